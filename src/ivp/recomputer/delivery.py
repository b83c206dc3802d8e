"""What the recomputer delivers to gateways: signed control messages and relays.

A mixin of :class:`~ivp.recomputer.service.Recomputer` (it uses its store, session,
ingest core and device key): SHUTDOWN and READMIT to ``<gateway>/control``, and the
inspectors' relayed instructions to ``<gateway>/admin``, each retried until answered
and alarmed while it is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ivp.errors import IvpError
from ivp.protocol import envelope as env
from ivp.protocol.encoding import canonical, decode
from ivp.protocol.messages import Readmit, Shutdown
from ivp.recomputer.alarms import Alarm

if TYPE_CHECKING:
    from ivp.device import SoftDevice
    from ivp.recomputer.ingest import Ingest
    from ivp.recomputer.store import Store

T = TypeVar("T")


class Delivery:
    """Control messages and relays out to the gateways (mixed into Recomputer)."""

    ingest: Ingest
    store: Store
    device: SoftDevice
    session: Any
    _relaying: set[str]
    _closing: bool
    _db: Callable[..., Awaitable[Any]]

    async def _deliver(self, gateway_id: str, data: bytes) -> bool:
        """POST the signed SHUTDOWN (or READMIT) to the gateway's /control; alarm if
        undeliverable (it is retried by the ticker until the gateway confirms)."""
        import aiohttp

        url = self.ingest.gateway_url(gateway_id)
        error = "no URL known for the gateway"
        if url:
            try:
                async with self.session.post(
                    url.rstrip("/") + "/control", data=data,
                    headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=10),
                ) as resp:
                    if resp.status == 200:
                        await self._db(self.store.shutdown_delivered, gateway_id)
                        return True
                    error = f"gateway answered {resp.status}: {(await resp.text())[:300]}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        kind = "shutdown_undelivered"
        with contextlib.suppress(IvpError):
            if env.Envelope.from_bytes(data).payloadType == env.READMIT:
                kind = "readmit_undelivered"
        alarm = Alarm(kind, gateway_id, None, error, time.time())
        await self._db(self.store.add_alarms, [alarm])
        return False

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
                relay_id, _, data = pending[0]
                if not await self._relay_one(gateway_id, relay_id, data):
                    return
        finally:
            self._relaying.discard(gateway_id)

    async def _relay_one(self, gateway_id: str, relay_id: int, data: bytes) -> bool:
        """POST one relay to the gateway's /admin; False: not delivered (retry later)."""
        import aiohttp

        url = self.ingest.gateway_url(gateway_id)
        if not url or self.session is None:
            return False
        try:
            async with self.session.post(
                url.rstrip("/") + "/admin", data=data,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=30),
            ) as resp:
                answer = (await resp.text())[:2000]
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            await self._db(self.store.add_alarms, [Alarm(
                "relay_undelivered", gateway_id, None, f"{type(exc).__name__}: {exc}"[:500],
                time.time())])
            return False
        if status == 200:
            await self._db(self.store.relay_done, relay_id, "delivered", answer)
            return True
        if 400 <= status < 500:
            await self._db(self.store.relay_done, relay_id, "refused", answer, [Alarm(
                "relay_refused", gateway_id, None,
                f"gateway answered {status}: {answer[:500]}", time.time())])
            return True
        await self._db(self.store.add_alarms, [Alarm(
            "relay_undelivered", gateway_id, None, f"gateway answered {status}: "
            f"{answer[:500]}", time.time())])
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
        return canonical(env.sign_message(env.READMIT, message, self.device.signing_key()))



__all__ = ["Delivery"]
