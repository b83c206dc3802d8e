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

from ivp.device import SoftDevice
from ivp.errors import (
    BrickedError,
    ExpiredError,
    IvpError,
    PeerDataError,
    TransportError,
    ValidationError,
)
from ivp.protocol import envelope as env
from ivp.protocol.encoding import canonical, decode, to_builtins
from ivp.protocol.messages import (
    Ack,
    Readmit,
    ReadmitArgs,
    Shutdown,
    UplinkCursor,
    UplinkResult,
    Verdict,
)
from ivp.protocol.quorum import QuorumPolicy
from ivp.recomputer import admin as adm
from ivp.recomputer import admin_ops
from ivp.recomputer.alarms import Alarm, authenticated
from ivp.recomputer.ingest import (
    Ingest,
    Rules,
    batch_items,
    signature_tasks,
    verify_signatures,
)
from ivp.recomputer.notices import MAX_BATCH as MAX_NOTICES
from ivp.recomputer.notices import NoticeLog
from ivp.recomputer.routing import RateLimiter, Route, Router
from ivp.recomputer.sensors import SensorHub, SensorReading, SensorRules
from ivp.recomputer.sensors import batch_items as sensor_items
from ivp.recomputer.store import QueuedAudit, Store
from ivp.recomputer.workers import Mode, ModelSource, VerifyJob, WorkerPool, make_pool
from ivp.whitelist import TrustedWhitelist, read_model_files

log = logging.getLogger("ivp.recomputer")
T = TypeVar("T")
MAX_REFUSED_KEPT = 64 * 1024  # bytes of a refused admin request kept beside its log entry
Scope = Literal["gateway", "model", "cluster"]


class AdminRefusedError(PeerDataError):
    """An admin request was refused (HTTP 403); it is in the admin log as ``log_seq``."""

    def __init__(self, cause: IvpError, log_seq: int) -> None:
        super().__init__(str(cause))
        self.cause, self.log_seq = cause, log_seq


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
    shutdown_on: frozenset[str] = frozenset({"verify_fail"})
    shutdown_scope: Scope = "gateway"
    batch_size: int = 16
    rate_limit: float = 0.0  # requests/s per client; 0 = off
    rate_burst: float = 20.0
    health_interval: float = 5.0
    tick_interval: float = 1.0
    forward_timeout: float = 600.0
    tamper_endpoint: bool = False  # POST /tamper stands for the tamper mesh (demos, tests)
    signature_workers: int = 1  # processes checking uplink signatures in parallel (0: inline)

    def __post_init__(self) -> None:
        bad = sorted(k for k in self.shutdown_on if not authenticated(k))
        if bad:
            raise ValidationError(
                f"shutdown cannot be triggered by {', '.join(bad)}: such alarms rest on data "
                "anyone can send, so they would let anyone shut an honest gateway down")


class _SignaturePool:
    """Signature checks of large uplink batches in worker processes.

    In one process the GIL keeps signature checks serial, and they are most of what
    ingestion costs. The pool starts on the first batch that needs it (tests and small
    batches never start it); until it is warm, and for good if it ever fails, the checks
    run inline in ``Ingest.admit`` — the same verdicts either way.
    """

    MIN_BATCH = 16

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._exec: Any = None  # concurrent.futures.ProcessPoolExecutor
        self._ready = False

    async def check(self, ingest: Ingest, items: Sequence[Any]
                    ) -> list[frozenset[tuple[str, bytes]]] | None:
        """Per item, the (keyid, key) pairs whose signature verified; None: check inline."""
        if self.workers <= 0 or len(items) < self.MIN_BATCH:
            return None
        if not self._ready:
            self._warm()
            return None
        tasks = signature_tasks(ingest, items)
        try:
            good = await asyncio.get_running_loop().run_in_executor(
                self._exec, verify_signatures, [t for _, _, t in tasks])
        except Exception as exc:  # a broken pool: inline from now on
            self._fail(exc)
            return None
        found: list[set[tuple[str, bytes]]] = [set() for _ in items]
        for (i, keyid, task), ok in zip(tasks, good, strict=True):
            if ok:
                found[i].add((keyid, task[2]))
        return [frozenset(f) for f in found]

    async def start(self) -> None:
        """Start the workers now and wait until they answer (else they start lazily)."""
        if self.workers <= 0:
            return
        self._warm()
        while self.workers > 0 and not self._ready:
            await asyncio.sleep(0.05)

    def _warm(self) -> None:
        if self._exec is not None:
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        try:  # forkserver: safe with the threads this process runs
            self._exec = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("forkserver"))
            warm = asyncio.get_running_loop().run_in_executor(self._exec, verify_signatures,
                                                              [])
        except Exception as exc:
            self._fail(exc)
            return

        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled() or f.exception() is not None:
                self._fail(f.exception() or RuntimeError("cancelled"))
            else:
                self._ready = True

        warm.add_done_callback(done)

    def _fail(self, exc: BaseException) -> None:
        log.warning("signature worker pool unavailable (checks run inline): %s", exc)
        self.workers, self._ready = 0, False
        self.close()

    def close(self) -> None:
        if self._exec is not None:
            self._exec.shutdown(wait=False, cancel_futures=True)
            self._exec = None


