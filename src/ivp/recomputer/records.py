"""What the recomputer decides about one authenticated record, by type (no I/O, no
state change): BOOT (whitelist, ε, churn, history), CHECKPOINT (monotone counts, audit
rate, chain position, counter), AUDIT (numbering with gaps, chain link, pair order,
chain position), ALARM (a gateway's own alarms), HEARTBEAT (alive, not serving).

The per-type checks of :class:`~ivp.recomputer.ingest.Ingest` (a mixin: they read its
fleet state), and the values they return: :class:`Effect`, :class:`Outcome`,
:class:`Evidence`. Each check names the attack it blocks; a refusal is a
:class:`Refused` carrying the error and its alarms.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ivp.errors import ChainError, IvpError, ValidationError
from ivp.protocol.acks import Heartbeat, UplinkReceipt
from ivp.protocol.chain import link
from ivp.protocol.messages import (
    AuditRecord,
    BootRecord,
    Checkpoint,
    GatewayAlarm,
    Manifest,
    manifest_digest,
)
from ivp.recomputer.alarms import GATEWAY_PREFIX, Alarm
from ivp.recomputer.batch import audit_rate_pvalue
from ivp.recomputer.fleet import ABOVE_KEPT, Book, Boot, Device, Gateway, Rules

EffectKind = Literal["boot", "checkpoint", "audit", "alarm", "heartbeat", "duplicate"]


@dataclass(frozen=True)
class Effect:
    """What an admitted envelope changes; the store writes exactly these fields."""

    kind: EffectKind
    record: Any
    envelope: bytes  # canonical bytes of the envelope (payload kept as received)
    payload: bytes  # payload bytes as received (what the signature covers)
    received: float
    url: str = ""
    whitelisted: bool = True
    manifest_digest: str = ""


@dataclass(frozen=True)
class Evidence:
    """A refused record signed by the enrolled gateway it names: stored as evidence."""

    gateway_id: str
    boot_id: str | None
    kind: str
    n: int
    digest: str
    error: str
    envelope: bytes
    received: float


@dataclass(frozen=True)
class Outcome:
    """Result of :meth:`Ingest.decide`: an effect to record, or an error; alarms either
    way; the receipt's entry; and, for a refused authenticated record, its evidence."""

    effect: Effect | None
    error: IvpError | None
    alarms: tuple[Alarm, ...] = ()
    receipt: UplinkReceipt | None = None
    evidence: Evidence | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Authenticated:
    """An envelope signed by the enrolled gateway its record names (steps 1-4)."""

    device: Device
    record: Any
    kind: str
    envelope: bytes
    payload: bytes
    digest: str


_ENVELOPE_KEYS = frozenset({"payloadType", "payload", "signatures"})
_JUNK_ERROR = ValidationError("not a DSSE envelope ({payloadType, payload, signatures})")


class Refused(Exception):
    def __init__(self, error: IvpError, *alarms: Alarm, retry: bool = False) -> None:
        self.error, self.alarms, self.retry = error, alarms, retry


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def _number(record: Any) -> int:
    if isinstance(record, AuditRecord):
        return record.audit_seq
    if isinstance(record, Checkpoint):
        return record.pairs_served
    if isinstance(record, GatewayAlarm):
        return record.seq
    return 0




def _receipt(digest: str, status: Any, kind: Any = "other", boot_id: str | None = None,
             n: int = 0, error: IvpError | None = None) -> UplinkReceipt:
    text = "" if error is None else f"{type(error).__name__}: {error}"[:500]
    return UplinkReceipt(digest=digest, status=status, kind=kind, boot_id=boot_id, n=n,
                         error=text)


def _disagreement(boot: Boot, claims: list[tuple[int, str]]) -> str:
    """'' if every (position, head) agrees with the heads known for ``boot``, else why."""
    for pos, head in claims:
        known = boot.heads.get(pos)
        if known is not None and known != head:
            what = "genesis" if pos == 0 else f"the head at chain position {pos}"
            return (f"names {head[:16]}… as {what}, another signed record of this boot "
                    f"names {known[:16]}… (a fork)")
    return ""



