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

from collections.abc import Callable
from typing import Any

import msgspec

from ivp.errors import IvpError, SignatureError, StateError, ValidationError
from ivp.protocol import envelope as env
from ivp.protocol.acks import NO_DIGEST, Heartbeat, payload_digest
from ivp.protocol.chain import genesis
from ivp.protocol.encoding import canonical, convert, decode
from ivp.protocol.keys import VerifyKey
from ivp.protocol.messages import (
    AuditRecord,
    BootRecord,
    Checkpoint,
    GatewayAlarm,
    Manifest,
    UplinkCursor,
)
from ivp.recomputer import timed
from ivp.recomputer.alarms import Alarm
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
from ivp.recomputer.records import (
    _ENVELOPE_KEYS,
    _JUNK_ERROR,
    Authenticated,
    Effect,
    Evidence,
    Outcome,
    RecordChecks,
    Refused,
    _digest,
    _number,
    _receipt,
)

_TYPES: dict[str, tuple[type[Any], str]] = {
    env.BOOT: (BootRecord, "boot"), env.CHECKPOINT: (Checkpoint, "checkpoint"),
    env.AUDIT: (AuditRecord, "audit"), env.ALARM: (GatewayAlarm, "alarm"),
    env.HEARTBEAT: (Heartbeat, "heartbeat")}


class Ingest(RecordChecks):
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
                raise Refused(exc, Alarm("malformed", None, None, str(exc)[:300], now)) \
                    from None
            digest = payload_digest(payload)
            device = self._signer(envelope, payload, now, verified)
        except Refused as r:
            return Outcome(None, r.error, r.alarms, _receipt(digest, "retry", error=r.error))
        typed = _TYPES.get(envelope.payloadType)
        try:
            if typed is None:
                err: IvpError = ValidationError(
                    f"payload type {envelope.payloadType!r} is not accepted on the uplink "
                    "(audit, boot, checkpoint, alarm or heartbeat)")
                raise Refused(err, Alarm("malformed", device.device_id, None, str(err), now))
            try:
                record: Any = decode(payload, typed[0])
            except ValidationError as exc:
                raise Refused(exc, Alarm("malformed", device.device_id, None,
                                          str(exc)[:300], now)) from None
            if record.gateway_id != device.device_id:
                err = SignatureError(f"record for gateway {record.gateway_id!r} is signed by "
                                     f"the key of {device.device_id!r}")
                raise Refused(err, Alarm("forged", record.gateway_id, None, str(err), now))
        except Refused as r:  # signed by an enrolled gateway: evidence against it
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
        except Refused as refused:
            if refused.retry:
                return Outcome(None, refused.error, refused.alarms, _receipt(
                    auth.digest, "retry", auth.kind, boot_id, _number(r), refused.error))
            return self._refusal(refused, r.gateway_id, boot_id, auth.kind, _number(r),
                                 auth.digest, auth.envelope, now)
        receipt = _receipt(auth.digest, "stored", auth.kind, boot_id, _number(r))
        return Outcome(out.effect, None, out.alarms, receipt)

    @staticmethod
    def _refusal(r: Refused, gateway_id: str, boot_id: str | None, kind: str, n: int,
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
            raise Refused(err, Alarm("unenrolled", claimed, None, str(err), now))
        for device in known:
            if (device.key.keyid, device.key.raw) in verified or \
                    env.valid_signers(envelope, {device.key.keyid: device.key}):
                return device
        err = SignatureError(f"bad signature by the enrolled key of gateway "
                             f"{known[0].device_id!r}: bytes altered after signing")
        raise Refused(err, Alarm("forged", known[0].device_id, None, str(err), now))

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
        """Alarms due at ``now`` (``timed.due``): a silenced serving gateway (missing
        checkpoints) or shut-down one (missing heartbeats), audit records a signed claim
        counted that never arrived (withheld) — in every boot, not only the latest —
        and boots that outlived the reboot schedule. Each is raised once while its
        condition holds."""
        return timed.due(self, now)

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


__all__ = ["Authenticated", "Effect", "Evidence", "GatewayState", "Ingest", "Outcome", "Rules",
           "audit_rate_pvalue"]


#: The outcome of every item that is not even shaped like an envelope (one object:
#: junk costs no allocation per item; its alarm is one folded ``malformed``)
_JUNK = Outcome(None, _JUNK_ERROR, (Alarm("malformed", None, None, str(_JUNK_ERROR), 0.0),),
                _receipt(NO_DIGEST, "retry", error=_JUNK_ERROR))
