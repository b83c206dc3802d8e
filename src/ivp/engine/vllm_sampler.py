"""Sampler spec v1 inside vLLM: a V1 logits processor that makes vLLM's choice ours.

vLLM's own seeded sampler is not spec v1 (another generator, float32, its own top-k /
top-p), so a verifier replaying under spec v1 could not explain its tokens. Requests
that carry ``SamplingParams.extra_args[ARGS]`` — the gateway's seed and sampling
parameters, put there by ``ivp server --engine vllm`` — are sent to vLLM with
temperature 0 (greedy), and this processor, which vLLM runs on every step's logits
before its greedy argmax, computes the spec v1 token of every such row of the step at
once (``ivp.engine.spec_v1_fast.choose_rows``: the tokens of
``ivp.protocol.sampler.choose``, batched and compiled) and writes +inf there, so the
token is the row's only maximum (a row holding NaN or +inf is first set to -inf
whole). vLLM's greedy argmax then emits exactly that token.

Why this holds whatever vLLM does around it:

* the choice is a pure function of (row, seed, t, params): batch composition,
  chunked prefill, prefix caching and preemption change which rows are computed
  together, never what the function returns for a row;
* t is the request's own output length, read from the live output list vLLM hands
  the processor (``BatchUpdate``: "a reference to the request's running output
  tokens list"), so a discarded sample of a partial prefill is never counted;
* the row is the one vLLM samples from (float32, after the model's soft-cap), i.e.
  what the verifier compares its replay with.

Requests without the extra argument (plain vLLM traffic, benches) pass untouched.
This module imports vLLM: load it only in vLLM's environment (``make vllm``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from vllm import SamplingParams as VllmSamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from ivp.engine.spec_v1_fast import choose_rows
from ivp.errors import ValidationError
from ivp.protocol.encoding import convert, to_builtins
from ivp.protocol.messages import SamplingParams

ARGS = "ivp_spec_v1"  # the extra_args key: {"seed", "params", "key"}
RECORD_ENV = "IVP_RECORD_LOGITS"  # RecordingSpecV1 writes rows under this directory
PROCESSOR = f"{__name__}:SpecV1LogitsProcessor"  # what vLLM's logits_processors names
RECORDER = f"{__name__}:RecordingSpecV1"


def spec_args(seed: int, params: SamplingParams, key: str = "") -> dict[str, Any]:
    """``extra_args`` of a vLLM request sampled under spec v1 with ``seed``."""
    return {ARGS: {"seed": int(seed), "params": to_builtins(params), "key": key}}


@dataclass(frozen=True)
class _Row:
    seed: int
    params: SamplingParams
    output: list[int]  # vLLM's live list of the request's generated tokens
    key: str


def _row(params: VllmSamplingParams, _prompt: list[int] | None, output: list[int]
         ) -> _Row | None:
    spec = (params.extra_args or {}).get(ARGS)
    if spec is None:
        return None
    return _Row(int(spec["seed"]), convert(spec["params"], SamplingParams), output,
                str(spec.get("key", "")))


class SpecV1LogitsProcessor(LogitsProcessor):
    """Each spec v1 row: -inf everywhere but the token spec v1 chooses (there 0)."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, _Row] = {}  # batch index -> request state

    @classmethod
    def validate_params(cls, sampling_params: VllmSamplingParams) -> None:
        """Refuse a malformed spec v1 argument when the request is added, not mid-batch."""
        spec = (sampling_params.extra_args or {}).get(ARGS)
        if spec is None:
            return
        if not isinstance(spec, dict) or not isinstance(spec.get("seed"), int) \
                or not 0 <= spec["seed"] < 2**64:
            raise ValueError(f"{ARGS}: needs an unsigned 64-bit 'seed'")
        try:
            convert(spec.get("params"), SamplingParams)
        except ValidationError as exc:
            raise ValueError(f"{ARGS}: {exc}") from None
        if sampling_params.temperature != 0.0:
            raise ValueError(f"{ARGS}: vLLM must sample greedily (temperature 0) from the "
                             "row this processor leaves")

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax: vLLM must run it before greedy sampling

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, _row)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (batch, V) float32, modified in place: the spec v1 token of each
        spec v1 row becomes that row's only maximum."""
        if not self.rows:
            return logits
        indices = sorted(self.rows)
        rows = [self.rows[i] for i in indices]
        if logits.device.type == "cpu":  # read the rows where they are: no copy
            host, picked = logits.detach().contiguous().numpy(), indices
        else:  # one copy of the spec v1 rows to the host
            host = logits[indices].to("cpu", torch.float32).numpy()
            picked = list(range(len(indices)))
        for j, row in zip(picked, rows, strict=True):
            self.observe(row, host[j])
        chosen, finite = choose_rows(host, picked, [r.seed for r in rows],
                                     [len(r.output) for r in rows], [r.params for r in rows])
        # the token becomes the row's only maximum: +inf there (vLLM's greedy argmax
        # picks it; one write per row); a row that is not all finite is masked whole
        where = torch.tensor(indices, device=logits.device)
        tokens = torch.from_numpy(chosen).to(logits.device)
        if not finite.all():
            odd = torch.from_numpy(~finite).to(logits.device)
            logits[where[odd]] = float("-inf")
        logits[where, tokens] = float("inf")
        return logits

    def observe(self, row: _Row, z: np.ndarray) -> None:
        """Hook for :class:`RecordingSpecV1`; nothing in service."""


class RecordingSpecV1(SpecV1LogitsProcessor):
    """The same choice, and every row it was made from saved as
    ``$IVP_RECORD_LOGITS/<key>/<t>.npy`` (calibration and conformance tests only:
    ``ivp server --record-logits DIR``). A row computed again for the same position
    (a partial prefill's discarded sample, a preempted request's recompute) overwrites
    the earlier one: the last is the one vLLM's emitted token came from."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self.root = Path(os.environ[RECORD_ENV])

    def observe(self, row: _Row, z: np.ndarray) -> None:
        if not row.key:
            return
        folder = self.root / row.key
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{len(row.output)}.npy", z)


__all__ = ["ARGS", "PROCESSOR", "RECORDER", "RECORD_ENV", "RecordingSpecV1",
           "SpecV1LogitsProcessor", "spec_args"]
