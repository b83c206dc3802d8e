"""Audit ingestion: a pure state machine over uplinked envelopes (no I/O, no clock).

:class:`Ingest` holds the recomputer's trusted view of the fleet — enrolled device
keys, every gateway's boots, each boot's audit sequence and latest checkpoint — and
decides about one uplinked envelope at a time in two steps:

* :meth:`Ingest.admit` checks an envelope and returns an :class:`Outcome` (never
  raises): either an :class:`Effect` to record, or the error that refused it; plus
  the alarms to raise either way. It does not change any state.
* :meth:`Ingest.apply` advances the state with an admitted effect. The service calls
  it for every admitted envelope of a batch, writes the effects in one durable
  transaction, and only then acknowledges (if that write fails it rebuilds the core
  from the store, so memory never runs ahead of disk).

Order of checks for every envelope (each names the attack it blocks):

1. decode the envelope (malformed input never reaches the trust logic);
2. find an enrolled *gateway* key among the signers (blocks records from devices the
   inspectors never enrolled: a rogue gateway, or the operator signing with a key of
   its own);
3. verify the signature over the payload bytes as received (blocks records altered
   in transit or by the operator who holds the gateway's disk and network);
4. decode the payload only now, and require ``gateway_id`` to be the signer's
   (blocks one enrolled gateway speaking for another);
5. per type: BOOT (whitelist, ε, churn), CHECKPOINT (known boot, monotone counts,
   audit rate, chain position), AUDIT (known boot, gap-free sequence, chain link,
   pair order, chain position), ALARM (the gateway's own alarms: gap-free numbering
   per gateway; stored as alarms of kind ``gateway:<kind>``).

**Chain positions** (docs/ARCHITECTURE.md, "Checkpoints and audit records"): a pair's
position p in its boot's chain counts the pairs committed before it, plus one; the
chain head after p pairs is ``head_p`` (``head_0`` is the boot's genesis). An audit
record states p (``chain_pos``) and carries ``head_{p-1}`` (``chain_prev``) and
``head_p`` (``chain_head``); a checkpoint carries ``head_P`` for P = pairs served.
So every record names heads at positions, and the recomputer requires

* **agreement**: two signed records naming position p give the same head (a fork —
  two histories of one boot — is refused, alarm ``chain_fork``), the first pair
  chaining from the boot's genesis;
* **coverage**: an audit record a checkpoint counts (``audit_seq`` ≤ its ``audits``)
  holds a pair that checkpoint counts (``chain_pos`` ≤ its ``pairs_served``), alarm
  ``chain_ahead``.

Audit records are numbered in draw order (= tag order), not chain order, so their
positions need not increase: concurrent responses commit out of tag order.

Timed rules (missing checkpoints, withheld audits, overdue reboots) run in
:meth:`Ingest.tick`, given the time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from ivp.errors import ChainError, IvpError, SignatureError, StateError, ValidationError
from ivp.protocol import envelope as env
from ivp.protocol.chain import AuditSequence, genesis, link
from ivp.protocol.encoding import canonical, convert, decode
from ivp.protocol.keys import VerifyKey
from ivp.protocol.messages import (
    AuditRecord,
    BootRecord,
    Checkpoint,
    GatewayAlarm,
    Manifest,
    UplinkCursor,
    manifest_digest,
)
from ivp.recomputer.alarms import GATEWAY_PREFIX, Alarm

GatewayState = Literal["enrolled", "serving", "shutdown", "readmitted"]


@dataclass(frozen=True)
class Rules:
    """Thresholds of the timed and statistical alarms (configured by the operator of
    the recomputer; the inspectors set ε and the reboot schedule by admin request)."""

    checkpoint_period: float = 60.0  # the gateways' checkpoint period, seconds
    missing_factor: float = 3.0  # alarm after this many periods without a checkpoint
    withheld_grace: float | None = None  # default: two checkpoint periods
    churn_window: float = 3600.0
    churn_max: int = 6  # more boots than this within the window -> boot_churn
    binom_alpha: float = 1e-6  # two-sided binomial test level
    binom_min_pairs: int = 20
    reboot_grace: float = 1.5  # alarm when a boot lives grace x the reboot interval


@dataclass
class Device:
    device_id: str
    kind: str  # "gateway" | "sensor"
    key: VerifyKey
    url: str = ""


@dataclass
class Boot:
    """One (gateway, boot) as the recomputer tracks it."""

    record: BootRecord
    url: str
    received: float
    whitelisted: bool
    digest: str  # BLAKE3 of the BOOT payload as received (tells a duplicate from a conflict)
    sequence: AuditSequence = field(default_factory=AuditSequence)
    last_pair_seq: int = -1
    checkpoint: Checkpoint | None = None
    checkpoint_received: float | None = None
    # chain heads by position named by records of this boot (a sliding window)
    heads: dict[int, str] = field(default_factory=dict)
    # audit_seq -> chain_pos of records no checkpoint has counted yet
    uncounted: dict[int, int] = field(default_factory=dict)

    @property
    def audits_received(self) -> int:
        return self.sequence.next_seq - 1

    def remember(self, pos: int, head: str) -> None:
        """Keep ``head`` at ``pos`` (bounded: the oldest positions are forgotten first)."""
        self.heads[pos] = head
        if len(self.heads) > HEADS_KEPT:
            for old in sorted(self.heads)[:len(self.heads) - HEADS_KEPT // 2]:
                del self.heads[old]


HEADS_KEPT = 8192  # chain heads remembered per boot (positions) for the agreement check


@dataclass
class Gateway:
    gateway_id: str
    state: GatewayState = "enrolled"
    reason: str = ""
    boot_id: str | None = None  # the latest BOOT received
    boot_times: list[float] = field(default_factory=list)  # when each BOOT arrived
    last_seen: float | None = None  # when its last uplinked record arrived
    next_alarm_seq: int = 1  # the next GatewayAlarm number expected
    readmitted_at: float | None = None  # when inspectors last re-admitted it


@dataclass(frozen=True)
class Effect:
    """What an admitted envelope changes; the store writes exactly these fields."""

    kind: Literal["boot", "checkpoint", "audit", "alarm", "duplicate"]
    record: Any
    envelope: bytes  # canonical bytes of the envelope (payload kept as received)
    payload: bytes  # payload bytes as received (what the signature covers)
    received: float
    url: str = ""
    whitelisted: bool = True
    manifest_digest: str = ""


@dataclass(frozen=True)
class Outcome:
    """Result of :meth:`Ingest.admit`: an effect to record, or an error; alarms either way."""

    effect: Effect | None
    error: IvpError | None
    alarms: tuple[Alarm, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None


class _Refused(Exception):
    def __init__(self, error: IvpError, *alarms: Alarm) -> None:
        self.error, self.alarms = error, alarms


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=32).hexdigest()


class Ingest:
    """The trusted fleet state. See the module docstring for the order of checks."""

    def __init__(
        self,
        whitelist: Callable[[str], Manifest | None],
        rules: Rules | None = None,
    ) -> None:
        self.whitelist = whitelist
        self.rules = rules or Rules()
        self.devices: dict[str, Device] = {}
        self._by_keyid: dict[str, str] = {}
        self.gateways: dict[str, Gateway] = {}
        self.boots: dict[tuple[str, str], Boot] = {}
        self.epsilon: float | None = None  # set by inspectors (admin set_epsilon)
        self.model_epsilon: dict[str, float] = {}
        self.reboot_interval: float | None = None
        self._raised: set[tuple[str, str, str]] = set()  # timed alarms currently raised

    # --- enrolment (driven by accepted admin requests) -------------------------------
    def enrol(self, device_id: str, kind: str, public_key: str, url: str = "") -> None:
        """Bind ``device_id`` to a public key (quorum checked by the admin core).

        Raises:
            StateError: the id or the key is already enrolled (use rotate_key).
            ValidationError: the key is not the text of an Ed25519 or P-256 key.
        """
        key = VerifyKey.from_hex(public_key)
        if device_id in self.devices:
            raise StateError(f"device {device_id!r} is already enrolled (use rotate_key)")
        if key.keyid in self._by_keyid:
            raise StateError(f"key {key.keyid} is already enrolled as "
                             f"{self._by_keyid[key.keyid]!r}")
        self.devices[device_id] = Device(device_id, kind, key, url)
        self._by_keyid[key.keyid] = device_id
        if kind == "gateway":
            self.gateways.setdefault(device_id, Gateway(device_id))

    def rotate(self, device_id: str, public_key: str) -> None:
        """Replace a device's key: records signed by the old key are refused from now.

        Raises:
            StateError: unknown device, or the new key is enrolled already.
        """
        key = VerifyKey.from_hex(public_key)
        dev = self.devices.get(device_id)
        if dev is None:
            raise StateError(f"device {device_id!r} is not enrolled")
        if key.keyid in self._by_keyid:
            raise StateError(f"key {key.keyid} is already enrolled")
        del self._by_keyid[dev.key.keyid]
        dev.key = key
        self._by_keyid[key.keyid] = device_id

    def shut_down(self, gateway_id: str, reason: str) -> None:
        gw = self.gateways.setdefault(gateway_id, Gateway(gateway_id))
        gw.state, gw.reason = "shutdown", reason

    def readmit(self, gateway_id: str, now: float | None = None) -> None:
        """Re-admit a shut-down gateway: it is routed again after its next BOOT (a
        fresh upload of whitelisted weights), never on its old boot.

        Raises:
            StateError: the gateway is not shut down.
        """
        gw = self.gateways.get(gateway_id)
        if gw is None or gw.state != "shutdown":
            raise StateError(f"gateway {gateway_id!r} is not shut down")
        gw.state, gw.reason = "readmitted", "re-admitted by inspectors; awaiting a fresh BOOT"
        gw.readmitted_at = now

    def judged(self, gateway_id: str, boot_id: str) -> bool:
        """Whether inspectors re-admitted ``gateway_id`` after ``boot_id`` began: a late
        FAIL verdict of such a boot is stored and alarmed, but shuts nothing down (the
        inspectors already judged that boot when they re-admitted the gateway)."""
        gw = self.gateways.get(gateway_id)
        boot = self.boots.get((gateway_id, boot_id))
        return (gw is not None and gw.readmitted_at is not None and boot is not None
                and boot.received <= gw.readmitted_at)

    def cursor(self, gateway_id: str, boot_id: str | None) -> UplinkCursor:
        """What is stored of ``gateway_id`` (and its boot ``boot_id``): the answer to
        ``GET /uplink/cursor``. It says nothing a gateway could not learn from its own
        acknowledgements; a gateway uses it to drop the records whose Ack was lost."""
        gw = self.gateways.get(gateway_id)
        out = UplinkCursor(gateway_id=gateway_id,
                           next_alarm_seq=gw.next_alarm_seq if gw is not None else 1)
        if boot_id is None:
            return out
        boot = self.boots.get((gateway_id, boot_id))
        if boot is None:
            return msgspec.structs.replace(out, boot_id=boot_id)
        return msgspec.structs.replace(out, boot_id=boot_id, boot_known=True,
                                       next_audit_seq=boot.sequence.next_seq,
                                       checkpoint=boot.checkpoint)

    # --- the uplink -------------------------------------------------------------------------
    def admit(self, item: Any, now: float, verified: frozenset[tuple[str, bytes]] = frozenset()
              ) -> Outcome:
        """Check one uplinked envelope (a parsed JSON value). Never raises; no state change.

        ``verified``: (keyid, raw public key) pairs already known to have signed this
        very item (checked elsewhere, e.g. in parallel by :func:`verify_signatures`); a
        signer not in it is verified here.
        """
        try:
            return self._admit(item, now, verified)
        except _Refused as r:
            return Outcome(None, r.error, r.alarms)

    def _admit(self, item: Any, now: float,
               verified: frozenset[tuple[str, bytes]] = frozenset()) -> Outcome:
        try:
            envelope = convert(item, env.Envelope)
            payload = envelope.payload_bytes()
        except ValidationError as exc:
            raise _Refused(exc, Alarm("malformed", None, None, str(exc)[:300], now)) from None
        device = self._signer(envelope, payload, now, verified)
        kinds: dict[str, type[Any]] = {env.BOOT: BootRecord, env.CHECKPOINT: Checkpoint,
                                       env.AUDIT: AuditRecord, env.ALARM: GatewayAlarm}
        type_ = kinds.get(envelope.payloadType)
        if type_ is None:
            err: IvpError = ValidationError(
                f"payload type {envelope.payloadType!r} is not accepted on "
                                  "the uplink (audit, boot, checkpoint or alarm)")
            raise _Refused(err, Alarm("malformed", device.device_id, None, str(err), now))
        try:
            record: Any = decode(payload, type_)
        except ValidationError as exc:
            raise _Refused(exc, Alarm("malformed", device.device_id, None,
                                      str(exc)[:300], now)) from None
        if record.gateway_id != device.device_id:
            err = SignatureError(f"record for gateway {record.gateway_id!r} is signed by the "
                                 f"key of {device.device_id!r}")
            raise _Refused(err, Alarm("forged", record.gateway_id, None, str(err), now))
        raw = canonical(envelope)
        if isinstance(record, BootRecord):
            return self._admit_boot(record, device, raw, payload, now)
        if isinstance(record, Checkpoint):
            return self._admit_checkpoint(record, raw, payload, now)
        if isinstance(record, GatewayAlarm):
            return self._admit_alarm(record, raw, payload, now)
        return self._admit_audit(record, raw, payload, now)

    def _signer(self, envelope: env.Envelope, payload: bytes, now: float,
                verified: frozenset[tuple[str, bytes]] = frozenset()) -> Device:
        """The enrolled gateway whose key validly signed ``envelope``.

        Blocks: records from unenrolled keys (SignatureError, alarm ``unenrolled``) and
        records whose bytes were changed after signing (alarm ``forged``).
        """
        known = [self.devices[self._by_keyid[s.keyid]] for s in envelope.signatures
                 if s.keyid in self._by_keyid]
        known = [d for d in known if d.kind == "gateway"]
        if not known:
            claimed = _claimed_gateway(payload)
            err = SignatureError(
                "record is signed by no enrolled gateway key"
                + (f" (claims gateway {claimed!r}; unauthenticated)" if claimed else "")
            )
            raise _Refused(err, Alarm("unenrolled", claimed, None, str(err), now))
        for device in known:
            if (device.key.keyid, device.key.raw) in verified or \
                    env.valid_signers(envelope, {device.key.keyid: device.key}):
                return device
        err = SignatureError(f"bad signature by the enrolled key of gateway "
                             f"{known[0].device_id!r}: bytes altered after signing")
        raise _Refused(err, Alarm("forged", known[0].device_id, None, str(err), now))

    def _admit_boot(self, b: BootRecord, device: Device, raw: bytes, payload: bytes,
                    now: float) -> Outcome:
        key = (b.gateway_id, b.boot_id)
        digest = _digest(payload)
        old = self.boots.get(key)
        if old is not None:
            if old.digest == digest:  # a resend of the same BOOT: nothing changes
                return Outcome(Effect("duplicate", b, raw, payload, now), None)
            err: IvpError = ChainError(
                f"boot id {b.boot_id!r} of gateway {b.gateway_id!r} reused with "
                             "different content")
            raise _Refused(err, Alarm("boot_conflict", b.gateway_id, b.boot_id, str(err), now))
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
        url = device.url or b.url
        effect = Effect("boot", b, raw, payload, now, url=url, whitelisted=whitelisted,
                        manifest_digest=b.manifest_digest)
        return Outcome(effect, None, tuple(alarms))

    def _boot_of(self, gateway_id: str, boot_id: str, now: float) -> Boot:
        boot = self.boots.get((gateway_id, boot_id))
        if boot is None:
            err = ChainError(f"gateway {gateway_id!r} sent a record for boot {boot_id!r} "
                             "without a BOOT record")
            raise _Refused(err, Alarm("unknown_boot", gateway_id, boot_id, str(err), now))
        return boot

    def _admit_checkpoint(self, c: Checkpoint, raw: bytes, payload: bytes,
                          now: float) -> Outcome:
        boot = self._boot_of(c.gateway_id, c.boot_id, now)
        last = boot.checkpoint
        if last is not None:
            if last == c:
                return Outcome(Effect("duplicate", c, raw, payload, now), None)
            if c.pairs_served < last.pairs_served or c.audits < last.audits:
                err: IvpError = ChainError(
                    f"checkpoint counts went back: pairs {last.pairs_served}->{c.pairs_served},"
                    f" audits {last.audits}->{c.audits}")
                raise _Refused(err, Alarm("checkpoint_regress", c.gateway_id, c.boot_id,
                                          str(err), now))
        alarms: list[Alarm] = []
        if c.audits > c.pairs_served:
            err = ValidationError(f"checkpoint claims {c.audits} audits of "
                                  f"{c.pairs_served} pairs")
            raise _Refused(err, Alarm("malformed", c.gateway_id, c.boot_id, str(err), now))
        fork = _disagreement(boot, [(c.pairs_served, c.chain_head)])
        if fork:
            err = ChainError(f"checkpoint at {c.pairs_served} pairs: {fork}")
            raise _Refused(err, Alarm("chain_fork", c.gateway_id, c.boot_id, str(err), now))
        ahead = sorted((seq, pos) for seq, pos in boot.uncounted.items()
                       if seq <= c.audits and pos > c.pairs_served)
        if ahead:
            seq, pos = ahead[0]
            err = ChainError(f"checkpoint counts {c.pairs_served} pairs and {c.audits} audit "
                             f"records, but audit record {seq} holds the pair at chain "
                             f"position {pos}")
            raise _Refused(err, Alarm("chain_ahead", c.gateway_id, c.boot_id, str(err), now))
        p = audit_rate_pvalue(c.audits, c.pairs_served, boot.record.epsilon)
        if c.pairs_served >= self.rules.binom_min_pairs and p < self.rules.binom_alpha:
            alarms.append(Alarm(
                "audit_rate", c.gateway_id, c.boot_id,
                f"{c.audits} audits of {c.pairs_served} pairs is implausible for "
                f"ε={boot.record.epsilon} (binomial p={p:.2e} < {self.rules.binom_alpha:g})",
                now))
        return Outcome(Effect("checkpoint", c, raw, payload, now), None, tuple(alarms))

    def _admit_audit(self, r: AuditRecord, raw: bytes, payload: bytes, now: float) -> Outcome:
        boot = self._boot_of(r.gateway_id, r.boot_id, now)
        seq = boot.sequence
        if r.audit_seq < seq.next_seq:
            err = ChainError(f"audit record {r.audit_seq} replayed (already stored; next "
                             f"expected {seq.next_seq})")
            raise _Refused(err, Alarm("replay", r.gateway_id, r.boot_id, str(err), now))
        if r.audit_seq != seq.next_seq:
            err = ChainError(f"audit sequence gap: got {r.audit_seq}, expected "
                             f"{seq.next_seq} ({r.audit_seq - seq.next_seq} record(s) withheld)")
            raise _Refused(err, Alarm("sequence_gap", r.gateway_id, r.boot_id, str(err), now))
        if link(r.chain_prev, r.pair) != r.chain_head:
            err = ChainError(f"audit record {r.audit_seq}: chain_head is not "
                             "link(chain_prev, pair)")
            raise _Refused(err, Alarm("chain_link", r.gateway_id, r.boot_id, str(err), now))
        if r.pair.tag.seq <= boot.last_pair_seq:
            err = ChainError(f"audit record {r.audit_seq} holds pair {r.pair.tag.seq}, not "
                             f"after pair {boot.last_pair_seq} of the previous record")
            raise _Refused(err, Alarm("pair_order", r.gateway_id, r.boot_id, str(err), now))
        if r.chain_pos:  # 0: a record that states no position (older gateway builds)
            self._check_position(boot, r, now)
        return Outcome(Effect("audit", r, raw, payload, now,
                              manifest_digest=boot.record.manifest_digest), None)

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
            raise _Refused(err, Alarm("chain_fork", r.gateway_id, r.boot_id, str(err), now))
        cp = boot.checkpoint
        if cp is not None and r.audit_seq <= cp.audits and r.chain_pos > cp.pairs_served:
            err = ChainError(f"audit record {r.audit_seq} holds the pair at chain position "
                             f"{r.chain_pos}, but the checkpoint counting it counts "
                             f"{cp.pairs_served} pairs")
            raise _Refused(err, Alarm("chain_ahead", r.gateway_id, r.boot_id, str(err), now))

    def _admit_alarm(self, a: GatewayAlarm, raw: bytes, payload: bytes,
                     now: float) -> Outcome:
        """A gateway's own alarm: stored as alarm ``gateway:<kind>``.

        Numbered per gateway without gaps: an alarm already stored is refused as a
        replay (blocks inflating one alarm into many); a gap is accepted with a
        ``gateway_alarm_gap`` alarm (blocks withholding a gateway's alarm unseen — the
        alarm that did come is kept, not refused).
        """
        gw = self.gateways.get(a.gateway_id)
        expected = gw.next_alarm_seq if gw is not None else 1
        if a.seq < expected:
            err: IvpError = ChainError(f"gateway alarm {a.seq} replayed (already stored; next "
                                       f"expected {expected})")
            raise _Refused(err, Alarm("replay", a.gateway_id, a.boot_id, str(err), now))
        alarms = []
        if a.seq > expected:
            alarms.append(Alarm("gateway_alarm_gap", a.gateway_id, None,
                                f"gateway alarm {a.seq} arrived, {expected} expected: "
                                f"{a.seq - expected} alarm(s) withheld", now))
        alarms.append(Alarm(GATEWAY_PREFIX + a.kind, a.gateway_id, a.boot_id,
                            f"{a.message} (gateway alarm {a.seq})", now))
        return Outcome(Effect("alarm", a, raw, payload, now), None, tuple(alarms))

    def apply(self, effect: Effect) -> None:
        """Advance the state with an admitted effect (after :meth:`admit`, in order)."""
        rec = effect.record
        seen = self.gateways.get(rec.gateway_id)
        if seen is not None:
            seen.last_seen = max(seen.last_seen or 0.0, effect.received)
        if effect.kind == "boot":
            boot = self.boots[(rec.gateway_id, rec.boot_id)] = Boot(
                rec, effect.url, effect.received, effect.whitelisted, _digest(effect.payload))
            boot.remember(0, genesis(rec.gateway_id, rec.boot_id))
            gw = self.gateways.setdefault(rec.gateway_id, Gateway(rec.gateway_id))
            gw.last_seen = max(gw.last_seen or 0.0, effect.received)
            gw.boot_id = rec.boot_id
            gw.boot_times.append(effect.received)
            gw.boot_times = [t for t in gw.boot_times
                             if effect.received - t <= self.rules.churn_window]
            if gw.state in ("enrolled", "serving", "readmitted"):
                gw.state, gw.reason = "serving", ""
        elif effect.kind == "checkpoint":
            boot = self.boots[(rec.gateway_id, rec.boot_id)]
            boot.checkpoint, boot.checkpoint_received = rec, effect.received
            boot.remember(rec.pairs_served, rec.chain_head)
            boot.uncounted = {s: p for s, p in boot.uncounted.items() if s > rec.audits}
        elif effect.kind == "audit":
            boot = self.boots[(rec.gateway_id, rec.boot_id)]
            boot.sequence.check(rec.audit_seq)
            boot.last_pair_seq = rec.pair.tag.seq
            if rec.chain_pos:
                boot.remember(rec.chain_pos - 1, rec.chain_prev)
                boot.remember(rec.chain_pos, rec.chain_head)
                if boot.checkpoint is None or rec.audit_seq > boot.checkpoint.audits:
                    boot.uncounted[rec.audit_seq] = rec.chain_pos
                    if len(boot.uncounted) > HEADS_KEPT:
                        del boot.uncounted[min(boot.uncounted)]
        elif effect.kind == "alarm":
            gw = self.gateways.setdefault(rec.gateway_id, Gateway(rec.gateway_id))
            gw.next_alarm_seq = max(gw.next_alarm_seq, rec.seq + 1)

    # --- timed rules ---------------------------------------------------------------------------
    def tick(self, now: float) -> list[Alarm]:
        """Alarms due at ``now``: missing checkpoints (a silenced gateway), audits a
        checkpoint claimed that never arrived (withheld on the way), and boots that
        outlived the reboot schedule. Each is raised once while its condition holds."""
        r = self.rules
        due: dict[tuple[str, str, str], str] = {}
        for gw in self.gateways.values():
            if gw.state != "serving" or gw.boot_id is None:
                continue
            boot = self.boots[(gw.gateway_id, gw.boot_id)]
            last = max(boot.received, boot.checkpoint_received or 0.0)
            silent = now - last
            if silent > r.missing_factor * r.checkpoint_period:
                due[("checkpoint_missing", gw.gateway_id, gw.boot_id)] = (
                    f"no checkpoint for {silent:.0f} s (period {r.checkpoint_period:g} s)")
            cp = boot.checkpoint
            grace = r.withheld_grace if r.withheld_grace is not None \
                else 2 * r.checkpoint_period
            if (cp is not None and cp.audits > boot.audits_received
                    and now - (boot.checkpoint_received or now) > grace):
                due[("audit_withheld", gw.gateway_id, gw.boot_id)] = (
                    f"checkpoint claims {cp.audits} audit records, {boot.audits_received} "
                    f"arrived after {grace:g} s")
            if self.reboot_interval is not None and \
                    now - boot.received > r.reboot_grace * self.reboot_interval:
                due[("reboot_overdue", gw.gateway_id, gw.boot_id)] = (
                    f"boot is {now - boot.received:.0f} s old; reboot schedule is every "
                    f"{self.reboot_interval:g} s")
        fresh = [Alarm(k, g, b, d, now) for (k, g, b), d in due.items()
                 if (k, g, b) not in self._raised]
        self._raised = set(due)
        return fresh

    # --- views -----------------------------------------------------------------------------------
    def serving(self, model_id: str) -> list[tuple[str, str, str]]:
        """(gateway_id, url, boot_id) of every gateway routable for ``model_id``: its
        latest BOOT names the model under a whitelisted manifest, and it is not shut down."""
        out = []
        for gw in self.gateways.values():
            if gw.state != "serving" or gw.boot_id is None:
                continue
            boot = self.boots[(gw.gateway_id, gw.boot_id)]
            if boot.record.model_id == model_id and boot.whitelisted and boot.url:
                out.append((gw.gateway_id, boot.url, gw.boot_id))
        return out

    def gateway_url(self, gateway_id: str) -> str:
        dev = self.devices.get(gateway_id)
        gw = self.gateways.get(gateway_id)
        if dev is not None and dev.url:
            return dev.url
        if gw is not None and gw.boot_id is not None:
            return self.boots[(gateway_id, gw.boot_id)].url
        return ""

    def model_of(self, gateway_id: str) -> str | None:
        gw = self.gateways.get(gateway_id)
        if gw is None or gw.boot_id is None:
            return None
        return self.boots[(gateway_id, gw.boot_id)].record.model_id

    # --- restart ---------------------------------------------------------------------------------
    def restore(self, snap: Any, load_boot: Callable[[str, str], bytes]) -> None:
        """Rebuild from a store snapshot (``store.Snapshot``); ``load_boot`` gives the
        stored envelope bytes of a BOOT."""
        for e in snap.enrolments:
            key = VerifyKey.from_hex(e["public_key"])
            self.devices[e["device_id"]] = Device(e["device_id"], e["kind"], key, e["url"])
            self._by_keyid[key.keyid] = e["device_id"]
            if e["kind"] == "gateway":
                self.gateways.setdefault(e["device_id"], Gateway(e["device_id"]))
        for b in snap.boots:
            payload = env.Envelope.from_bytes(load_boot(b["gateway_id"], b["boot_id"])) \
                .payload_bytes()
            rec = decode(payload, BootRecord)
            self.apply(Effect("boot", rec, b"", payload, b["received"], url=b["url"],
                              whitelisted=bool(b["whitelisted"])))
        for g in snap.gateways:
            gw = self.gateways.setdefault(g["gateway_id"], Gateway(g["gateway_id"]))
            if g["state"] == "readmitted":
                gw.readmitted_at = g["time"]
            booted_after = gw.boot_times and max(gw.boot_times) > g["time"]
            if g["state"] == "readmitted" and booted_after:
                gw.state, gw.reason = "serving", ""
            elif g["state"] != "serving" or not booted_after:
                gw.state, gw.reason = g["state"], g["reason"]
        for c in snap.checkpoints:
            boot = self.boots.get((c["gateway_id"], c["boot_id"]))
            if boot is not None:
                boot.checkpoint = Checkpoint(
                    gateway_id=c["gateway_id"], boot_id=c["boot_id"],
                    pairs_served=c["pairs_served"], audits=c["audits"],
                    chain_head=c["chain_head"], time=c["time"])
                boot.checkpoint_received = c["received"]
                boot.remember(c["pairs_served"], c["chain_head"])
                gw = self.gateways[c["gateway_id"]]
                gw.last_seen = max(gw.last_seen or 0.0, c["received"])
        for h in snap.audit_heads:
            boot = self.boots.get((h["gateway_id"], h["boot_id"]))
            if boot is not None:
                boot.sequence = AuditSequence(next_seq=int(h["last_seq"]) + 1)
                boot.last_pair_seq = int(h["last_pair_seq"])
        for gateway_id, last in getattr(snap, "alarm_heads", {}).items():
            gw = self.gateways.setdefault(gateway_id, Gateway(gateway_id))
            gw.next_alarm_seq = int(last) + 1


def _disagreement(boot: Boot, claims: list[tuple[int, str]]) -> str:
    """'' if every (position, head) agrees with the heads known for ``boot``, else why."""
    for pos, head in claims:
        known = boot.heads.get(pos)
        if known is not None and known != head:
            what = "genesis" if pos == 0 else f"the head at chain position {pos}"
            return (f"names {head[:16]}… as {what}, another signed record of this boot "
                    f"names {known[:16]}… (a fork)")
    return ""


def audit_rate_pvalue(audits: int, pairs: int, epsilon: float) -> float:
    """Two-sided binomial test of ``audits`` kept out of ``pairs`` at rate ε.

    Blocks a gateway whose sampler was subverted to keep fewer (or more) records than
    ε promises: an operator who keeps the cheating pairs out of the sample.
    """
    if pairs <= 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(audits, pairs, epsilon).pvalue)


#: One signature to check: (signed message, signature, raw public key, its scheme).
SignatureTask = tuple[bytes, bytes, bytes, str]


def signature_tasks(ingest: Ingest, items: Sequence[Any]
                    ) -> list[tuple[int, str, SignatureTask]]:
    """Every (item index, keyid, task) whose signer is an enrolled gateway key: the
    signature checks of a batch, to run in parallel before :meth:`Ingest.admit`.
    Malformed items are skipped (``admit`` refuses them); nothing here is trusted."""
    out: list[tuple[int, str, SignatureTask]] = []
    for i, item in enumerate(items):
        try:
            envelope = convert(item, env.Envelope)
            message = env.pae(envelope.payloadType, envelope.payload_bytes())
        except ValidationError:
            continue
        for sig in envelope.signatures:
            device_id = ingest._by_keyid.get(sig.keyid)
            device = ingest.devices.get(device_id) if device_id else None
            if device is None or device.kind != "gateway":
                continue
            try:
                raw_sig = base64.b64decode(sig.sig, validate=True)
            except (binascii.Error, ValueError):
                continue
            out.append((i, sig.keyid, (message, raw_sig, device.key.raw, device.key.scheme)))
    return out


def verify_signatures(tasks: Sequence[SignatureTask]) -> list[bool]:
    """Signature checks, one bool each. Pure: runs in a worker process."""
    keys: dict[tuple[bytes, str], VerifyKey] = {}
    out = []
    for message, signature, raw, scheme in tasks:
        try:
            key = keys.get((raw, scheme))
            if key is None:
                key = keys[raw, scheme] = VerifyKey(raw, scheme)  # type: ignore[arg-type]
            key.verify(signature, message)
            out.append(True)
        except (SignatureError, ValidationError):
            out.append(False)
    return out


def _claimed_gateway(payload: bytes) -> str | None:
    """The gateway id an unauthenticated payload claims (for the alarm text only)."""
    try:
        value = msgspec.json.decode(payload)
    except (msgspec.DecodeError, ValueError):
        return None
    claim = value.get("gateway_id") if isinstance(value, dict) else None
    return claim[:200] if isinstance(claim, str) else None


def batch_items(body: bytes) -> list[Any]:
    """The ``envelopes`` list of an uplink body, each item left undecoded.

    Raises:
        ValidationError: not JSON, or no ``envelopes`` list.
    """
    try:
        value = msgspec.json.decode(body)
    except (msgspec.DecodeError, ValueError):
        raise ValidationError("uplink body is not JSON") from None
    items = value.get("envelopes") if isinstance(value, dict) else None
    if not isinstance(items, list):
        raise ValidationError('uplink body must be {"envelopes": [...]}')
    return items


def effects_of(outcomes: Iterable[Outcome]) -> list[Effect]:
    return [o.effect for o in outcomes if o.effect is not None]
