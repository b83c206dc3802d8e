"""Verification workers: recompute audited pairs by replay, behind a small pool interface.

:class:`Verifier` is the worker's core. It holds the whitelisted models (loaded from
bytes that were checked against the manifest) and turns audit records into
:class:`~ivp.protocol.messages.Verdict` objects: replay by one prefill
(``ReferenceEngine.replay_bounded_batch``), ``verify.score_replayed`` for the raw figures, and the
configured ``verify.Policy`` for pass/fail. Before replaying it checks what replay
cannot: that the pair names the booted model, that the output is non-empty and
stops as sampler spec v1 says, and that the text is the tokenizer's decoding.

A :class:`WorkerPool` runs verifiers off the event loop. Two implementations:
:class:`LocalPool` (threads, each with its own engine: the engine is not
thread-safe) and :class:`RayPool` (Ray actor processes, on this machine or a
cluster, each holding the models). Both give the same verdicts for the same records
(same code, same float32 kernels).
"""

from __future__ import annotations

import asyncio
import math
import queue
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ivp.errors import ValidationError
from ivp.protocol.encoding import canonical, decode
from ivp.protocol.messages import AuditRecord, Manifest, Verdict, manifest_digest
from ivp.verify.structure import structural_problem

Mode = Literal["exact", "tolerant"]
_BIG = 1e300  # JSON has no infinity: margins that are infinite are written as this


@dataclass(frozen=True)
class ModelSource:
    """A whitelisted model's manifest and its files (already checked against it)."""

    manifest: Manifest
    files: dict[str, bytes]

    @property
    def digest(self) -> str:
        return manifest_digest(self.manifest)


@dataclass(frozen=True)
class VerifyJob:
    """One stored audit record to recompute, under the manifest its boot declared."""

    audit_id: int
    manifest_digest: str
    payload: bytes  # the AuditRecord bytes as received (their signature was checked)


@dataclass(frozen=True)
class Outcome:
    """A verdict (canonical bytes), or why the record cannot be verified here (no
    model for its manifest): such records stay queued and raise an alarm."""

    audit_id: int
    verdict: bytes | None
    unverifiable: str = ""


