"""The group-commit writer (SNG property 3's durability: durable before release).

Appends (a pair must be durable before its response is released), the chunks of open
streams (each durable before its bytes are released) and sampling draws (after
release) share one write queue, written in arrival order by one loop on the
log's own thread: every transaction holds all that waited, so concurrent requests and
the draws of earlier ones cost one fsync together (group commit). Draws keep tag order
because they are queued in tag order (``serving.ServingBoot.settle``) and the queue is
written first in, first out. A draw may *linger* a moment (``draw_linger``) for the
next request's append to share its fsync: draws come after release, so no response
waits for that.

Inside one commit, consecutive appends of one boot are one step and each step is a
savepoint (``log.PairLog.step``), so a refused step (a closed boot, a row that does
not open) leaves no trace and undoes no other. :class:`GroupCommit` is the only code
that runs the log's methods: all of them on its one worker thread (``call``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ivp.errors import IvpError
from ivp.gateway.log import PairLog
from ivp.gateway.metrics import GatewayMetrics
from ivp.gateway.streaming import ChunkWrite
from ivp.protocol.messages import AuditRecord, PairRecord

if TYPE_CHECKING:
    from ivp.gateway.serving import Link
    from ivp.gateway.shared import GatewayConfig

T = TypeVar("T")


@dataclass
class Write:
    """One queued write of the group commit: an ``append`` (a pair, before release), a
    ``progress`` (an open stream's next chunk, before it is released), a ``decide`` (a
    sampling draw, after release) or a ``barrier`` (flush up to here). ``stream``: an
    append that ends a stream (its chunk rows go with it)."""

    kind: str
    boot_id: str
    pair: PairRecord | None = None
    chunk: ChunkWrite | None = None
    stream: bool = False
    pos: int = 0
    keep: bool = False
    future: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupCommit:
    """The write queue in front of :class:`~ivp.gateway.log.PairLog`.

    Args:
        log: the durable log (its methods run on this writer's one thread).
        config: read for ``draw_linger`` at every turn.
        metrics: commit time, pairs per commit, pairs committed.
        sign_audit: signs an audit record with the device key (called on the thread).
        gateway_id: named in every audit record.
    """

    def __init__(self, log: PairLog, config: GatewayConfig, metrics: GatewayMetrics,
                 sign_audit: Callable[[AuditRecord], bytes], gateway_id: str) -> None:
        self.log = log
        self.config = config
        self.metrics = metrics
        self._sign_audit = sign_audit
        self._gateway_id = gateway_id
        self._writes: list[Write] = []
        self._append_waiting = asyncio.Event()
        self._urgent = False  # someone waits for the queue: no lingering
        self._committing = False
        self._commit_task: asyncio.Task[None] | None = None
        self._spare_wanted = False  # a commit is coming: advance the counter when idle
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ivp-gateway-log")

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the log's thread (the only thread that touches the log)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def append(self, boot_id: str, pair: PairRecord, stream: bool = False
               ) -> asyncio.Future[Link]:
        """Queue ``pair``'s append: the future gives its link once it is durable;
        concurrent callers share one commit (group commit). ``stream``: the pair ends a
        stream (its partial row is dropped in the same commit)."""
        future = self.enqueue(Write("append", boot_id, pair=pair, stream=stream))
        self._append_waiting.set()
        return future

    def progress(self, boot_id: str, chunk: ChunkWrite) -> asyncio.Future[None]:
        """Queue an open stream's next chunk (``log.PairLog.progress``): the future ends
        once it is durable, in the same group commit as every other open stream's and
        every plain pair's."""
        future = self.enqueue(Write("progress", boot_id, chunk=chunk))
        self._append_waiting.set()
        return future

    def decide(self, boot_id: str, pos: int, keep: bool) -> Write:
        """Queue the sampling decision of the pair at ``pos`` (its future: the audit
        record when kept and new, else None)."""
        op = Write("decide", boot_id, pos=pos, keep=keep)
        self.enqueue(op)
        return op

    def expect(self, first: bool = False) -> None:
        """A stream's next commit is coming (its request went to its server, or a chunk
        of it was committed): once the queue is empty, advance the device counter for it
        on the log's thread (``log.PairLog.reserve``), while the server works, so that
        commit waits for one disk flush instead of two. ``first``: it is the stream's
        first chunk, so draws lingering for a commit to share are written now instead (a
        stream's many commits leave nothing to share, and its first token waits for
        that commit)."""
        if self.log.spare is None:
            self._spare_wanted = True
            self._run()
        if first:
            self.hurry()

    def enqueue(self, op: Write) -> asyncio.Future[Any]:
        self._writes.append(op)
        self._run()
        return op.future

    def _run(self) -> None:
        if not self._committing:
            self._committing = True
            self._commit_task = asyncio.create_task(self._commit_loop())

    def hurry(self) -> None:
        """Commit what is queued without lingering (a caller waits for it)."""
        self._urgent = True
        self._append_waiting.set()

    async def flush(self) -> None:
        """Wait until every write queued so far is committed (no lingering)."""
        if not self._writes and not self._committing:
            return
        self.hurry()
        with contextlib.suppress(Exception):
            await self.enqueue(Write("barrier", ""))

    def shutdown(self) -> None:
        """Stop the log's thread once what it runs has ended."""
        self._executor.shutdown(wait=True)

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
        batch: list[Write] = []
        try:
            while self._writes or self._spare_wanted:
                if not self._writes:
                    self._spare_wanted = False
                    if self.log.spare is None:  # the last commit's job may have advanced it
                        with contextlib.suppress(Exception):  # the commit meets it again
                            await self.call(self.log.reserve)
                    continue
                await self._linger()
                batch, self._writes = self._writes, []
                self._urgent = False
                appends = sum(1 for w in batch if w.kind in ("append", "progress"))
                t = time.monotonic()
                results = await self._commit(batch)
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

    async def _commit(self, batch: list[Write]) -> list[object]:
        """``batch`` in one durable commit on the log's thread. Its results come back as
        soon as it is durable; if more commits are coming, the thread then advances the
        device counter for the next one (``log.PairLog.reserve``) while this loop hands
        the results out and gathers the next batch, so that commit waits for one disk
        flush instead of two."""
        loop = asyncio.get_running_loop()
        durable: asyncio.Future[list[object]] = loop.create_future()

        def settle(results: list[object], error: BaseException | None) -> None:
            if durable.done():  # the loop stopped waiting (cancelled)
                return
            if error is not None:
                durable.set_exception(error)
            else:
                durable.set_result(results)

        def job() -> None:
            try:
                results = self._write_batch(batch)
            except BaseException as exc:
                loop.call_soon_threadsafe(settle, [], exc)
                raise
            loop.call_soon_threadsafe(settle, results, None)
            if self._writes or self._spare_wanted:  # read on the thread: a hint only
                with contextlib.suppress(Exception):  # the next commit meets it again
                    self.log.reserve()

        self._executor.submit(job)
        return await durable

    def _write_batch(self, batch: list[Write]) -> list[object]:
        """Runs on the log thread: the whole batch in ONE durable commit. Consecutive
        appends (or chunks) of one boot are one step; each step is a savepoint, so a
        refused step (a closed boot, a row that does not open) leaves no trace and
        undoes no other.
        Consecutive draws share one savepoint; if one is refused, the others are redone
        one savepoint each (draws are deterministic once drawn: only the disk changes)."""
        out: list[object] = [None] * len(batch)
        with self.log.transaction():
            i = 0
            while i < len(batch):
                op, j = batch[i], i + 1
                if op.kind in ("append", "progress"):
                    while j < len(batch) and batch[j].kind == op.kind and \
                            batch[j].boot_id == op.boot_id:
                        j += 1
                    if op.kind == "progress":
                        chunks = [w.chunk for w in batch[i:j] if w.chunk is not None]
                        self._step(out, range(i, j), self.log.progress, op.boot_id, chunks)
                    else:
                        pairs = [w.pair for w in batch[i:j] if w.pair is not None]
                        ended = tuple(w.pair.tag.seq for w in batch[i:j]
                                      if w.stream and w.pair is not None)
                        self._step(out, range(i, j), self.log.append, op.boot_id, pairs,
                                   ended)
                elif op.kind == "decide":
                    while j < len(batch) and batch[j].kind == "decide":
                        j += 1
                    if j - i == 1 or not self._step(out, range(i, j), self._decide_all,
                                                    batch[i:j]):
                        for k in range(i, j):
                            self._step(out, range(k, k + 1), self._decide_all, batch[k:k + 1])
                i = j
        return out

    def _decide_all(self, draws: list[Write]) -> list[AuditRecord | None]:
        return [self.log.decide(w.boot_id, w.pos, w.keep, self._sign_audit, self._gateway_id)
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


__all__ = ["GroupCommit", "Write"]
