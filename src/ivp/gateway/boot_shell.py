"""The I/O shell of secure boot (SNG property 2): the operator's stream, the server's
power and its boot HTTP, around the pure machine in ``boot``.

:class:`BootShell` streams the operator's bytes through :class:`~ivp.gateway.boot.UploadMode`
into a freshly power-cycled server and acts on its events: ``Forward`` goes to the
server, ``PowerKill`` cuts the server's power (RAM wiped) and restarts it with the
counter at zero, the end of S good bytes and a server that says ``ready`` open a boot
(a signed BOOT record, a ``serving.ServingBoot``) → SERVING. It also holds what else
power-cycles the server: a server that died on its own (back to UPLOAD), the forced
reboot on the inspectors' schedule, and any caller's ``forced_reboot``. What the
server's answers mean is judged by ``boot``'s pure functions; this module only waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, Callable
from typing import TYPE_CHECKING, Any

from ivp.errors import IvpError, StateError, TransportError
from ivp.gateway import boot as bootmod
from ivp.gateway import proxy, serving
from ivp.gateway.errors import ServerProtocolError, UnknownModelError, UploadRefusedError
from ivp.gateway.shared import State
from ivp.protocol.encoding import canonical
from ivp.protocol.envelope import BOOT
from ivp.protocol.messages import Manifest

if TYPE_CHECKING:
    from ivp.gateway.core import Gateway


def load_whitelisted_tokenizer(files: dict[str, bytes]) -> proxy.Tokenizer:
    """The tokenizer from the digest-checked files captured during the upload."""
    from ivp.engine.loading import load_tokenizer

    return proxy.HFTokenizer(load_tokenizer(files))


class BootShell:
    """UPLOAD and the server's power for one :class:`~ivp.gateway.core.Gateway`.

    Args:
        gw: the gateway whose state (mode, current boot, settings) this shell moves.
        tokenizer_loader: builds the tokenizer from the captured files.
    """

    def __init__(self, gw: Gateway,
                 tokenizer_loader: Callable[[dict[str, bytes]], proxy.Tokenizer]) -> None:
        self.gw = gw
        self._tokenizer_loader = tokenizer_loader
        self.machine: bootmod.UploadMode | None = None  # the upload in progress
        self.uploading = False
        self._server_fresh = False  # powered on by us, nothing sent to it since

    # --- UPLOAD ---------------------------------------------------------------------------
    async def upload(self, model_id: str, chunks: AsyncIterable[bytes]) -> dict[str, Any]:
        """See :meth:`ivp.gateway.core.Gateway.upload`."""
        gw = self.gw
        gw._check_alive()
        if self.uploading:
            raise StateError("an upload is already in progress on this gateway")
        manifest = _profile(gw, model_id)
        self.uploading = True
        aborting = False
        try:
            return await self._upload(manifest, chunks)
        except asyncio.CancelledError:
            # the operator's connection went away (the HTTP layer cancelled us): a short
            # stream, so POWER_KILL — finished in the background, uploads refused meanwhile
            machine = self.machine
            aborting = True
            gw.spawn(self._abort_upload(machine))
            raise
        finally:
            if not aborting:
                self.uploading = False
            self.machine = None

    async def _abort_upload(self, machine: bootmod.UploadMode | None) -> None:
        try:
            counter = machine.counter if machine is not None else 0
            entry = machine.current_file if machine is not None else None
            await self.gw.alarm("upload_broken",
                                f"operator connection lost after {counter} bytes")
            with contextlib.suppress(IvpError):
                await self._power_kill(bootmod.PowerKill(
                    "short", entry.name if entry else "",
                    f"operator connection lost after {counter} bytes", counter), None)
        finally:
            self.uploading = False

    async def _upload(self, manifest: Manifest, chunks: AsyncIterable[bytes]) -> dict[str, Any]:
        gw = self.gw
        if gw._boot is not None:
            await gw._end_boot("re-upload")
        gw._set_state(State.UPLOAD)
        if not (self._server_fresh and gw.power.is_on):
            await self.power_cycle()  # a fresh, empty server
        self._server_fresh = False
        machine = self.machine = bootmod.UploadMode(manifest)  # counter zero
        operator = _OperatorStream(chunks)
        status, body = await gw.upstream.post("/boot/manifest", canonical(manifest),
                                              timeout=30.0)
        await self._boot_answer(body, "loading")
        if status != 200:
            await gw.alarm("server_boot", f"server refused the manifest: HTTP {status}")
            raise await self._power_kill(bootmod.PowerKill(
                "server", "", f"server refused the manifest (HTTP {status})", 0), operator)

        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=gw.config.upload_queue)

        async def stream() -> AsyncIterable[bytes]:
            while (item := await queue.get()) is not None:
                yield item

        server = asyncio.create_task(gw.upstream.post("/boot/stream", stream(),
                                                      timeout=gw.config.server_timeout))
        try:
            async for chunk in operator:
                if gw._state is not State.UPLOAD:
                    gw._check_alive()
                for event in machine.feed(chunk):
                    if isinstance(event, bootmod.Forward):
                        await self._forward(queue, server, event.data)
                        gw.metrics.upload_bytes.inc(len(event.data))
                    elif isinstance(event, bootmod.PowerKill):
                        raise await self._power_kill(event, operator, server)
            end = machine.finish()
            if isinstance(end, bootmod.PowerKill):
                if operator.broken:
                    await gw.alarm("upload_broken", f"operator stream broke: {operator.broken}")
                raise await self._power_kill(end, operator, server)
            await self._forward(queue, server, None)
            status, body = await server
        except UploadRefusedError:
            raise
        except TransportError as exc:  # the server stopped reading: cut its power too
            raise await self._power_kill(bootmod.PowerKill(
                "server", "", f"server failed during the upload: {exc}", machine.counter),
                operator, server) from None
        except BaseException:
            server.cancel()
            raise
        await self._boot_answer(body, "ready")
        if not bootmod.booted(status, body):
            # no byte of the answer goes into the alarm: alarms leave the gateway
            await gw.alarm("server_boot", f"server did not boot from good weights: HTTP "
                           f"{status}")
            raise await self._power_kill(bootmod.PowerKill(
                "server", "", f"server did not become ready (HTTP {status})",
                machine.counter), None)
        return await self._enter_serving(manifest, machine)

    async def _boot_answer(self, body: bytes, expected: str) -> None:
        """During UPLOAD the server may say only its state: anything more is dropped here
        (it never leaves the gateway) and alarmed.

        The alarm names what happened, never what the server said: alarms are served by
        ``GET /alarms`` and uplinked to the recomputer, so a byte of the answer in the
        alarm text would be a channel out of the server (upload exfiltration).
        """
        if bootmod.boot_answer(body, expected) == "outside":
            await self.gw.alarm("server_outside_protocol",
                                f"server answered its {expected!r} step outside the protocol "
                                "during UPLOAD (answer dropped unread)")

    async def _forward(self, queue: asyncio.Queue[bytes | None], server: asyncio.Task[Any],
                       data: bytes | None) -> None:
        """Hand bytes to the server's stream, unless the server stopped reading."""
        if server.done():
            exc = None if server.cancelled() else server.exception()
            raise TransportError(f"server stopped reading the weights: {exc!r}" if exc else
                                 "server answered before the end of the weights")
        if queue.full():
            put = asyncio.ensure_future(queue.put(data))
            await asyncio.wait({put, server}, return_when=asyncio.FIRST_COMPLETED)
            if not put.done():
                put.cancel()
                exc = server.exception() if not server.cancelled() else None
                raise TransportError(f"server stopped reading the weights: {exc!r}")
        else:
            queue.put_nowait(data)

    async def _power_kill(self, event: bootmod.PowerKill, chunks: AsyncIterable[bytes] | None,
                          server: asyncio.Task[Any] | None = None) -> UploadRefusedError:
        """POWER_KILL: cut the server's power (RAM wiped), restart it, counter to zero."""
        gw = self.gw
        gw._set_state(State.POWER_KILL)
        gw.metrics.power_kills.labels(event.reason).inc()
        gw.metrics.uploads.labels("power_kill").inc()
        if server is not None:
            server.cancel()
            with contextlib.suppress(BaseException):
                await server
        await gw.alarm("power_kill", event.message)
        try:
            await self.power_cycle()
        finally:
            if gw._state is State.POWER_KILL:
                gw._set_state(State.UPLOAD)
        if chunks is not None and self.machine is not None:
            # let the operator's client finish sending, so it reads our answer (bounded)
            budget = max(0, self.machine.total - self.machine.counter) + (1 << 20)
            with contextlib.suppress(Exception):
                async for chunk in chunks:
                    budget -= len(chunk)
                    if budget < 0:
                        break
        return UploadRefusedError(f"POWER_KILL: {event.message}", reason=event.reason,
                                  file=event.file)

    async def _enter_serving(self, manifest: Manifest,
                             machine: bootmod.UploadMode) -> dict[str, Any]:
        gw = self.gw
        files = dict(machine.captured)
        try:
            tokenizer = await asyncio.to_thread(self._tokenizer_loader, files)
        except IvpError as exc:
            raise await self._power_kill(bootmod.PowerKill(
                "server", "", f"whitelisted tokenizer does not load: {exc}", machine.counter),
                None) from None
        vocab = _tokenizer_size(tokenizer)
        limits = proxy.ModelLimits.from_config(files.get("config.json"), vocab)
        boot_id = gw.device.random(16).hex()  # TRNG: unpredictable, never reused
        now = time.time()
        # the inspectors' ε (relayed set_epsilon) from this boot on; the BOOT declares it
        epsilon = gw._settings.epsilon_for(manifest.model_id, gw.config.epsilon)
        record, genesis = serving.boot_record(gw.gateway_id, boot_id, manifest, epsilon, now,
                                              gw.config.url)
        gw.draws.declare(boot_id, epsilon)
        await gw._db(gw.log.begin_boot, boot_id, manifest.model_id, genesis,
                     gw._sign(BOOT, record), now, epsilon)
        try:
            gw._check_alive()  # a shutdown or tamper during the upload wins
        except StateError:
            with contextlib.suppress(IvpError):
                await gw._db(gw.log.close_boot, boot_id)
            raise
        gw._boot = serving.ServingBoot(gw.gateway_id, boot_id, manifest, tokenizer, limits,
                                       now, epsilon)
        if gw.on_serving is not None:
            gw.on_serving()
        gw._set_state(State.SERVING)
        gw.metrics.uploads.labels("serving").inc()
        gw._wake_uplink()
        return {"state": "serving", "boot_id": boot_id, "model_id": manifest.model_id,
                "bytes": machine.counter, "files": len(machine.verified)}

    # --- the server's power ---------------------------------------------------------------
    async def power_cycle(self) -> None:
        """Power off, power on, wait for an *empty* server (no model in its memory).

        Raises:
            TransportError: the fresh server did not answer in time.
            ServerProtocolError: a freshly powered server claims to hold a model (its
                state survived the power cycle: not a memoryless server).
        """
        gw = self.gw
        self._server_fresh = False
        await gw.power.power_off()
        await gw.upstream.reset()
        await gw.power.power_on()
        deadline = time.monotonic() + gw.config.boot_timeout
        last = ""
        while time.monotonic() < deadline:
            if not gw.power.is_on:
                raise TransportError("server process exited during power-on")
            try:
                status, body = await gw.upstream.get("/health", timeout=5.0)
            except TransportError as exc:
                last = str(exc)
                await asyncio.sleep(0.1)
                continue
            state = bootmod.power_on_state(status, body)
            if state == "empty":
                self._server_fresh = True
                return
            if state == "holds_model":
                await gw.alarm("server_state", f"freshly powered server reports "
                               f"{bootmod.json_field(body, 'state')!r}")
                raise ServerProtocolError(
                    "freshly powered server claims to hold a model: not memoryless")
            last = f"HTTP {status}"
            await asyncio.sleep(0.1)
        raise TransportError(f"server did not come up within {gw.config.boot_timeout:.0f} s "
                             f"({last})")

    def on_power_loss(self, reason: str) -> None:
        """The server process died on its own: its memory is gone, back to UPLOAD.

        Only a loss while SERVING powers the server back on at once (an idle server in
        UPLOAD is power-cycled by the next upload anyway; no crash loop).
        """
        gw = self.gw
        if gw._state is State.SERVING and not self.uploading:
            gw._tasks.append(asyncio.create_task(self._power_lost(reason)))
        elif gw._state not in (State.SHUTDOWN, State.BRICKED):
            gw._tasks.append(asyncio.create_task(gw.alarm("server_power_loss", reason)))

    async def _power_lost(self, reason: str) -> None:
        gw = self.gw
        await gw.alarm("server_power_loss", reason)
        await gw._end_boot(f"power loss: {reason}")
        gw._set_state(State.UPLOAD)
        try:
            await self.power_cycle()
        except IvpError as exc:
            await gw.alarm("server_power", f"server did not come back: {exc}")

    async def reboot_loop(self) -> None:
        """Forced reboot on the inspectors' schedule: power flicker + wipe + fresh upload.

        The interval is read on every turn: a relayed ``reboot_schedule`` applies at once
        (a boot already older than the new interval is rebooted within a second).
        """
        gw = self.gw
        while True:
            interval = gw.config.reboot_interval
            await asyncio.sleep(1.0 if gw._boot is None or interval <= 0
                                else min(1.0, interval / 20))
            boot = gw._boot
            if boot is None or gw._state is not State.SERVING or self.uploading or \
                    interval <= 0:
                continue
            if time.time() - boot.started >= interval:
                await self.forced_reboot("scheduled reboot")

    async def forced_reboot(self, why: str) -> None:
        """Power-cycle the server now; the gateway returns to UPLOAD."""
        gw = self.gw
        if gw._state is not State.SERVING:
            return
        await gw._end_boot(why)
        gw._set_state(State.UPLOAD)
        try:
            await self.power_cycle()
        except IvpError as exc:
            await gw.alarm("server_power", f"server did not come back after reboot: {exc}")


