"""An honest serving path with the nondeterminism of real serving.

The recomputer replays by one prefill pass (``ReferenceEngine.replay``); an honest
server generates incrementally, many requests at once. The two compute the same
mathematical logits with different floating-point schedules, so they differ in the
last bits. This module is that honest server, with the sources of difference a
real deployment has (DESIGN.md, "Verification"):

* **batch composition**: requests are served in batches of 1–8, so the matrix
  shapes (and kernels) change with the company a request keeps;
* **left padding**: prompts of different lengths share a batch by left padding with
  an attention mask (positions counted from each row's first real token);
* **threads**: the same batch on 1, 2 or 4 intra-op threads (reduction order; 4 threads
  on fewer cores is oversubscribed, as a busy server is);
* **attention kernel**: PyTorch's fused SDPA or the eager softmax(QKᵀ)V (another
  summation order for the same attention);
* **incremental decoding** with the KV cache, against the verifier's one-pass prefill.

Every token is chosen by sampler spec v1 (``protocol.sampler.choose``) from the row
the server computed: the honest messages of the verification report come from here,
never from the replay path. A ``chooser`` hook lets attack generators (``attacks``,
``covert``) replace the choice while keeping everything else honest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import choose

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Request:
    """One audited request: prompt token ids, sampler parameters and the gateway's seed."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed: int


@dataclass(frozen=True)
class Served:
    """What a server answered for one request, and how it was served."""

    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    batch_size: int
    threads: int
    logits: np.ndarray | None = field(default=None, repr=False)  # (n, V) rows it sampled from


ATTENTION_KERNELS = ("sdpa", "eager")  # transformers attention implementations


@dataclass(frozen=True)
class ServingConfig:
    """One nondeterminism setting of the serving path."""

    batch_size: int = 1
    threads: int = 1
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 64 or not 1 <= self.threads <= 64:
            raise ValueError(f"bad serving config {self}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"unknown attention kernel {self.attention!r} "
                             f"(one of {', '.join(ATTENTION_KERNELS)})")

    @property
    def name(self) -> str:
        name = f"batch {self.batch_size}, {self.threads} thread{'s' if self.threads > 1 else ''}"
        return name if self.attention == "sdpa" else f"{name}, {self.attention}"


# The classic grid: batch sizes 1–8 x 1 or 2 threads, fused attention.
ALL_CONFIGS: tuple[ServingConfig, ...] = tuple(
    ServingConfig(b, th) for th in (1, 2) for b in range(1, 9)
)
# Every source the calibration and the honest traffic cover: batch sizes up to 32,
# 1/2/4 threads, both attention kernels.
WIDE_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
WIDE_CONFIGS: tuple[ServingConfig, ...] = tuple(
    ServingConfig(b, th, a) for a in ATTENTION_KERNELS for th in (1, 2, 4) for b in WIDE_BATCHES
)

# chooser(row (V,) float32, request, position t, tokens so far) -> token id
Chooser = Callable[[np.ndarray, Request, int, list[int]], int]


def spec_choice(row: np.ndarray, request: Request, t: int, _so_far: list[int]) -> int:
    """The honest choice: sampler spec v1 on the server's own logits row."""
    return choose(row, request.seed, t, request.params)


@contextlib.contextmanager
def attention_kernel(model: PreTrainedModel, kernel: str) -> Iterator[None]:
    """Run the block with ``model`` on attention implementation ``kernel``, then restore."""
    before = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if kernel == before:
        yield
        return
    model.set_attn_implementation(kernel)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ServingPath:
    """Batched, left-padded, KV-cached generation under sampler spec v1."""

    def __init__(self, model: PreTrainedModel, eos_ids: frozenset[int], pad_id: int = 0) -> None:
        """``eos_ids`` as ``ReferenceEngine.eos_ids``; ``pad_id`` fills left padding (masked)."""
        self.model = model.eval()
        self.eos_ids = eos_ids
        self.pad_id = pad_id

    def serve(
        self,
        requests: Sequence[Request],
        config: ServingConfig = ServingConfig(),
        *,
        keep_logits: bool | Collection[int] = False,
        chooser: Chooser = spec_choice,
    ) -> list[Served]:
        """Serve ``requests`` in consecutive batches of ``config.batch_size``.

        ``keep_logits``: True keeps every request's rows (n, V); a collection of indices
        into ``requests`` keeps only theirs (a full row is 1 MiB for Gemma: a batch of 32
        long outputs would not fit in memory)."""
        out: list[Served] = []
        keep = set(range(len(requests))) if keep_logits is True else set(keep_logits or ())
        with torch_threads(config.threads), attention_kernel(self.model, config.attention):
            for i in range(0, len(requests), config.batch_size):
                batch = list(requests[i : i + config.batch_size])
                kept = [i + b in keep for b in range(len(batch))]
                out.extend(self._batch(batch, config, kept, chooser))
        return out

    def _batch(self, batch: list[Request], config: ServingConfig, keep_logits: list[bool],
               chooser: Chooser) -> list[Served]:
        import torch

        size = len(batch)
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((size, width), self.pad_id, dtype=torch.long)  # (B, P) left-padded
        mask = torch.zeros((size, width), dtype=torch.long)  # (B, P) 1 = real token
        for b, r in enumerate(batch):
            ids[b, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[b, width - len(r.prompt_ids):] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, P) positions from each first real token
        device = next(self.model.parameters()).device  # a GPU server: inputs go there
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
        tokens: list[list[int]] = [[] for _ in batch]
        rows: list[list[np.ndarray]] = [[] for _ in batch]
        done = [False] * size
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                             use_cache=True, logits_to_keep=1)
            t = 0
            while True:
                logits = out.logits[:, -1].float().cpu().numpy()  # (B, V)
                step = []
                for b, r in enumerate(batch):
                    if done[b]:
                        step.append(self.pad_id)
                        continue
                    row = logits[b]
                    tok = int(chooser(row, r, t, tokens[b]))
                    tokens[b].append(tok)
                    if keep_logits[b]:
                        rows[b].append(row.copy())
                    if tok in self.eos_ids or len(tokens[b]) >= r.params.max_tokens:
                        done[b] = True
                    step.append(tok)
                if all(done):
                    break
                t += 1
                mask = torch.cat([mask, torch.ones((size, 1), dtype=torch.long, device=device)],
                                 dim=1)
                pos = pos[:, -1:] + 1
                out = self.model(input_ids=torch.tensor(step, dtype=torch.long,
                                                        device=device)[:, None],
                                 attention_mask=mask, position_ids=pos, cache=out.cache,
                                 use_cache=True)
        served = []
        for b, _r in enumerate(batch):
            toks = tuple(tokens[b])
            reason: FinishReason = "stop" if toks and toks[-1] in self.eos_ids else "length"
            served.append(Served(toks, reason, size, config.threads,
                                 np.stack(rows[b]) if keep_logits[b] else None))
        return served


__all__ = [
    "ALL_CONFIGS", "ATTENTION_KERNELS", "WIDE_CONFIGS", "Chooser", "Request", "Served",
    "ServingConfig", "ServingPath", "attention_kernel", "spec_choice", "torch_threads",
]
