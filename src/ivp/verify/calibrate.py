"""Calibrate a model's noise bound δ over the honest nondeterminism of serving.

δ is the largest difference, in any logit, between what an honest server computes and
what the recomputer's replay computes for the same context:

    observed = max over (requests, serving configs, replay groupings, positions t,
                         vocabulary i) of |z_serve[t, i] − z_replay[t, i]|

The serving side is :class:`~ivp.verify.serving.ServingPath` under every source in
``ALL_CONFIGS`` (batch sizes 1–8 with left padding, 1 and 2 threads, incremental
decoding); the replay side is ``ReferenceEngine.replay_batch`` as the recomputer runs
it, alone and grouped with other records (right padding), since the recomputer also
batches. A GPU server against the CPU reference is a further source this module
measures when such a server's logits are supplied (``extra``); on a CPU-only machine
it is not measured, and the method string says so.

Safety factor. ``observed`` is the maximum over a finite sample; deployment sees far
more positions. Two guards, and δ takes the larger:

* ``safety × observed`` (default 4): floating-point reordering errors scale with the
  magnitudes summed, not with the luck of the draw, so an unseen configuration of the
  same kernels lands within a small factor of the seen ones;
* a Gumbel-tail extrapolation of the per-position maxima to ``horizon`` positions
  (default 10^12, a large fleet's audited tokens): with u the (k+1)-th largest
  per-position maximum and β the mean excess of the k largest over u,
  P(max > u + x) ≈ (k/n) e^{−x/β}, so the maximum over N positions is about
  u + β ln(N k / n).

A larger δ costs little: detection needs attack effects (~1e−2 and more in logits)
far above it, and the covert channel grows linearly in δ (``covert``), from a
starting point orders of magnitude below the policy bar.

Calibration is deterministic: fixed prompts, seeds and configurations on one
machine give the same δ (tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ivp.protocol.messages import Manifest, NoiseBound, SamplingParams
from ivp.verify.serving import ALL_CONFIGS, Request, ServingConfig, ServingPath

if TYPE_CHECKING:
    from ivp.engine.reference import ReferenceEngine

SAFETY = 4.0
HORIZON = 1e12  # positions the extrapolated maximum must cover
TAIL = 50  # order statistics for the tail fit
REPLAY_GROUPS = (1, 4)  # recomputer replays one record alone, or four together
CALIBRATION_PARAMS = (
    SamplingParams(temperature=1.0, max_tokens=16),
    SamplingParams(temperature=0.0, max_tokens=16),
    SamplingParams(temperature=0.7, top_k=40, top_p=0.9, max_tokens=16),
)


@dataclass(frozen=True)
class SourceMeasurement:
    """max |Δz| for one (serving config, replay grouping) pair."""

    serving: str
    replay_group: int
    rows: int
    max_abs: float
    mean_row_max: float


@dataclass(frozen=True)
class Calibration:
    """Raw figures of one calibration and the δ derived from them."""

    sources: tuple[SourceMeasurement, ...]
    row_max: np.ndarray  # (samples,) per compared position: max_i |Δz_i|
    observed: float
    extrapolated: float  # Gumbel-tail maximum over HORIZON positions
    safety: float
    delta: float
    requests: int
    device: str
    configs: tuple[ServingConfig, ...] = ()
    serving: str = ""  # the serving path, when not ServingPath's configs (e.g. vLLM)

    @property
    def samples(self) -> int:
        return int(self.row_max.shape[0])

    def method(self) -> str:
        """What goes into the manifest's NoiseBound.method: how δ was measured."""
        sizes = sorted({c.batch_size for c in self.configs})
        threads = "/".join(str(t) for t in sorted({c.threads for c in self.configs}))
        groups = "/".join(str(g) for g in sorted({s.replay_group for s in self.sources}))
        gpu = "" if "cuda" in self.device else "; GPU server not measured"
        if self.serving:
            return (f"max|z_serve - z_replay| over {self.samples} positions of "
                    f"{self.requests} requests; serving path: {self.serving} on "
                    f"{self.device}; replay groups {groups}; observed {self.observed:.3g}, "
                    f"tail extrapolation to {HORIZON:.0e} positions {self.extrapolated:.3g}; "
                    f"delta = max({self.safety:g} x observed, extrapolation){gpu}")
        contiguous = len(sizes) > 2 and sizes == list(range(sizes[0], sizes[-1] + 1))
        batches = (f"batch {sizes[0]}-{sizes[-1]}" if contiguous
                   else "batch " + "/".join(str(b) for b in sizes))
        return (
            f"max|z_serve - z_replay| over {self.samples} positions of {self.requests} "
            f"requests; serving path: {len(self.configs)} configs ({batches} left-padded, "
            f"{threads} threads, KV-cache decode) on {self.device}; replay groups {groups}; "
            f"observed {self.observed:.3g}, tail extrapolation to {HORIZON:.0e} positions "
            f"{self.extrapolated:.3g}; delta = max({self.safety:g} x observed, "
            f"extrapolation){gpu}"
        )


