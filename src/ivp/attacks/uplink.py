"""The operator on the wire between gateways and recomputer (``ivp.attacks.tap``).

Audit records, BOOT records and checkpoints are signed by the gateway's device key
and numbered without gaps per boot; checkpoints (pairs served, chain head, audits
made) arrive on a fixed period. So the operator, who owns the network, can drop,
replay or alter them, but the recomputer notices: a bad signature (``forged``), an
unenrolled key (``unenrolled``), a number already stored (``replay``), a gap
(``sequence_gap``), a checkpoint claiming audits that never came
(``audit_withheld``), or silence (``checkpoint_missing``).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import msgspec

from ivp.attacks.base import Context, Evidence, Result, Scenario, Victim, require
from ivp.attacks.tap import Seen, post_uplink
from ivp.protocol.encoding import canonical, decode
from ivp.protocol.envelope import AUDIT, sign
from ivp.protocol.keys import SigningKey
from ivp.protocol.messages import AuditRecord

SIGNATURE = ("device signatures: every uplinked record must carry a valid signature by "
             "the enrolled key of the gateway it names (bytes checked as received)")
SEQUENCE = ("gap-free audit numbering per (gateway, boot): a number already stored is "
            "a replay")
WITHHELD = ("audit numbering + checkpoints: the next record shows the gap "
            "(sequence_gap), the first checkpoint that counts the missing record starts "
            "audit_withheld's grace; the gateway keeps the record (the forged Ack is "
            "unsigned)")
SILENCE = ("periodic signed checkpoints: a serving gateway silent for 3 periods raises "
           "checkpoint_missing; the store-and-forward spool delivers everything later")


def genuine_audit(ctx: Context, index: int, result: Result) -> Seen | None:
    """An audit record of gateway ``index`` that crossed its tap and was accepted
    (serves client traffic until one comes by)."""
    tap = ctx.tap(index)
    gid = ctx.dc.handles[index].gateway_id

    def probe() -> Evidence | None:
        got = tap.captured("audit", gid)
        return Evidence(time.time(), "tap", "captured") if got else None

    if ctx.drive(probe, cap=ctx.cap) is None:
        result.error = f"no audit record of {gid} came by within {ctx.cap} requests"
        return None
    return tap.captured("audit", gid)[-1]


def _altered(record: AuditRecord) -> AuditRecord:
    """The same record with the first output token changed (a cheat's output made to
    look like another one)."""
    tokens = list(record.pair.output_token_ids)
    tokens[0] ^= 1
    pair = msgspec.structs.replace(record.pair, output_token_ids=tokens)
    return msgspec.structs.replace(record, pair=pair)


def _uplink(ctx: Context, envelopes: list[dict[str, Any]], result: Result
            ) -> list[dict[str, Any]]:
    """POST envelopes as the operator; one result per envelope (a non-200 answer
    counts as no refusal of any: it names no failed check)."""
    status, raw = post_uplink(ctx.dc.recomputer_url,
                              json.dumps({"envelopes": envelopes}).encode())
    if status != 200:
        result.details["uplink_answer"] = f"HTTP {status}: {raw[:200]!r}"
        return [{"ok": False, "error": f"HTTP {status}"} for _ in envelopes]
    return list(json.loads(raw)["results"])


def _refused(source: str, result: dict[str, Any], error_type: str) -> Evidence | None:
    if not result.get("ok") and str(result.get("error", "")).startswith(error_type):
        return Evidence(time.time(), source, f"refused: {result['error'][:200]}")
    return None


def forged(ctx: Context, result: Result) -> None:
    """Alter a genuine audit record; send it with the gateway's signature kept, and
    re-signed with a key of the operator's own."""
    index = ctx.honest
    gid = ctx.dc.handles[index].gateway_id
    seen = genuine_audit(ctx, index, result)
    if seen is None:
        return
    envelope = seen.envelope
    record = decode(base64.b64decode(envelope["payload"]), AuditRecord)
    fake = canonical(_altered(record))
    kept_sig = {**envelope, "payload": base64.b64encode(fake).decode()}
    resigned = msgspec.to_builtins(sign(AUDIT, fake, [SigningKey.generate()]))
    t0 = time.time()
    result.started = t0
    answers = _uplink(ctx, [kept_sig, resigned], result)
    require(result, "the altered record is refused (SignatureError)",
            _refused("POST /uplink", answers[0], "SignatureError"))
    # alarms anyone can cause are folded and written at most once a second: wait for it
    require(result, "a forged alarm", ctx.wait_for(lambda: ctx.alarm(["forged"], t0, gid), 5))
    require(result, "the re-signed record is refused (SignatureError)",
            _refused("POST /uplink", answers[1], "SignatureError"))
    require(result, "an unenrolled alarm",
            ctx.wait_for(lambda: ctx.alarm(["unenrolled"], t0, gid), 5))
    result.details["audit_seq"] = record.audit_seq