class Recomputer:
    """One SRC. ``open()`` (sync) loads trusted state; ``start()`` starts the pool and
    background tasks; ``close()`` stops them."""

    def __init__(self, config: Config, pool: WorkerPool | None = None) -> None:
        self.config = config
        self.device = SoftDevice(Path(config.state_dir) / "device")
        if self.device.bricked:
            raise BrickedError("recomputer device is bricked (tamper detected): it does nothing")
        self.store = Store(Path(config.state_dir) / "recomputer.sqlite")
        self.notices = NoticeLog(Path(config.state_dir) / "notices.sqlite",
                                 self.device.signer())
        self._notice_wake = asyncio.Event()
        self.whitelist = TrustedWhitelist(config.policy)
        self._install_whitelists()
        self.sources = self._load_models()
        self.ingest = Ingest(self.whitelist.manifest, config.rules)
        self.admin = adm.AdminCore(config.policy)
        self.router = Router()
        self.limiter = RateLimiter(config.rate_limit, config.rate_burst)
        snap = self.store.snapshot()
        self.ingest.restore(snap, self._boot_envelope)
        self._apply_settings(snap.settings)
        self.admin.restore(snap.nonces, snap.admin_head)
        self.router.last_served.update(snap.served)
        self.sensors = self._restore_sensors()
        self.pool = pool or make_pool(config.workers, self.sources, config.mode,
                                      config.ray_actors)
        self._queue: collections.deque[QueuedAudit] = collections.deque(self.store.queued())
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
        self._signatures = _SignaturePool(config.signature_workers)
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
        for gw, data in await self._db(self.store.pending_shutdowns):
            self._spawn(self._deliver(gw, data))
        self._spawn(self._relay_pending())

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
        if self._served_dirty:
            self.store.put_served(self.router.last_served)
        self._db_exec.shutdown(wait=True)
        self.store.close()
        self.notices.close()

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
        return {"public_key": key.hex, "keyid": key.keyid}

    # --- uplink ------------------------------------------------------------------------------
    async def uplink(self, body: bytes) -> Ack:
        """Admit a batch of envelopes; ``ok`` only for what is stored durably.

        Raises:
            ValidationError: the body is not ``{"envelopes": [...]}``.
            TransportError: the store could not write (nothing was acknowledged).
        """
        self.check_alive()
        items = batch_items(body)
        # signatures first, in parallel and outside the lock (pure checks; ``admit``
        # re-checks any signer whose key changed meanwhile)
        verified = await self._signatures.check(self.ingest, items)
        async with self._lock:
            now = time.time()
            outcomes = []
            for i, item in enumerate(items):
                outcome = self.ingest.admit(item, now, verified[i] if verified else frozenset())
                if outcome.effect is not None:
                    self.ingest.apply(outcome.effect)
                outcomes.append(outcome)
            alarms = [a for o in outcomes for a in o.alarms]
            effects = [o.effect for o in outcomes
                       if o.effect is not None and o.effect.kind != "duplicate"]
            try:
                ids = await self._db(self.store.write_uplink, effects, alarms)
            except Exception as exc:
                log.exception("uplink write failed; reloading trusted state from the store")
                self._reload()
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
        if self._queue:
            self._wake.set()
        return Ack(results=[UplinkResult(ok=o.ok, error="" if o.error is None else
                                         f"{type(o.error).__name__}: {o.error}")
                            for o in outcomes])

    async def cursor(self, gateway_id: str, boot_id: str | None) -> UplinkCursor:
        """What is stored of a gateway (and one of its boots): ``GET /uplink/cursor``.

        Taken under the uplink's lock, so it reflects every batch that arrived before
        it, durably written. A gateway asks after a failed batch and drops the records
        it shows stored: a lost Ack no longer turns into a resend refused as a replay.

        Raises:
            ValidationError: an id that is not a valid name.
        """
        self.check_alive()
        from ivp.protocol.encoding import convert

        convert({"gateway_id": gateway_id, "boot_id": boot_id}, UplinkCursor)  # validates
        async with self._lock:
            return self.ingest.cursor(gateway_id, boot_id)

    def _reload(self) -> None:
        self.ingest = Ingest(self.whitelist.manifest, self.config.rules)
        snap = self.store.snapshot()
        self.ingest.restore(snap, self._boot_envelope)
        self._apply_settings(snap.settings)

    # --- sensors -----------------------------------------------------------------------------
    async def sensor_events(self, body: bytes) -> Ack:
        """Admit signed sensor readings; ``ok`` only once stored durably.

        Raises:
            ValidationError: the body is not ``{"envelopes": [...]}``.
            TransportError: the store could not write.
        """
        self.check_alive()
        items = sensor_items(body)
        async with self._lock:
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

    # --- verification ---------------------------------------------------------------------------
    def queue_depth(self) -> int:
        return len(self._queue) + len(self._singles) + self._in_flight

    async def drain(self, timeout: float = 60.0) -> None:
        """Wait until every verifiable queued record has a verdict (tests, demo)."""
        deadline = time.monotonic() + timeout
        while self.queue_depth():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.queue_depth()} audit records still queued")
            await asyncio.sleep(0.02)

    async def _dispatch(self) -> None:
        slots = asyncio.Semaphore(self.pool.size)
        while not self._closing:
            if not self._queue and not self._singles:
                self._wake.clear()
                await self._wake.wait()
                continue
            await slots.acquire()
            if self._singles:  # records of a failed batch, retried one by one
                batch = [self._singles.popleft()]
            else:
                batch = [self._queue.popleft()
                         for _ in range(min(self.config.batch_size, len(self._queue)))]
            if not batch:
                slots.release()
                continue
            self._in_flight += len(batch)
            self._spawn(self._verify(batch, slots))

    async def _verify(self, batch: list[QueuedAudit], slots: asyncio.Semaphore) -> None:
        t0 = time.perf_counter()
        try:
            outcomes = await self.pool.verify(
                [VerifyJob(q.id, q.manifest_digest, q.payload) for q in batch])
        except Exception as exc:
            # A worker crash is no evidence against the gateway. Retry each record on
            # its own; one that still crashes a worker is parked and alarmed (it would
            # otherwise block the queue forever).
            log.exception("verification worker failed on %d record(s)", len(batch))
            self._in_flight -= len(batch)
            slots.release()
            if len(batch) == 1 and batch[0].id in self._retried:
                q = batch[0]
                self._parked[q.id] = q
                await self._db(self.store.add_alarms, [Alarm(
                    "verifier_error", q.gateway_id, q.boot_id,
                    f"audit record {q.audit_seq} crashed the verifier twice: "
                    f"{type(exc).__name__}: {exc}"[:500], time.time())])
            else:
                self._retried.update(q.id for q in batch)
                self._singles.extend(batch)
                await asyncio.sleep(0.5)
            self._wake.set()
            return
        slots.release()
        self.metrics.verify_seconds.observe(time.perf_counter() - t0)
        by_id = {q.id: q for q in batch}
        now = time.time()
        verdicts: list[tuple[int, Verdict, bytes]] = []
        alarms: list[Alarm] = []
        for o in outcomes:
            q = by_id[o.audit_id]
            if o.verdict is None:
                self._parked[q.id] = q
                alarms.append(Alarm("model_unavailable", q.gateway_id, q.boot_id,
                                    o.unverifiable, now))
                continue
            v = decode(o.verdict, Verdict)
            verdicts.append((o.audit_id, v, o.verdict))
            if not v.passed:
                alarms.append(Alarm("verify_fail", v.gateway_id, v.boot_id,
                                    f"audit record {v.audit_seq}: {v.reason}", now,
                                    dedupe=False))
        requeue = True
        try:
            async with self._lock:
                fresh = set(await self._db(self.store.write_verdicts, verdicts, alarms))
                requeue = False
                self.metrics.verdicts([v for i, v, _ in verdicts if i in fresh])
                self.metrics.alarms(alarms)
                await self._enforce_all([a for a in alarms if a.kind != "verify_fail"])
                for audit_id, v, _ in verdicts:
                    if audit_id in fresh and not v.passed and \
                            not self.ingest.judged(v.gateway_id, v.boot_id):
                        await self._enforce("verify_fail", v.gateway_id,
                                            f"audit record {v.audit_seq} failed: {v.reason}")
        except Exception:
            log.exception("storing verdicts or enforcing failed")
            if requeue:
                self._queue.extendleft(reversed(batch))
        finally:
            self._in_flight -= len(batch)
        self._wake.set()

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
        self.ingest.shut_down(gateway_id, reason[:1000])
        log.warning("gateway %s shut down: %s", gateway_id, reason)
        self._spawn(self._deliver(gateway_id, data))

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
    async def _ticker(self) -> None:
        last_health = last_retry = last_persist = 0.0
        while not self._closing:
            await asyncio.sleep(self.config.tick_interval)
            try:
                now = time.time()
                async with self._lock:
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
        self.check_alive()
        if not exclude:
            self.limiter.take(client, time.monotonic())
        return self.router.choose(model_id, self.ingest.serving(model_id), exclude)

    def served(self, route: Route, ok: bool) -> None:
        self.router.end(route, time.time() if ok else None)
        self._served_dirty = self._served_dirty or ok

    # --- admin ------------------------------------------------------------------------------------
    async def handle_admin(self, body: bytes) -> dict[str, Any]:
        """Decide, log and apply one admin request.

        Raises:
            AdminRefusedError: refused (the reason names the failed check).
        """
        self.check_alive()
        async with self._lock:
            now = time.time()
            # decide runs on the store thread: state checks may read the store
            targets = admin_ops.AdminTargets(self.ingest, self.store, self.whitelist,
                                             self.router)
            d = await self._db(self.admin.decide, body, now,
                               lambda _i, args: admin_ops.check(targets, args))
            seq, entry, digest = self.admin.next_entry(d, now)
            effects: list[tuple[str, tuple[Any, ...]]] = []
            result: dict[str, Any] = {}
            readmit = None
            if d.accepted and isinstance(d.args, ReadmitArgs):
                readmit = await self._readmit_envelope(d.args.gateway_id, seq, now)
            if d.accepted:
                effects, result = admin_ops.effects(targets, d.args, seq, now, request=body,
                                                    readmit=readmit)
            # A refused request is kept whole only if small: unauthenticated junk must
            # not fill the disk (its BLAKE3 digest is in the entry either way).
            kept = body if d.accepted or len(body) <= MAX_REFUSED_KEPT else b""
            await self._db(self.store.append_admin, seq, entry, digest, kept,
                           d.request.nonce if d.accepted and d.request else None, effects)
            self.admin.advance(seq, digest, d)
            if d.accepted:
                admin_ops.apply(targets, d.args, now)
                if readmit is not None:
                    self._spawn(self._deliver(d.args.gateway_id, readmit))  # type: ignore[union-attr]
                if result.get("relayed_to"):
                    self._spawn(self._relay_pending())
            self.metrics.admin(d)
        if not d.accepted:
            assert d.error is not None
            log.warning("admin request refused (log %d): %s", seq, d.reason)
            raise AdminRefusedError(d.error, seq)
        log.info("admin request accepted (log %d): %s", seq, d.instruction)
        return {"accepted": True, "log_seq": seq, "instruction": d.instruction,
                "signers": sorted(d.signers), "result": result}

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

    async def admin_log(self) -> dict[str, Any]:
        """The admin log with its head signed by the recomputer's device key."""
        rows = await self._db(self.store.admin_log)
        head = adm.verify_log(rows)
        head_doc = {"seq": len(rows), "hash": head, "time": time.time()}
        signed = env.sign(adm.LOG_HEAD, canonical(head_doc), [self.device.signer()])
        return {"entries": [{**json.loads(raw), "hash": h} for _, raw, h in rows],
                "head": to_builtins(signed)}

    # --- views ----------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        self.check_alive()
        counts = await self._db(self.store.counts)
        per_gw = await self._db(self.store.verdict_counts_by_gateway)
        relays = await self._db(self.store.relay_counts)
        gateways: dict[str, Any] = {}
        for gw in sorted(self.ingest.gateways.values(), key=lambda g: g.gateway_id):
            boot = self.ingest.boots.get((gw.gateway_id, gw.boot_id)) if gw.boot_id else None
            cp = boot.checkpoint if boot else None
            gateways[gw.gateway_id] = {
                "gateway_id": gw.gateway_id, "state": gw.state, "reason": gw.reason,
                "healthy": gw.gateway_id not in self.router.unhealthy,
                "health": self.router.unhealthy.get(gw.gateway_id, "ok"),
                "url": self.ingest.gateway_url(gw.gateway_id),
                "boot_id": gw.boot_id,
                "model_id": boot.record.model_id if boot else None,
                "whitelisted": boot.whitelisted if boot else None,
                "epsilon": boot.record.epsilon if boot else None,
                "audits_received": boot.audits_received if boot else 0,
                "pairs_served": cp.pairs_served if cp else None,
                "audits_claimed": cp.audits if cp else None,
                "last_checkpoint": boot.checkpoint_received if boot else None,
                "verdicts": per_gw.get(gw.gateway_id, {"passed": 0, "failed": 0}),
                "in_flight": self.router.in_flight.get(gw.gateway_id, 0),
                "alarms_received": gw.next_alarm_seq - 1,
                "relays": relays.get(gw.gateway_id, {}),
            }
        wl = self.whitelist.current
        return {
            "keyid": self.device.public_key.keyid,
            "mode": self.config.mode,
            "workers": {"kind": self.pool.name, "size": self.pool.size},
            "store": {"path": str(self.store.path), "journal_mode": self.store.journal_mode,
                      "sync_mode": self.store.sync_mode},
            "whitelist": {"version": wl.version, "expires": wl.expires,
                          "models": [m.model_id for m in wl.manifests]} if wl else None,
            "models_loaded": [s.manifest.model_id for s in self.sources],
            "gateways": gateways,
            "queue_depth": self.queue_depth(),
            "in_flight": self._in_flight,
            "unverifiable": len(self._parked),
            "audits": counts["audits"],
            "verdicts": {"passed": counts["passed"], "failed": counts["failed"],
                         "total": counts["passed"] + counts["failed"]},
            "alarms": counts["alarms"],
            "open_alarms": counts["open_alarms"],
            "settings": {"epsilon": self.ingest.epsilon,
                         "model_epsilon": self.ingest.model_epsilon,
                         "reboot_interval": self.ingest.reboot_interval,
                         "shutdown_on": sorted(self.config.shutdown_on),
                         "shutdown_scope": self.config.shutdown_scope},
            "admin_log": {"seq": self.admin.seq, "head": self.admin.head},
            "last_served": dict(self.router.last_served),
            "sensors": self.sensors.view(),
        }

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
