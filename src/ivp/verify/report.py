"""The verification report: honest false alarms, detection power, covert capacity.

``run(plan)`` does, on one model:

1. **Calibrate δ** (:mod:`ivp.verify.calibrate`) on the calibration prompts — a sweep
   over batch sizes, thread counts and attention kernels that also keeps the
   per-position noise records the false-alarm cost is computed from — or take δ from
   a manifest.
2. **Honest messages** on the evaluation prompts from the serving path
   (:mod:`ivp.verify.serving`) under every source of ``plan.configs`` and every
   temperature of ``plan.honest_params``, recorded as they are served
   (:mod:`ivp.verify.traffic`), replayed as the recomputer does (bounded replay,
   pruned scoring, records grouped 1–8 with right padding) and scored.
3. **Attacks** (:mod:`ivp.verify.attacks`): every generator answers requests; claims
   are replayed and scored the same way.
4. **Covert channel**: the stego-bounded encoder (:mod:`ivp.verify.covert`) at the
   rule's tolerance, and the bf16 server's δ.

Per message the figures are δ*_t per position (policy-free): the verdict at a
tolerance τ is max_t δ*_t ≤ τ and no structural problem, so one scoring pass serves
the flat rule (τ = δ) and the temperature rule (τ(T), ``ivp.verify.tolerance``).
Per-temperature figures, tables and plots are views of the raw figures
(:mod:`ivp.verify.views`).

Long runs resume: with a checkpoint directory every unit of work (one calibration
source, one served batch of honest messages, one chunk of attack messages) is stored
under a digest of exactly what it computed, so a rerun — or a larger plan — reuses it.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ivp.protocol.messages import SamplingParams
from ivp.verify.pruned import score_replayed
from ivp.verify.serving import ALL_CONFIGS, WIDE_CONFIGS, Request, ServingConfig, ServingPath
from ivp.verify.structure import structural_problem
from ivp.verify.traffic import TrafficStats

HONEST_TEMPERATURES = (0.0, 0.1, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0)
HONEST_PARAMS = (
    *(SamplingParams(temperature=t) for t in HONEST_TEMPERATURES),
    SamplingParams(temperature=0.7, top_k=40, top_p=0.9),
    SamplingParams(temperature=1.0, top_p=0.95),
)
ATTACK_PARAMS = SamplingParams(temperature=1.0)  # every generator unless it asks otherwise
COVERT_PARAMS = SamplingParams(temperature=1.0)
VERSION = 2  # part of every checkpoint key: bump when a stored figure changes meaning
Log = Callable[[str], None]
T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """How big each experiment is. ``QUICK`` is for CI; the full plans for the docs."""

    model: str  # "tiny" or "gemma-3-270m"
    calib_prompts: int
    calib_max_tokens: int
    honest_messages: int
    honest_max_tokens: int
    attack_messages: int
    attack_max_tokens: tuple[tuple[str, int], ...]  # per generator
    covert_messages: int
    covert_max_tokens: int
    bf16_requests: int
    configs: tuple[ServingConfig, ...] = ALL_CONFIGS  # honest messages: every source
    quick: bool = False
    calib_configs: tuple[ServingConfig, ...] | None = None  # None: the same as ``configs``
    calib_per_config: int | None = None  # a sweep: requests per calibration source
    calib_kept: int | None = None  # rows compared per served batch (None: all)
    int4_messages: int | None = None  # the int4 AUC claim at scale (None: attack_messages)
    honest_params: tuple[SamplingParams, ...] = HONEST_PARAMS

    def attack_tokens(self, name: str) -> int:
        return dict(self.attack_max_tokens).get(name, max(n for _, n in self.attack_max_tokens))

    def attack_count(self, name: str) -> int:
        if name == "int4" and self.int4_messages:
            return self.int4_messages
        return self.attack_messages


def _tokens(long: int, short: int) -> tuple[tuple[str, int], ...]:
    from ivp.verify.attacks import ATTACK_NAMES

    slow = {"finetune-step", "int8", "int4", "truncate", "speculative", "temperature-0.99",
            "top-k-ignored"}
    return tuple((n, long if n in slow else short) for n in ATTACK_NAMES)


QUICK = Plan("tiny", calib_prompts=4, calib_max_tokens=12, honest_messages=200,
             honest_max_tokens=16, attack_messages=12, attack_max_tokens=_tokens(48, 24),
             covert_messages=6, covert_max_tokens=32, bf16_requests=2, quick=True,
             calib_per_config=4)
# Small batches first: a sweep cut short still covers every thread count and kernel.
_GEMMA_CALIB = tuple(ServingConfig(b, th, a) for b in (1, 2, 4, 8, 12, 16, 32)
                     for th in (1, 2, 4) for a in ("sdpa", "eager"))
FULL = {
    "tiny": Plan("tiny", calib_prompts=32, calib_max_tokens=32, honest_messages=30000,
                 honest_max_tokens=16, attack_messages=64, attack_max_tokens=_tokens(128, 64),
                 covert_messages=64, covert_max_tokens=64, bf16_requests=16,
                 configs=WIDE_CONFIGS, calib_configs=WIDE_CONFIGS, calib_per_config=8,
                 int4_messages=3000),
    # Calibrated on batch 1-32 x 1/2/4 threads x both attention kernels (outputs of 128
    # tokens, 2 rows compared per batch); 3,300 honest messages of up to 64 tokens (so
    # that >= 3,000 reach 64) under every source of WIDE_CONFIGS, batch sizes 3, 6 and 24
    # held out of the calibration; 3,000 int4 messages of 32 tokens for the AUC claim.
    "gemma-3-270m": Plan("gemma-3-270m", calib_prompts=32, calib_max_tokens=128,
                         honest_messages=3300, honest_max_tokens=64, attack_messages=48,
                         attack_max_tokens=(*((n, t) for n, t in _tokens(64, 32)
                                              if n != "int4"), ("int4", 32)),
                         covert_messages=16,
                         covert_max_tokens=64, bf16_requests=2, configs=WIDE_CONFIGS,
                         calib_configs=_GEMMA_CALIB, calib_per_config=4, calib_kept=2,
                         int4_messages=3000),
}


# --- raw figures ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MessageFigures:
    """One scored message: δ*_t per position and any structural problem."""

    tokens: int
    exact: int  # positions where the claimed token is the spec's choice under replay
    needed: np.ndarray = field(repr=False)  # (n,) δ*_t; +inf at a structural problem
    source: str  # serving config (honest) or generator name
    params: SamplingParams
    traffic: TrafficStats | None = field(default=None, repr=False)

    @property
    def statistic(self) -> float:
        return float(self.needed.max()) if self.needed.size else 0.0

    @property
    def changed(self) -> bool:
        """Some token is not the spec's choice under the replay: the claim differs from
        the honest output under the same seed (up to there the two share the prefix, so
        the first difference is where the claim leaves the replay's choice)."""
        return self.exact < self.tokens or bool(np.isinf(self.needed).any())

    def passed_at(self, tolerance: float) -> bool:
        return self.statistic <= tolerance


@dataclass(frozen=True)
class DeltaSource:
    delta: float
    origin: str  # "calibration in this run" or the manifest path
    method: str
    samples: int
    observed: float | None = None
    extrapolated: float | None = None
    observed_abs: float | None = None
    # (config, replay group, rows, max half-span, max |Δz|)
    per_source: tuple[tuple[str, int, int, float, float], ...] = ()


@dataclass(frozen=True)
class AttackFigures:
    name: str
    help: str
    messages: tuple[MessageFigures, ...]


@dataclass(frozen=True)
class CovertFigures:
    delta: float  # the tolerance the encoder was held to (τ at T = 1)
    encoder_bits: int
    encoder_messages: int
    encoder_tokens: int
    encoder_detected: int
    wide_delta: float
    wide_bits: int
    wide_tokens: int
    wide_messages: int
    wide_detected: int


@dataclass(frozen=True)
class Report:
    model: str
    plan: Plan
    delta: DeltaSource
    honest: tuple[MessageFigures, ...]
    attacks: tuple[AttackFigures, ...]
    covert: CovertFigures
    bf16_delta: float
    seconds: float
    records: Any = None  # NoiseRecords of the calibration (None with a manifest's δ)
    device: str = "cpu"


# --- checkpoints -------------------------------------------------------------------------------
class Store:
    """Content-addressed results of units of work (pickles of our own figures, in a
    directory this run owns); ``None``: nothing is kept."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)

    def cached(self, kind: str, key: object, compute: Callable[[], T]) -> T:
        if self.root is None:
            return compute()
        digest = hashlib.blake2b(repr((VERSION, kind, key)).encode(), digest_size=12)
        path = self.root / f"{kind}-{digest.hexdigest()}.pkl"
        if path.is_file():
            return pickle.loads(path.read_bytes())  # type: ignore[no-any-return]
        value = compute()
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(value))
        tmp.rename(path)
        return value


# --- running ------------------------------------------------------------------------------------
def requests_for(prompts: Sequence[tuple[int, ...]], n: int, params: Sequence[SamplingParams],
                 max_tokens: int, seed: int) -> list[Request]:
    """n requests cycling through ``params`` then ``prompts``; a prefix of a longer list
    is the shorter list (so a larger plan reuses a smaller one's checkpoints)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = params[i % len(params)]
        p = SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                           max_tokens=max_tokens)
        prompt = prompts[(i // len(params)) % len(prompts)]
        out.append(Request(prompt, p, int(rng.integers(0, 2**63, dtype=np.uint64))))
    return out


def assign_sources(n: int, sources: int, seed: int = 3) -> np.ndarray:
    """Source of each of n messages: every block of ``sources`` messages is a seeded
    permutation of all sources (balanced, and prefix-stable)."""
    rng = np.random.default_rng(seed)
    blocks = -(-n // sources) if sources else 0
    return np.concatenate([rng.permutation(sources) for _ in range(blocks)])[:n] \
        if blocks else np.zeros(0, dtype=np.int64)


def param_name(p: SamplingParams) -> str:
    if p.temperature == 0:
        return "T=0"
    name = f"T={p.temperature:g}"
    if p.top_k:
        name += f",k={p.top_k}"
    if p.top_p < 1:
        name += f",p={p.top_p:g}"
    return name


def score_claims(engine: Any, requests: Sequence[Request],
                 claims: Sequence[tuple[tuple[int, ...], str]], source: Callable[[int], str],
                 groups: Sequence[int] = (1,),
                 traffic: Sequence[TrafficStats | None] | None = None) -> list[MessageFigures]:
    """Replay claims in recomputer-like groups (sizes cycling through ``groups``) on the
    recomputer's own path (bounded replay + pruned scoring), run the structural checks,
    keep δ*_t per position."""
    out: list[MessageFigures] = []
    i = g = 0
    while i < len(requests):
        chunk = range(i, min(i + groups[g % len(groups)], len(requests)))
        g += 1
        replayed = engine.replay_bounded_batch(
            [(requests[j].prompt_ids, claims[j][0]) for j in chunk])
        for j, logits in zip(chunk, replayed, strict=True):
            r, (ids, reason) = requests[j], claims[j]
            scores = score_replayed(logits, list(ids), r.seed, r.params)
            needed = scores.needed_delta.copy()
            problem = structural_problem(ids, reason, r.params.max_tokens, engine.eos_ids)
            if problem is not None:
                needed = np.append(needed, np.inf) if not len(ids) else needed
                needed[min(problem[0], len(needed) - 1)] = np.inf
            exact = int(np.sum(scores.expected == np.asarray(ids)))
            out.append(MessageFigures(len(ids), exact, needed, source(j), r.params,
                                      traffic[j] if traffic is not None else None))
        i = chunk.stop
    return out


def load_model(model: str, log: Log) -> tuple[Any, Any, bool, Path | None]:
    """(model, tokenizer, chat, model_dir) for "tiny" (built fresh) or "gemma-3-270m"."""
    from ivp.engine.loading import load_from_dir

    if model == "tiny":
        import tempfile

        from ivp.engine.tiny import build_tiny_model

        tmp = Path(tempfile.mkdtemp(prefix="ivp-verify-tiny-"))
        build_tiny_model(tmp, seed=0)
        m, t = load_from_dir(tmp)
        return m, t, False, tmp
    if model == "gemma-3-270m":
        from ivp.engine.gemma import prepare_gemma

        log("preparing Gemma-3-270M (converted once to fp32 safetensors, then cached)")
        path = prepare_gemma()
        m, t = load_from_dir(path)
        return m, t, True, path
    raise ValueError(f"unknown model {model!r} (tiny or gemma-3-270m)")


def measure_bf16(engine: Any, requests: Sequence[Request]) -> float:
    """max half-span of z_bf16 − z_fp32: the δ a bf16 server (same weights, bf16
    arithmetic) would need against the fp32 reference — measured here on the CPU."""
    import copy

    import torch

    from ivp.verify.noise import half_span

    bf16 = copy.deepcopy(engine.model).to(torch.bfloat16).eval()
    path = ServingPath(bf16, engine.eos_ids, 0)
    worst = 0.0
    for r in requests:
        (s,) = path.serve([r], ServingConfig(1, 1), keep_logits=True)
        ref = engine.replay(r.prompt_ids, s.token_ids)
        assert s.logits is not None
        worst = max(worst, float(half_span(s.logits.astype(np.float64) - ref).max()))
    del bf16
    return worst


@dataclass
class _Setup:
    model: Any
    tokenizer: Any
    engine: Any
    path: ServingPath
    cal_prompts: list[tuple[int, ...]]
    eval_prompts: list[tuple[int, ...]]


def _setup(plan: Plan, log: Log) -> _Setup:
    from ivp.engine.reference import ReferenceEngine
    from ivp.verify.prompts import CALIBRATION, EVALUATION, encode_prompts

    model, tokenizer, chat, _dir = load_model(plan.model, log)
    engine = ReferenceEngine(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return _Setup(model, tokenizer, engine, ServingPath(model, engine.eos_ids, int(pad)),
                  encode_prompts(tokenizer, CALIBRATION[: plan.calib_prompts], chat),
                  encode_prompts(tokenizer, EVALUATION, chat))


def calibration_phase(plan: Plan, checkpoint: Path | None, log: Log,
                      setup: _Setup | None = None) -> Any:
    """δ and the noise records of ``plan``'s calibration sweep (resumable)."""
    from ivp.verify import calibrate

    s = setup or _setup(plan, log)
    configs = plan.calib_configs or plan.configs
    params = tuple(SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                  max_tokens=plan.calib_max_tokens)
                   for p in calibrate.CALIBRATION_PARAMS)
    log(f"calibrating δ: {len(s.cal_prompts)} prompts x {len(params)} parameter sets, "
        f"{len(configs)} serving configs")
    return calibrate.measure(
        s.engine, calibrate.calibration_requests(s.cal_prompts, params), configs,
        per_config=plan.calib_per_config, kept_per_batch=plan.calib_kept, records=True,
        checkpoint=None if checkpoint is None else checkpoint / "calibration", log=log)


def run(plan: Plan, *, manifest: Path | None = None, checkpoint: Path | None = None,
        log: Log = lambda _m: None) -> Report:
    """Run every experiment of ``plan``; return the raw figures."""
    from ivp.verify.experiments import attack_phase, covert_phase, honest_phase

    start = time.perf_counter()
    s = _setup(plan, log)
    store = Store(checkpoint)
    records = None
    if manifest is not None:
        from ivp.protocol.encoding import decode
        from ivp.protocol.messages import Manifest

        m = decode(Path(manifest).read_bytes(), Manifest)
        if m.noise_bound is None:
            raise ValueError(f"{manifest}: the manifest carries no noise bound")
        nb = m.noise_bound
        dsrc = DeltaSource(nb.delta, f"manifest {manifest}", nb.method, nb.samples)
    else:
        cal = calibration_phase(plan, checkpoint, log, s)
        records = cal.records
        dsrc = DeltaSource(cal.delta, "calibration in this run (ivp calibrate, same procedure)",
                           cal.method(), cal.samples, cal.observed, cal.extrapolated,
                           cal.observed_abs,
                           tuple((x.serving, x.replay_group, x.rows, x.max_span, x.max_abs)
                                 for x in cal.sources))
    log(f"δ = {dsrc.delta:.3g} ({dsrc.origin})")
    honest = honest_phase(plan, s, store, log)
    attacks = attack_phase(plan, s, store, honest, log)
    covert, bf16_delta = covert_phase(plan, s, store, dsrc.delta, log)
    return Report(plan.model, plan, dsrc, tuple(honest), tuple(attacks), covert, bf16_delta,
                  time.perf_counter() - start, records)


__all__ = [
    "FULL", "HONEST_PARAMS", "HONEST_TEMPERATURES", "QUICK", "AttackFigures", "CovertFigures",
    "DeltaSource", "MessageFigures", "Plan", "Report", "Store", "assign_sources",
    "calibration_phase", "param_name", "requests_for", "run", "score_claims",
]