class _OperatorStream:
    """The operator's byte stream; a broken connection ends it (→ a short stream).

    A truncated weight stream must power-kill like any other short stream, whatever
    the transport raised when the operator's connection broke.
    """

    def __init__(self, chunks: AsyncIterable[bytes]) -> None:
        self._it = aiter(chunks)
        self.broken = ""

    def __aiter__(self) -> _OperatorStream:
        return self

    async def __anext__(self) -> bytes:
        if self.broken:
            raise StopAsyncIteration
        try:
            return await anext(self._it)
        except (StopAsyncIteration, asyncio.CancelledError, IvpError):
            raise
        except Exception as exc:  # aiohttp payload errors, resets, timeouts
            self.broken = repr(exc)
            raise StopAsyncIteration from None


def _tokenizer_size(tokenizer: proxy.Tokenizer) -> int:
    inner: Any = getattr(tokenizer, "_tok", tokenizer)
    try:
        return len(inner)
    except TypeError:
        return 2**31 - 1


def _profile(gw: Gateway, model_id: str) -> Manifest:
    """The whitelisted manifest for (model, this deployment's engine and dtype).

    Raises:
        UnknownModelError: the model is not whitelisted, not for this engine or dtype,
            or (no dtype configured) for several dtypes of this engine.
    """
    engine, dtype = gw.config.engine, gw.config.dtype or None
    found = [m for m in gw.whitelist.manifests_for(model_id)
             if m.engine == engine and (dtype is None or m.dtype == dtype)]
    if not found:
        raise UnknownModelError(_not_whitelisted(gw, model_id))
    if len(found) > 1:
        raise UnknownModelError(
            f"model {model_id!r} is whitelisted for {engine} in dtypes "
            f"{', '.join(m.dtype for m in found)}: this gateway's deployment must name one "
            "(--dtype)")
    return found[0]


def _not_whitelisted(gw: Gateway, model_id: str) -> str:
    """Why no manifest boots: the model is not listed, or not for this deployment's
    engine and dtype (whose profiles it has)."""
    profiles = gw.whitelist.manifests_for(model_id)
    wanted = f"engine {gw.config.engine}" + (f", dtype {gw.config.dtype}" if gw.config.dtype
                                              else "")
    if profiles:
        named = ", ".join(f"{m.engine}/{m.dtype}" for m in profiles)
        return (f"model {model_id!r} is whitelisted only for {named}, not for this "
                f"gateway's {wanted}: refusing to boot it")
    listed = sorted({m.model_id for m in (gw.whitelist.current.manifests
                                          if gw.whitelist.current else [])})
    return (f"model {model_id!r} is not on the installed whitelist "
            f"(whitelisted: {', '.join(listed) or 'none'})")


__all__ = ["BootShell", "load_whitelisted_tokenizer"]
