"""The uplink shell: one batch from a gateway, admitted without unbounded work.

For each ``POST /uplink`` (a mixin of :class:`~ivp.recomputer.service.Recomputer`):

1. caps before parsing: the HTTP layer refuses a body over ``batch.MAX_BODY`` unread,
   and a batch of more than ``batch.MAX_ITEMS`` envelopes is refused whole;
2. authentication *outside* the lock: the batch's signatures are checked (in worker
   processes for large batches), then ``Ingest.authenticate`` per item, yielding to
   the event loop as it goes. A batch holding only junk never takes the lock;
3. under the lock: ``Ingest.decide`` and ``apply`` per authenticated item (yielding
   again), then ONE durable transaction for the effects, the refused records kept as
   evidence and the authenticated alarms;
4. the answer: an ``Ack`` whose ``signed`` part is the batch's ``UplinkAck`` signed
   by the recomputer's device key — what the gateway acts on.

Alarms anyone can cause (malformed, unenrolled, forged, replay) are folded by
:class:`Noise` and written at most once a second, so a flood of junk costs no durable
write per request. A wait for the lock longer than :data:`STALL` seconds means the
recomputer was not listening: ``Ingest.resume`` then restarts the silence clocks, so
honest gateways queued behind a stall are not taken for silent ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from ivp.errors import TransportError, ValidationError
from ivp.protocol import envelope as env
from ivp.protocol.acks import UplinkAck, UplinkReceipt
from ivp.protocol.encoding import convert
from ivp.protocol.messages import Ack, UplinkCursor, UplinkResult
from ivp.recomputer.alarms import Alarm, authenticated
from ivp.recomputer.batch import batch_items
from ivp.recomputer.ingest import Authenticated, Outcome
from ivp.recomputer.store import QueuedAudit

if TYPE_CHECKING:
    from ivp.device import Device
    from ivp.recomputer.ingest import Ingest
    from ivp.recomputer.metrics import Metrics
    from ivp.recomputer.signatures import SignaturePool
    from ivp.recomputer.store import Store

log = logging.getLogger("ivp.recomputer")
STALL = 2.0  # seconds waited for the lock that count as the recomputer not listening
ADMITTED = 2  # uplink bodies read and worked on at once
YIELD_EVERY = 32  # items between yields to the event loop


class Noise:
    """Unauthenticated alarms, folded per (kind, gateway, boot) until written."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self.pending: dict[tuple[str, str | None, str | None], Alarm] = {}
        self.last = 0.0

    def add(self, alarms: Sequence[Alarm], now: float) -> None:
        for a in alarms:
            key = (a.kind, a.gateway_id, a.boot_id)
            seen = self.pending.get(key)
            self.pending[key] = Alarm(a.kind, a.gateway_id, a.boot_id, a.detail, now,
                                      repeats=1 if seen is None else seen.repeats + 1)

    def take(self, now: float, force: bool = False) -> list[Alarm]:
        """The folded alarms, if it is time to write them (or ``force``)."""
        if not self.pending or (not force and now - self.last < self.every):
            return []
        self.last = now
        out, self.pending = list(self.pending.values()), {}
        return out