class Verifier:
    """Holds engines for whitelisted models; verifies audit records. Not thread-safe."""

    def __init__(self, sources: Sequence[ModelSource], mode: Mode = "tolerant") -> None:
        from ivp.engine.loading import load_model, load_tokenizer
        from ivp.engine.reference import ReferenceEngine
        from ivp.verify import CHANNEL_GOAL, Policy

        self.mode: Mode = mode
        self._models: dict[str, tuple[Manifest, Any, Policy]] = {}
        engines: dict[tuple[str, ...], Any] = {}  # serving profiles of one model share it
        for src in sources:
            files = tuple(f.digest for f in src.manifest.files)
            if files not in engines:
                engines[files] = ReferenceEngine(load_model(src.files), load_tokenizer(src.files))
            engine = engines[files]
            nb = src.manifest.noise_bound
            # The temperature rule: tolerance min(δ, T ln(1 + ε)/2), so the covert channel
            # stays below CHANNEL_GOAL of the sampling channel at every T (docs/VERIFICATION.md).
            policy = Policy(mode=mode, delta=nb.delta if (nb and mode == "tolerant") else 0.0,
                            channel_goal=CHANNEL_GOAL if mode == "tolerant" else None)
            self._models[src.digest] = (src.manifest, engine, policy)

    def digests(self) -> list[str]:
        return sorted(self._models)

    def verify(self, jobs: Sequence[VerifyJob], now: float | None = None) -> list[Outcome]:
        """Verdicts for ``jobs``, in order; records of one model are replayed in a batch."""
        now = time.time() if now is None else now
        out: dict[int, Outcome] = {}
        by_model: dict[str, list[tuple[VerifyJob, AuditRecord]]] = {}
        for job in jobs:
            record = decode(job.payload, AuditRecord)
            if job.manifest_digest not in self._models:
                out[job.audit_id] = Outcome(
                    job.audit_id, None,
                    f"no whitelisted model with manifest {job.manifest_digest[:16]}… is "
                    f"loaded (boot of {record.pair.model_id!r})")
                continue
            by_model.setdefault(job.manifest_digest, []).append((job, record))
        for digest, items in by_model.items():
            for job, verdict in zip((j for j, _ in items), self._verify_model(digest, items, now),
                                    strict=True):
                out[job.audit_id] = Outcome(job.audit_id, canonical(verdict))
        return [out[j.audit_id] for j in jobs]

    def _verify_model(self, digest: str, items: list[tuple[VerifyJob, AuditRecord]],
                      now: float) -> list[Verdict]:
        from ivp.verify import score_replayed

        manifest, engine, policy = self._models[digest]
        verdicts: list[Verdict | None] = [None] * len(items)
        replay: list[int] = []
        for i, (_, r) in enumerate(items):
            problem = self._precheck(r, manifest, engine)
            if problem:
                verdicts[i] = self._verdict(r, manifest, False, problem,
                                            len(r.pair.output_token_ids),
                                            max(1, len(r.pair.output_token_ids)), _BIG, 0.0, now,
                                            delta=policy.tolerance(r.pair.params))
            else:
                replay.append(i)
        pairs = [(items[i][1].pair.prompt_token_ids, items[i][1].pair.output_token_ids)
                 for i in replay]
        logits = engine.replay_bounded_batch(pairs) if pairs else []
        for i, rows in zip(replay, logits, strict=True):
            r = items[i][1]
            scores = score_replayed(rows, r.pair.output_token_ids, r.pair.seed, r.pair.params)
            j = policy.judge(scores, r.pair.params)
            verdicts[i] = self._verdict(r, manifest, j.passed, j.reason, scores.tokens,
                                        j.failures, j.max_margin, j.bound, now,
                                        scores.needed_delta, j.positions,
                                        policy.tolerance(r.pair.params))
        return [v for v in verdicts if v is not None]

    @staticmethod
    def _precheck(r: AuditRecord, manifest: Manifest, engine: Any) -> str:
        """What replay cannot see. Each blocks a cheat that keeps every token honest:

        * pair names another model than the boot's manifest (a substitute model
          whose outputs are filed under the whitelisted one);
        * no output, or tokens after EOS, or a finish reason the tokens do not give
          (truncating or extending an honest generation to carry information);
        * text that is not the tokenizer's decoding of the ids (the server's own text
          reaching the client: a covert channel around the token sequence);
        * an output not cut exactly where the client's stop string first appears
          (running on past it, or ending early: a length that carries bits).
        """
        p = r.pair
        if p.model_id != manifest.model_id:
            return (f"pair names model {p.model_id!r} but the gateway booted "
                    f"{manifest.model_id!r}")
        out = p.output_token_ids
        if not out:
            return "no output tokens (a generation yields at least one)"
        try:
            engine.check_ids(p.prompt_token_ids, "prompt")
            engine.check_ids(out, "output")
        except ValidationError as exc:
            return str(exc)
        if len(p.prompt_token_ids) + len(out) > engine.max_positions:
            return "prompt + output exceed the model's context"
        problem = structural_problem(
            out, p.finish_reason, p.params.max_tokens, engine.eos_ids, text=p.output_text,
            decode=lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=True),
            stop=p.stop)
        return problem[1] if problem else ""

    def _verdict(self, r: AuditRecord, manifest: Manifest, passed: bool, reason: str,
                 tokens: int, failures: int, max_margin: float, bound: float,
                 now: float, position_delta: Sequence[float] = (),
                 failed_positions: Sequence[int] = (), delta: float = 0.0) -> Verdict:
        return Verdict(
            gateway_id=r.gateway_id, boot_id=r.boot_id, audit_seq=r.audit_seq,
            model_id=manifest.model_id, passed=passed, mode=self.mode, reason=reason,
            tokens=tokens, failures=failures,
            max_margin=_finite(max_margin), bound=_finite(bound), time=now,
            # 6 significant digits: these figures are for reading, the verdict is decided
            position_delta=[_finite(float(f"{d:.6g}")) for d in position_delta],
            failed_positions=[int(p) for p in failed_positions], delta=float(delta),
        )


def _finite(x: float) -> float:
    return x if math.isfinite(x) else _BIG


class WorkerPool(Protocol):
    """Where verification runs. ``verify`` may be awaited concurrently up to ``size``."""

    size: int
    name: str

    async def start(self) -> None: ...

    async def verify(self, jobs: Sequence[VerifyJob]) -> list[Outcome]: ...

    async def close(self) -> None: ...


