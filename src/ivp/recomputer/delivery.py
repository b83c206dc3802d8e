"""What the recomputer delivers to gateways: signed control messages and relays.

A mixin of :class:`~ivp.recomputer.service.Recomputer` (it uses its store, session,
ingest core and device key): SHUTDOWN and READMIT to ``<gateway>/control``, and the
inspectors' relayed instructions to ``<gateway>/admin``, each inside a ``Relay`` this
recomputer signs and numbers per gateway (so the gateway applies them in admin-log
order and never an old one after a newer).

**Delivered means receipted.** The operator owns the wire and can answer any POST
with a 200 of its own, so an answer counts only if it carries a ``ControlReceipt``
signed by the enrolled key of that gateway, naming the BLAKE3 digest of the very bytes
delivered (:func:`receipt_of`). Anything else leaves the message pending: retried by
the ticker, and alarmed (``shutdown_undelivered``, ``readmit_undelivered``,
``relay_undelivered``) each time. A receipt that says ``refused`` is final for a relay
(``relay_refused``: the gateway will not apply it; its number is used).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ivp.errors import IvpError, SignatureError, ValidationError
from ivp.protocol import envelope as env
from ivp.protocol.acks import ControlReceipt, Relay, digest_of
from ivp.protocol.encoding import canonical, convert, decode, loads
from ivp.protocol.messages import Readmit, Shutdown
from ivp.recomputer.alarms import Alarm

if TYPE_CHECKING:
    from ivp.device import Device
    from ivp.recomputer.ingest import Ingest
    from ivp.recomputer.store import Store

T = TypeVar("T")


class Delivery:
    """Control messages and relays out to the gateways (mixed into Recomputer)."""

    ingest: Ingest
    store: Store
    device: Device
    session: Any
    _relaying: set[str]
    _closing: bool
    _db: Callable[..., Awaitable[Any]]

    async def _deliver(self, gateway_id: str, data: bytes) -> bool:
        """POST the signed SHUTDOWN (or READMIT) to the gateway's /control; delivered
        only on the gateway's signed receipt, else alarmed (the ticker retries)."""
        if self.session is None:  # not started: nothing goes out yet
            return False
        kind = "shutdown_undelivered"
        with contextlib.suppress(IvpError):
            if env.Envelope.from_bytes(data).payloadType == env.READMIT:
                kind = "readmit_undelivered"
        status, answer = await self._post(gateway_id, "/control", data, 10.0)
        error = answer if status == 0 else f"gateway answered {status}: {answer[:300]}"
        if status == 200:
            try:
                receipt = self.receipt_of(gateway_id, answer, data,
                                          "readmit" if kind == "readmit_undelivered"
                                          else "shutdown")
            except IvpError as exc:
                error = f"answered 200 without a valid signed receipt: {exc}"
            else:
                await self._db(self.store.shutdown_delivered, gateway_id, receipt.time)
                return True
        await self._db(self.store.add_alarms, [Alarm(kind, gateway_id, None, error[:500],
                                                     time.time())])
        return False

    def receipt_of(self, gateway_id: str, answer: str, data: bytes, kind: str
                   ) -> ControlReceipt:
        """The gateway's signed receipt for ``data`` in its answer.

        Raises:
            ValidationError: no receipt in the answer, or a malformed one.
            SignatureError: not signed by the enrolled key of ``gateway_id``, or naming
                another gateway, another kind or other bytes than those delivered.
        """
        device = self.ingest.devices.get(gateway_id)
        if device is None:
            raise SignatureError(f"gateway {gateway_id!r} is not enrolled")
        try:
            doc = loads(answer, "gateway answer")
        except ValidationError:
            raise ValidationError("the answer is not JSON") from None
        found = doc.get("receipt") if isinstance(doc, dict) else None
        if not isinstance(found, dict):
            raise ValidationError("the answer carries no receipt")
        envelope = convert(found, env.Envelope)
        receipt = decode(env.open_signed(envelope, env.RECEIPT, device.key), ControlReceipt)
        if (receipt.gateway_id, receipt.kind, receipt.digest) != (gateway_id, kind,
                                                                 digest_of(data)):
            raise SignatureError(f"receipt names {receipt.kind} {receipt.digest[:16]}… of "
                                 f"{receipt.gateway_id!r}, not this {kind}")
        return receipt

    async def _post(self, gateway_id: str, path: str, data: bytes, timeout: float
                    ) -> tuple[int, str]:
        """POST to a gateway: (status, answer text); (0, why) when it was not reached."""
        import aiohttp

        url = self.ingest.gateway_url(gateway_id)
        if not url or self.session is None:
            return 0, "no URL known for the gateway"
        try:
            async with self.session.post(
                url.rstrip("/") + path, data=data,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                return resp.status, (await resp.text())[:64 * 1024]
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 0, f"{type(exc).__name__}: {exc}"[:500]

    # --- relays: the inspectors' instructions, forwarded to each gateway ----------------------
    async def _relay_pending(self) -> None:
        """Deliver every pending relay, per gateway in admin-log order.

        A gateway's relays go out one at a time, oldest first, and stop at the first
        that cannot be delivered (retried by the ticker), so a gateway never gets a
        newer instruction before an older one from this recomputer. An answer of 4xx is
        final (the gateway refused: alarm ``relay_refused``); 200 is delivered.
        """
        targets = await self._db(self.store.relay_targets)
        await asyncio.gather(*(self._relay_to(g) for g in targets))

    async def _relay_to(self, gateway_id: str) -> None:
        if gateway_id in self._relaying:  # the running loop picks up new relays too
            return
        self._relaying.add(gateway_id)
        try:
            while not self._closing:
                pending = await self._db(self.store.pending_relays, gateway_id, 1)
                if not pending:
                    return
                if not await self._relay_one(pending[0]):
                    return
        finally:
            self._relaying.discard(gateway_id)

    async def _relay_one(self, row: Any) -> bool:
        """POST one relay, numbered and signed, to the gateway's /admin; True once the
        gateway's signed receipt says it applied (or already had) or refused it."""
        if self.session is None:  # not started: nothing goes out yet
            return False
        relay = Relay(gateway_id=row.gateway_id, relay_seq=row.relay_seq,
                      admin_seq=row.admin_seq, instruction=row.instruction,
                      request=env.Envelope.from_bytes(row.envelope))
        data = canonical(env.sign_message(env.RELAY, relay, self.device.signer()))
        status, answer = await self._post(row.gateway_id, "/admin", data, 30.0)
        error = answer if status == 0 else f"gateway answered {status}: {answer[:500]}"
        if status == 200:
            try:
                receipt = self.receipt_of(row.gateway_id, answer, data, "relay")
            except IvpError as exc:
                error = f"answered 200 without a valid signed receipt: {exc}"
            else:
                refused = receipt.outcome == "refused"
                alarms = [Alarm("relay_refused", row.gateway_id, None,
                                f"relay {row.relay_seq} (admin log {row.admin_seq}): "
                                f"{receipt.detail}"[:500], time.time())] if refused else []
                await self._db(self.store.relay_done, row.id,
                               "refused" if refused else "delivered", answer[:2000], alarms)
                return True
        await self._db(self.store.add_alarms, [Alarm(
            "relay_undelivered", row.gateway_id, None, error[:500], time.time())])
        return False

    # --- timers ---------------------------------------------------------------------------------

    async def _readmit_envelope(self, gateway_id: str, seq: int, now: float) -> bytes:
        """A Readmit signed by this recomputer, naming the Shutdown it lifts (the one
        last sent to the gateway), so it can never lift a later shutdown."""
        stored = await self._db(self.store.control_envelope, gateway_id)
        shutdown_nonce = "0" * 32  # no Shutdown on record: lifts none on the gateway
        if stored is not None:
            with contextlib.suppress(IvpError):
                envelope = env.Envelope.from_bytes(stored)
                if envelope.payloadType == env.SHUTDOWN:
                    shutdown_nonce = decode(envelope.payload_bytes(), Shutdown).nonce
        message = Readmit(gateway_id=gateway_id, shutdown_nonce=shutdown_nonce,
                          reason=f"re-admitted by inspectors (admin log {seq})", time=now,
                          nonce=secrets.token_hex(16))
        return canonical(env.sign_message(env.READMIT, message, self.device.signer()))



__all__ = ["Delivery"]
