"""What each console page shows, computed from values: no I/O, no clock (``now`` is given).

The pages (``app``) fetch the recomputer's status, the read-only store rows and the
gateways' own ``/status`` answers, then call these functions and render the result.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ivp.errors import IvpError
from ivp.protocol import envelope as env
from ivp.protocol.chain import link
from ivp.protocol.encoding import decode, to_builtins
from ivp.protocol.keys import VerifyKey
from ivp.protocol.messages import AdminRequest, AuditRecord
from ivp.recomputer.admin import AdminLogEntry, verify_log
from ivp.recomputer.console.reader import AuditRow, BootRow

# Problem rows first: the worse the state, the higher the row.
SEVERITY = {"bricked": 0, "shutdown": 1, "silent": 2, "upload": 3, "serving": 4}
BIG = 1e299  # verdict figures at or above this stand for "no δ explains it" (1e300)


# --- fleet ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Live:
    """A gateway's own ``GET /status`` as the console last read it."""

    body: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # why it could not be read ('' = read)
    bricked: bool = False  # it answered BrickedError (tamper = brick)
    time: float = 0.0


def fleet_state(rc: Mapping[str, Any], live: Live | None, now: float,
                silent_after: float) -> tuple[str, str]:
    """(state, why) of one gateway: serving / upload / shutdown / bricked / silent.

    The recomputer's view (``rc``: its ``/status`` entry for the gateway) decides
    shutdown and silence by checkpoints; the gateway's own answer adds what only it
    knows (bricked, in UPLOAD after a power kill, unreachable).
    """
    said = (live.body.get("state") if live else None) or ""
    if live is not None and (live.bricked or said == "bricked"):
        return "bricked", "the gateway answers BrickedError (its tamper mesh fired)"
    if rc.get("state") == "shutdown" or said == "shutdown":
        return "shutdown", str(rc.get("reason") or (live.body.get("reason") if live else "")
                               or "")
    if live is not None and live.error:
        return "silent", f"gateway unreachable: {live.error}"
    last = rc.get("last_checkpoint")
    if rc.get("state") == "serving" and last and now - float(last) > silent_after:
        return "silent", f"no checkpoint for {now - float(last):.0f} s"
    if said in ("upload", "power_kill") or rc.get("state") in ("enrolled", "readmitted"):
        why = "awaiting a fresh upload" if said != "power_kill" else "server power-killed"
        return "upload", why
    return "serving", ""


def fleet_rows(status: Mapping[str, Any], live: Mapping[str, Live], boots: Sequence[BootRow],
               open_by_gateway: Mapping[str, int], now: float,
               silent_after: float) -> list[dict[str, Any]]:
    """One row per enrolled gateway, problem rows first (then by id)."""
    boot_time = {(b.gateway_id, b.boot_id): b.time for b in boots}
    rows = []
    for gid, rc in status.get("gateways", {}).items():
        lv = live.get(gid)
        state, why = fleet_state(rc, lv, now, silent_after)
        verdicts = rc.get("verdicts", {})
        body = lv.body if lv else {}
        row = {
            "gateway_id": gid, "state": state, "why": why, "model_id": rc.get("model_id"),
            "boot_id": rc.get("boot_id"),
            "boot_time": boot_time.get((gid, rc.get("boot_id"))),
            "pairs_served": rc.get("pairs_served"), "live_pairs": body.get("pairs_served"),
            "audits_received": rc.get("audits_received", 0),
            "passed": verdicts.get("passed", 0), "failed": verdicts.get("failed", 0),
            "last_checkpoint": rc.get("last_checkpoint"),
            "spool_depth": body.get("spool_depth"),
            "epsilon": rc.get("epsilon") if rc.get("epsilon") is not None
            else body.get("epsilon"),
            "open_alarms": open_by_gateway.get(gid, 0),
            "health": rc.get("health", "ok"), "url": rc.get("url", ""),
        }
        row["problem"] = (state != "serving" or row["failed"] > 0 or row["open_alarms"] > 0)
        rows.append(row)
    rows.sort(key=lambda r: (not r["problem"], SEVERITY[r["state"]], r["gateway_id"]))
    return rows


