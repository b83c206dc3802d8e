"""The gateway (SNG): boot, serving, sampling, control — over pluggable I/O.

:class:`Gateway` ties the pure parts together (``boot.UploadMode``, ``proxy``, the
chain in ``log.PairLog``) and talks to the world only through four small
interfaces: the device (keys, TRNG, sealing, tamper), the server's power switch, the
server's HTTP (``upstream.Upstream``) and the recomputer's uplink
(``uplink.UplinkTransport``). Tests plug in-memory fakes into all four; the CLI plugs
a child process, aiohttp and a SoftDevice.

States (lowercase on the wire)::

    UPLOAD ──S bytes, all digests good, server ready──▶ SERVING
      ▲  ╲                                                │
      │   ╲──digest mismatch / short / long──▶ POWER_KILL ─┘ (server killed + restarted,
      │                                          │           counter zeroed)
      └──────────────────────────────────────────┘
    any ──signed Shutdown from the recomputer──▶ SHUTDOWN  (persisted; all traffic 403)
    SHUTDOWN ──signed Readmit naming that Shutdown──▶ UPLOAD (server power-cycled)
    any ──tamper──▶ BRICKED                                (for good; all traffic 403)

Every request in SERVING: validate → tokenise (whitelisted tokenizer) → tag + TRNG
seed → server → check tag, re-serialise from token ids → commit the pair durably
(group commit) → release → TRNG draw: keep with probability ε as a signed audit
record, else delete the pair. The draw happens after release, so the server cannot
know which outputs will be checked.

Every local alarm except those about the uplink itself is also signed and spooled as
a numbered ``GatewayAlarm`` for the recomputer. The inspectors' ε, reboot schedule and
whitelist reach the gateway as their own quorum-signed admin requests, relayed by the
recomputer (``admin``; the checks are in ``control``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import gc
import json
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ivp.device import Device
from ivp.errors import (
    BrickedError,
    IvpError,
    PeerDataError,
    SignatureError,
    StateError,
    TransportError,
    ValidationError,
)
from ivp.gateway import boot as bootmod
from ivp.gateway import control, proxy
from ivp.gateway.errors import (
    BodyTooLargeError,
    ServerProtocolError,
    ShutdownError,
    UnknownModelError,
    UploadRefusedError,
)
from ivp.gateway.log import Link, PairLog
from ivp.gateway.metrics import GatewayMetrics
from ivp.gateway.power import PowerSwitch
from ivp.gateway.uplink import Uplink, UplinkTransport, already_stored
from ivp.gateway.upstream import Upstream
from ivp.protocol import chain
from ivp.protocol.encoding import canonical, decode
from ivp.protocol.envelope import ALARM, AUDIT, BOOT, CHECKPOINT, READMIT, WHITELIST, Envelope, sign
from ivp.protocol.keys import VerifyKey
from ivp.protocol.messages import (
    AuditRecord,
    BootRecord,
    Checkpoint,
    EpsilonArgs,
    GatewayAlarm,
    Manifest,
    PairRecord,
    RebootArgs,
    Shutdown,
    Tag,
    UplinkCursor,
    Whitelist,
    WhitelistArgs,
    manifest_digest,
)
from ivp.whitelist import TrustedWhitelist

T = TypeVar("T")

_META_SHUTDOWN = "shutdown"
_META_WHITELIST = "whitelist"
_META_SETTINGS = "settings"
#: Alarms about the uplink itself stay local: the recomputer already alarms every record
#: it refuses, and an alarm about a failing uplink could only travel over that uplink
#: (and would feed itself: a refused alarm would raise another).
LOCAL_ONLY_ALARMS = frozenset({"uplink_refused", "uplink_garbage_ack"})


class State(enum.Enum):
    UPLOAD = "upload"
    SERVING = "serving"
    POWER_KILL = "power_kill"
    SHUTDOWN = "shutdown"
    BRICKED = "bricked"


@dataclass
class GatewayConfig:
    """Settings of one gateway (all set by the inspectors' deployment, not the operator).

    Attributes:
        gateway_id: this gateway's name (in every tag and record).
        epsilon: probability ε that a served pair becomes an audit record.
        url: where this gateway serves INPUT (sent in BOOT records, for routing).
        checkpoint_interval: seconds between signed checkpoints while serving (0: off).
        reboot_interval: forced reboot period in seconds while serving (0: off): power
            flicker + memory wipe + fresh upload (bounds how long in-memory state lives).
        release_grid: release responses only at multiples of this many seconds
            (0: at once); bounds what response timing can carry.
        server_timeout: seconds one inference may take on the server.
        boot_timeout: seconds a freshly powered server may take to answer /health.
        max_body: largest client request body in bytes.
        upload_queue: weight chunks buffered between the operator and the server.
        draw_linger: seconds a sampling draw may wait for the next request's commit to
            share its fsync (draws come after release: no response waits for this).
    """

    gateway_id: str
    epsilon: float = 0.2
    url: str = ""
    checkpoint_interval: float = 10.0
    reboot_interval: float = 0.0
    release_grid: float = 0.0
    server_timeout: float = 600.0
    boot_timeout: float = 120.0
    max_body: int = 1 << 20
    upload_queue: int = 8
    draw_linger: float = 0.02

    def __post_init__(self) -> None:
        if not 0.0 < self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in (0, 1], got {self.epsilon}")
        if self.release_grid < 0 or self.checkpoint_interval < 0 or self.reboot_interval < 0:
            raise ValueError("intervals must be >= 0")


@dataclass
class Reply:
    """An answer for the HTTP shell. ``after_release`` runs once the bytes are sent."""

    body: bytes
    content_type: str = "application/json"
    status: int = 200
    after_release: Callable[[], Awaitable[None]] | None = None


@dataclass
class _Boot:
    """What SERVING knows about the current boot (volatile: gone on restart)."""

    boot_id: str
    manifest: Manifest
    tokenizer: proxy.Tokenizer
    limits: proxy.ModelLimits
    started: float
    epsilon: float = 1.0  # the ε its BOOT record declared: every draw of this boot uses it
    next_seq: int = 0
    pairs: int = 0
    audits: int = 0
    open_tags: set[int] = field(default_factory=set)
    # Draws happen in tag order, so audit records hold pairs in increasing tag seq (the
    # recomputer refuses a record whose pair comes before the previous record's). A seq
    # is settled once its response was released or never will be (its link, or None:
    # no pair), and settled seqs are drawn for from next_draw up (a reorder buffer).
    next_draw: int = 0
    settled: dict[int, tuple[Link | None, asyncio.Future[None]]] = field(default_factory=dict)

    @property
    def unsettled(self) -> int:
        """Seqs handed out whose response is neither released nor abandoned yet."""
        return self.next_seq - self.next_draw - len(self.settled)


@dataclass
class _Write:
    """One queued write of the group commit: an ``append`` (a pair, before release), a
    ``decide`` (a sampling draw, after release) or a ``barrier`` (flush up to here)."""

    kind: str
    boot_id: str
    pair: PairRecord | None = None
    pos: int = 0
    keep: bool = False
    future: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


def load_whitelisted_tokenizer(files: dict[str, bytes]) -> proxy.Tokenizer:
    """The tokenizer from the digest-checked files captured during the upload."""
    from ivp.engine.loading import load_tokenizer

    return proxy.HFTokenizer(load_tokenizer(files))


class Gateway:
    """One Secure Network Gateway in front of one server.

    Args:
        config: see :class:`GatewayConfig`.
        device: the gateway's secure hardware (keys, TRNG, sealing, tamper).
        log: the rolling I/O log + spool (its methods run on one worker thread).
        whitelist: the installed, quorum-signed whitelist.
        upstream: HTTP to the server.
        power: the server's power switch.
        uplink: transport to the recomputer (None: records stay spooled).
        recomputer_key: the only key whose Shutdown envelopes are obeyed.
        tokenizer_loader: builds the tokenizer from the captured files.
    """

    def __init__(self, config: GatewayConfig, device: Device, log: PairLog,
                 whitelist: TrustedWhitelist, upstream: Upstream, power: PowerSwitch, *,
                 uplink: UplinkTransport | None = None, recomputer_key: VerifyKey | None = None,
                 tokenizer_loader: Callable[[dict[str, bytes]], proxy.Tokenizer] = (
                     load_whitelisted_tokenizer),
                 metrics: GatewayMetrics | None = None) -> None:
        self.config = config
        self.device = device
        self.log = log
        self.whitelist = whitelist
        self.upstream = upstream
        self.power = power
        self.recomputer_key = recomputer_key
        self.metrics = metrics or GatewayMetrics()
        self._tokenizer_loader = tokenizer_loader
        self._state = State.UPLOAD
        self._boot: _Boot | None = None
        self._machine: bootmod.UploadMode | None = None
        self._uploading = False
        self._server_fresh = False  # powered on by us, nothing sent to it since
        self._writes: list[_Write] = []  # the group commit's queue (appends and draws)
        self._append_waiting = asyncio.Event()
        self._urgent = False  # someone waits for the queue: no lingering
        self._committing = False
        self._commit_task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ivp-gateway-log")
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Future[Any]] = set()
        self._ended: list[_Boot] = []  # recent boots whose draws may still be pending
        self._threshold = min(int(config.epsilon * 2**64), 2**64)
        self._thresholds: dict[str, int] = {}  # boot_id -> from the ε its BOOT declared
        self._settings = control.Settings()  # the inspectors' (persisted; over the CLI's)
        self._operating = False  # power-loss watch and checkpoint/reboot loops started
        self._settings_lock = asyncio.Lock()  # one settings change at a time (no lost update)
        self._ok = {e: self.metrics.requests.labels(e, "200")
                    for e in ("completions", "chat.completions")}  # hot path: no label lookup
        self.shutdown_reason = ""
        self.uplink: Uplink | None = None
        if uplink is not None:
            reconcile = self._reconcile if hasattr(uplink, "cursor") else None
            self.uplink = Uplink(uplink, self._spool_fetch, self._spool_done, self.alarm,
                                 reconcile=reconcile)

    # --- state ----------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    def _set_state(self, state: State) -> None:
        self._state = state
        self.metrics.state.state(state.value)

    @property
    def gateway_id(self) -> str:
        return self.config.gateway_id

    def _check_alive(self) -> None:
        """Raises BrickedError / ShutdownError: the gateway refuses everything."""
        if self._state is State.BRICKED or self.device.bricked:
            self._set_state(State.BRICKED)
            raise BrickedError("gateway is bricked (tamper detected): it refuses all traffic")
        if self._state is State.SHUTDOWN:
            raise ShutdownError(
                f"gateway was shut down by the recomputer ({self.shutdown_reason}): it refuses "
                "all traffic until re-admitted")

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def alarm(self, kind: str, message: str) -> None:
        """Keep a local alarm (persisted in the log; counted in /metrics) and, unless it
        is about the uplink itself, spool it signed for the recomputer.

        Blocks an operator keeping the gateway's alarms (upload exfiltration, unpaired
        output, power kills, …) from the inspectors: they travel signed and numbered
        without gaps, so a withheld one shows as a gap at the recomputer.
        """
        self.metrics.alarms.labels(kind).inc()
        boot_id = self._boot.boot_id if self._boot is not None else ""
        signer = None if kind in LOCAL_ONLY_ALARMS else functools.partial(
            self._sign_alarm, kind, message, boot_id or None)
        try:
            await self._db(self.log.alarm, kind, message, signer, boot_id)
        except IvpError:  # e.g. the alarm counter does not open: keep it locally at least
            with contextlib.suppress(IvpError):
                await self._db(self.log.alarm, kind, message)
            return
        if signer is not None:
            self._wake_uplink()

    # --- signing --------------------------------------------------------------------------
    def _sign(self, payload_type: str, message: object) -> bytes:
        return sign(payload_type, canonical(message), [self.device.signing_key()]).to_bytes()

    def _sign_audit(self, record: AuditRecord) -> bytes:
        return self._sign(AUDIT, record)

    def _sign_checkpoint(self, cp: Checkpoint) -> bytes:
        return self._sign(CHECKPOINT, cp)

    def _sign_alarm(self, kind: str, message: str, boot_id: str | None, seq: int,
                    now: float) -> bytes:
        return self._sign(ALARM, GatewayAlarm(gateway_id=self.gateway_id, seq=seq, kind=kind,
                                              message=message[:2000], time=now,
                                              boot_id=boot_id))

    # --- life cycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Power-on of the gateway: recover the log, then power the server on, in UPLOAD.

        The volatile counter starts at zero and no boot survives a gateway restart: the
        server is power-cycled and must be uploaded to again. Pairs whose sampling draw
        a crash interrupted get their draw now (no logged pair is lost), and every boot
        left open gets a final checkpoint.
        """
        if self.device.bricked:
            self._set_state(State.BRICKED)
            return
        await self._restore_settings()
        await self._recover()
        reason = await self._stored_shutdown()
        if reason is not None:
            self.shutdown_reason = reason
            self._set_state(State.SHUTDOWN)
        else:
            await self._restore_whitelist()
        if self.uplink is not None:
            self.uplink.start()
        if self._state is State.SHUTDOWN:
            return
        self._operate()
        try:
            await self._power_cycle()
        except IvpError as exc:
            await self.alarm("server_power", f"server did not come up at gateway start: {exc}")

    def _operate(self) -> None:
        """Watch the server's power and run the checkpoint and reboot loops (once)."""
        if self._operating:
            return
        self._operating = True
        self.power.on_power_loss(self._on_power_loss)
        self._tasks.append(asyncio.create_task(self._checkpoint_loop(), name="ivp-checkpoints"))
        self._tasks.append(asyncio.create_task(self._reboot_loop(), name="ivp-reboots"))

    async def _recover(self) -> None:
        for boot_id, eps in (await self._db(self.log.undecided_epsilons)).items():
            self._thresholds.setdefault(boot_id, _threshold(eps))  # the ε its BOOT declared
        drawn = [self._draw(boot_id, pos) for boot_id, pos in await self._db(self.log.undecided)]
        self._urgent = True
        for op in drawn:
            await self._drawn(op)
        for boot_id in await self._db(self.log.open_boots):
            await self._db(self.log.checkpoint, boot_id, self.gateway_id, self._sign_checkpoint)
            await self._db(self.log.close_boot, boot_id)

    async def _stored_shutdown(self) -> str | None:
        """The persisted shutdown's reason; fails closed on a record that does not open."""
        try:
            stored = await self._db(self.log.get_meta, _META_SHUTDOWN)
            return None if stored is None else decode(stored, Shutdown).reason
        except PeerDataError as exc:
            await self.alarm("log_corrupt", f"shutdown record does not open: {exc}")
            return "a shutdown record that does not open (tampered log)"

    async def _restore_settings(self) -> None:
        """The inspectors' settings this gateway last accepted (over the CLI flags).

        Blocks undoing an inspectors' instruction by restarting with other flags.
        """
        try:
            stored = await self._db(self.log.get_meta, _META_SETTINGS)
            if stored is not None:
                self._settings = decode(stored, control.Settings)
        except PeerDataError as exc:
            await self.alarm("log_corrupt", f"stored settings do not open: {exc}")
        if self._settings.reboot_interval is not None:
            self.config.reboot_interval = self._settings.reboot_interval

    async def _restore_whitelist(self) -> None:
        """Install the newest whitelist this gateway ever accepted.

        Blocks rollback by restart: an operator restarting the gateway with an older
        whitelist file (one that allowed more) still gets the newer stored version.
        """
        try:
            stored = await self._db(self.log.get_meta, _META_WHITELIST)
        except PeerDataError as exc:
            await self.alarm("log_corrupt", f"stored whitelist does not open: {exc}")
            stored = None
        if stored is not None:
            with contextlib.suppress(IvpError):
                self.whitelist.update(stored)  # only if newer than the file and unexpired
        if self.whitelist.envelope is not None:
            current = self.whitelist.envelope.to_bytes()
            if current != stored:
                await self._db(self.log.set_meta, _META_WHITELIST, current)

    async def close(self) -> None:
        """Stop background work and power the server off (the gateway is going away)."""
        self._urgent = True  # queued draws commit now, without lingering
        self._append_waiting.set()
        boots = [b for b in (self._boot, *self._ended) if b is not None]
        waiting = any(b.unsettled for b in boots)
        if self._background:
            _done, pending = await asyncio.wait(set(self._background), timeout=0.2 if waiting
                                               else 10)
            for task in pending:  # draws whose release never came: left to recovery
                task.cancel()
            for task in pending:
                with contextlib.suppress(BaseException):
                    await task
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.uplink is not None:
            await self.uplink.stop()
            close_transport = getattr(self.uplink.transport, "close", None)
            if close_transport is not None:
                with contextlib.suppress(Exception):
                    await close_transport()
        with contextlib.suppress(Exception):
            await self.power.power_off()
        with contextlib.suppress(Exception):
            await self.upstream.reset()
        with contextlib.suppress(Exception):
            await self._flush()  # what was queued (draws of cancelled waits) is written
        self._executor.shutdown(wait=True)
        self.log.close()

    # --- power ----------------------------------------------------------------------------
    async def _power_cycle(self) -> None:
        """Power off, power on, wait for an *empty* server (no model in its memory).

        Raises:
            TransportError: the fresh server did not answer in time.
            ServerProtocolError: a freshly powered server claims to hold a model (its
                state survived the power cycle: not a memoryless server).
        """
        self._server_fresh = False
        await self.power.power_off()
        await self.upstream.reset()
        await self.power.power_on()
        deadline = time.monotonic() + self.config.boot_timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.power.is_on:
                raise TransportError("server process exited during power-on")
            try:
                status, body = await self.upstream.get("/health", timeout=5.0)
            except TransportError as exc:
                last = str(exc)
                await asyncio.sleep(0.1)
                continue
            state = _json_field(body, "state") if status == 200 else None
            if state == "empty":
                self._server_fresh = True
                return
            if state in ("loading", "ready"):
                await self.alarm("server_state", f"freshly powered server reports {state!r}")
                raise ServerProtocolError(
                    "freshly powered server claims to hold a model: not memoryless")
            last = f"HTTP {status}"
            await asyncio.sleep(0.1)
        raise TransportError(f"server did not come up within {self.config.boot_timeout:.0f} s "
                             f"({last})")

    def _on_power_loss(self, reason: str) -> None:
        """The server process died on its own: its memory is gone, back to UPLOAD.

        Only a loss while SERVING powers the server back on at once (an idle server in
        UPLOAD is power-cycled by the next upload anyway; no crash loop).
        """
        if self._state is State.SERVING and not self._uploading:
            self._tasks.append(asyncio.create_task(self._power_lost(reason)))
        elif self._state not in (State.SHUTDOWN, State.BRICKED):
            self._tasks.append(asyncio.create_task(self.alarm("server_power_loss", reason)))

    async def _power_lost(self, reason: str) -> None:
        await self.alarm("server_power_loss", reason)
        await self._end_boot(f"power loss: {reason}")
        self._set_state(State.UPLOAD)
        try:
            await self._power_cycle()
        except IvpError as exc:
            await self.alarm("server_power", f"server did not come back: {exc}")

    async def _end_boot(self, why: str) -> None:
        """Close the current boot: final checkpoint, no more pairs under its boot_id."""
        boot, self._boot = self._boot, None
        if boot is None:
            return
        self._ended.append(boot)
        del self._ended[:-4]
        with contextlib.suppress(IvpError):
            await self._db(self.log.checkpoint, boot.boot_id, self.gateway_id,
                           self._sign_checkpoint)
            await self._db(self.log.close_boot, boot.boot_id)
        self._wake_uplink()

    # --- UPLOAD ---------------------------------------------------------------------------
    async def upload(self, model_id: str, chunks: AsyncIterable[bytes]) -> dict[str, Any]:
        """Secure boot (SNG property 2): stream the operator's bytes into a fresh server.

        The manifest comes from the installed whitelist, never from the operator. Each
        file is hashed as it passes; a mismatch power-kills the server at that file's
        end; exactly S good bytes and a server that reports ready → SERVING under a
        fresh boot_id, and a signed BOOT record goes to the uplink.

        Raises:
            BrickedError, ShutdownError: the gateway refuses all traffic.
            StateError: another upload is in progress.
            UnknownModelError: ``model_id`` is not on the installed whitelist (blocks
                booting an unlisted model).
            UploadRefusedError: digest mismatch, short or long stream, or a server that
                failed to boot; the server was power-killed and the gateway is back in
                UPLOAD.
            TransportError: the server could not be powered on.
        """
        self._check_alive()
        if self._uploading:
            raise StateError("an upload is already in progress on this gateway")
        manifest = self.whitelist.manifest(model_id)
        if manifest is None:
            listed = sorted(m.model_id for m in (self.whitelist.current.manifests
                                                 if self.whitelist.current else []))
            raise UnknownModelError(
                f"model {model_id!r} is not on the installed whitelist "
                f"(whitelisted: {', '.join(listed) or 'none'})")
        self._uploading = True
        aborting = False
        try:
            return await self._upload(manifest, chunks)
        except asyncio.CancelledError:
            # the operator's connection went away (the HTTP layer cancelled us): a short
            # stream, so POWER_KILL — finished in the background, uploads refused meanwhile
            machine = self._machine
            aborting = True
            self.spawn(self._abort_upload(machine))
            raise
        finally:
            if not aborting:
                self._uploading = False
            self._machine = None

    async def _abort_upload(self, machine: bootmod.UploadMode | None) -> None:
        try:
            counter = machine.counter if machine is not None else 0
            entry = machine.current_file if machine is not None else None
            await self.alarm("upload_broken", f"operator connection lost after {counter} bytes")
            with contextlib.suppress(IvpError):
                await self._power_kill(bootmod.PowerKill(
                    "short", entry.name if entry else "",
                    f"operator connection lost after {counter} bytes", counter), None)
        finally:
            self._uploading = False

    async def _upload(self, manifest: Manifest, chunks: AsyncIterable[bytes]) -> dict[str, Any]:
        if self._boot is not None:
            await self._end_boot("re-upload")
        self._set_state(State.UPLOAD)
        if not (self._server_fresh and self.power.is_on):
            await self._power_cycle()  # a fresh, empty server
        self._server_fresh = False
        machine = self._machine = bootmod.UploadMode(manifest)  # counter zero
        operator = _OperatorStream(chunks)
        status, body = await self.upstream.post("/boot/manifest", canonical(manifest),
                                                timeout=30.0)
        await self._boot_answer(body, "loading")
        if status != 200:
            await self.alarm("server_boot", f"server refused the manifest: HTTP {status}")
            raise await self._power_kill(bootmod.PowerKill(
                "server", "", f"server refused the manifest (HTTP {status})", 0), operator)

        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=self.config.upload_queue)

        async def stream() -> AsyncIterable[bytes]:
            while (item := await queue.get()) is not None:
                yield item

        server = asyncio.create_task(self.upstream.post("/boot/stream", stream(),
                                                        timeout=self.config.server_timeout))
        try:
            async for chunk in operator:
                if self._state is not State.UPLOAD:
                    self._check_alive()
                for event in machine.feed(chunk):
                    if isinstance(event, bootmod.Forward):
                        await self._forward(queue, server, event.data)
                        self.metrics.upload_bytes.inc(len(event.data))
                    elif isinstance(event, bootmod.PowerKill):
                        raise await self._power_kill(event, operator, server)
            end = machine.finish()
            if isinstance(end, bootmod.PowerKill):
                if operator.broken:
                    await self.alarm("upload_broken", f"operator stream broke: {operator.broken}")
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
        if status != 200 or _json_field(body, "state") != "ready":
            # no byte of the answer goes into the alarm: alarms leave the gateway
            await self.alarm("server_boot", f"server did not boot from good weights: HTTP "
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
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            obj = None
        if not (isinstance(obj, dict) and set(obj) == {"state"} and obj["state"] == expected):
            if isinstance(obj, dict) and "error" in obj and set(obj) == {"error"}:
                return  # an error answer; the caller power-kills on the status
            await self.alarm("server_outside_protocol",
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
        self._set_state(State.POWER_KILL)
        self.metrics.power_kills.labels(event.reason).inc()
        self.metrics.uploads.labels("power_kill").inc()
        if server is not None:
            server.cancel()
            with contextlib.suppress(BaseException):
                await server
        await self.alarm("power_kill", event.message)
        try:
            await self._power_cycle()
        finally:
            if self._state is State.POWER_KILL:
                self._set_state(State.UPLOAD)
        if chunks is not None and self._machine is not None:
            # let the operator's client finish sending, so it reads our answer (bounded)
            budget = max(0, self._machine.total - self._machine.counter) + (1 << 20)
            with contextlib.suppress(Exception):
                async for chunk in chunks:
                    budget -= len(chunk)
                    if budget < 0:
                        break
        return UploadRefusedError(f"POWER_KILL: {event.message}", reason=event.reason,
                                  file=event.file)

    async def _enter_serving(self, manifest: Manifest,
                             machine: bootmod.UploadMode) -> dict[str, Any]:
        files = dict(machine.captured)
        try:
            tokenizer = await asyncio.to_thread(self._tokenizer_loader, files)
        except IvpError as exc:
            raise await self._power_kill(bootmod.PowerKill(
                "server", "", f"whitelisted tokenizer does not load: {exc}", machine.counter),
                None) from None
        vocab = _tokenizer_size(tokenizer)
        limits = proxy.ModelLimits.from_config(files.get("config.json"), vocab)
        boot_id = self.device.random(16).hex()  # TRNG: unpredictable, never reused
        now = time.time()
        # the inspectors' ε (relayed set_epsilon) from this boot on; the BOOT declares it
        epsilon = self._settings.epsilon_for(manifest.model_id, self.config.epsilon)
        record = BootRecord(gateway_id=self.gateway_id, boot_id=boot_id,
                            model_id=manifest.model_id,
                            manifest_digest=manifest_digest(manifest),
                            epsilon=epsilon, time=now, url=self.config.url)
        self._thresholds[boot_id] = _threshold(epsilon)
        await self._db(self.log.begin_boot, boot_id, manifest.model_id,
                       chain.genesis(self.gateway_id, boot_id), self._sign(BOOT, record), now,
                       epsilon)
        try:
            self._check_alive()  # a shutdown or tamper during the upload wins
        except StateError:
            with contextlib.suppress(IvpError):
                await self._db(self.log.close_boot, boot_id)
            raise
        self._boot = _Boot(boot_id, manifest, tokenizer, limits, now, epsilon)
        _freeze_heap()
        self._set_state(State.SERVING)
        self.metrics.uploads.labels("serving").inc()
        self._wake_uplink()
        return {"state": "serving", "boot_id": boot_id, "model_id": manifest.model_id,
                "bytes": machine.counter, "files": len(machine.verified)}

    # --- SERVING --------------------------------------------------------------------------
    def _require_serving(self) -> _Boot:
        self._check_alive()
        if self._state is not State.SERVING or self._boot is None:
            raise StateError(
                f"gateway is in {self._state.value.upper()} mode, not SERVING: it serves only "
                "after a whitelisted model was uploaded through it (POST /upload)")
        return self._boot

    async def complete(self, endpoint: proxy.Endpoint, body: bytes) -> Reply:
        """Serve one inference request (SNG property 3).

        Raises:
            BrickedError, ShutdownError: the gateway refuses all traffic.
            StateError: not SERVING (no whitelisted model booted).
            ValidationError: bad body or a parameter outside sampler spec v1.
            UnknownModelError: the request names another model than the one booted.
            ServerProtocolError: the server's answer is outside the protocol (dropped,
                alarmed; its content never reaches the client).
            TransportError: the server is unreachable.
        """
        t0 = time.monotonic()
        boot = self._require_serving()
        if len(body) > self.config.max_body:
            raise BodyTooLargeError(f"request body is over the {self.config.max_body}-byte "
                                    "limit")
        request = proxy.parse_request(endpoint, body)
        if request.model != boot.manifest.model_id:
            raise UnknownModelError(
                f"this gateway serves only {boot.manifest.model_id!r}, not {request.model!r}")
        prompt_ids = proxy.tokenize(request, boot.tokenizer, boot.limits)
        seq = boot.next_seq
        boot.next_seq += 1
        drawn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        committing: asyncio.Future[Link] | None = None
        try:
            tag = Tag(gateway_id=self.gateway_id, boot_id=boot.boot_id, seq=seq)
            seed = self.device.random_u64()  # TRNG: the client never chooses it
            t_request = time.time()
            boot.open_tags.add(seq)
            try:
                out, t_server = await self._ask_server(boot, request, prompt_ids, tag, seed)
            finally:
                boot.open_tags.discard(seq)
            if self._boot is not boot:  # boot ended (power kill, shutdown) meanwhile
                self._check_alive()
                raise StateError("the server was power-cycled during this request: output "
                                 "dropped")
            out, text = proxy.finish_output(out, request.stop, boot.tokenizer.decode)
            pair = PairRecord(
                tag=tag, model_id=boot.manifest.model_id, endpoint=request.endpoint,
                input=request.input_text, prompt_token_ids=prompt_ids,
                output_token_ids=out.token_ids, output_text=text,
                finish_reason=out.finish_reason,  # type: ignore[arg-type]
                seed=seed, params=request.params, t_request=t_request, t_response=time.time(),
                stop=list(request.stop),
            )
            committing = self._commit(boot.boot_id, pair)
            where = await asyncio.shield(committing)  # durable before release
            boot.pairs += 1
            if request.stream:
                payload = proxy.client_stream(
                    request.endpoint, model_id=pair.model_id, tag=tag,
                    prompt_len=len(prompt_ids), token_ids=out.token_ids, text=text,
                    finish_reason=out.finish_reason, include_usage=request.include_usage,
                    deltas=proxy.text_deltas(out.token_ids, boot.tokenizer.decode, request.stop,
                                             text))
                content_type = "text/event-stream"
            else:
                payload = proxy.client_response(
                    request.endpoint, model_id=pair.model_id, tag=tag,
                    prompt_len=len(prompt_ids), token_ids=out.token_ids, text=text,
                    finish_reason=out.finish_reason)
                content_type = "application/json"
            await self._release_grid()
        except BaseException:
            # no release will come: a committed pair gets its draw once its commit ends
            self._settle_unreleased(boot, seq, committing, drawn)
            raise
        self.metrics.overhead_seconds.observe(max(0.0, time.monotonic() - t0 - t_server))
        self._ok[request.endpoint].inc()
        released = False

        def after_release() -> asyncio.Future[None]:
            # releases at once (no task per request); the future ends with the draw
            nonlocal released
            if not released:
                released = True
                self._settle(boot, seq, where, drawn)
            return drawn

        return Reply(payload, content_type, after_release=after_release)

    async def _ask_server(self, boot: _Boot, request: proxy.ClientRequest,
                          prompt_ids: list[int], tag: Tag,
                          seed: int) -> tuple[proxy.ServerOutput, float]:
        body = proxy.server_request(boot.manifest.model_id, prompt_ids, request.params, seed,
                                    tag, request.stream)
        t = time.monotonic()
        status, raw = await self.upstream.post("/v1/completions", body,
                                               timeout=self.config.server_timeout)
        elapsed = time.monotonic() - t
        self.metrics.server_seconds.observe(elapsed)
        try:
            if status != 200:
                raise ServerProtocolError(f"server answered HTTP {status}: {raw[:300]!r}")
            parse = proxy.parse_server_stream if request.stream else proxy.parse_server_response
            return parse(raw, tag, request.params, boot.limits), elapsed
        except ServerProtocolError:
            # Neither the client nor the alarm gets any of the answer (not even the parse
            # error, which quotes it): the alarm log is served by GET /alarms and the
            # alarm is uplinked, so server-chosen text there would be a channel out.
            what = "an HTTP 200 answer" if status == 200 else "an HTTP error answer"
            await self.alarm("unpaired_output", f"{tag.boot_id}/{tag.seq}: {what} outside the "
                             "protocol (no open tag, or not token ids): dropped unread")
            raise ServerProtocolError(
                "the server's output was outside the protocol and was dropped; an alarm was "
                "raised") from None

    async def _release_grid(self) -> None:
        grid = self.config.release_grid
        if grid > 0:
            now = time.monotonic()
            await asyncio.sleep(grid - (now % grid))

    # --- group commit ---------------------------------------------------------------------
    # Appends (a pair must be durable before its response is released) and sampling draws
    # (after release) share one write queue, written in arrival order by one loop: every
    # transaction holds all that waited, so concurrent requests and the draws of earlier
    # ones cost one fsync together (group commit). Draws keep tag order because they are
    # queued in tag order and the queue is written first in, first out.
    def _commit(self, boot_id: str, pair: PairRecord) -> asyncio.Future[Link]:
        """Queue ``pair``'s append: the future gives its link once it is durable;
        concurrent callers share one commit (group commit)."""
        future = self._enqueue(_Write("append", boot_id, pair=pair))
        self._append_waiting.set()
        return future

    def _enqueue(self, op: _Write) -> asyncio.Future[Any]:
        self._writes.append(op)
        if not self._committing:
            self._committing = True
            self._commit_task = asyncio.create_task(self._commit_loop())
        return op.future

    async def _flush(self) -> None:
        """Wait until every write queued so far is committed (no lingering)."""
        if not self._writes and not self._committing:
            return
        self._urgent = True
        self._append_waiting.set()
        with contextlib.suppress(Exception):
            await self._enqueue(_Write("barrier", ""))

    async def _linger(self) -> None:
        """Only draws wait: give the next request's append a moment to share their fsync
        (a draw happens after release, so this delays no response)."""
        linger = self.config.draw_linger
        if linger <= 0 or self._urgent or any(w.kind != "decide" for w in self._writes):
            return
        self._append_waiting.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._append_waiting.wait(), linger)

    async def _commit_loop(self) -> None:
        batch: list[_Write] = []
        try:
            while self._writes:
                await self._linger()
                batch, self._writes = self._writes, []
                self._urgent = False
                appends = sum(1 for w in batch if w.kind == "append")
                t = time.monotonic()
                results = await self._db(self._write_batch, batch)
                if appends:
                    self.metrics.commit_seconds.observe(time.monotonic() - t)
                    self.metrics.commit_batch.observe(appends)
                for op, result in zip(batch, results, strict=True):
                    if op.future.done():
                        continue
                    if isinstance(result, BaseException):
                        op.future.set_exception(result)
                    else:
                        if op.kind == "append":
                            self.metrics.pairs.inc()
                        op.future.set_result(result)
                batch = []
        except BaseException as exc:  # the disk failed, the loop was cancelled, ...
            for op in batch + self._writes:
                if not op.future.done():
                    op.future.set_exception(exc)
            self._writes = []
            raise
        finally:
            self._committing = False

    def _write_batch(self, batch: list[_Write]) -> list[object]:
        """Runs on the log thread: the whole batch in ONE durable commit. Consecutive
        appends of one boot are one step; each step is a savepoint, so a refused step (a
        closed boot, a row that does not open) leaves no trace and undoes no other.
        Consecutive draws share one savepoint; if one is refused, the others are redone
        one savepoint each (draws are deterministic once drawn: only the disk changes)."""
        out: list[object] = [None] * len(batch)
        with self.log.transaction():
            i = 0
            while i < len(batch):
                op, j = batch[i], i + 1
                if op.kind == "append":
                    while j < len(batch) and batch[j].kind == "append" and \
                            batch[j].boot_id == op.boot_id:
                        j += 1
                    pairs = [w.pair for w in batch[i:j] if w.pair is not None]
                    self._step(out, range(i, j), self.log.append, op.boot_id, pairs)
                elif op.kind == "decide":
                    while j < len(batch) and batch[j].kind == "decide":
                        j += 1
                    if j - i == 1 or not self._step(out, range(i, j), self._decide_all,
                                                    batch[i:j]):
                        for k in range(i, j):
                            self._step(out, range(k, k + 1), self._decide_all, batch[k:k + 1])
                i = j
        return out

    def _decide_all(self, draws: list[_Write]) -> list[AuditRecord | None]:
        return [self.log.decide(w.boot_id, w.pos, w.keep, self._sign_audit, self.gateway_id)
                for w in draws]

    def _step(self, out: list[object], idx: range, fn: Callable[..., list[Any]],
              *args: Any) -> bool:
        """Run one savepointed step; its results (or its error) fill ``out[idx]``.
        False: the step was refused (and left no trace)."""
        try:
            with self.log.step():
                results = fn(*args)
        except IvpError as exc:
            for k in idx:
                out[k] = exc
            return False
        for k, r in zip(idx, results, strict=True):
            out[k] = r
        return True

    def spawn(self, coro: Coroutine[Any, Any, Any] | Awaitable[Any]) -> asyncio.Future[Any]:
        """Run ``coro`` in the background, keeping a reference until it is done."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _settle(self, boot: _Boot, seq: int, where: Link | None,
                drawn: asyncio.Future[None]) -> None:
        """``seq``'s response was released, or never will be (``where``: its pair's link,
        None: no pair). Draws for every settled seq from ``boot.next_draw`` on, in tag
        order; ``drawn`` ends once that seq's draw is committed and counted."""
        boot.settled[seq] = (where, drawn)
        while boot.next_draw in boot.settled:
            link, done = boot.settled.pop(boot.next_draw)
            boot.next_draw += 1
            op = self._draw(link.boot_id, link.pos) if link is not None else None
            if op is None:
                if not done.done():
                    done.set_result(None)
            else:
                op.future.add_done_callback(functools.partial(self._draw_committed, op, done))

    def _settle_unreleased(self, boot: _Boot, seq: int,
                           committing: asyncio.Future[Link] | None,
                           drawn: asyncio.Future[None]) -> None:
        """The request failed or was cancelled: settle ``seq`` once its commit (if it was
        handed one) has ended; a committed pair still gets its draw."""
        if committing is None:
            self._settle(boot, seq, None, drawn)
            return

        def committed(fut: asyncio.Future[Link]) -> None:
            ok = not fut.cancelled() and fut.exception() is None
            self._settle(boot, seq, fut.result() if ok else None, drawn)

        committing.add_done_callback(committed)

    def _draw_committed(self, op: _Write, drawn: asyncio.Future[None],
                        fut: asyncio.Future[Any]) -> None:
        """A queued draw's write ended: count it (the common case, with no task), or
        leave a refused or failed one to :meth:`_drawn` (alarm, or re-raise)."""
        if fut.cancelled() or fut.exception() is not None:
            _chain(self.spawn(self._drawn(op)), drawn)
            return
        self._count_draw(op, fut.result())
        if not drawn.done():
            drawn.set_result(None)

    # --- sampling -------------------------------------------------------------------------
    async def _decide(self, boot_id: str, pos: int) -> None:
        """The TRNG draw, after release: keep as an audit record with probability ε."""
        await self._drawn(self._draw(boot_id, pos))

    def _draw(self, boot_id: str, pos: int) -> _Write | None:
        """Draw now (TRNG) and queue the decision; None when the device is bricked."""
        try:
            keep = self.device.random_u64() < self._thresholds.get(boot_id, self._threshold)
        except BrickedError:
            return None
        op = _Write("decide", boot_id, pos=pos, keep=keep)
        self._enqueue(op)
        return op

    async def _drawn(self, op: _Write | None) -> None:
        """Wait for a queued draw to be committed; count it, wake the uplink."""
        if op is None:
            return
        try:
            record = await op.future
        except BrickedError:
            return
        except IvpError as exc:  # a sealed row that does not open or chain: tampered disk
            await self.alarm("log_corrupt", f"pair {op.boot_id}/{op.pos}: {exc}")
            return
        self._count_draw(op, record)

    def _count_draw(self, op: _Write, record: AuditRecord | None) -> None:
        if record is not None:
            self.metrics.audits.inc()
            if self._boot is not None and self._boot.boot_id == op.boot_id:
                self._boot.audits = record.audit_seq
            self._wake_uplink()
        elif not op.keep:
            self.metrics.deleted.inc()

    # --- checkpoints, reboots -------------------------------------------------------------
    async def checkpoint(self) -> Checkpoint | None:
        """Spool a signed checkpoint of the current boot now (None when not serving)."""
        boot = self._boot
        if boot is None or self._state is not State.SERVING:
            return None
        cp = await self._db(self.log.checkpoint, boot.boot_id, self.gateway_id,
                            self._sign_checkpoint)
        self._wake_uplink()
        return cp

    async def _checkpoint_loop(self) -> None:
        interval = self.config.checkpoint_interval
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(IvpError):
                await self.checkpoint()

    async def _reboot_loop(self) -> None:
        """Forced reboot on the inspectors' schedule: power flicker + wipe + fresh upload.

        The interval is read on every turn: a relayed ``reboot_schedule`` applies at once
        (a boot already older than the new interval is rebooted within a second).
        """
        while True:
            interval = self.config.reboot_interval
            await asyncio.sleep(1.0 if self._boot is None or interval <= 0
                                else min(1.0, interval / 20))
            boot = self._boot
            if boot is None or self._state is not State.SERVING or self._uploading or \
                    interval <= 0:
                continue
            if time.time() - boot.started >= interval:
                await self.forced_reboot("scheduled reboot")

    async def forced_reboot(self, why: str) -> None:
        """Power-cycle the server now; the gateway returns to UPLOAD."""
        if self._state is not State.SERVING:
            return
        await self._end_boot(why)
        self._set_state(State.UPLOAD)
        try:
            await self._power_cycle()
        except IvpError as exc:
            await self.alarm("server_power", f"server did not come back after reboot: {exc}")

    # --- control --------------------------------------------------------------------------
    async def control(self, body: bytes) -> dict[str, Any]:
        """Obey a Shutdown or a Readmit envelope signed by the recomputer key.

        Raises:
            BrickedError: bricked.
            ValidationError: not an envelope, another payload type, a malformed message.
            SignatureError: not signed by the configured recomputer key, or for another
                gateway (blocks an operator or a peer gateway shutting this one down, or
                un-shutting it: state does not change).
            ChainError: a Readmit naming another Shutdown than the one in force (blocks
                replaying an old Readmit to lift a later shutdown).
        """
        if self._state is State.BRICKED or self.device.bricked:
            self._check_alive()
        if self.recomputer_key is None:
            raise SignatureError("no recomputer key configured: control messages refused")
        envelope = Envelope.from_bytes(body)
        if envelope.payloadType == READMIT:
            async with self._settings_lock:
                return await self._readmit(envelope, self.recomputer_key)
        message, payload = control.open_shutdown(envelope, self.recomputer_key,
                                                 self.gateway_id, self._settings)
        if self._state is State.SHUTDOWN:
            return {"state": State.SHUTDOWN.value, "reason": self.shutdown_reason}
        await self._db(self.log.set_meta, _META_SHUTDOWN, payload)  # persisted first
        self.shutdown_reason = message.reason
        self._set_state(State.SHUTDOWN)
        await self.alarm("shutdown", f"shut down by the recomputer: {message.reason}")
        await self._end_boot("shutdown")
        with contextlib.suppress(Exception):
            await self.power.power_off()
        return {"state": State.SHUTDOWN.value, "reason": message.reason}

    async def _readmit(self, envelope: Envelope, key: VerifyKey) -> dict[str, Any]:
        """Re-admission (after the inspectors' quorum ``readmit_gateway``): lift the
        shutdown, power-cycle the server, back to UPLOAD. The recomputer routes to this
        gateway again only after a fresh upload's BOOT record.

        A Readmit whose nonce was obeyed before is answered and changes nothing (the
        recomputer resending after a lost answer). One that reaches a gateway that is
        not shut down (its Shutdown never arrived) still ends the current boot: the
        inspectors re-admitted it on the condition of a fresh upload.
        """
        message = control.open_readmit(envelope, key, self.gateway_id)
        was = self._state
        if was is State.SHUTDOWN:
            control.check_readmit(message, await self._shutdown_nonce())
        elif message.nonce in self._settings.readmits:
            return {"state": self._state.value, "readmitted": False,
                    "reason": "this readmit was already obeyed"}
        settings = control.readmitted(self._settings, message)
        await self._db(self.log.update_meta, {_META_SETTINGS: canonical(settings)},
                       (_META_SHUTDOWN,))  # persisted first, shutdown lifted with it
        self._settings = settings
        await self.alarm("readmitted", f"re-admitted by the recomputer: {message.reason}")
        if was is State.SHUTDOWN:
            self.shutdown_reason = ""
            self._set_state(State.UPLOAD)
            self._operate()
            try:
                await self._power_cycle()
            except IvpError as exc:
                await self.alarm("server_power", f"server did not come up after re-admission: "
                                 f"{exc}")
        elif was is State.SERVING:
            await self.forced_reboot("re-admitted: a fresh upload is needed")
        return {"state": self._state.value, "readmitted": True}

    async def _shutdown_nonce(self) -> str | None:
        """The nonce of the persisted Shutdown (None: none, or it does not open)."""
        try:
            stored = await self._db(self.log.get_meta, _META_SHUTDOWN)
            return None if stored is None else decode(stored, Shutdown).nonce
        except PeerDataError:
            return None

    async def admin(self, body: bytes) -> dict[str, Any]:
        """Apply an inspectors' admin request relayed by the recomputer (``POST /admin``).

        Only ``set_epsilon`` (from the next BOOT on: the BOOT record declares it, so the
        recomputer's audit-rate test always uses the ε a boot really sampled with),
        ``reboot_schedule`` (at once) and ``whitelist_update`` (through the same
        ``TrustedWhitelist`` as ``POST /whitelist``). The gateway checks the inspectors'
        quorum itself: the recomputer only carries the envelope. Settings persist
        (sealed) and override the CLI flags. Accepted also while shut down (they apply
        after re-admission).

        Raises:
            BrickedError: bricked.
            ValidationError, QuorumError, ExpiredError, ChainError: see
                ``control.check_relayed``; and the whitelist's own errors. Nothing
                changes on any refusal.
        """
        if self._state is State.BRICKED or self.device.bricked:
            self._check_alive()
        async with self._settings_lock:
            return await self._admin(body)

    async def _admin(self, body: bytes) -> dict[str, Any]:
        now = time.time()
        relayed = control.check_relayed(body, self.whitelist.policy, self._settings, now)
        instruction = relayed.request.instruction
        if relayed.duplicate:
            return {"applied": False, "instruction": instruction,
                    "reason": "this request was already applied"}
        result: dict[str, Any] = {"applied": True, "instruction": instruction}
        if isinstance(relayed.args, WhitelistArgs):
            result.update(await self._relayed_whitelist(relayed.args))
        settings = control.apply(self._settings, relayed, now)
        await self._db(self.log.set_meta, _META_SETTINGS, canonical(settings))
        self._settings = settings
        args = relayed.args
        if isinstance(args, EpsilonArgs):
            result.update(epsilon=args.epsilon, model_id=args.model_id, effective="next boot")
        elif isinstance(args, RebootArgs):
            self.config.reboot_interval = args.interval_s
            result.update(interval_s=args.interval_s, effective="now")
        return result

    async def _relayed_whitelist(self, args: WhitelistArgs) -> dict[str, Any]:
        """Install a relayed whitelist; one not newer than the installed is no change
        (answered, not refused: a relay retried after it was installed)."""
        data = canonical(args.whitelist)
        payload = self.whitelist.policy.verify(args.whitelist, WHITELIST)
        offered = decode(payload, Whitelist)
        current = self.whitelist.current
        if current is not None and offered.version <= current.version:
            return {"applied": False, "version": current.version,
                    "reason": f"whitelist version {offered.version} is not above the "
                              f"installed version {current.version}"}
        return await self._install_whitelist(data)

    async def tamper(self) -> dict[str, Any]:
        """The tamper mesh fired: destroy the UID (device.tamper), cut the server's power."""
        if not self.device.bricked:
            self.device.tamper()
        self._set_state(State.BRICKED)
        self.metrics.alarms.labels("tamper").inc()
        self._boot = None
        for task in self._tasks:
            task.cancel()
        if self.uplink is not None:
            await self.uplink.stop()
        with contextlib.suppress(Exception):
            await self.power.power_off()
        return {"state": State.BRICKED.value}

    async def install_whitelist(self, body: bytes) -> dict[str, Any]:
        """Install a newer quorum-signed whitelist (takes effect at the next upload).

        Raises:
            ValidationError, QuorumError, ExpiredError: see ``TrustedWhitelist.update``;
                the installed whitelist does not change.
        """
        self._check_alive()
        return await self._install_whitelist(body)

    async def _install_whitelist(self, body: bytes) -> dict[str, Any]:
        whitelist = self.whitelist.update(body)
        await self._db(self.log.set_meta, _META_WHITELIST, body)
        boot = self._boot
        if boot is not None and whitelist.manifest(boot.manifest.model_id) is None:
            # the inspectors revoked the model being served: stop serving it now
            await self.alarm("model_revoked", f"{boot.manifest.model_id} left the whitelist "
                             f"(version {whitelist.version}): forced reboot")
            await self.forced_reboot("model removed from the whitelist")
        return {"version": whitelist.version,
                "models": [m.model_id for m in whitelist.manifests]}

    # --- uplink glue ----------------------------------------------------------------------
    def _wake_uplink(self) -> None:
        if self.uplink is not None:
            self.uplink.wake()

    async def _spool_fetch(self, limit: int) -> list[tuple[int, bytes]]:
        items = await self._db(self.log.spool_batch, limit)
        return [(item.id, item.envelope) for item in items]

    async def _spool_done(self, acked: list[int], refused: list[tuple[int, str]]) -> None:
        await self._db(self.log.spool_done, acked, refused)
        self.metrics.uplink.labels("acked").inc(len(acked))
        if refused:
            self.metrics.uplink.labels("refused").inc(len(refused))
            self.metrics.alarms.labels("uplink_refused").inc(len(refused))

    async def _reconcile(self, limit: int) -> int:
        """Drop the spooled records the recomputer already stored (their Ack was lost).

        Only the oldest ``limit`` records can be concerned: the uplink sends the oldest
        first, one batch at a time, so a batch whose fate is unknown (the gateway died,
        the answer never came) is at the head of the spool. For each boot among them
        (and for the gateway's alarms) the recomputer's cursor says what it holds;
        ``uplink.already_stored`` decides per record.

        The cursor is unsigned: a cursor that claims more than the recomputer stored
        (the operator answering in its name) makes the gateway drop records the
        recomputer never got — which the recomputer alarms as a gap (``sequence_gap``,
        ``audit_withheld``, ``gateway_alarm_gap``, ``unknown_boot``), exactly as if the
        operator had dropped them on the wire, which it can do anyway. A cursor that
        claims less only causes the resend this replaces (refused as a replay).

        Raises:
            TransportError: the cursor could not be read, or was not a cursor of this
                gateway (the batch is then sent as it is).
        """
        transport = self.uplink.transport if self.uplink is not None else None
        ask = getattr(transport, "cursor", None)
        if ask is None:
            return 0
        items = await self._db(self.log.spool_batch, limit)
        boots = list(dict.fromkeys(i.boot_id for i in items if i.kind != "ALARM"))
        if not boots and items:
            boots = [""]  # only alarms: the gateway-wide cursor is enough
        cursors: dict[str, UplinkCursor] = {}
        for boot_id in boots:
            try:
                cursor = decode(await ask(self.gateway_id, boot_id or None), UplinkCursor)
            except ValidationError as exc:
                raise TransportError(f"garbage cursor: {exc}") from None
            if cursor.gateway_id != self.gateway_id or (cursor.boot_id or "") != boot_id:
                raise TransportError("cursor of another gateway or boot")
            cursors[boot_id] = cursor
        alarms = next(iter(cursors.values()), None)
        stored = [i.id for i in items if already_stored(
            i.kind, i.n, i.envelope, alarms if i.kind == "ALARM" else cursors.get(i.boot_id))]
        if stored:
            await self._db(self.log.spool_done, stored, [])
            self.metrics.uplink.labels("reconciled").inc(len(stored))
        return len(stored)

    # --- status ---------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        await self._flush()  # counters include every draw already made
        boot = self._boot
        out: dict[str, Any] = {
            "gateway_id": self.gateway_id,
            "state": self._state.value,
            "model_id": boot.manifest.model_id if boot else None,
            "boot_id": boot.boot_id if boot else None,
            "pairs_served": boot.pairs if boot else 0,
            "audits": boot.audits if boot else 0,
            "epsilon": boot.epsilon if boot else self._settings.epsilon_for(
                "", self.config.epsilon),
            "server": "on" if self.power.is_on else "off",
            "settings": {"epsilon": self._settings.epsilon,
                         "model_epsilon": dict(self._settings.model_epsilon),
                         "reboot_interval": self.config.reboot_interval},
        }
        if self._machine is not None:
            out["upload"] = {"model_id": self._machine.manifest.model_id,
                             "counter": self._machine.counter, "total": self._machine.total}
        if self._state is State.SHUTDOWN:
            out["reason"] = self.shutdown_reason
        if self._state is State.BRICKED or self.device.bricked:
            out.update(state=State.BRICKED.value, spool_depth=0,
                       error="tamper detected: the device is bricked")
            return out
        if boot is not None:
            c = await self._db(self.log.counters, boot.boot_id)
            out.update(pairs_served=c.pairs, audits=c.audits, chain_head=c.head)
        depth = await self._db(self.log.spool_depth)
        self.metrics.spool_depth.set(depth)
        out["spool_depth"] = depth
        out["alarms"] = await self._db(self.log.alarm_count)
        if self.whitelist.current is not None:
            out["whitelist_version"] = self.whitelist.current.version
        if self.uplink is not None:
            s = self.uplink.stats
            out["uplink"] = {"acked": s.acked, "refused": s.refused, "failures": s.failures,
                             "garbage": s.garbage, "last_error": s.last_error}
        return out

    async def alarms(self) -> list[dict[str, object]]:
        """The gateway's own alarm log (readable after a shutdown, not after a brick)."""
        if self._state is State.BRICKED or self.device.bricked:
            self._check_alive()
        return await self._db(self.log.alarms)


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