class LocalPool:
    """``size`` threads, each verifying with its own :class:`Verifier` (own engine)."""

    name = "local"

    def __init__(self, sources: Sequence[ModelSource], mode: Mode = "tolerant",
                 size: int = 1) -> None:
        self.sources, self.mode, self.size = list(sources), mode, max(1, size)
        self._exec: ThreadPoolExecutor | None = None
        self._verifiers: queue.Queue[Verifier] = queue.Queue()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._exec = ThreadPoolExecutor(self.size, thread_name_prefix="ivp-verify")
        made = await asyncio.gather(*(
            loop.run_in_executor(self._exec, Verifier, self.sources, self.mode)
            for _ in range(self.size)
        ))
        for v in made:
            self._verifiers.put(v)

    def _run(self, jobs: Sequence[VerifyJob]) -> list[Outcome]:
        verifier = self._verifiers.get()
        try:
            return verifier.verify(jobs)
        finally:
            self._verifiers.put(verifier)

    async def verify(self, jobs: Sequence[VerifyJob]) -> list[Outcome]:
        assert self._exec is not None, "pool not started"
        return await asyncio.get_running_loop().run_in_executor(self._exec, self._run, list(jobs))

    async def close(self) -> None:
        if self._exec is not None:
            self._exec.shutdown(wait=True, cancel_futures=True)
            self._exec = None


class _VerifierActor:
    """The Ray actor body: one Verifier per actor process."""

    def __init__(self, sources: list[tuple[bytes, dict[str, bytes]]], mode: Mode) -> None:
        import os

        self.pid = os.getpid()
        self.verifier = Verifier(
            [ModelSource(decode(m, Manifest), files) for m, files in sources], mode)

    def ready(self) -> int:
        return self.pid

    def verify(self, jobs: list[VerifyJob]) -> list[Outcome]:
        return self.verifier.verify(jobs)


class RayPool:
    """Verification on Ray actors (``size`` >= 2 actor processes, never local mode).

    ``address`` None starts a private local Ray instance; ``"auto"`` or
    ``"ray://host:port"`` joins a running cluster, where each actor may sit on another
    machine (a GPU node holding the whitelisted models). The models travel once
    through Ray's object store.
    """

    name = "ray"

    def __init__(self, sources: Sequence[ModelSource], mode: Mode = "tolerant", size: int = 2,
                 address: str | None = None, num_cpus: float = 1.0) -> None:
        if size < 2:
            raise ValidationError("a Ray pool runs at least two actors")
        self.sources, self.mode, self.size = list(sources), mode, size
        self.address, self.num_cpus = address, num_cpus
        self._actors: list[Any] = []
        self._next = 0
        self._started_ray = False
        self.pids: list[int] = []

    async def start(self) -> None:
        import ray

        if not ray.is_initialized():
            if self.address is None:
                ray.init(num_cpus=max(math.ceil(self.size * self.num_cpus), 2),
                         include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            self._started_ray = True
        actor = ray.remote(num_cpus=self.num_cpus)(_VerifierActor)
        payload = ray.put([(canonical(s.manifest), s.files) for s in self.sources])
        self._actors = [actor.remote(payload, self.mode) for _ in range(self.size)]
        self.pids = list(await asyncio.gather(*(a.ready.remote() for a in self._actors)))

    async def verify(self, jobs: Sequence[VerifyJob]) -> list[Outcome]:
        assert self._actors, "pool not started"
        actor = self._actors[self._next % len(self._actors)]
        self._next += 1
        return list(await actor.verify.remote(list(jobs)))

    async def close(self) -> None:
        import ray

        for a in self._actors:
            ray.kill(a)
        self._actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()


def make_pool(spec: str, sources: Sequence[ModelSource], mode: Mode,
              ray_actors: int = 2) -> WorkerPool:
    """``N`` -> LocalPool of N threads; ``ray`` -> local Ray; ``ray://…``/``auto`` -> cluster.

    Raises:
        ValidationError: an unknown spec.
    """
    if spec == "ray":
        return RayPool(sources, mode, size=ray_actors)
    if spec.startswith("ray://") or spec == "auto":
        return RayPool(sources, mode, size=ray_actors, address=spec)
    try:
        n = int(spec)
    except ValueError:
        raise ValidationError(f"--workers {spec!r}: a number, 'ray' or 'ray://host:port'") \
            from None
    if n < 1:
        raise ValidationError("--workers must be at least 1")
    return LocalPool(sources, mode, size=n)
