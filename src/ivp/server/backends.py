"""What the server needs from an engine, and the reference engine behind it.

``ivp server`` speaks one protocol (docs/ARCHITECTURE.md, "Server") whatever engine
generates: a :class:`Backend` turns token ids, sampler spec v1 parameters and the
gateway's seed into token ids. Two exist: :class:`ReferenceBackend` (the
transformers reference engine, one request at a time under a lock, in worker
threads) and ``ivp.engine.vllm_engine.VllmBackend`` (vLLM's continuous batching,
many requests at once). :func:`load_backend` builds the one ``--engine`` names from
the streamed files.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ivp.protocol.messages import Manifest, SamplingParams

if TYPE_CHECKING:
    from ivp.engine.reference import ReferenceEngine
    from ivp.server.attacks import Attack

EngineName = Literal["reference", "vllm"]
ENGINES: tuple[EngineName, ...] = ("reference", "vllm")


class Backend(Protocol):
    """One loaded model behind the server protocol."""

    name: EngineName
    tokenizer: Any  # a transformers fast tokenizer, built from the whitelisted bytes

    def check_ids(self, ids: Sequence[int], what: str) -> None: ...

    def finish_reason(self, token_ids: Sequence[int]) -> Literal["stop", "length"]: ...

    async def generate(self, prompt_ids: list[int], params: SamplingParams, seed: int,
                       key: str) -> list[int]:
        """Token ids under spec v1 with ``seed`` (EOS included when reached)."""
        ...

    def stream(self, prompt_ids: list[int], params: SamplingParams, seed: int,
               key: str) -> AsyncIterator[int]:
        """The same tokens one at a time; checks the prompt at the call."""
        ...

    async def fire(self, attack: Attack) -> None:
        """Switch a cheat on (``--attack``): alter what the engine computes."""
        ...

    async def close(self) -> None:
        """Drop the model (and free its memory); waits for running generations."""
        ...


class ReferenceBackend:
    """The reference engine: one generation at a time (it is not thread-safe), each
    run in worker threads so the event loop keeps answering ``/health``."""

    name: EngineName = "reference"

    def __init__(self, engine: ReferenceEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.lock = asyncio.Lock()

    def check_ids(self, ids: Sequence[int], what: str) -> None:
        self.engine.check_ids(ids, what)

    def finish_reason(self, token_ids: Sequence[int]) -> Literal["stop", "length"]:
        return self.engine.finish_reason(token_ids)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, seed: int,
                       key: str) -> list[int]:
        async with self.lock:
            gen = await asyncio.to_thread(self.engine.generate, prompt_ids, params, seed)
        return gen.token_ids

    def stream(self, prompt_ids: list[int], params: SamplingParams, seed: int,
               key: str) -> AsyncIterator[int]:
        steps = self.engine.generate_stream(prompt_ids, params, seed)  # validates: may raise
        return self._stream(steps)

    async def _stream(self, steps: Iterator[int]) -> AsyncIterator[int]:
        done = object()
        async with self.lock:
            while (token := await asyncio.to_thread(next, steps, done)) is not done:
                yield token  # type: ignore[misc]

    async def fire(self, attack: Attack) -> None:
        if attack.alter_model is not None:
            async with self.lock:  # not in the middle of a generation
                await asyncio.to_thread(attack.alter_model, self.engine.model)

    async def close(self) -> None:
        async with self.lock:  # let a running generation finish with the old model
            pass


async def load_backend(engine: EngineName, files: dict[str, bytes], manifest: Manifest,
                       options: dict[str, Any] | None = None) -> Backend:
    """The backend ``engine`` built from the streamed ``files`` (consumed: the dict is
    emptied). ValidationError when the files do not make a model."""
    if engine == "vllm":
        from ivp.engine.vllm_engine import VllmBackend

        return await VllmBackend.start(files, manifest, **(options or {}))
    from ivp.engine.loading import load_model, load_tokenizer
    from ivp.engine.reference import ReferenceEngine

    def build() -> ReferenceEngine:
        try:
            return ReferenceEngine(load_model(files), load_tokenizer(files))
        finally:
            files.clear()

    return ReferenceBackend(await asyncio.to_thread(build))


__all__ = ["ENGINES", "Backend", "EngineName", "ReferenceBackend", "load_backend"]