class RecordChecks:
    """Step 5 of the checks (``ingest`` module docstring), per record type."""

    whitelist: Callable[[str], Manifest | None]
    rules: Rules
    gateways: dict[str, Gateway]
    boots: dict[tuple[str, str], Boot]
    epsilon: float | None
    model_epsilon: dict[str, float]

    def _admit_boot(self, b: BootRecord, auth: Authenticated, now: float) -> Outcome:
        old = self.boots.get((b.gateway_id, b.boot_id))
        if old is not None:
            if old.digest == _digest(auth.payload):  # a resend of the same BOOT
                return Outcome(Effect("duplicate", b, auth.envelope, auth.payload, now), None)
            err: IvpError = ChainError(f"boot id {b.boot_id!r} of gateway {b.gateway_id!r} "
                                       "reused with different content")
            raise Refused(err, Alarm("boot_conflict", b.gateway_id, b.boot_id, str(err), now))
        alarms: list[Alarm] = []
        manifest = self.whitelist(b.model_id)
        whitelisted = manifest is not None and manifest_digest(manifest) == b.manifest_digest
        if not whitelisted:
            why = "not in the whitelist" if manifest is None else "under another manifest"
            alarms.append(Alarm("boot_not_whitelisted", b.gateway_id, b.boot_id,
                                f"booted model {b.model_id!r} {why} (digest "
                                f"{b.manifest_digest[:16]}…); not routed", now))
        eps = self.model_epsilon.get(b.model_id, self.epsilon)
        if eps is not None and abs(eps - b.epsilon) > 1e-12:
            alarms.append(Alarm("epsilon_mismatch", b.gateway_id, b.boot_id,
                                f"BOOT declares ε={b.epsilon}, inspectors set ε={eps}", now))
        gw = self.gateways.get(b.gateway_id)
        recent = [t for t in (gw.boot_times if gw else []) if now - t <= self.rules.churn_window]
        if len(recent) + 1 > self.rules.churn_max:
            alarms.append(Alarm("boot_churn", b.gateway_id, b.boot_id,
                                f"{len(recent) + 1} boots within {self.rules.churn_window:g} s "
                                f"(at most {self.rules.churn_max})", now))
        alarms += self._history(b, gw, now)
        url = auth.device.url or b.url
        effect = Effect("boot", b, auth.envelope, auth.payload, now, url=url,
                        whitelisted=whitelisted, manifest_digest=b.manifest_digest)
        return Outcome(effect, None, tuple(alarms))

    def _history(self, b: BootRecord, gw: Gateway | None, now: float) -> list[Alarm]:
        """A BOOT against the gateway's history: the device counter must exceed every
        one stated before, and ``previous`` must be the last boot the recomputer holds,
        closed no earlier than its last checkpoint.

        Blocks the operator who restores an old copy of the gateway's log, deletes it,
        or restores the whole device state to erase records the recomputer never got
        (alarm ``rollback``), and a boot whose BOOT record was withheld
        (``unknown_boot``).
        """
        def alarm(kind: str, text: str) -> Alarm:
            return Alarm(kind, b.gateway_id, b.boot_id, text, now)

        out = []
        if gw is not None and gw.counter:
            if not b.counter:
                out.append(alarm("rollback", f"BOOT states no device counter; this gateway's "
                                 f"records stated {gw.counter} before (a downgraded device)"))
            elif b.counter <= gw.counter:
                out.append(alarm("rollback", f"BOOT states device counter {b.counter}; this "
                                 f"gateway's records stated {gw.counter} before: its device "
                                 "state was set back"))
        last = self.boots.get((b.gateway_id, gw.boot_id)) if gw and gw.boot_id else None
        prev = b.previous
        if last is None:
            if prev is not None:
                out.append(alarm("unknown_boot", f"BOOT names previous boot {prev.boot_id!r}, "
                                 "of which the recomputer holds no BOOT record"))
            return out
        if prev is None:
            if b.counter or (gw is not None and gw.counter):  # a gateway with a counter
                out.append(alarm("rollback", f"BOOT names no previous boot; the recomputer "
                                 f"holds boot {last.record.boot_id!r} of this gateway: its "
                                 "log was deleted or replaced"))
            return out
        if prev.boot_id != last.record.boot_id:
            if (b.gateway_id, prev.boot_id) in self.boots:
                out.append(alarm("rollback", f"BOOT names boot {prev.boot_id!r} as the previous "
                                 f"one; the recomputer holds a later boot "
                                 f"{last.record.boot_id!r}: the gateway's log was set back"))
            else:
                out.append(alarm("unknown_boot", f"BOOT names previous boot {prev.boot_id!r}, "
                                 "of which the recomputer holds no BOOT record (withheld)"))
            return out
        cp = last.checkpoint
        if cp is not None and (prev.pairs_served < cp.pairs_served or prev.audits < cp.audits):
            out.append(alarm("rollback", f"BOOT says boot {prev.boot_id!r} closed at "
                             f"{prev.pairs_served} pairs and {prev.audits} audit records; its "
                             f"checkpoint had counted {cp.pairs_served} and {cp.audits}: the "
                             "gateway's log was set back"))
        fork = _disagreement(last, [(prev.pairs_served, prev.chain_head)])
        if fork:
            out.append(alarm("chain_fork", f"closing state of boot {prev.boot_id!r}: {fork}"))
        return out

    def _counter(self, gateway_id: str, counter: int, what: str, now: float,
                 boot_id: str | None = None) -> list[Alarm]:
        """A checkpoint or heartbeat states a counter below one stated before."""
        gw = self.gateways.get(gateway_id)
        if gw is None or not gw.counter or counter >= gw.counter:
            return []
        return [Alarm("rollback", gateway_id, boot_id,
                      f"{what} states device counter {counter}; this gateway's records stated "
                      f"{gw.counter} before: its device state was set back", now)]

    def _boot_of(self, gateway_id: str, boot_id: str, now: float) -> Boot:
        boot = self.boots.get((gateway_id, boot_id))
        if boot is None:  # its BOOT may still be on the way: not kept, sent again
            err = ChainError(f"gateway {gateway_id!r} sent a record for boot {boot_id!r} "
                             "without a BOOT record")
            raise Refused(err, Alarm("unknown_boot", gateway_id, boot_id, str(err), now),
                           retry=True)
        return boot

    def _admit_checkpoint(self, c: Checkpoint, auth: Authenticated, now: float) -> Outcome:
        boot = self._boot_of(c.gateway_id, c.boot_id, now)
        last = boot.checkpoint
        if last is not None:
            if last == c:
                return Outcome(Effect("duplicate", c, auth.envelope, auth.payload, now), None)
            if c.pairs_served < last.pairs_served or c.audits < last.audits:
                err: IvpError = ChainError(
                    f"checkpoint counts went back: pairs {last.pairs_served}->{c.pairs_served},"
                    f" audits {last.audits}->{c.audits}")
                raise Refused(err, Alarm("checkpoint_regress", c.gateway_id, c.boot_id,
                                          str(err), now))
        if c.audits > c.pairs_served:
            err = ValidationError(f"checkpoint claims {c.audits} audits of "
                                  f"{c.pairs_served} pairs")
            raise Refused(err, Alarm("malformed", c.gateway_id, c.boot_id, str(err), now))
        fork = _disagreement(boot, [(c.pairs_served, c.chain_head)])
        if fork:
            err = ChainError(f"checkpoint at {c.pairs_served} pairs: {fork}")
            raise Refused(err, Alarm("chain_fork", c.gateway_id, c.boot_id, str(err), now))
        ahead = sorted((seq, pos) for seq, pos in boot.uncounted.items()
                       if seq <= c.audits and pos > c.pairs_served)
        if ahead:
            seq, pos = ahead[0]
            err = ChainError(f"checkpoint counts {c.pairs_served} pairs and {c.audits} audit "
                             f"records, but audit record {seq} holds the pair at chain "
                             f"position {pos}")
            raise Refused(err, Alarm("chain_ahead", c.gateway_id, c.boot_id, str(err), now))
        alarms = self._counter(c.gateway_id, c.counter, "checkpoint", now, c.boot_id)
        # only pairs already drawn for: at ε = 1 a draw still pending is not a "no"
        drawn, eps = c.drawn, boot.record.epsilon
        p = audit_rate_pvalue(c.audits, drawn, eps)
        if drawn >= self.rules.binom_min_pairs and p < self.rules.binom_alpha:
            alarms.append(Alarm(
                "audit_rate", c.gateway_id, c.boot_id,
                f"{c.audits} audits of {drawn} pairs drawn for is implausible for ε={eps} "
                f"(binomial p={p:.2e} < {self.rules.binom_alpha:g})", now))
        return Outcome(Effect("checkpoint", c, auth.envelope, auth.payload, now), None,
                       tuple(alarms))

    def _admit_audit(self, r: AuditRecord, auth: Authenticated, now: float) -> Outcome:
        boot = self._boot_of(r.gateway_id, r.boot_id, now)
        book = boot.sequence
        if book.has(r.audit_seq):
            err: IvpError = ChainError(f"audit record {r.audit_seq} replayed (already stored; "
                                       f"next expected {book.next_seq})")
            raise Refused(err, Alarm("replay", r.gateway_id, r.boot_id, str(err), now))
        alarms: list[Alarm] = []
        if r.audit_seq > book.highest + 1:
            if len(book.above) >= ABOVE_KEPT:
                err = ChainError(f"audit record {r.audit_seq}: {ABOVE_KEPT} records already "
                                 f"wait past the gap at {book.next_seq}")
                raise Refused(err, Alarm("sequence_gap", r.gateway_id, r.boot_id, str(err),
                                          now))
            missing = r.audit_seq - book.highest - 1
            alarms.append(Alarm("sequence_gap", r.gateway_id, r.boot_id,
                                f"audit sequence gap: got {r.audit_seq}, expected "
                                f"{book.highest + 1} ({missing} record(s) missing); stored, "
                                "the gap stays open until they arrive", now))
        if link(r.chain_prev, r.pair) != r.chain_head:
            err = ChainError(f"audit record {r.audit_seq}: chain_head is not "
                             "link(chain_prev, pair)")
            raise Refused(err, Alarm("chain_link", r.gateway_id, r.boot_id, str(err), now))
        below, above = book.neighbours(r.audit_seq)
        if r.pair.tag.seq <= below or (above is not None and r.pair.tag.seq >= above):
            err = ChainError(
                f"audit record {r.audit_seq} holds pair {r.pair.tag.seq}, not after pair "
                f"{below} of the record before" if r.pair.tag.seq <= below else
                f"audit record {r.audit_seq} holds pair {r.pair.tag.seq}, not before pair "
                f"{above} of the record after")
            raise Refused(err, Alarm("pair_order", r.gateway_id, r.boot_id, str(err), now))
        if r.chain_pos:  # 0: a record that states no position (older gateway builds)
            self._check_position(boot, r, now)
        return Outcome(Effect("audit", r, auth.envelope, auth.payload, now,
                              manifest_digest=boot.record.manifest_digest), None, tuple(alarms))

    def _check_position(self, boot: Boot, r: AuditRecord, now: float) -> None:
        """Agreement and coverage of an audit record's chain position (module docstring).

        Blocks a gateway key signing two histories of one boot (a fork: e.g. audit
        records cut from a doctored chain), and records that claim pairs beyond what
        the gateway's own checkpoint said was served.
        """
        fork = _disagreement(boot, [(r.chain_pos - 1, r.chain_prev), (r.chain_pos, r.chain_head)])
        if fork:
            err = ChainError(f"audit record {r.audit_seq} at chain position {r.chain_pos}: "
                             f"{fork}")
            raise Refused(err, Alarm("chain_fork", r.gateway_id, r.boot_id, str(err), now))
        cp = boot.checkpoint
        if cp is not None and r.audit_seq <= cp.audits and r.chain_pos > cp.pairs_served:
            err = ChainError(f"audit record {r.audit_seq} holds the pair at chain position "
                             f"{r.chain_pos}, but the checkpoint counting it counts "
                             f"{cp.pairs_served} pairs")
            raise Refused(err, Alarm("chain_ahead", r.gateway_id, r.boot_id, str(err), now))

    def _admit_alarm(self, a: GatewayAlarm, auth: Authenticated, now: float) -> Outcome:
        """A gateway's own alarm: stored as alarm ``gateway:<kind>``.

        Numbered per gateway: an alarm already stored is refused as a replay (blocks
        inflating one alarm into many); one past a gap is stored with a
        ``gateway_alarm_gap`` alarm (blocks withholding a gateway's alarm unseen).
        """
        gw = self.gateways.get(a.gateway_id)
        book = gw.alarms if gw is not None else Book()
        if book.has(a.seq):
            err: IvpError = ChainError(f"gateway alarm {a.seq} replayed (already stored; next "
                                       f"expected {book.next_seq})")
            raise Refused(err, Alarm("replay", a.gateway_id, a.boot_id, str(err), now))
        alarms = []
        if a.seq > book.highest + 1:
            alarms.append(Alarm("gateway_alarm_gap", a.gateway_id, None,
                                f"gateway alarm {a.seq} arrived, {book.highest + 1} expected: "
                                f"{a.seq - book.highest - 1} alarm(s) withheld", now))
        alarms.append(Alarm(GATEWAY_PREFIX + a.kind, a.gateway_id, a.boot_id,
                            f"{a.message} (gateway alarm {a.seq})", now))
        return Outcome(Effect("alarm", a, auth.envelope, auth.payload, now), None, tuple(alarms))

    def _admit_heartbeat(self, h: Heartbeat, auth: Authenticated, now: float) -> Outcome:
        """A gateway alive but not serving (a shut-down one keeps sending these).

        One that says it shut *itself* down (its log was set back: ``gateway_locked``)
        while the recomputer has not shut it down is alarmed, so the recomputer's own
        Shutdown (and then the inspectors' Readmit) can follow.
        """
        alarms = self._counter(h.gateway_id, h.counter, "heartbeat", now)
        gw = self.gateways.get(h.gateway_id)
        if h.locked and (gw is None or gw.state != "shutdown") and \
                h.time > ((gw.readmitted_at or 0.0) if gw else 0.0):
            alarms.append(Alarm("gateway_locked", h.gateway_id, None,
                                f"the gateway shut itself down: {h.reason}"[:1000], now))
        return Outcome(Effect("heartbeat", h, auth.envelope, auth.payload, now), None,
                       tuple(alarms))