class UplinkShell:
    """``POST /uplink`` and ``GET /uplink/cursor`` (mixed into Recomputer)."""

    ingest: Ingest
    store: Store
    device: Device
    metrics: Metrics
    noise: Noise
    _admitted: asyncio.Semaphore | None = None
    _lock: asyncio.Lock
    _signatures: SignaturePool
    _queue: Any
    _wake: asyncio.Event
    router: Any
    _db: Callable[..., Awaitable[Any]]
    _kem: Any  # the device's X25519 KEM key pair (``ivp.protocol.hpke.device_kem_key``)
    config: Any  # ivp.recomputer.service.Config

    def check_alive(self) -> None: ...

    def check_trusted(self) -> None: ...

    def open_sealed(self, body: bytes) -> bytes:
        """An uplink body sealed to this recomputer's KEM key, opened.

        Raises:
            ValidationError: it does not open (altered, or sealed to another key).
        """
        from ivp.protocol.hpke import UPLINK_INFO, open_message

        return open_message(self._kem, UPLINK_INFO, body)

    async def _enforce_all(self, alarms: Sequence[Alarm]) -> None: ...

    async def _reload(self) -> None: ...

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """The lock; a long wait for it restarts the silence clocks (see module doc)."""
        asked = time.monotonic()
        async with self._lock:
            self._waited(time.monotonic() - asked, "its lock")
            yield

    @contextlib.asynccontextmanager
    async def admission(self) -> AsyncIterator[None]:
        """A turn to be read at all: at most :data:`ADMITTED` uplink bodies are read
        and worked on at once (the others wait unread, in the kernel's buffers), so a
        flood of junk cannot monopolise the event loop and starve other routes."""
        if self._admitted is None:
            self._admitted = asyncio.Semaphore(ADMITTED)
        # a wait here restarts no clock: junk anyone can send must not be able to
        # postpone checkpoint_missing or audit_withheld (only the lock's wait does: the
        # lock is taken for authenticated records only)
        async with self._admitted:
            yield

    def _waited(self, waited: float, what: str) -> None:
        if waited > STALL:
            log.warning("recomputer was not listening for %.1f s (waiting for %s): "
                        "silence is measured from now", waited, what)
            now = time.time()
            self.ingest.resume(now)
            self.noise.add([Alarm("recomputer_stalled", None, None,
                                  f"uplinks waited {waited:.1f} s for {what}: silence "
                                  "clocks restarted", now)], now)

    async def uplink(self, body: bytes, sealed: bool = False) -> Ack:
        """Admit a batch of envelopes; ``stored`` only for what is stored durably.

        ``sealed``: the body was sealed to this recomputer's KEM key by the gateway
        (``Content-Type: application/vnd.ivp.sealed-uplink``); it is opened first, and
        then checked exactly as a clear one (the records inside are signed). With
        ``Config.require_sealed_uplink`` a clear body is refused whole.

        Raises:
            ValidationError: a sealed body that does not open, a clear body where only
                sealed ones are taken, a body over the caps, or
                not ``{"envelopes": [...]}``.
            TransportError: the store could not write (nothing was acknowledged).
            StoreRolledBackError: the store was set back and is not yet accepted
                (nothing is acknowledged: the gateway keeps its records and retries).
        """
        self.check_trusted()
        if sealed:
            body = self.open_sealed(body)
        elif self.config.require_sealed_uplink:
            # the inspectors' side of "the operator's network sees no prompt": a gateway
            # started without --recomputer-kem-key delivers nothing (and so goes silent)
            raise ValidationError("this recomputer takes only sealed uplink bodies "
                                  "(--require-sealed-uplink): start the gateway with "
                                  "--recomputer-kem-key")
        items = batch_items(body)
        # signatures first, in parallel and outside the lock (pure checks; ``decide``
        # uses only what was authenticated, against the enrolments at that moment)
        verified = await self._signatures.check(self.ingest, items)
        now = time.time()
        checked: list[Authenticated | Outcome] = []
        for i, item in enumerate(items):
            checked.append(self.ingest.authenticate(
                item, now, verified[i] if verified else frozenset()))
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
        gateway_id = next((a.device.device_id for a in checked
                           if isinstance(a, Authenticated)), None)
        checked = [_one_gateway(a, gateway_id) for a in checked]
        if any(isinstance(a, Authenticated) or a.evidence is not None for a in checked):
            async with self._locked():
                outcomes = await self._admit(checked)
        else:
            outcomes = [a for a in checked if isinstance(a, Outcome)]
            self.metrics.uplink(outcomes)
        self.noise.add([a for o in outcomes for a in o.alarms if not authenticated(a.kind)],
                       time.time())
        await self.flush_noise()
        if self._queue:
            self._wake.set()
        return self._answer(gateway_id, outcomes)

    async def _admit(self, checked: list[Authenticated | Outcome]) -> list[Outcome]:
        """Decide, apply and store (the caller holds the lock)."""
        now = time.time()
        outcomes = []
        for i, a in enumerate(checked):
            if isinstance(a, Authenticated):
                o = self.ingest.decide(a, now)
                if o.effect is not None:
                    self.ingest.apply(o.effect)
                a = o
            outcomes.append(a)
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
        alarms = [a for o in outcomes for a in o.alarms if authenticated(a.kind)]
        effects = [o.effect for o in outcomes
                   if o.effect is not None and o.effect.kind != "duplicate"]
        evidence = [o.evidence for o in outcomes if o.evidence is not None]
        try:
            ids = await self._db(self.store.write_uplink, effects, alarms, evidence)
        except Exception as exc:
            log.exception("uplink write failed; reloading trusted state from the store")
            await self._reload()
            raise TransportError(f"recomputer store write failed: {exc}") from None
        for effect, audit_id in zip(effects, ids, strict=True):
            if effect.kind == "audit" and audit_id is not None:
                r = effect.record
                self._queue.append(QueuedAudit(audit_id, r.gateway_id, r.boot_id,
                                               r.audit_seq, effect.manifest_digest,
                                               effect.payload))
            elif effect.kind == "boot":
                self.router.mark(effect.record.gateway_id, True)
        self.metrics.uplink(outcomes)
        self.metrics.alarms(alarms)
        await self._enforce_all(alarms)
        return outcomes

    def _answer(self, gateway_id: str | None, outcomes: Sequence[Outcome]) -> Ack:
        receipts = [o.receipt for o in outcomes if o.receipt is not None]
        assert len(receipts) == len(outcomes), "every outcome carries its receipt"
        signed = env.sign_message(env.ACK, UplinkAck(gateway_id=gateway_id, results=receipts,
                                                     time=time.time()),
                                  self.device.signer())
        return Ack(results=[UplinkResult(ok=o.ok, error="" if o.error is None else
                                         f"{type(o.error).__name__}: {o.error}")
                            for o in outcomes], signed=signed)

    async def flush_noise(self, force: bool = False) -> None:
        """Write the folded unauthenticated alarms, at most once a second."""
        alarms = self.noise.take(time.time(), force)
        if alarms:
            await self._db(self.store.add_alarms, alarms)
            self.metrics.alarms(alarms)

    async def cursor(self, gateway_id: str, boot_id: str | None) -> UplinkCursor:
        """What is stored of a gateway (and one of its boots): ``GET /uplink/cursor``.

        Taken under the uplink's lock, so it reflects every batch that arrived before
        it, durably written. A gateway asks after a failed batch and drops the records
        it shows stored: a lost Ack no longer turns into a resend refused as a replay.

        Raises:
            ValidationError: an id that is not a valid name.
            StoreRolledBackError: the store was set back (its cursor is stale: a
                gateway must not drop records on it).
        """
        self.check_trusted()
        convert({"gateway_id": gateway_id, "boot_id": boot_id}, UplinkCursor)  # validates
        async with self._locked():
            return self.ingest.cursor(gateway_id, boot_id, time.time())

    async def signed_cursor(self, gateway_id: str, boot_id: str | None) -> env.Envelope:
        """:meth:`cursor`, signed by the recomputer's device key (payload ``CURSOR``)."""
        cursor = await self.cursor(gateway_id, boot_id)
        return env.sign_message(env.CURSOR, cursor, self.device.signer())


def _one_gateway(a: Authenticated | Outcome, gateway_id: str | None) -> Authenticated | Outcome:
    """A batch answers for one gateway: records another gateway signed are sent back."""
    if not isinstance(a, Authenticated) or a.device.device_id == gateway_id:
        return a
    err = ValidationError(f"batch mixes gateways: a record of {a.device.device_id!r} after "
                          f"records of {gateway_id!r}")
    receipt = UplinkReceipt(digest=a.digest, status="retry", kind=a.kind,  # type: ignore[arg-type]
                            error=f"ValidationError: {err}"[:500])
    return Outcome(None, err, (), receipt)


__all__ = ["STALL", "Noise", "UplinkShell"]
