"""Verification in the recomputer: the durable queue to the worker pool and back.

A mixin of :class:`~ivp.recomputer.service.Recomputer`: records wait in the durable
queue (``audits`` rows without a verdict), go to the pool in batches, and each verdict
is stored before it is acted on (alarm ``verify_fail`` and, by policy, a signed
SHUTDOWN). A worker crash is no evidence against a gateway: the batch is retried one by
one, and a record that crashes a worker twice is parked (``verifier_error``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ivp.protocol.encoding import decode
from ivp.protocol.messages import Verdict
from ivp.recomputer.alarms import Alarm
from ivp.recomputer.store import QueuedAudit
from ivp.recomputer.workers import VerifyJob

if TYPE_CHECKING:
    from ivp.recomputer.ingest import Ingest
    from ivp.recomputer.metrics import Metrics
    from ivp.recomputer.store import Store
    from ivp.recomputer.workers import WorkerPool

log = logging.getLogger("ivp.recomputer")


class Verifying:
    """The audit queue and the worker pool (mixed into Recomputer)."""

    ingest: Ingest
    store: Store
    pool: WorkerPool
    metrics: Metrics
    config: Any
    _queue: collections.deque[QueuedAudit]
    _singles: collections.deque[QueuedAudit]
    _parked: dict[int, QueuedAudit]
    _retried: set[int]
    _in_flight: int
    _closing: bool
    _wake: asyncio.Event
    _db: Callable[..., Awaitable[Any]]
    _spawn: Callable[[Awaitable[Any]], None]
    _locked: Callable[[], Any]
    _enforce_all: Callable[..., Awaitable[None]]
    _enforce: Callable[..., Awaitable[None]]

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
            async with self._locked():
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


__all__ = ["Verifying"]
