"""Calibrate a model's noise bound δ over the honest nondeterminism of serving.

δ bounds the **half-span** of the difference between what an honest server computes
and what the recomputer's replay computes for the same context (``ivp.verify.noise``:
a common shift of a whole logits row changes no choice of sampler spec v1, so it is
not noise):

    observed = max over (requests, serving configs, replay groupings, positions t) of
               ω_t = (max_i Δz_t,i − min_i Δz_t,i) / 2,   Δz = z_serve − z_replay

The serving side is :class:`~ivp.verify.serving.ServingPath` under the configurations
given (batch sizes with left padding, thread counts, attention kernels, incremental
decoding); the replay side is ``ReferenceEngine.replay_batch`` as the recomputer runs
it, alone and grouped with other records (right padding). The old absolute measure
max_i |Δz_t,i| is kept beside it per source, for comparison. A GPU server against the
CPU reference is a further source this module measures when such a server's logits are
supplied (``extra``); on a CPU-only machine it is not measured, and the method string
says so.

Two guards against an unseen maximum, and δ takes the larger:

* ``safety × observed`` (default 4): floating-point reordering errors scale with the
  magnitudes summed, not with the luck of the draw, so an unseen configuration of the
  same kernels lands within a small factor of the seen ones;
* a Gumbel-tail extrapolation of the per-position ω to ``horizon`` positions (default
  10^12, a large fleet's audited tokens): with u the (k+1)-th largest value and β the
  mean excess of the k largest over u, P(max > u + x) ≈ (k/n) e^{−x/β}, so the maximum
  over N positions is about u + β ln(N k / n).

A sweep over many sources (``per_config``) serves each configuration a rotating slice
of the requests rather than all of them, keeps the logits of a few requests per batch
(a Gemma row is 1 MiB), and can checkpoint each source to a directory so that a long
run resumes where it stopped. It also keeps :class:`~ivp.verify.noise.NoiseRecords`,
from which the report computes the false-alarm cost of any tolerance.

Calibration is deterministic: fixed prompts, seeds and configurations on one machine
give the same δ (tested).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ivp.protocol.messages import Manifest, NoiseBound, SamplingParams
from ivp.verify.noise import NoiseRecords, half_span
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
    SamplingParams(temperature=0.3, max_tokens=16),
)


@dataclass(frozen=True)
class SourceMeasurement:
    """The noise of one (serving config, replay grouping) pair."""

    serving: str
    replay_group: int
    rows: int
    max_span: float  # max_t ω_t: what δ bounds
    mean_span: float
    max_abs: float  # max_t max_i |Δz_t,i|: the absolute measure, for comparison


@dataclass(frozen=True)
class Calibration:
    """Raw figures of one calibration and the δ derived from them."""

    sources: tuple[SourceMeasurement, ...]
    row_span: np.ndarray  # (samples,) per compared position: ω_t
    observed: float  # max ω
    extrapolated: float  # Gumbel-tail maximum over HORIZON positions
    safety: float
    delta: float
    requests: int
    device: str
    configs: tuple[ServingConfig, ...] = ()
    records: NoiseRecords | None = None  # top-token noise per position (sweeps)
    max_tokens: int = 0
    serving: str = ""  # the serving path, when not ServingPath's configs (e.g. vLLM)

    @property
    def samples(self) -> int:
        return int(self.row_span.shape[0])

    @property
    def observed_abs(self) -> float:
        return max((s.max_abs for s in self.sources), default=0.0)

    def method(self) -> str:
        """What goes into the manifest's NoiseBound.method: how δ was measured."""
        sizes = sorted({c.batch_size for c in self.configs})
        threads = "/".join(str(t) for t in sorted({c.threads for c in self.configs}))
        kernels = "/".join(sorted({c.attention for c in self.configs}))
        groups = "/".join(str(g) for g in sorted({s.replay_group for s in self.sources}))
        gpu = "" if "cuda" in self.device else "; GPU server not measured"
        if self.serving:
            return (f"half-span (max - min)/2 of z_serve - z_replay over {self.samples} "
                    f"positions of {self.requests} requests; serving path: {self.serving} on "
                    f"{self.device}; replay groups {groups}; observed {self.observed:.3g} "
                    f"(max |dz| {self.observed_abs:.3g}), tail extrapolation to {HORIZON:.0e} "
                    f"positions {self.extrapolated:.3g}; delta = max({self.safety:g} x "
                    f"observed, extrapolation){gpu}")
        contiguous = len(sizes) > 2 and sizes == list(range(sizes[0], sizes[-1] + 1))
        batches = (f"batch {sizes[0]}-{sizes[-1]}" if contiguous
                   else "batch " + "/".join(str(b) for b in sizes))
        longest = f", outputs up to {self.max_tokens} tokens" if self.max_tokens else ""
        return (
            f"half-span (max - min)/2 of z_serve - z_replay over {self.samples} positions of "
            f"{self.requests} requests{longest}; serving path: {len(self.configs)} configs "
            f"({batches} left-padded, {threads} threads, {kernels} attention, KV-cache "
            f"decode) on {self.device}; replay groups {groups}; observed {self.observed:.3g} "
            f"(max |dz| {self.observed_abs:.3g}), tail extrapolation to {HORIZON:.0e} "
            f"positions {self.extrapolated:.3g}; delta = max({self.safety:g} x observed, "
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


def schedule(n_requests: int, configs: Sequence[ServingConfig],
             per_config: int | None) -> list[list[int]]:
    """Request indices each config serves: all of them, or (a sweep) a rotating slice of
    at least ``per_config`` and at least one full batch, a whole number of batches, so
    that every request meets many configs and no config sees only one prompt."""
    if per_config is None:
        return [list(range(n_requests)) for _ in configs]
    out, start = [], 0
    for c in configs:
        count = -(-max(per_config, c.batch_size) // c.batch_size) * c.batch_size
        out.append([(start + k) % n_requests for k in range(count)])
        start = (start + count) % n_requests
    return out


@dataclass(frozen=True)
class _Part:
    """One source's measurements (what a checkpoint file holds)."""

    source: SourceMeasurement
    span: np.ndarray
    records: NoiseRecords | None


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
    per_config: int | None = None,
    kept_per_batch: int | None = None,
    records: bool = False,
    checkpoint: Path | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> Calibration:
    """Serve ``requests`` under every config, replay, compare.

    Default: every config serves every request and each is replayed under every
    grouping of ``replay_groups``. A sweep (``per_config``) serves each config a
    rotating slice (:func:`schedule`) and replays it in one grouping, cycling through
    ``replay_groups`` config by config; ``kept_per_batch`` compares only that many
    requests of each batch (the rest are company); ``records`` keeps the top-token noise
    records; ``checkpoint`` saves each source to that directory and reuses saved ones.
    Pure apart from the model's arithmetic: same inputs on one machine, same result.
    ``extra`` / ``extra_row_max`` add measurements taken elsewhere (e.g. a GPU server).
    """
    if safety < 1.0:
        raise ValueError("the safety factor must be at least 1")
    path = ServingPath(engine.model, engine.eos_ids, _pad_id(engine))
    sources: list[SourceMeasurement] = list(extra)
    spans: list[np.ndarray] = [] if extra_row_max is None else [np.asarray(extra_row_max)]
    kept_records: list[NoiseRecords] = []
    plan = schedule(len(requests), configs, per_config)
    for c, (config, idx) in enumerate(zip(configs, plan, strict=True)):
        groups = list(replay_groups) if per_config is None else \
            [replay_groups[c % len(replay_groups)]]
        for group in groups:
            key = _checkpoint_key(config, group, [requests[i] for i in idx])
            part = _load(checkpoint, key)
            if part is None:
                part = _measure_source(engine, path, [requests[i] for i in idx], config,
                                       group, kept_per_batch, records)
                _save(checkpoint, key, part)
            sources.append(part.source)
            spans.append(part.span)
            if part.records is not None:
                kept_records.append(part.records)
            log(f"calibration {c + 1}/{len(configs)}: {config.name}, replay group {group}: "
                f"{part.source.rows} positions, max ω {part.source.max_span:.3g}, "
                f"max |Δz| {part.source.max_abs:.3g}")
    pooled = np.concatenate(spans) if spans else np.zeros(0)
    observed = float(pooled.max(initial=0.0))
    extrapolated = tail_extrapolation(pooled)
    delta = max(safety * observed, extrapolated)
    return Calibration(tuple(sources), pooled, observed, extrapolated, safety, delta,
                       len(requests), device, tuple(configs),
                       NoiseRecords.concat(kept_records) if records else None,
                       max((r.params.max_tokens for r in requests), default=0))


def _measure_source(engine: ReferenceEngine, path: ServingPath, requests: Sequence[Request],
                    config: ServingConfig, group: int, kept_per_batch: int | None,
                    records: bool) -> _Part:
    """Serve batch by batch, replay the kept requests in groups of ``group``, compare."""
    spans: list[np.ndarray] = []
    absolute: list[float] = []
    recs: list[NoiseRecords] = []
    size = config.batch_size
    for start in range(0, len(requests), size):
        batch = list(requests[start : start + size])
        keep = list(range(len(batch) if kept_per_batch is None
                          else min(kept_per_batch, len(batch))))
        served = path.serve(batch, config, keep_logits=keep)
        pairs = [(batch[i].prompt_ids, served[i].token_ids) for i in keep]
        for g in range(0, len(pairs), group):
            replayed = engine.replay_batch(pairs[g : g + group])
            for i, ref in zip(keep[g : g + group], replayed, strict=True):
                rows = served[i].logits
                assert rows is not None and rows.shape == ref.shape  # (n, V)
                diff = rows.astype(np.float64) - ref
                spans.append(half_span(diff))
                absolute.append(float(np.abs(diff).max(initial=0.0)))
                if records:
                    recs.append(NoiseRecords.of(rows, ref))
        del served
    span = np.concatenate(spans) if spans else np.zeros(0)
    source = SourceMeasurement(config.name, group, int(span.shape[0]),
                               float(span.max(initial=0.0)),
                               float(span.mean()) if span.size else 0.0,
                               max(absolute, default=0.0))
    return _Part(source, span, NoiseRecords.concat(recs) if records else None)


def _checkpoint_key(config: ServingConfig, group: int, requests: Sequence[Request]) -> str:
    """File name of a source's checkpoint: the config, the grouping and a digest of
    exactly the requests it served (a changed plan never reuses a stale file)."""
    h = hashlib.blake2b(digest_size=8)
    for r in requests:
        h.update(repr((r.prompt_ids, r.params, r.seed)).encode())
    name = config.name.replace(", ", "_").replace(" ", "")
    return f"{name}_g{group}_{h.hexdigest()}.npz"


def _save(directory: Path | None, key: str, part: _Part) -> None:
    if directory is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    s = part.source
    arrays = {"span": part.span, "meta": np.array([s.rows, s.max_span, s.mean_span, s.max_abs]),
              "name": np.array([s.serving]), "group": np.array([s.replay_group])}
    if part.records is not None:
        arrays |= {f"rec_{k}": v for k, v in part.records.arrays().items()}
    tmp = directory / f".{key}.tmp.npz"
    np.savez(tmp, **arrays)
    tmp.rename(directory / key)  # whole or absent: a crash leaves no half file


def _load(directory: Path | None, key: str) -> _Part | None:
    if directory is None or not (directory / key).is_file():
        return None
    with np.load(directory / key) as f:
        rows, max_span, mean_span, max_abs = f["meta"]
        source = SourceMeasurement(str(f["name"][0]), int(f["group"][0]), int(rows),
                                   float(max_span), float(mean_span), float(max_abs))
        recs = NoiseRecords(f["rec_served"], f["rec_noise"], f["rec_lse"], f["rec_span"]) \
            if "rec_span" in f.files else None
        return _Part(source, f["span"], recs)


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
    "noise_bound", "schedule", "tail_extrapolation",
]