def sensor_rows(enrolled: Mapping[str, Mapping[str, Any]],
                latest: Mapping[str, tuple[str, float, int]], now: float,
                heartbeat: float) -> list[dict[str, Any]]:
    """Each enrolled sensor: its newest reading (summarised), when it came, whether the
    sensor is overdue (``sensor_silent`` territory)."""
    rows = []
    for sid in sorted(enrolled):
        event = latest.get(sid)
        reading, received, count = "never heard", None, 0
        if event is not None:
            raw, received, count = event
            reading = _reading_summary(raw)
        age = None if received is None else now - received
        silent = heartbeat > 0 and (age is None or age > heartbeat)
        rows.append({"sensor_id": sid, "reading": reading, "received": received,
                     "readings": count, "silent": silent})
    return rows


def _reading_summary(raw: str) -> str:
    from ivp.recomputer.sensors import SensorReading

    try:
        payload = env.Envelope.from_bytes(raw.encode()).payload_bytes()
        reading = to_builtins(decode(payload, SensorReading))  # type: ignore[arg-type]
    except IvpError as exc:
        return f"(unreadable: {exc})"
    kind = reading.pop("kind", "?")
    for k in ("v", "sensor_id", "seq", "time"):
        reading.pop(k, None)
    fields = ", ".join(f"{k}={v}" for k, v in sorted(reading.items()))
    return f"{kind}: {fields}" if fields else str(kind)


# --- audit explorer ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Token:
    position: int
    token_id: int
    text: str
    delta_star: float | None  # δ*_t (None: not replayed)
    failed: bool
    shade: float  # 0..1: δ*_t relative to δ (1 = at δ or beyond)
    raw: bool = False  # ``text`` is the vocabulary piece (the token adds no whole character)


def token_texts(decode_ids: Callable[[list[int]], str], ids: Sequence[int],
                piece: Callable[[int], str] | None = None, window: int = 6
                ) -> list[tuple[str, bool]]:
    """(text, raw) per token: the text it adds, decoded with a few tokens of left context
    so that word-piece spaces come out as a reader sees them; where that is nothing or
    a broken character (one byte of a multi-byte one), the token's own vocabulary
    piece instead (``raw``), so that every position stays visible."""
    out = []
    for i in range(len(ids)):
        lo = max(0, i - window)
        before = decode_ids(list(ids[lo:i]))
        upto = decode_ids(list(ids[lo:i + 1]))
        text = upto[len(before):] if upto.startswith(before) else decode_ids([ids[i]])
        if piece is not None and (not text or "\ufffd" in text):
            out.append((piece(ids[i]), True))
        else:
            out.append((text, False))
    return out


def shade(delta_star: float | None, delta: float) -> float:
    if delta_star is None or delta_star <= 0:
        return 0.0
    if delta <= 0:
        return 1.0
    return min(1.0, delta_star / delta)


def audit_detail(row: AuditRow, enrolled_key: str | None,
                 decode_ids: Callable[[list[int]], str] | None,
                 whitelist_delta: float | None,
                 piece: Callable[[int], str] | None = None) -> dict[str, Any]:
    """Everything the explorer shows of one audit record.

    The signature is checked again here, over the envelope as stored, against the key
    enrolled for the gateway now (a rotated key shows as such), and the chain link is
    recomputed from the pair: the console shows what it checked, not what it was told.
    """
    record = decode(row.payload, AuditRecord)
    pair = record.pair
    verdict = row.verdict or {}
    delta = float(verdict["delta"]) if "delta" in verdict else (whitelist_delta or 0.0)
    figures: list[float] = list(verdict.get("position_delta") or [])
    failed = set(verdict.get("failed_positions") or [])
    texts = (token_texts(decode_ids, pair.output_token_ids, piece) if decode_ids
             else [(f"#{t}", True) for t in pair.output_token_ids])
    tokens = []
    for t, (tid, (text, raw)) in enumerate(zip(pair.output_token_ids, texts, strict=True)):
        ds = figures[t] if t < len(figures) else None
        tokens.append(Token(t, tid, text, ds, t in failed, shade(ds, delta), raw))
    head = link(record.chain_prev, pair)
    return {
        "row": row, "record": record, "pair": pair, "verdict": verdict, "delta": delta,
        "tokens": tokens, "failed_positions": sorted(failed),
        "prompt_text": decode_ids(list(pair.prompt_token_ids)) if decode_ids else None,
        "signature": signature_status(row.envelope, row.payload, enrolled_key),
        "chain": {"ok": head == record.chain_head, "computed": head,
                  "claimed": record.chain_head, "prev": record.chain_prev,
                  "position": record.chain_pos},
    }


