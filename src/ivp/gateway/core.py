"""The gateway (SNG) as one object: its modes and life cycle — and SNG property 1, a
tamper bricks it for good (``Gateway.tamper``) — over pluggable I/O.

:class:`Gateway` owns the state every part shares — the mode, the current boot, the
inspectors' settings — and hands each kind of work to the module that owns it:

=====================  ==================================================================
``boot``               pure: the volatile counter and per-file digests (SNG property 2)
``boot_shell``         UPLOAD's I/O: the operator's stream, the server's power and boot
``serving``            pure: tags, pair records, chain links, draws in tag order, audit
                       records, checkpoints (SNG property 3)
``datapath``           SERVING's I/O: request in, server call, commit, release, draw
``log``, ``commit``    the durable log (the only SQLite) and its group-commit writer
``control``            pure: the checks of Shutdown, Readmit and relayed admin requests
``control_shell``      obeying them, whitelist installs, what persists across restarts
``uplink``             the store-and-forward uplink to the recomputer
=====================  ==================================================================

It talks to the world only through four small interfaces: the device (keys, TRNG,
sealing, tamper), the server's power switch, the server's HTTP (``upstream.Upstream``)
and the recomputer's uplink (``uplink.UplinkTransport``). Tests plug in-memory fakes
into all four; the CLI plugs a child process, aiohttp and a SoftDevice. The library
makes no process-wide change: the CLI passes ``on_serving`` to freeze the heap.

States (lowercase on the wire)::

    UPLOAD ──S bytes, all digests good, server ready──▶ SERVING
      ▲  ╲                                                │
      │   ╲──digest mismatch / short / long──▶ POWER_KILL ─┘ (server killed + restarted,
      │                                          │           counter zeroed)
      └──────────────────────────────────────────┘
    any ──signed Shutdown from the recomputer──▶ SHUTDOWN  (persisted; all traffic 403)
    SHUTDOWN ──signed Readmit naming that Shutdown──▶ UPLOAD (server power-cycled)
    any ──tamper──▶ BRICKED                                (for good; all traffic 403)

Every local alarm except those about the uplink itself is also signed and spooled as
a numbered ``GatewayAlarm`` for the recomputer. The inspectors' ε, reboot schedule and
whitelist reach the gateway as their own quorum-signed admin requests, relayed by the
recomputer (``admin``; the checks are in ``control``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from ivp.device import Device
from ivp.errors import BrickedError, IvpError, SignatureError, StateError
from ivp.gateway import control, proxy
from ivp.gateway.answers import AckJudgement, Spooled, judge_ack
from ivp.gateway.boot_shell import BootShell, load_whitelisted_tokenizer
from ivp.gateway.commit import GroupCommit
from ivp.gateway.control_shell import ControlShell
from ivp.gateway.datapath import Boot, Datapath
from ivp.gateway.errors import ShutdownError
from ivp.gateway.log import PairLog
from ivp.gateway.metrics import GatewayMetrics
from ivp.gateway.power import PowerSwitch
from ivp.gateway.serving import Draws
from ivp.gateway.shared import GatewayConfig, Reply, State
from ivp.gateway.uplink import Backoff, Spool, Uplink, UplinkTransport
from ivp.gateway.upstream import Upstream
from ivp.protocol.encoding import canonical
from ivp.protocol.envelope import ALARM, AUDIT, CHECKPOINT, sign
from ivp.protocol.keys import VerifyKey
from ivp.protocol.messages import AuditRecord, Checkpoint, GatewayAlarm
from ivp.whitelist import TrustedWhitelist

T = TypeVar("T")

#: Alarms about the uplink itself stay local: the recomputer already alarms every record
#: it refuses, and an alarm about a failing uplink could only travel over that uplink
#: (and would feed itself: a refused alarm would raise another).
LOCAL_ONLY_ALARMS = frozenset({"uplink_refused", "uplink_garbage_ack", "uplink_bad_receipt"})


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
        on_serving: called each time a boot enters SERVING, before its first request
            (the process entry freezes the heap there; a library makes no such change).
    """

    def __init__(self, config: GatewayConfig, device: Device, log: PairLog,
                 whitelist: TrustedWhitelist, upstream: Upstream, power: PowerSwitch, *,
                 uplink: UplinkTransport | None = None, recomputer_key: VerifyKey | None = None,
                 tokenizer_loader: Callable[[dict[str, bytes]], proxy.Tokenizer] = (
                     load_whitelisted_tokenizer),
                 metrics: GatewayMetrics | None = None,
                 on_serving: Callable[[], None] | None = None) -> None:
        self.config = config
        self.device = device
        self.log = log
        self.whitelist = whitelist
        self.upstream = upstream
        self.power = power
        self.recomputer_key = recomputer_key
        self.metrics = metrics or GatewayMetrics()
        self.on_serving = on_serving
        self._state = State.UPLOAD
        self._boot: Boot | None = None
        self._ended: list[Boot] = []  # recent boots whose draws may still be pending
        self._settings = control.Settings()  # the inspectors' (persisted; over the CLI's)
        self.shutdown_reason = ""
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Future[Any]] = set()
        self._operating = False  # power-loss watch and checkpoint/reboot loops started
        self.draws = Draws(config.epsilon)
        self.writer = GroupCommit(log, config, self.metrics, self._sign_audit,
                                  config.gateway_id)
        self.boot_shell = BootShell(self, tokenizer_loader)
        self.datapath = Datapath(self)
        self.control_shell = ControlShell(self)
        self.uplink: Uplink | None = None
        if uplink is not None:
            self._spool = Spool(self._db, log, config.gateway_id, self.metrics,
                                recomputer_key)
            reconcile = self._reconcile if hasattr(uplink, "cursor") else None
            # retry at least once a checkpoint period: a recomputer back from a restart
            # must hear from this gateway before it would count it silent
            backoff = Backoff(cap=max(1.0, config.checkpoint_interval or 30.0))
            self.uplink = Uplink(uplink, self._spool.fetch, self._spool.done, self.alarm,
                                 self._judge_ack, depth=self._spool.depth,
                                 reconcile=reconcile, backoff=backoff)

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

    def _require_serving(self) -> Boot:
        self._check_alive()
        if self._state is not State.SERVING or self._boot is None:
            raise StateError(
                f"gateway is in {self._state.value.upper()} mode, not SERVING: it serves only "
                "after a whitelisted model was uploaded through it (POST /upload)")
        return self._boot

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a log method on the log's own thread."""
        return await self.writer.call(fn, *args, **kwargs)

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
        return sign(payload_type, canonical(message), [self.device.signer()]).to_bytes()

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
        check = await self.control_shell.counter_check()  # before any commit
        await self.control_shell.restore_settings()
        await self._recover(keep_all=check.keep_undecided)
        if check.locked:  # the log was set back: serve nothing from it
            await self.control_shell.lock_down(f"log rollback detected: {check.explain()}")
        reason = await self.control_shell.stored_shutdown()
        if reason is not None:
            self.shutdown_reason = reason
            self._set_state(State.SHUTDOWN)
        else:
            await self.control_shell.restore_whitelist()
        if self.uplink is not None:
            self.uplink.start()
        # checkpoints while serving, heartbeats otherwise: from the first start, also
        # while shut down (a shut-down gateway that falls silent is an alarm)
        self._tasks.append(asyncio.create_task(self._checkpoint_loop(), name="ivp-checkpoints"))
        if self._state is State.SHUTDOWN:
            await self.heartbeat()
            return
        self._operate()
        try:
            await self.boot_shell.power_cycle()
        except IvpError as exc:
            await self.alarm("server_power", f"server did not come up at gateway start: {exc}")

    def _operate(self) -> None:
        """Watch the server's power and run the reboot loop (once)."""
        if self._operating:
            return
        self._operating = True
        self.power.on_power_loss(self.boot_shell.on_power_loss)
        self._tasks.append(asyncio.create_task(self.boot_shell.reboot_loop(),
                                               name="ivp-reboots"))

    async def _recover(self, keep_all: bool = False) -> None:
        """Chain every stream a crash cut (its last durable chunk: all it released), draw
        for every pair a crash left undecided (all kept when ``keep_all``: the fate of
        the last draw batch is unknown), then close every boot left open."""
        await self._db(self.log.cut_streams)  # streams the crash cut: chained as they stood
        for boot_id, eps in (await self._db(self.log.undecided_epsilons)).items():
            self.draws.recovered(boot_id, eps)  # the ε its BOOT declared
        drawn = [self.writer.decide(boot_id, pos, True) if keep_all
                 else self.datapath.draw(boot_id, pos)
                 for boot_id, pos in await self._db(self.log.undecided)]
        self.writer.hurry()
        for op in drawn:
            await self.datapath.drawn(op)
        for boot_id in await self._db(self.log.open_boots):
            await self._db(self.log.end_boot, boot_id, self.gateway_id, self._sign_checkpoint)

    async def close(self) -> None:
        """Stop background work and power the server off (the gateway is going away)."""
        self.writer.hurry()  # queued draws commit now, without lingering
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
            await self.writer.flush()  # what was queued (draws of cancelled waits) is written
        self.writer.shutdown()
        self.log.close()

    async def _end_boot(self, why: str) -> None:
        """Close the current boot: final checkpoint, no more pairs under its boot_id."""
        boot, self._boot = self._boot, None
        if boot is None:
            return
        self._ended.append(boot)
        del self._ended[:-4]
        with contextlib.suppress(IvpError):
            # its open streams are chained as they stood in the commit that closes it:
            # no chunk they released is missing, and none can be committed after
            boot.chained.update(await self._db(self.log.end_boot, boot.boot_id,
                                               self.gateway_id, self._sign_checkpoint))
        self._wake_uplink()

    def spawn(self, coro: Coroutine[Any, Any, Any] | Awaitable[Any]) -> asyncio.Future[Any]:
        """Run ``coro`` in the background, keeping a reference until it is done."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # --- UPLOAD and SERVING ---------------------------------------------------------------
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
        return await self.boot_shell.upload(model_id, chunks)

    async def complete(self, endpoint: proxy.Endpoint, body: bytes,
                       head: Callable[[], Awaitable[None]] | None = None) -> Reply:
        """Serve one inference request (SNG property 3).

        ``head``: for a streamed answer, awaited once the server answered 200, so that
        the HTTP shell sends the response head while the server generates (the head
        holds nothing the server chose; never with a release grid, whose ticks all
        bytes keep). Once it has been awaited, an error is the shell's to tell in-stream.

        Raises:
            BrickedError, ShutdownError: the gateway refuses all traffic.
            StateError: not SERVING (no whitelisted model booted).
            ValidationError: bad body or a parameter outside sampler spec v1.
            UnknownModelError: the request names another model than the one booted.
            ServerProtocolError: the server's answer is outside the protocol (dropped,
                alarmed; its content never reaches the client).
            TransportError: the server is unreachable.
        """
        return await self.datapath.complete(endpoint, body, head)

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

    async def heartbeat(self) -> None:
        """See :meth:`ivp.gateway.control_shell.ControlShell.heartbeat`."""
        await self.control_shell.heartbeat()

    async def _checkpoint_loop(self) -> None:
        """A checkpoint every interval while serving, a heartbeat while not (shut down
        included: the loop runs from the first start, whatever the state)."""
        interval = self.config.checkpoint_interval
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(IvpError):
                await self.checkpoint()
                await self.heartbeat()

    async def forced_reboot(self, why: str) -> None:
        """Power-cycle the server now; the gateway returns to UPLOAD."""
        await self.boot_shell.forced_reboot(why)

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
        return await self.control_shell.control(body)

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
        return await self.control_shell.admin(body)

    async def install_whitelist(self, body: bytes) -> dict[str, Any]:
        """Install a newer quorum-signed whitelist (takes effect at the next upload).

        Raises:
            ValidationError, QuorumError, ExpiredError: see ``TrustedWhitelist.update``;
                the installed whitelist does not change.
        """
        return await self.control_shell.install_whitelist(body)

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

    # --- uplink glue ----------------------------------------------------------------------
    def _wake_uplink(self) -> None:
        if self.uplink is not None:
            self.uplink.wake()

    def _judge_ack(self, raw: bytes, batch: list[Spooled]) -> AckJudgement:
        """The recomputer's answer to a batch, believed only if signed by its key."""
        if self.recomputer_key is None:
            raise SignatureError("no recomputer key configured: no answer is believed")
        return judge_ack(raw, batch, self.recomputer_key, self.gateway_id)

    async def _reconcile(self, limit: int) -> int:
        """See :meth:`ivp.gateway.uplink.Spool.reconcile` (over the uplink's transport
        of the moment)."""
        transport = self.uplink.transport if self.uplink is not None else None
        return await self._spool.reconcile(transport, limit)

    # --- status ---------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        """What anyone may read (``GET /status``). It tells no per-request audit
        decision before the recomputer holds the record: ``audits`` counts the audit
        records it acknowledged, and ``spool_depth`` is the spool after the last
        uplink round, not a count that grows the moment a pair is kept (that once told
        the operator at once which cheat to roll back). ``settling``: pairs handed
        out (in flight or released) whose draw was not made yet (it tells no
        decision); once it is 0, every uplink round begun after this call counts their
        records (``uplink.rounds``), and this call wakes the uplink for one."""
        boots = [b for b in (self._boot, *self._ended) if b is not None]
        settling = sum(b.next_seq - b.next_draw for b in boots)
        await self.writer.flush()  # counters include every draw already made
        self._wake_uplink()
        boot = self._boot
        out: dict[str, Any] = {
            "gateway_id": self.gateway_id,
            "state": self._state.value,
            "model_id": boot.manifest.model_id if boot else None,
            "boot_id": boot.boot_id if boot else None,
            "pairs_served": boot.pairs if boot else 0,
            "audits": 0,
            "settling": settling,
            "epsilon": boot.epsilon if boot else self._settings.epsilon_for(
                "", self.config.epsilon),
            "server": "on" if self.power.is_on else "off",
            "settings": {"epsilon": self._settings.epsilon,
                         "model_epsilon": dict(self._settings.model_epsilon),
                         "reboot_interval": self.config.reboot_interval},
        }
        machine = self.boot_shell.machine
        if machine is not None:
            out["upload"] = {"model_id": machine.manifest.model_id,
                             "counter": machine.counter, "total": machine.total}
        if self._state is State.SHUTDOWN:
            out["reason"] = self.shutdown_reason
        if self._state is State.BRICKED or self.device.bricked:
            out.update(state=State.BRICKED.value, spool_depth=0,
                       error="tamper detected: the device is bricked")
            return out
        if boot is not None:
            c = await self._db(self.log.counters, boot.boot_id)
            out.update(pairs_served=c.pairs, audits=c.acked, chain_head=c.head)
        depth = self.uplink.stats.depth if self.uplink is not None else \
            await self._db(self.log.spool_depth)
        self.metrics.spool_depth.set(depth)
        out["spool_depth"] = depth
        out["alarms"] = await self._db(self.log.alarm_count)
        if self.whitelist.current is not None:
            out["whitelist_version"] = self.whitelist.current.version
        if self.uplink is not None:
            s = self.uplink.stats
            out["uplink"] = {"acked": s.acked, "refused": s.refused, "retried": s.retried,
                             "failures": s.failures, "garbage": s.garbage,
                             "forged": s.forged, "reconciled": s.reconciled,
                             "rounds": s.rounds, "last_error": s.last_error}
        return out

    async def alarms(self) -> list[dict[str, object]]:
        """The gateway's own alarm log (readable after a shutdown, not after a brick)."""
        if self._state is State.BRICKED or self.device.bricked:
            self._check_alive()
        return await self._db(self.log.alarms)


__all__ = ["Gateway", "GatewayConfig", "Reply", "State", "load_whitelisted_tokenizer"]
