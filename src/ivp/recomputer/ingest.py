"""Audit ingestion: a pure state machine over uplinked envelopes (no I/O, no clock).

:class:`Ingest` holds the recomputer's trusted view of the fleet (``fleet``: enrolled
device keys, every gateway's boots, each boot's audit numbers and checkpoints) and
decides about one uplinked envelope at a time in three steps:

* :meth:`Ingest.authenticate` finds the enrolled signer and checks the signature,
  reading no per-boot state, so the service runs it for a whole batch *before* it takes
  its lock: junk and forgeries never reach the per-item work under the lock.
* :meth:`Ingest.decide` checks an authenticated record and returns an :class:`Outcome`
  (never raises): an :class:`Effect` to record or the error that refused it, the
  alarms to raise either way, and the signed receipt's entry (``UplinkReceipt``). It
  does not change any state. (:meth:`Ingest.admit` is the two in one.)
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
5. per type: BOOT (whitelist, ε, churn, the device counter and the previous boot's
   closing state: ``rollback``), CHECKPOINT (known boot, monotone counts, audit rate,
   chain position, counter), AUDIT (known boot, numbering, chain link, pair order,
   chain position), ALARM (the gateway's own alarms, stored as ``gateway:<kind>``),
   HEARTBEAT (alive while not serving).

**What a refusal keeps.** A record that fails step 5 was signed by the gateway it
names: it is evidence, and the service stores it (``refused`` receipt) before it
answers, so the gateway may delete its copy. A record that fails steps 1-3 proves
nothing and is not kept (``retry``); nor is one for a boot not yet known (its BOOT may
still be on its way).

**Numbering.** Audit records are numbered 1, 2, 3, … per boot, alarms per gateway. A
number already held is a ``replay``; a number past a gap raises ``sequence_gap`` and
is *stored* (the rest of the boot stays auditable); the gap is a withheld record
until it arrives: ``audit_withheld`` once the first signed claim of it (a checkpoint,
or the next BOOT's closing state) is older than the grace.

**Chain positions** (docs/ARCHITECTURE.md, "Checkpoints and audit records"): records
name heads at positions; two signed records naming one position must agree
(``chain_fork``), and an audit record a checkpoint counts must hold a pair it counts
(``chain_ahead``). Audit records are numbered in draw order (= tag order), not chain
order, so their positions need not increase.

Timed rules (silence, withheld records, overdue reboots) run in :meth:`Ingest.tick`,
given the time; silence is measured from the recomputer's own resumption too
(:meth:`Ingest.resume`: after a restart or a stall it had not been listening).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from ivp.errors import ChainError, IvpError, SignatureError, StateError, ValidationError
from ivp.protocol import envelope as env
from ivp.protocol.acks import NO_DIGEST, Heartbeat, UplinkReceipt, payload_digest
from ivp.protocol.chain import genesis, link
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
from ivp.recomputer.batch import audit_rate_pvalue, claimed_gateway
from ivp.recomputer.fleet import (
    ABOVE_KEPT,
    HEADS_KEPT,
    Book,
    Boot,
    Device,
    Gateway,
    GatewayState,
    Rules,
)

EffectKind = Literal["boot", "checkpoint", "audit", "alarm", "heartbeat", "duplicate"]
_TYPES: dict[str, tuple[type[Any], str]] = {
    env.BOOT: (BootRecord, "boot"), env.CHECKPOINT: (Checkpoint, "checkpoint"),
    env.AUDIT: (AuditRecord, "audit"), env.ALARM: (GatewayAlarm, "alarm"),
    env.HEARTBEAT: (Heartbeat, "heartbeat")}


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


class _Refused(Exception):
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


class Ingest:
    """The trusted fleet state. See the module docstring for the order of checks."""

    def __init__(self, whitelist: Callable[[str], Manifest | None],
                 rules: Rules | None = None, now: float = 0.0) -> None:
        self.whitelist = whitelist
        self.rules = rules or Rules()
        self.devices: dict[str, Device] = {}
        self._by_keyid: dict[str, str] = {}
        self.gateways: dict[str, Gateway] = {}
        self.boots: dict[tuple[str, str], Boot] = {}
        self.epsilon: float | None = None  # set by inspectors (admin set_epsilon)
        self.model_epsilon: dict[str, float] = {}
        self.reboot_interval: float | None = None
        self.resumed_at = now  # since when this recomputer has been listening
        self._raised: set[tuple[str, str, str]] = set()  # timed alarms currently raised
        self._claimed: set[tuple[str, str]] = set()  # boots with claims not yet met

    # --- enrolment (driven by accepted admin requests) -------------------------------
    def enrol(self, device_id: str, kind: str, public_key: str, url: str = "") -> None:
        """Bind ``device_id`` to a public key (quorum checked by the admin core).

        Raises:
            StateError: the id or the key is already enrolled (use rotate_key).
            ValidationError: the key is not a 32-byte hex Ed25519 key.
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

    def device_of_key(self, keyid: str) -> Device | None:
        device_id = self._by_keyid.get(keyid)
        return self.devices.get(device_id) if device_id is not None else None

    def shut_down(self, gateway_id: str, reason: str, now: float | None = None) -> None:
        gw = self.gateways.setdefault(gateway_id, Gateway(gateway_id))
        gw.state, gw.reason, gw.shutdown_at = "shutdown", reason, now

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

    def resume(self, now: float) -> None:
        """The recomputer was not listening until ``now`` (a restart, or a stall that
        held every uplink back): silence and lateness count from here, so honest
        gateways are not taken for silent ones while it was the recomputer that was."""
        self.resumed_at = max(self.resumed_at, now)

    def cursor(self, gateway_id: str, boot_id: str | None, now: float = 0.0) -> UplinkCursor:
        """What is stored of ``gateway_id`` (and its boot ``boot_id``): the answer to
        ``GET /uplink/cursor``. It says nothing a gateway could not learn from its own
        acknowledgements; a gateway uses it to drop the records whose Ack was lost."""
        gw = self.gateways.get(gateway_id)
        alarms = gw.alarms if gw is not None else Book()
        out = UplinkCursor(gateway_id=gateway_id, next_alarm_seq=alarms.next_seq,
                           alarms_above=sorted(alarms.above)[:ABOVE_KEPT])
        if boot_id is None:
            return out
        boot = self.boots.get((gateway_id, boot_id))
        if boot is None:
            return msgspec.structs.replace(out, boot_id=boot_id)
        return msgspec.structs.replace(
            out, boot_id=boot_id, boot_known=True, next_audit_seq=boot.sequence.next_seq,
            audits_above=sorted(boot.sequence.above)[:ABOVE_KEPT], checkpoint=boot.checkpoint)

    # --- the uplink -------------------------------------------------------------------------
    def admit(self, item: Any, now: float, verified: frozenset[tuple[str, bytes]] = frozenset()
              ) -> Outcome:
        """:meth:`authenticate`, then :meth:`decide`. Never raises; no state change."""
        auth = self.authenticate(item, now, verified)
        return auth if isinstance(auth, Outcome) else self.decide(auth, now)

    def authenticate(self, item: Any, now: float,
                     verified: frozenset[tuple[str, bytes]] = frozenset()
                     ) -> Authenticated | Outcome:
        """Steps 1-4 for one uplinked envelope (a parsed JSON value): who signed it.

        Reads only the enrolments. ``verified``: (keyid, raw public key) pairs already
        known to have signed this very item (checked in parallel by
        ``batch.verify_signatures``); a signer not in it is verified here. A refusal
        comes back as an :class:`Outcome` with a ``retry`` receipt (nothing here is
        evidence of anything).
        """
        digest = NO_DIGEST
        if not (isinstance(item, dict) and _ENVELOPE_KEYS.issuperset(item)
                and isinstance(item.get("payload"), str)):  # cheap: no exception per junk
            return _JUNK
        try:
            try:
                envelope = convert(item, env.Envelope)
                payload = envelope.payload_bytes()
            except ValidationError as exc:
                raise _Refused(exc, Alarm("malformed", None, None, str(exc)[:300], now)) \
                    from None
            digest = payload_digest(payload)
            device = self._signer(envelope, payload, now, verified)
        except _Refused as r:
            return Outcome(None, r.error, r.alarms, _receipt(digest, "retry", error=r.error))
        typed = _TYPES.get(envelope.payloadType)
        try:
            if typed is None:
                err: IvpError = ValidationError(
                    f"payload type {envelope.payloadType!r} is not accepted on the uplink "
                    "(audit, boot, checkpoint, alarm or heartbeat)")
                raise _Refused(err, Alarm("malformed", device.device_id, None, str(err), now))
            try:
                record: Any = decode(payload, typed[0])
            except ValidationError as exc:
                raise _Refused(exc, Alarm("malformed", device.device_id, None,
                                          str(exc)[:300], now)) from None
            if record.gateway_id != device.device_id:
                err = SignatureError(f"record for gateway {record.gateway_id!r} is signed by "
                                     f"the key of {device.device_id!r}")
                raise _Refused(err, Alarm("forged", record.gateway_id, None, str(err), now))
        except _Refused as r:  # signed by an enrolled gateway: evidence against it
            return self._refusal(r, device.device_id, None, "other", 0, digest,
                                 canonical(envelope), now)
        return Authenticated(device, record, typed[1], canonical(envelope), payload, digest)

    def decide(self, auth: Authenticated, now: float) -> Outcome:
        """Step 5 for an authenticated record. Never raises; no state change."""
        r = auth.record
        boot_id = getattr(r, "boot_id", None)
        try:
            if isinstance(r, BootRecord):
                out = self._admit_boot(r, auth, now)
            elif isinstance(r, Checkpoint):
                out = self._admit_checkpoint(r, auth, now)
            elif isinstance(r, GatewayAlarm):
                out = self._admit_alarm(r, auth, now)
            elif isinstance(r, Heartbeat):
                out = self._admit_heartbeat(r, auth, now)
            else:
                out = self._admit_audit(r, auth, now)
        except _Refused as refused:
            if refused.retry:
                return Outcome(None, refused.error, refused.alarms, _receipt(
                    auth.digest, "retry", auth.kind, boot_id, _number(r), refused.error))
            return self._refusal(refused, r.gateway_id, boot_id, auth.kind, _number(r),
                                 auth.digest, auth.envelope, now)
        receipt = _receipt(auth.digest, "stored", auth.kind, boot_id, _number(r))
        return Outcome(out.effect, None, out.alarms, receipt)

    @staticmethod
    def _refusal(r: _Refused, gateway_id: str, boot_id: str | None, kind: str, n: int,
                 digest: str, envelope: bytes, now: float) -> Outcome:
        error = f"{type(r.error).__name__}: {r.error}"
        evidence = Evidence(gateway_id, boot_id, kind, n, digest, error[:2000], envelope, now)
        return Outcome(None, r.error, r.alarms,
                       _receipt(digest, "refused", kind, boot_id, n, r.error), evidence)

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
            claimed = claimed_gateway(payload)
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

    def _admit_boot(self, b: BootRecord, auth: Authenticated, now: float) -> Outcome:
        old = self.boots.get((b.gateway_id, b.boot_id))
        if old is not None:
            if old.digest == _digest(auth.payload):  # a resend of the same BOOT
                return Outcome(Effect("duplicate", b, auth.envelope, auth.payload, now), None)
            err: IvpError = ChainError(f"boot id {b.boot_id!r} of gateway {b.gateway_id!r} "
                                       "reused with different content")
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
            raise _Refused(err, Alarm("unknown_boot", gateway_id, boot_id, str(err), now),
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
                raise _Refused(err, Alarm("checkpoint_regress", c.gateway_id, c.boot_id,
                                          str(err), now))
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
            raise _Refused(err, Alarm("replay", r.gateway_id, r.boot_id, str(err), now))
        alarms: list[Alarm] = []
        if r.audit_seq > book.highest + 1:
            if len(book.above) >= ABOVE_KEPT:
                err = ChainError(f"audit record {r.audit_seq}: {ABOVE_KEPT} records already "
                                 f"wait past the gap at {book.next_seq}")
                raise _Refused(err, Alarm("sequence_gap", r.gateway_id, r.boot_id, str(err),
                                          now))
            missing = r.audit_seq - book.highest - 1
            alarms.append(Alarm("sequence_gap", r.gateway_id, r.boot_id,
                                f"audit sequence gap: got {r.audit_seq}, expected "
                                f"{book.highest + 1} ({missing} record(s) missing); stored, "
                                "the gap stays open until they arrive", now))
        if link(r.chain_prev, r.pair) != r.chain_head:
            err = ChainError(f"audit record {r.audit_seq}: chain_head is not "
                             "link(chain_prev, pair)")
            raise _Refused(err, Alarm("chain_link", r.gateway_id, r.boot_id, str(err), now))
        below, above = book.neighbours(r.audit_seq)
        if r.pair.tag.seq <= below or (above is not None and r.pair.tag.seq >= above):
            err = ChainError(
                f"audit record {r.audit_seq} holds pair {r.pair.tag.seq}, not after pair "
                f"{below} of the record before" if r.pair.tag.seq <= below else
                f"audit record {r.audit_seq} holds pair {r.pair.tag.seq}, not before pair "
                f"{above} of the record after")
            raise _Refused(err, Alarm("pair_order", r.gateway_id, r.boot_id, str(err), now))
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
            raise _Refused(err, Alarm("chain_fork", r.gateway_id, r.boot_id, str(err), now))
        cp = boot.checkpoint
        if cp is not None and r.audit_seq <= cp.audits and r.chain_pos > cp.pairs_served:
            err = ChainError(f"audit record {r.audit_seq} holds the pair at chain position "
                             f"{r.chain_pos}, but the checkpoint counting it counts "
                             f"{cp.pairs_served} pairs")
            raise _Refused(err, Alarm("chain_ahead", r.gateway_id, r.boot_id, str(err), now))

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
            raise _Refused(err, Alarm("replay", a.gateway_id, a.boot_id, str(err), now))
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

    def apply(self, effect: Effect) -> None:
        """Advance the state with an admitted effect (after :meth:`admit`, in order)."""
        rec = effect.record
        gw = self.gateways.setdefault(rec.gateway_id, Gateway(rec.gateway_id))
        gw.last_seen = max(gw.last_seen or 0.0, effect.received)
        gw.counter = max(gw.counter, getattr(rec, "counter", 0))
        if effect.kind == "boot":
            self._apply_boot(rec, effect, gw)
        elif effect.kind == "checkpoint":
            boot = self.boots[(rec.gateway_id, rec.boot_id)]
            boot.checkpoint, boot.checkpoint_received = rec, effect.received
            boot.remember(rec.pairs_served, rec.chain_head)
            boot.uncounted = {s: p for s, p in boot.uncounted.items() if s > rec.audits}
            self._claim(boot, rec.audits, effect.received)
        elif effect.kind == "audit":
            boot = self.boots[(rec.gateway_id, rec.boot_id)]
            boot.sequence.add(rec.audit_seq, rec.pair.tag.seq)
            if rec.chain_pos:
                boot.remember(rec.chain_pos - 1, rec.chain_prev)
                boot.remember(rec.chain_pos, rec.chain_head)
                if boot.checkpoint is None or rec.audit_seq > boot.checkpoint.audits:
                    boot.uncounted[rec.audit_seq] = rec.chain_pos
                    if len(boot.uncounted) > HEADS_KEPT:
                        del boot.uncounted[min(boot.uncounted)]
        elif effect.kind == "alarm":
            gw.alarms.add(rec.seq)

    def _apply_boot(self, rec: BootRecord, effect: Effect, gw: Gateway) -> None:
        boot = self.boots[(rec.gateway_id, rec.boot_id)] = Boot(
            rec, effect.url, effect.received, effect.whitelisted, _digest(effect.payload))
        boot.remember(0, genesis(rec.gateway_id, rec.boot_id))
        prev = rec.previous
        old = self.boots.get((rec.gateway_id, prev.boot_id)) if prev is not None else None
        if prev is not None and old is not None:  # the old boot's final word
            old.closed = True
            self._claim(old, prev.audits, effect.received)
        gw.boot_id = rec.boot_id
        gw.boot_times.append(effect.received)
        gw.boot_times = [t for t in gw.boot_times if effect.received - t <= self.rules.churn_window]
        if gw.state in ("enrolled", "serving", "readmitted"):
            gw.state, gw.reason = "serving", ""

    def _claim(self, boot: Boot, audits: int, when: float) -> None:
        boot.claim(audits, when)
        if boot.claimed > boot.audits_received:
            self._claimed.add((boot.record.gateway_id, boot.record.boot_id))

    # --- timed rules ---------------------------------------------------------------------------
    def tick(self, now: float) -> list[Alarm]:
        """Alarms due at ``now``: a silenced serving gateway (missing checkpoints) or
        shut-down one (missing heartbeats), audit records a signed claim counted that
        never arrived (withheld) — in every boot, not only the latest — and boots that
        outlived the reboot schedule. Each is raised once while its condition holds."""
        r = self.rules
        due: dict[tuple[str, str, str], str] = {}
        for gw in self.gateways.values():
            if gw.state == "shutdown":
                heard = max(gw.last_seen or 0.0, gw.shutdown_at or 0.0, self.resumed_at)
                if gw.shutdown_at is not None and now - heard > r.silence:
                    due[("shutdown_silent", gw.gateway_id, "")] = (
                        f"shut down, and silent for {now - heard:.0f} s: no heartbeat (a "
                        f"shut-down gateway sends one every {r.checkpoint_period:g} s)")
            if gw.state != "serving" or gw.boot_id is None:
                continue
            boot = self.boots[(gw.gateway_id, gw.boot_id)]
            heard = max(boot.received, boot.checkpoint_received or 0.0, self.resumed_at)
            if now - heard > r.silence:
                due[("checkpoint_missing", gw.gateway_id, gw.boot_id)] = (
                    f"no checkpoint for {now - heard:.0f} s (period {r.checkpoint_period:g} s)")
            if self.reboot_interval is not None and \
                    now - boot.received > r.reboot_grace * self.reboot_interval:
                due[("reboot_overdue", gw.gateway_id, gw.boot_id)] = (
                    f"boot is {now - boot.received:.0f} s old; reboot schedule is every "
                    f"{self.reboot_interval:g} s")
        for key in list(self._claimed):
            boot = self.boots[key]
            missing = boot.first_missing_claim()
            if missing is None:
                self._claimed.discard(key)
                continue
            first, claimed, since = missing
            late = now - max(since, self.resumed_at)
            if late > r.grace:
                due[("audit_withheld", *key)] = (
                    f"{claimed} audit record(s) claimed by signed records"
                    f"{' (the boot is closed)' if boot.closed else ''}; "
                    f"{boot.audits_received} arrived: record {first} was first claimed "
                    f"{now - since:.0f} s ago and never came (grace {r.grace:g} s)")
        fresh = [Alarm(k, g, b or None, d, now) for (k, g, b), d in due.items()
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
    def restore(self, snap: Any, load_boot: Callable[[str, str], bytes], now: float) -> None:
        """Rebuild from a store snapshot (``store.Snapshot``); ``load_boot`` gives the
        stored envelope bytes of a BOOT. Silence counts from ``now`` (the restart)."""
        from ivp.recomputer.restore import restore

        restore(self, snap, load_boot)
        self.resumed_at = now


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


__all__ = ["Authenticated", "Effect", "Evidence", "GatewayState", "Ingest", "Outcome", "Rules",
           "audit_rate_pvalue"]


#: The outcome of every item that is not even shaped like an envelope (one object:
#: junk costs no allocation per item; its alarm is one folded ``malformed``)
_JUNK = Outcome(None, _JUNK_ERROR, (Alarm("malformed", None, None, str(_JUNK_ERROR), 0.0),),
                _receipt(NO_DIGEST, "retry", error=_JUNK_ERROR))