def replayed(ctx: Context, result: Result) -> None:
    """Send a genuine, already accepted audit record again."""
    index = ctx.honest
    gid = ctx.dc.handles[index].gateway_id
    seen = genuine_audit(ctx, index, result)
    if seen is None:
        return
    t0 = time.time()
    result.started = t0
    answers = _uplink(ctx, [seen.envelope], result)
    require(result, "the replayed record is refused (ChainError)",
            _refused("POST /uplink", answers[0], "ChainError"))
    require(result, "a replay alarm", ctx.wait_for(lambda: ctx.alarm(["replay"], t0, gid), 5))
    result.details["audit_seq"] = seen.payload.get("audit_seq")


def withheld(ctx: Context, result: Result) -> None:
    """Drop the victim's next audit record on the wire, telling the gateway it arrived."""
    assert ctx.victim is not None
    tap, victim = ctx.tap(ctx.victim), ctx.victim_id
    dropped: list[int] = []

    def rule(kind: str, payload: dict[str, Any]) -> str:
        if kind == "audit" and payload.get("gateway_id") == victim:
            seq = int(payload.get("audit_seq", 0))
            if not dropped:
                dropped.append(seq)
            if seq == dropped[0]:  # every time it comes: the gateway keeps resending it
                return "drop"
        return "pass"

    t0 = time.time()
    result.started = t0
    tap.set_rule(rule)  # type: ignore[arg-type]
    found = require(result, f"sequence_gap or audit_withheld for {victim}",
                    ctx.drive(lambda: ctx.alarm(["sequence_gap", "audit_withheld"], t0,
                                                victim), pace=0.2, result=result))
    tap.pass_all()
    result.details["dropped_audit_seq"] = dropped[:1]
    refused = [s.payload.get("audit_seq") for s in tap.captured("audit", victim, acked=False)]
    result.details["audit_seqs_refused_after"] = refused
    if found is not None:
        result.detected_at = found.time


def silenced(ctx: Context, result: Result) -> None:
    """Cut the victim's uplink while it keeps serving; then reconnect it."""
    assert ctx.victim is not None
    tap, victim = ctx.tap(ctx.victim), ctx.victim_id
    t0 = time.time()
    result.started = t0
    tap.block()
    found = require(result, f"checkpoint_missing for {victim}",
                    ctx.drive(lambda: ctx.alarm(["checkpoint_missing"], t0, victim),
                              pace=0.5, batch=2, result=result))
    if found is not None:
        result.detected_at = found.time
        answers = ctx.dc.send(4, concurrency=2, max_tokens=8)  # still routed to it?
        result.details["served_after_alarm"] = sum(
            1 for a in answers if a["status"] == 200
            and (a["body"].get("ivp") or {}).get("tag", {}).get("gateway_id") == victim)
    tap.pass_all()
    status = ctx.gateway_status(ctx.victim)
    result.details["spool_depth_when_reconnected"] = status.get("spool_depth")
    period = ctx.dc.checkpoint_interval

    def caught_up() -> Evidence | None:
        """The recomputer holds every audit the gateway's latest checkpoint claims."""
        view = ctx.dc.recomputer_status()["gateways"].get(victim, {})
        result.details["audits_received_after"] = view.get("audits_received")
        result.details["audits_claimed_after"] = view.get("audits_claimed")
        if view.get("audits_claimed") is not None and \
                view.get("audits_received") == view.get("audits_claimed"):
            return Evidence(time.time(), "recomputer /status", "spool delivered")
        return None

    # store-and-forward: everything held back arrives once the wire is back
    result.details["nothing_lost"] = ctx.wait_for(caught_up, 5 * period + 10) is not None


SCENARIOS = (
    Scenario(
        "forged-audit", "protocol",
        "The operator alters a genuine audit record on the wire (e.g. to replace a "
        "cheating output by an honest-looking one), keeping the gateway's signature, "
        "or re-signing it with a key of its own.",
        SIGNATURE, forged),
    Scenario(
        "replayed-audit", "protocol",
        "The operator sends a genuine, already accepted audit record again (to pad the "
        "audit stream with known-good records).",
        SEQUENCE, replayed),
    Scenario(
        "withheld-audit", "protocol",
        "The operator drops an audit record on the wire (e.g. the one that would show a "
        "cheat), every time the gateway sends it, and tells the gateway it was delivered.",
        WITHHELD, withheld, needs="gateway", victim=Victim(tapped=True)),
    Scenario(
        "silenced-gateway", "protocol",
        "The operator cuts a gateway's uplink: no audit records, no checkpoints reach "
        "the recomputer while the gateway keeps serving.",
        SILENCE, silenced, needs="gateway", victim=Victim(tapped=True)),
)

__all__ = ["SCENARIOS", "genuine_audit"]
