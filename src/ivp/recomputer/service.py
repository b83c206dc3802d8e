"""The recomputer service: the thin asynchronous shell around the pure cores.

It owns the I/O — the SQLite store (on one dedicated thread), the worker pool, the
HTTP client that forwards INPUT and delivers SHUTDOWN — and wires the cores
(``ingest.Ingest``, ``admin.AdminCore``, ``routing.Router``) to it. Every trust
decision is taken by a core; this module only orders the steps so that nothing is
acknowledged before it is durable:

* uplink: admit each envelope → one durable transaction → Ack → queue;
* verification: pool verdicts → durable → alarm and (policy) signed SHUTDOWN;
* admin: decide → log entry + nonce + effect in one durable transaction → apply →
  deliver what the gateways must get (a signed READMIT; the inspectors' own
  ε / reboot-schedule / whitelist envelopes, relayed), retried until answered.

Mutations of trusted state run under one asyncio lock, in arrival order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from ivp.device import Device, open_device
from ivp.errors import (
    BrickedError,
    ExpiredError,
    IvpError,
    ModelNotFoundError,
    StoreRolledBackError,
    TransportError,
    ValidationError,
)
from ivp.gateway.rollback import CounterCheck
from ivp.protocol import envelope as env
from ivp.protocol.encoding import canonical, decode
from ivp.protocol.hpke import device_kem_key, kem_public_hex
from ivp.protocol.messages import Ack, Shutdown, UplinkResult
from ivp.protocol.quorum import QuorumPolicy
from ivp.recomputer import admin as adm
from ivp.recomputer import views
from ivp.recomputer.admin_shell import AdminRefusedError, AdminShell
from ivp.recomputer.alarms import Alarm, authenticated
from ivp.recomputer.delivery import Delivery
from ivp.recomputer.ingest import Ingest, Rules
from ivp.recomputer.notices import MAX_BATCH as MAX_NOTICES
from ivp.recomputer.notices import NoticeLog
from ivp.recomputer.routing import RateLimiter, Route, Router, not_whitelisted
from ivp.recomputer.seal import SEAL_PURPOSE, Sealer
from ivp.recomputer.sensors import SensorHub, SensorReading, SensorRules
from ivp.recomputer.sensors import batch_items as sensor_items
from ivp.recomputer.signatures import SignaturePool
from ivp.recomputer.store import QueuedAudit, Store
from ivp.recomputer.uplink import STALL, Noise, UplinkShell
from ivp.recomputer.verifying import Verifying
from ivp.recomputer.workers import Mode, ModelSource, WorkerPool, make_pool
from ivp.whitelist import TrustedWhitelist, read_model_files

log = logging.getLogger("ivp.recomputer")
T = TypeVar("T")
Scope = Literal["gateway", "model", "cluster"]
#: What shuts a gateway down unless the inspectors configure otherwise: a failed audit,
#: an audit record the gateway signed for that never arrived within the grace (the
#: record that would have been checked is gone: as good as a failed audit), and a
#: gateway whose log or device state was set back (records it made were erased), seen
#: at its BOOT (``rollback``) or by the gateway itself (``gateway_locked``).
DEFAULT_SHUTDOWN_ON = ("verify_fail", "audit_withheld", "rollback", "gateway_locked")


@dataclass
class Config:
    """How one recomputer runs. Trust material (policy, whitelist) comes from inspectors."""

    state_dir: Path
    policy: QuorumPolicy
    whitelist: bytes | None = None  # a signed whitelist envelope's bytes
    models: dict[str, Path] = field(default_factory=dict)  # model_id -> directory
    workers: str = "1"  # N local threads | "ray" | "ray://host:port" | "auto"
    ray_actors: int = 2
    mode: Mode = "tolerant"
    rules: Rules = field(default_factory=Rules)
    sensor_rules: SensorRules = field(default_factory=SensorRules)
    shutdown_on: frozenset[str] = frozenset(DEFAULT_SHUTDOWN_ON)
    shutdown_scope: Scope = "gateway"
    batch_size: int = 16
    rate_limit: float = 0.0  # requests/s per client; 0 = off
    rate_burst: float = 20.0
    health_interval: float = 5.0
    tick_interval: float = 1.0
    forward_timeout: float = 600.0
    tamper_endpoint: bool = False  # POST /tamper stands for the tamper mesh (demos, tests)
    signature_workers: int = 1  # processes checking uplink signatures in parallel (0: inline)
    device: str = "soft"  # ivp.device.KINDS: "tpm" keeps the keys (and the seal's) in a TPM
    tpm: str | None = None  # the TPM's TCTI with device="tpm" (None: /dev/tpmrm0)
    require_sealed_uplink: bool = False  # refuse uplink bodies not sealed to this device

    def __post_init__(self) -> None:
        bad = sorted(k for k in self.shutdown_on if not authenticated(k))
        if bad:
            raise ValidationError(
                f"shutdown cannot be triggered by {', '.join(bad)}: such alarms rest on data "
                "anyone can send, so they would let anyone shut an honest gateway down")


class Recomputer(UplinkShell, Delivery, Verifying, AdminShell):
    """One SRC. ``open()`` (sync) loads trusted state; ``start()`` starts the pool and
    background tasks; ``close()`` stops them."""

    def __init__(self, config: Config, pool: WorkerPool | None = None) -> None:
        self.config = config
        self.device: Device = open_device(config.device, Path(config.state_dir) / "device",
                                          config.tpm)
        if self.device.bricked:
            raise BrickedError("recomputer device is bricked (tamper detected): it does nothing")
        self.store = Store(Path(config.state_dir) / "recomputer.sqlite",
                           Sealer(self.device.derive_key(SEAL_PURPOSE)),
                           device=self.device)
        self._report_tampering()
        self._kem = device_kem_key(self.device)  # audit records arrive sealed to it
        self.notices = NoticeLog(Path(config.state_dir) / "notices.sqlite",
                                 self.device.signer())
        self._report_rollback()
        self._notice_wake = asyncio.Event()
        self.whitelist = TrustedWhitelist(config.policy)
        self._install_whitelists()
        self.sources = self._load_models()
        self.ingest = Ingest(self.whitelist.manifest, config.rules)
        self.admin = adm.AdminCore(config.policy)
        self.router = Router()
        self.limiter = RateLimiter(config.rate_limit, config.rate_burst)
        snap = self.store.snapshot()
        self.ingest.restore(snap, self._boot_envelope, time.time())
        self._apply_settings(snap.settings)
        self.admin.restore(snap.nonces, snap.admin_head)
        self.router.last_served.update(snap.served)
        self.sensors = self._restore_sensors()
        self.pool = pool or make_pool(config.workers, self.sources, config.mode,
                                      config.ray_actors)
        # a locked store's queue is stale: nothing is verified from it until accepted
        self._queue: collections.deque[QueuedAudit] = collections.deque(
            [] if self.store.locked else self.store.queued())
        self._parked: dict[int, QueuedAudit] = {}  # unverifiable here (no model, crash)
        self._singles: collections.deque[QueuedAudit] = collections.deque()
        self._retried: set[int] = set()
        self._in_flight = 0
        self._db_exec = ThreadPoolExecutor(1, thread_name_prefix="ivp-store")
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._spawned: set[asyncio.Task[Any]] = set()
        self._relaying: set[str] = set()  # gateways whose relays are being delivered
        self._closing = False
        self._signatures = SignaturePool(config.signature_workers)
        self.noise = Noise()
        self._served_dirty = False
        self.session: Any = None  # aiohttp.ClientSession, made in start()
        from ivp.recomputer.metrics import Metrics

        self.metrics = Metrics()

    # --- start-up ---------------------------------------------------------------------
    def _install_whitelists(self) -> None:
        """The stored whitelist (from admin updates), then the one given at start.

        Raises:
            ValidationError, QuorumError, ExpiredError: the given whitelist is invalid
                (under-signed, expired, malformed): the recomputer refuses to start.
        """
        stored = self.store.snapshot().settings.get("whitelist")
        if stored is not None:
            try:
                self.whitelist.update(canonical(stored))
            except IvpError as exc:
                log.warning("stored whitelist not installed: %s", exc)
        if self.config.whitelist is not None:
            try:
                self.whitelist.update(self.config.whitelist)
            except ExpiredError as exc:
                current = self.whitelist.current
                if current is None or "rollback" not in str(exc):
                    raise
                log.warning("given whitelist not newer than the installed version %d: %s",
                            current.version, exc)

    def _report_tampering(self) -> None:
        """One ``store_tampered`` alarm per table whose rows the store refused at open
        (written, edited or deleted outside the recomputer: ``ivp.recomputer.seal``)."""
        now = time.time()
        alarms = [Alarm("store_tampered", None, None, f.describe()[:2000], now, dedupe=False)
                  for f in self.store.tampered]
        for a in alarms:
            log.error("store tampered: %s", a.detail)
        if alarms:
            self.store.add_alarms(alarms)

    def _report_rollback(self) -> None:
        """A store set back (``Store.rollback``): one ``store_rolled_back`` alarm naming
        both counter values, numbered above every alarm the notice feed already
        published (so the feed carries it even when only the store was restored); an
        honest crash between the advance and the commit only logs."""
        check = self.store.rollback
        if check is None:
            return
        if check.verdict == "interrupted":
            log.warning("recomputer store: the last commit (device counter %d) did not "
                        "complete; nothing it held was acknowledged", check.device)
        if not self.store.locked:
            return
        detail = rollback_detail(check, self.store.rollback_error)
        log.error("store rolled back: %s", detail)
        # folded into the open one at each restart until the inspectors accept the store
        self.store.add_alarms([Alarm("store_rolled_back", None, None, detail[:2000],
                                     time.time())],
                              above=self.notices.cursor("alarm"))

    @property
    def locked(self) -> bool:
        """The store was set back and the inspectors have not accepted it yet."""
        return self.store.locked

    def check_trusted(self) -> None:
        """Raises:
        BrickedError: the device was tampered with.
        StoreRolledBackError: the store was set back: no trust decision is taken from
            it (uplink, cursors, INPUT, sensor readings) until ``accept_store``.
        """
        self.check_alive()
        if self.store.locked:
            assert self.store.rollback is not None
            raise StoreRolledBackError(
                "the recomputer's store was set back and takes no trust decision until "
                "the inspectors accept it: " + rollback_detail(self.store.rollback,
                                                               self.store.rollback_error))

    async def _store_accepted(self) -> None:
        """``accept_store`` is durable: the store is trusted as it stands; verify its
        queue, and measure silence from now (nobody was heard while it was locked)."""
        self._queue.extend(await self._db(self.store.queued))
        self.ingest.resume(time.time())
        self._wake.set()

    def _load_models(self) -> list[ModelSource]:
        """The recomputer's own copies of whitelisted models, checked file by file.

        Raises:
            ValidationError: a model id the whitelist does not hold.
            DigestError: a file missing or not matching the manifest.
        """
        sources = []
        for model_id, directory in self.config.models.items():
            manifests = self.whitelist.manifests_for(model_id)
            if not manifests:
                raise ValidationError(f"--model {model_id}: not in the installed whitelist")
            # one source per serving profile (engine, dtype, δ): a BOOT names one of them;
            # profiles of the same files share one read of them
            read: dict[tuple[str, ...], dict[str, bytes]] = {}
            for manifest in manifests:
                key = tuple(f.digest for f in manifest.files)
                if key not in read:
                    read[key] = read_model_files(Path(directory), manifest)
                sources.append(ModelSource(manifest, read[key]))
        return sources

    def _boot_envelope(self, gateway_id: str, boot_id: str) -> bytes:
        return self.store.boot_envelope(gateway_id, boot_id)

    def _restore_sensors(self) -> SensorHub:
        """Replay stored readings (their alarms were raised when they arrived)."""
        hub = SensorHub(self.config.sensor_rules)
        for raw, received in self.store.sensor_events():
            payload = env.Envelope.from_bytes(raw.encode()).payload_bytes()
            hub.apply(decode(payload, SensorReading), received)  # type: ignore[arg-type]
        return hub

    def _apply_settings(self, settings: dict[str, Any]) -> None:
        self.ingest.epsilon = settings.get("epsilon")
        self.ingest.model_epsilon = dict(settings.get("model_epsilon", {}))
        self.ingest.reboot_interval = settings.get("reboot_interval")

    async def start(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        await self.pool.start()
        self._tasks = [asyncio.create_task(self._dispatch(), name="ivp-dispatch"),
                       asyncio.create_task(self._ticker(), name="ivp-tick")]
        self._wake.set()
        if not self.store.locked:  # a locked store's pending messages are stale
            for gw, data in await self._db(self.store.pending_shutdowns):
                self._spawn(self._deliver(gw, data))
            self._spawn(self._relay_pending())
        self.ingest.resume(time.time())  # listening from now: silence counts from here

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        for t in self._tasks + list(self._spawned):
            t.cancel()
        for t in self._tasks + list(self._spawned):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.pool.close()
        self._signatures.close()
        if self.session is not None:
            await self.session.close()
        # through the store's one thread: a cancelled task's write may still be running there
        if self._served_dirty:
            await self._db(self.store.put_served, self.router.last_served)
        folded = self.noise.take(time.time(), force=True)
        if folded:
            await self._db(self.store.add_alarms, folded)
        self._db_exec.shutdown(wait=True)
        self.store.close()
        self.notices.close()
        getattr(self.device, "close", lambda: None)()  # a TPM's session (soft: nothing)

    # --- helpers ----------------------------------------------------------------------------
    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db_exec, fn, *args)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    async def start_signature_workers(self) -> None:
        """Start the uplink's signature-checking processes now rather than on the first
        large batch (a recomputer expecting heavy uplink traffic from the start)."""
        await self._signatures.start()

    def check_alive(self) -> None:
        """Raises:
        BrickedError: the device was tampered with (property 1: tamper = brick).
        """
        if self.device.bricked:
            raise BrickedError("recomputer is bricked (tamper detected): it does nothing")

    def tamper(self) -> None:
        """The tamper mesh fired: destroy the device secret. Irreversible."""
        self.device.tamper()
        self._closing = True
        self._wake.set()

    def identity(self) -> dict[str, str]:
        key = self.device.public_key
        return {"public_key": key.hex, "keyid": key.keyid,
                "kem_public_key": kem_public_hex(self.device)}

    # --- uplink (the rest is in ``uplink.UplinkShell``) ------------------------------------
    async def _reload(self) -> None:
        def load() -> tuple[Ingest, dict[str, Any]]:  # on the store's thread: no write beside
            ingest = Ingest(self.whitelist.manifest, self.config.rules)
            snap = self.store.snapshot()
            ingest.restore(snap, self._boot_envelope, time.time())
            return ingest, snap.settings
        self.ingest, settings = await self._db(load)
        self._apply_settings(settings)

    # --- sensors -----------------------------------------------------------------------------
    async def sensor_events(self, body: bytes) -> Ack:
        """Admit signed sensor readings; ``ok`` only once stored durably.

        Raises:
            ValidationError: the body is not ``{"envelopes": [...]}``.
            TransportError: the store could not write.
        """
        self.check_trusted()
        items = sensor_items(body)
        async with self._locked():
            now = time.time()
            keys = {d.device_id: d.key for d in self.ingest.devices.values()
                    if d.kind == "sensor"}
            answers: list[UplinkResult] = []
            rows: list[tuple[str, int, str, str, float]] = []
            alarms: list[Alarm] = []
            for item in items:
                reading, error, raised = self.sensors.admit(item, keys, now)
                alarms += raised
                if reading is None:
                    assert error is not None
                    answers.append(UplinkResult(ok=False,
                                                error=f"{type(error).__name__}: {error}"))
                    continue
                alarms += self.sensors.apply(reading, now)
                raw = canonical(env.Envelope(**{k: item[k] for k in
                                                ("payloadType", "payload", "signatures")}))
                rows.append((reading.sensor_id, reading.seq, type(reading).__name__,
                             raw.decode(), now))
                answers.append(UplinkResult(ok=True))
            try:
                await self._db(self.store.add_sensor_events, rows, alarms)
            except Exception as exc:
                log.exception("sensor write failed; reloading sensor state")
                self.sensors = self._restore_sensors()
                raise TransportError(f"recomputer store write failed: {exc}") from None
            self.metrics.alarms(alarms)
            await self._enforce_all(alarms)
        return Ack(results=answers)

    # --- alarms and shutdown -------------------------------------------------------------------
    async def _enforce_all(self, alarms: Sequence[Alarm]) -> None:
        for a in alarms:
            if a.gateway_id is not None:
                await self._enforce(a.kind, a.gateway_id, f"{a.kind}: {a.detail}")

    async def _enforce(self, kind: str, gateway_id: str, reason: str) -> None:
        """The configured shutdown policy (caller holds the lock). Only authenticated
        alarm kinds can be configured (see ``alarms``)."""
        if kind not in self.config.shutdown_on or not authenticated(kind):
            return
        scope = self.config.shutdown_scope
        if scope == "gateway":
            targets = [gateway_id]
        elif scope == "model":
            model = self.ingest.model_of(gateway_id)
            targets = [g for g in self.ingest.gateways
                       if g == gateway_id or (model and self.ingest.model_of(g) == model)]
        else:
            targets = list(self.ingest.gateways)
        for g in targets:
            why = reason if g == gateway_id else f"{scope} shutdown after {gateway_id}: {reason}"
            await self._shutdown(g, why)

    async def _shutdown(self, gateway_id: str, reason: str) -> None:
        gw = self.ingest.gateways.get(gateway_id)
        if gw is not None and gw.state == "shutdown":
            return
        now = time.time()
        order = Shutdown(gateway_id=gateway_id, reason=reason[:1000], time=now,
                         nonce=secrets.token_hex(16))
        data = canonical(env.sign_message(env.SHUTDOWN, order, self.device.signer()))
        await self._db(self.store.set_gateway, gateway_id, "shutdown", reason[:1000], now,
                       True, data)
        await self._db(self.store.confirm)  # the SHUTDOWN leaves: see Store.confirm
        self.ingest.shut_down(gateway_id, reason[:1000], now)
        log.warning("gateway %s shut down: %s", gateway_id, reason)
        # its reason (the failed verdict, the alarm) is signed onto the feed before the
        # SHUTDOWN leaves, not at the next tick: an operator who stops the recomputer at
        # once and puts an older store back must not erase the catch from the feed too
        # (notices.sqlite is not the store; the restore is alarmed, the catch kept)
        try:
            await self.publish_notices()
        except Exception:  # the SHUTDOWN leaves anyway; the ticker publishes again
            log.exception("publishing notices before a SHUTDOWN failed")
        self._spawn(self._deliver(gateway_id, data))

    async def _ticker(self) -> None:
        last_health = last_retry = last_persist = 0.0
        while not self._closing:
            asked = time.monotonic()
            await asyncio.sleep(self.config.tick_interval)
            late = time.monotonic() - asked - self.config.tick_interval
            if late > STALL:  # the event loop itself was blocked: nobody was listening
                log.warning("recomputer loop was blocked %.1f s: silence is measured from "
                            "now", late)
                self.ingest.resume(time.time())
            now = time.time()
            if self.store.locked:  # a set-back store judges nothing; the feed still runs
                with contextlib.suppress(Exception):
                    await self.publish_notices()
                continue
            try:
                async with self._locked():
                    now = time.time()
                    alarms = self.ingest.tick(now)
                    alarms += self.sensors.tick(now, {
                        g.gateway_id: (g.state, g.last_seen)
                        for g in self.ingest.gateways.values()},
                        [d.device_id for d in self.ingest.devices.values()
                         if d.kind == "sensor"])
                    if alarms:
                        await self._db(self.store.add_alarms, alarms)
                        self.metrics.alarms(alarms)
                        await self._enforce_all(alarms)
                await self.flush_noise()
                await self.publish_notices()
                if now - last_health >= self.config.health_interval:
                    last_health = now
                    await self.health_check()
                if now - last_retry >= 5.0:
                    last_retry = now
                    for gw, data in await self._db(self.store.pending_shutdowns):
                        self._spawn(self._deliver(gw, data))
                    self._spawn(self._relay_pending())
                if self._served_dirty and now - last_persist >= 10.0:
                    last_persist, self._served_dirty = now, False
                    await self._db(self.store.put_served, dict(self.router.last_served))
            except Exception:
                log.exception("recomputer tick failed")

    async def health_check(self) -> None:
        """GET each serving gateway's /status: healthy only if it answers, says
        ``serving`` and runs the boot the recomputer knows."""
        import aiohttp

        async def one(gateway_id: str, url: str, boot_id: str) -> None:
            try:
                async with self.session.get(url.rstrip("/") + "/status",
                                            timeout=aiohttp.ClientTimeout(total=3)) as resp:
                    body = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self.router.mark(gateway_id, False, f"health check failed: {exc}"[:200])
                return
            state = body.get("state") if isinstance(body, dict) else None
            their_boot = body.get("boot_id") if isinstance(body, dict) else None
            if state != "serving":
                self.router.mark(gateway_id, False, f"gateway reports state {state!r}")
            elif their_boot is not None and their_boot != boot_id:
                self.router.mark(gateway_id, False, f"gateway runs boot {their_boot!r}, "
                                 f"last BOOT record was {boot_id!r}")
            else:
                self.router.mark(gateway_id, True)

        targets = []
        for gw in self.ingest.gateways.values():
            if gw.state == "serving" and gw.boot_id is not None:
                targets.append((gw.gateway_id, self.ingest.gateway_url(gw.gateway_id),
                                gw.boot_id))
        await asyncio.gather(*(one(*t) for t in targets if t[1]))

    # --- INPUT ------------------------------------------------------------------------------------
    def route(self, model_id: str, client: str, exclude: frozenset[str] = frozenset()) -> Route:
        """Raises:
        RateLimitedError: the client is over its rate (checked on the first try only).
        NoRouteError: no healthy gateway serves ``model_id``.
        """
        self.check_trusted()
        if not exclude:
            self.limiter.take(client, time.monotonic())
        if self.whitelist.manifest(model_id) is None:
            raise ModelNotFoundError(not_whitelisted(model_id, self.served_models()))
        return self.router.choose(model_id, self.ingest.serving(model_id), exclude)

    def served_models(self) -> list[str]:
        """Whitelisted models that a healthy gateway serves now (``GET /v1/models``)."""
        current = self.whitelist.current
        if self.store.locked:  # which gateway serves is stale state
            return []
        return self.router.served([m.model_id for m in current.manifests] if current else [],
                                  self.ingest.serving)

    def served(self, route: Route, ok: bool) -> None:
        self.router.end(route, time.time() if ok else None)
        self._served_dirty = self._served_dirty or ok

    # --- views ----------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        self.check_alive()
        return await views.status(self)

    # --- notices: signed alarms and verdicts for inspectors -----------------------------------
    async def publish_notices(self) -> int:
        """Sign and append every alarm and verdict stored since the last call (the
        ticker calls it each tick); wakes waiting subscribers."""
        alarms = await self._db(self.store.alarms_after, self.notices.cursor("alarm"))
        verdicts = await self._db(self.store.verdicts_after, self.notices.cursor("verdict"))
        items = [("alarm", a.id, a.time, a.to_json()) for a in alarms]
        items += [("verdict", audit_id, t, json.loads(raw))
                  for audit_id, t, raw in verdicts]
        items.sort(key=lambda item: (item[2], item[0], item[1]))
        new = await self._db(self.notices.publish, items) if items else 0
        if new:
            self._notice_wake.set()
            self._notice_wake = asyncio.Event()
        return new

    async def notice_feed(self, after: int, wait: float) -> dict[str, Any]:
        """``GET /notices``: the signed notices after ``after`` (waiting up to ``wait``
        seconds for one), and a heartbeat signed now naming the head.

        Raises:
            BrickedError: the device was tampered with (nothing is signed any more).
        """
        self.check_alive()
        await self.publish_notices()
        batch = await self._db(self.notices.after, after)
        if not batch and wait > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._notice_wake.wait(), min(wait, 60.0))
            batch = await self._db(self.notices.after, after)
        beat = await self._db(self.notices.heartbeat)
        return {"notices": [json.loads(b) for b in batch],
                "more": len(batch) >= MAX_NOTICES, "heartbeat": json.loads(beat)}

    async def verdicts(self, gateway_id: str | None = None) -> list[Any]:
        self.check_alive()
        rows = await self._db(self.store.verdicts, gateway_id)
        return [json.loads(r) for r in rows]

    async def alarms(self, open_only: bool = False) -> list[dict[str, Any]]:
        self.check_alive()
        return [a.to_json() for a in await self._db(self.store.alarms, open_only)]


def rollback_detail(check: CounterCheck, error: str = "") -> str:
    """What a locked store's check means, with both counter values and what to do."""
    accept = (f"; the inspectors re-accept the store as it stands with a quorum "
              f"`ivp admin accept-store --device-counter {check.device}`")
    if error:
        return f"the recomputer's device counter does not open ({error})" + accept
    if check.verdict == "rolled_back":
        missing = check.device - (check.log or 0)
        return (f"the recomputer's store was set back: it was last committed under device "
                f"counter {check.log}, the device is at {check.device} ({missing} commits "
                "missing: an older copy of the store was put back)" + accept)
    if check.verdict == "deleted":
        return (f"the recomputer's store holds no bound counter while the device is at "
                f"{check.device}: the store was deleted or replaced, or its counter row "
                "was edited (quarantined)" + accept)
    return (f"the recomputer's device counter ({check.device}) is behind its own store "
            f"({check.log}): the device state was restored" + accept)


__all__ = ["DEFAULT_SHUTDOWN_ON", "AdminRefusedError", "Config", "Recomputer", "Scope"]