def signature_status(envelope: bytes, payload: bytes, enrolled_key: str | None
                     ) -> dict[str, Any]:
    """Whether the stored envelope carries a valid signature by the enrolled key over
    exactly the stored payload."""
    try:
        e = env.Envelope.from_bytes(envelope)
        keyids = [s.keyid for s in e.signatures]
        if e.payloadType != env.AUDIT or e.payload_bytes() != payload:
            return {"ok": False, "text": "envelope does not hold this record", "keyids": keyids}
        if enrolled_key is None:
            return {"ok": False, "text": "gateway no longer enrolled", "keyids": keyids}
        key = VerifyKey.from_hex(enrolled_key)
        if env.valid_signers(e, {key.keyid: key}):
            return {"ok": True, "text": f"valid, by enrolled key {key.keyid}", "keyids": keyids}
        return {"ok": False, "keyids": keyids,
                "text": f"no valid signature by the enrolled key {key.keyid} (rotated since?)"}
    except IvpError as exc:
        return {"ok": False, "text": f"unreadable envelope: {exc}", "keyids": []}


# --- verification health ----------------------------------------------------------------------
def audit_rate_band(pairs: int, epsilon: float, alpha: float, min_pairs: int) -> tuple[int, int]:
    """The audit counts k in [lo, hi] that the implausible-rate alarm accepts for
    ``pairs`` at ε: the same two-sided binomial test (``ingest.audit_rate_pvalue``),
    whose p-value falls monotonically on each side of the mode."""
    from ivp.recomputer.ingest import audit_rate_pvalue

    if pairs < min_pairs or pairs <= 0:
        return 0, pairs
    mode = min(pairs, max(0, round(epsilon * pairs)))

    def edge(lo: int, hi: int, inside_low: bool) -> int:
        # binary search for the last accepted k walking away from the mode
        while lo < hi:
            mid = (lo + hi) // 2 if inside_low else (lo + hi + 1) // 2
            ok = audit_rate_pvalue(mid, pairs, epsilon) >= alpha
            if inside_low:
                lo, hi = (lo, mid) if ok else (mid + 1, hi)
            else:
                lo, hi = (mid, hi) if ok else (lo, mid - 1)
        return lo

    return edge(0, mode, True), edge(mode, pairs, False)


