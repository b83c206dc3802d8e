"""Uplink signature checks in worker processes (the costly part of ingestion)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from ivp.recomputer.batch import signature_tasks, verify_signatures
from ivp.recomputer.ingest import Ingest

log = logging.getLogger("ivp.recomputer")


class SignaturePool:
    """Ed25519 checks of large uplink batches in worker processes.

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
        """Start the workers off the event loop: spawning the forkserver and its
        processes takes seconds on a busy machine, and the loop must keep answering
        (a recomputer that stops listening makes honest gateways look silent)."""
        if self._exec is not None:
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        try:  # forkserver: safe with the threads this process runs
            self._exec = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("forkserver"))
        except Exception as exc:
            self._fail(exc)
            return
        pool = self._exec
        warm = asyncio.get_running_loop().run_in_executor(
            None, lambda: pool.submit(verify_signatures, []).result())

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


__all__ = ["SignaturePool"]