def tail_extrapolation(row_max: np.ndarray, horizon: float = HORIZON, tail: int = TAIL) -> float:
    """Maximum expected over ``horizon`` positions from a Gumbel (exponential) tail fit.

    u = the (k+1)-th largest value, β = mean(top k − u):  u + β ln(horizon · k / n).
    """
    n = int(row_max.shape[0])
    if n == 0:
        return 0.0
    k = max(1, min(tail, n // 10))
    top = np.sort(row_max)[::-1]
    if n <= k:
        return float(top[0])
    u = float(top[k])
    beta = float(np.mean(top[:k] - u))
    return max(float(top[0]), u + beta * math.log(max(horizon * k / n, 1.0)))


def calibration_requests(prompts: Sequence[Sequence[int]],
                         params: Sequence[SamplingParams] = CALIBRATION_PARAMS,
                         seed: int = 0) -> list[Request]:
    """Every prompt under every parameter set, with seeds fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for p in params:
        for prompt in prompts:
            out.append(Request(tuple(prompt), p, int(rng.integers(0, 2**63, dtype=np.uint64))))
    return out


def measure(
    engine: ReferenceEngine,
    requests: Sequence[Request],
    configs: Sequence[ServingConfig] = ALL_CONFIGS,
    replay_groups: Sequence[int] = REPLAY_GROUPS,
    *,
    safety: float = SAFETY,
    device: str = "cpu",
    extra: Sequence[SourceMeasurement] = (),
    extra_row_max: np.ndarray | None = None,
) -> Calibration:
    """Serve ``requests`` under every config, replay under every grouping, compare.

    Pure apart from the model's arithmetic: same inputs on one machine, same result.
    ``extra`` / ``extra_row_max`` add measurements taken elsewhere (e.g. a GPU server).
    """
    if safety < 1.0:
        raise ValueError("the safety factor must be at least 1")
    path = ServingPath(engine.model, engine.eos_ids, _pad_id(engine))
    sources: list[SourceMeasurement] = list(extra)
    row_max: list[np.ndarray] = [] if extra_row_max is None else [np.asarray(extra_row_max)]
    for config in configs:
        served = path.serve(requests, config, keep_logits=True)
        pairs = [(r.prompt_ids, s.token_ids) for r, s in zip(requests, served, strict=True)]
        for group in replay_groups:
            maxima = []
            for i in range(0, len(pairs), group):
                replayed = engine.replay_batch(pairs[i : i + group])
                for s, ref in zip(served[i : i + group], replayed, strict=True):
                    assert s.logits is not None and s.logits.shape == ref.shape  # (n, V)
                    maxima.append(np.abs(s.logits.astype(np.float64) - ref).max(axis=1))
            rows = np.concatenate(maxima) if maxima else np.zeros(0)
            row_max.append(rows)
            sources.append(SourceMeasurement(config.name, group, int(rows.shape[0]),
                                             float(rows.max(initial=0.0)),
                                             float(rows.mean()) if rows.size else 0.0))
    pooled = np.concatenate(row_max) if row_max else np.zeros(0)
    observed = float(pooled.max(initial=0.0))
    extrapolated = tail_extrapolation(pooled)
    delta = max(safety * observed, extrapolated)
    return Calibration(tuple(sources), pooled, observed, extrapolated, safety, delta,
                       len(requests), device, tuple(configs))


def _pad_id(engine: ReferenceEngine) -> int:
    pad = getattr(engine.tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def noise_bound(calibration: Calibration) -> NoiseBound:
    return NoiseBound(delta=calibration.delta, method=calibration.method(),
                      samples=calibration.samples)


def calibrated_manifest(model_dir: Path, model_id: str, calibration: Calibration,
                        algo: str = "blake3", engine: str = "reference",
                        dtype: str | None = None) -> Manifest:
    """The model's manifest carrying the calibrated δ. It reaches gateways and the
    recomputer only inside a new whitelist version signed under the quorum policy
    (``ivp whitelist build`` / ``sign``, installed by a ``whitelist_update`` admin
    request): δ is a security parameter, never configured locally."""
    from ivp.whitelist.manifest import make_manifest

    return make_manifest(model_dir, model_id, algo=algo, noise_bound=noise_bound(calibration),
                         engine=engine, dtype=dtype)


__all__ = [
    "CALIBRATION_PARAMS", "HORIZON", "REPLAY_GROUPS", "SAFETY", "Calibration",
    "ServingConfig", "SourceMeasurement", "calibrated_manifest", "calibration_requests", "measure",
    "noise_bound", "tail_extrapolation",
]