_heap_frozen = False


def _freeze_heap() -> None:
    """Once, at the first boot (transformers loaded): move what is alive out of the
    cyclic GC's full passes, which took ~60 ms each (~10 µs per request under load).
    Collected first, so no garbage is frozen; later boots add little (a tokenizer is
    freed by reference counting, frozen or not)."""
    global _heap_frozen
    if not _heap_frozen:
        _heap_frozen = True
        gc.collect()
        gc.freeze()


def _threshold(epsilon: float) -> int:
    """TRNG draws (u64) below this are kept: probability ``epsilon``."""
    return min(int(epsilon * 2**64), 2**64)


def _chain(source: asyncio.Future[Any], target: asyncio.Future[None]) -> None:
    """End ``target`` as ``source`` ends (result dropped)."""
    def copy(fut: asyncio.Future[Any]) -> None:
        if target.done():
            return
        if fut.cancelled():
            target.cancel()
        elif fut.exception() is not None:
            target.set_exception(fut.exception())  # type: ignore[arg-type]
        else:
            target.set_result(None)
    source.add_done_callback(copy)


def _json_field(body: bytes, key: str) -> Any:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj.get(key) if isinstance(obj, dict) else None


def _tokenizer_size(tokenizer: proxy.Tokenizer) -> int:
    inner: Any = getattr(tokenizer, "_tok", tokenizer)
    try:
        return len(inner)
    except TypeError:
        return 2**31 - 1


__all__ = ["Gateway", "GatewayConfig", "Reply", "State", "load_whitelisted_tokenizer"]