def health(passed: Sequence[Mapping[str, Any]], boots: Sequence[BootRow],
           deltas: Mapping[str, float], alpha: float, min_pairs: int
           ) -> list[dict[str, Any]]:
    """Per model: max δ* of each passed audit relative to δ, and each boot's audit
    count against the binomial band of the implausible-rate alarm."""
    from ivp.recomputer.ingest import audit_rate_pvalue

    models = sorted({str(v["model_id"]) for v in passed} | {b.model_id for b in boots})
    out = []
    for model in models:
        mine = [v for v in passed if v["model_id"] == model]
        judged_at = Counter(float(v.get("delta", 0.0)) for v in mine if v.get("position_delta"))
        delta = deltas.get(model, judged_at.most_common(1)[0][0] if judged_at else 0.0)
        maxima = [max(v["position_delta"]) for v in mine if v.get("position_delta")]
        # an audit reproduced exactly sits at 0 whatever δ is (also δ = 0: exact serving)
        ratios = [0.0 if m == 0 else m / delta for m in maxima
                  if m == 0 or (delta > 0 and m < BIG)]
        points = []
        for b in boots:
            if b.model_id != model or b.pairs_served is None:
                continue
            # the alarm's own figures: audits and pairs as one signed checkpoint counts them
            # (records sent after that checkpoint are received but not yet counted)
            claimed = min(b.audits_claimed or 0, b.pairs_served)
            p = audit_rate_pvalue(claimed, b.pairs_served, b.epsilon)
            lo, hi = audit_rate_band(b.pairs_served, b.epsilon, alpha, min_pairs)
            points.append({"gateway_id": b.gateway_id, "boot_id": b.boot_id,
                           "pairs": b.pairs_served, "audits": claimed,
                           "received": b.audits_received,
                           "expected": b.epsilon * b.pairs_served, "epsilon": b.epsilon,
                           "band": (lo, hi), "p": p,
                           "plausible": b.pairs_served < min_pairs or p >= alpha})
        out.append({"model_id": model, "delta": delta, "passed": len(mine),
                    "with_figures": len(maxima), "ratios": ratios,
                    "largest": max(ratios) if ratios else None,
                    "median": sorted(ratios)[len(ratios) // 2] if ratios else None,
                    "exact_zero": sum(1 for m in maxima if m == 0.0),
                    "boots": points})
    return out


# --- admin log --------------------------------------------------------------------------------
def admin_rows(log: Sequence[tuple[int, bytes, str, bytes]],
               relays: Mapping[int, Sequence[tuple[str, str, str]]],
               inspectors: Mapping[str, tuple[str, str]]) -> tuple[list[dict[str, Any]], str]:
    """Each admin request (newest first): instruction and its arguments, who signed for
    which party, outcome and relays; and the log chain's status."""
    try:
        chain = f"hash chain intact: {len(log)} entries, head {verify_log([r[:3] for r in log])}"
    except IvpError as exc:
        chain = f"HASH CHAIN BROKEN: {exc}"
    rows = []
    for seq, raw, _digest, envelope in reversed(log):
        entry = decode(raw, AdminLogEntry)
        rows.append({
            "seq": seq, "time": entry.time, "accepted": entry.accepted,
            "instruction": entry.instruction or "-", "reason": entry.reason,
            "args": _request_args(envelope),
            "signed": [_signer(k, inspectors) for k in _signature_keyids(envelope)],
            "counted": [_signer(k, inspectors) for k in entry.signers],
            "parties": entry.parties, "nonce": entry.nonce,
            "relays": list(relays.get(seq, [])),
        })
    return rows, chain


def _signer(keyid: str, inspectors: Mapping[str, tuple[str, str]]) -> dict[str, str]:
    name, party = inspectors.get(keyid, ("", ""))
    return {"keyid": keyid, "name": name or "unknown key", "party": party or "?"}


def _signature_keyids(envelope: bytes) -> list[str]:
    try:
        return [s.keyid for s in env.Envelope.from_bytes(envelope).signatures]
    except IvpError:
        return []


def _request_args(envelope: bytes, limit: int = 240) -> str:
    """The request's arguments in one line (a whitelist is summarised)."""
    if not envelope:
        return "(request not kept: refused and too large)"
    try:
        request = decode(env.Envelope.from_bytes(envelope).payload_bytes(), AdminRequest)
    except IvpError as exc:
        return f"(not a readable request: {exc})"[:limit]
    args = dict(request.args)
    wl = args.get("whitelist")
    if isinstance(wl, dict):
        args["whitelist"] = "<signed whitelist envelope>"
    text = json.dumps(args, sort_keys=True, separators=(", ", ": "))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) or x >= BIG else x


__all__ = ["Live", "admin_rows", "audit_detail", "fleet_rows", "fleet_state", "health",
           "sensor_rows", "token_texts"]
