"""The verification report: honest false alarms, detection power, covert capacity.

``run(plan)`` does, on one model:

1. **Calibrate δ** (:mod:`ivp.verify.calibrate`) on the calibration prompts, or take
   δ from a manifest.
2. **Honest messages** on the evaluation prompts from the serving path
   (:mod:`ivp.verify.serving`) under every nondeterminism source (batch 1–8 with
   left padding, 1 and 2 threads), replayed as the recomputer does (one prefill,
   records grouped 1–8 with right padding), scored and judged in tolerant mode.
3. **Attacks** (:mod:`ivp.verify.attacks`): every generator answers the same kind of
   requests; claims are replayed, scored and judged the same way.
4. **Covert channel** (:mod:`ivp.verify.covert`): the stego-bounded encoder at δ,
   its realised payload, and the channel bound at δ and at larger δ.

Per message the statistic is **max_t δ*_t**, the smallest noise bound that explains
every token of the message (+∞ at a structural problem): a message fails iff it
exceeds δ. Detection within n tokens and AUC at n tokens use the same statistic on
the first n tokens. Everything returned is raw figures (frozen dataclasses); the
markdown, plots and JSON are views of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ivp.protocol.messages import SamplingParams
from ivp.verify.pruned import score_replayed
from ivp.verify.scoring import Policy
from ivp.verify.serving import ALL_CONFIGS, Request, ServingConfig, ServingPath
from ivp.verify.structure import structural_problem

HONEST_PARAMS = (
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7, top_k=40, top_p=0.9),
    SamplingParams(temperature=1.0, top_p=0.95),
)
ATTACK_PARAMS = SamplingParams(temperature=1.0)  # unrestricted T = 1, every generator
COVERT_PARAMS = SamplingParams(temperature=1.0)  # the channel is measured at T = 1
AUC_TARGET = 0.999
Log = Callable[[str], None]


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

    def attack_tokens(self, name: str) -> int:
        return dict(self.attack_max_tokens).get(name, max(n for _, n in self.attack_max_tokens))


def _tokens(long: int, short: int) -> tuple[tuple[str, int], ...]:
    from ivp.verify.attacks import ATTACK_NAMES

    slow = {"finetune-step", "int8", "int4", "truncate"}
    return tuple((n, long if n in slow else short) for n in ATTACK_NAMES)


QUICK = Plan("tiny", calib_prompts=4, calib_max_tokens=12, honest_messages=256,
             honest_max_tokens=16, attack_messages=16, attack_max_tokens=_tokens(48, 24),
             covert_messages=8, covert_max_tokens=32, bf16_requests=4, quick=True)
FULL = {
    "tiny": Plan("tiny", calib_prompts=16, calib_max_tokens=16, honest_messages=30000,
                 honest_max_tokens=16, attack_messages=64, attack_max_tokens=_tokens(128, 64),
                 covert_messages=64, covert_max_tokens=64, bf16_requests=16),
    # Sized for ~30 minutes on 2 CPU cores: >= 500 honest messages under all 16 sources,
    # int4 curves to 100 tokens; δ calibrated on batch 1/4/8 x 1/2 threads (the honest
    # messages then test it under every source).
    "gemma-3-270m": Plan("gemma-3-270m", calib_prompts=3, calib_max_tokens=8,
                         honest_messages=512, honest_max_tokens=6, attack_messages=12,
                         attack_max_tokens=(*((n, t) for n, t in _tokens(64, 16)
                                              if n != "int4"), ("int4", 100)),
                         covert_messages=8, covert_max_tokens=32, bf16_requests=2,
                         calib_configs=tuple(ServingConfig(b, t) for t in (1, 2)
                                             for b in (1, 4, 8))),
}


# --- raw figures ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MessageFigures:
    """One scored message: δ*_t per position and any structural problem."""

    tokens: int
    exact: int  # positions where the claimed token is the spec's choice under replay
    needed: np.ndarray = field(repr=False)  # (n,) δ*_t; +inf at a structural problem
    passed: bool
    source: str  # serving config (honest) or generator name
    params: str

    @property
    def statistic(self) -> float:
        return float(self.needed.max()) if self.needed.size else 0.0

    def statistic_at(self, n: int) -> float:
        """max δ*_t over the first n tokens (the whole message if shorter)."""
        head = self.needed[:n]
        return float(head.max()) if head.size else 0.0


@dataclass(frozen=True)
class DeltaSource:
    delta: float
    origin: str  # "calibration in this run" or the manifest path
    method: str
    samples: int
    observed: float | None = None
    extrapolated: float | None = None
    per_source: tuple[tuple[str, int, int, float], ...] = ()  # (config, replay group, rows, max)


@dataclass(frozen=True)
class AttackFigures:
    name: str
    help: str
    messages: tuple[MessageFigures, ...]

    @property
    def detected(self) -> int:
        return sum(not m.passed for m in self.messages)


@dataclass(frozen=True)
class CovertFigures:
    delta: float
    tokens: int
    entropy_bits: float
    expected_bits: float
    realised_bits: float
    encoder_bits: int  # payload bits the stego-bounded encoder actually hid
    encoder_messages: int
    encoder_detected: int
    # (label, δ, expected bits/token, realised bits/token, fraction of entropy)
    growth: tuple[tuple[str, float, float, float, float], ...]
    # the same encoder against a verifier at the measured bf16 δ (a wide channel)
    wide_delta: float
    wide_bits: int
    wide_tokens: int
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
    device: str = "cpu"
    notes: tuple[str, ...] = ()


# --- statistics --------------------------------------------------------------------------------
def clopper_pearson_upper(failures: int, n: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound on a rate from ``failures`` of ``n``."""
    if n == 0:
        return 1.0
    if failures >= n:
        return 1.0
    if failures == 0:
        return 1.0 - (1.0 - confidence) ** (1.0 / n)
    from scipy.stats import beta

    return float(beta.ppf(confidence, failures + 1, n - failures))


def auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(attack statistic > honest statistic) + ½ P(equal) (Mann–Whitney)."""
    if positives.size == 0 or negatives.size == 0:
        return float("nan")
    neg = np.sort(negatives)
    below = np.searchsorted(neg, positives, side="left")
    equal = np.searchsorted(neg, positives, side="right") - below
    return float((below.sum() + 0.5 * equal.sum()) / (positives.size * neg.size))


def prefix_statistics(messages: Sequence[MessageFigures], upto: int) -> np.ndarray:
    """(messages, upto): entry [m, n−1] = max δ*_t over the first n tokens of message m
    (its whole length when shorter)."""
    out = np.zeros((len(messages), upto))
    for i, m in enumerate(messages):
        if m.needed.size:
            run = np.maximum.accumulate(m.needed[:upto])
            out[i, : run.size] = run
            out[i, run.size :] = run[-1]
    return out


def tokens_for_auc(attack: Sequence[MessageFigures], honest: Sequence[MessageFigures],
                   target: float = AUC_TARGET) -> int | None:
    """Smallest n such that the AUC of max_{t<n} δ*_t (attack vs honest) exceeds
    ``target``; None if no message length reaches it."""
    longest = max((m.tokens for m in attack), default=0)
    if longest == 0:
        return None
    a = prefix_statistics(attack, longest)
    h = prefix_statistics(honest, longest)
    for n in range(1, longest + 1):
        if auc(a[:, n - 1], h[:, n - 1]) > target:
            return n
    return None


def detection_curve(messages: Sequence[MessageFigures], delta: float,
                    upto: int) -> np.ndarray:
    """(upto,) fraction of messages detected when auditing only their first n tokens."""
    if not messages:
        return np.zeros(upto)
    return (prefix_statistics(messages, upto) > delta).mean(axis=0)


# --- running ------------------------------------------------------------------------------------
def _requests(prompts: Sequence[tuple[int, ...]], n: int, params: Sequence[SamplingParams],
              max_tokens: int, seed: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = params[i % len(params)]
        p = SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                           max_tokens=max_tokens)
        prompt = prompts[(i // len(params)) % len(prompts)]
        out.append(Request(prompt, p, int(rng.integers(0, 2**63, dtype=np.uint64))))
    return out


def _param_name(p: SamplingParams) -> str:
    if p.temperature == 0:
        return "T=0"
    name = f"T={p.temperature:g}"
    if p.top_k:
        name += f",k={p.top_k}"
    if p.top_p < 1:
        name += f",p={p.top_p:g}"
    return name


def _score_all(engine: Any, requests: Sequence[Request], claims: Sequence[tuple[tuple[int, ...],
               str]], policy: Policy, source: Callable[[int], str],
               groups: Sequence[int] = (1,)) -> list[MessageFigures]:
    """Replay claims in recomputer-like groups (sizes cycling through ``groups``),
    score each position, run the structural checks, judge."""
    out: list[MessageFigures] = []
    i = g = 0
    while i < len(requests):
        size = groups[g % len(groups)]
        g += 1
        chunk = range(i, min(i + size, len(requests)))
        # The recomputer's own path: bounded replay + pruned scoring (plain rows on
        # small vocabularies), so the report's verdicts are the ones it would give.
        replayed = engine.replay_bounded_batch(
            [(requests[j].prompt_ids, claims[j][0]) for j in chunk])
        for j, logits in zip(chunk, replayed, strict=True):
            r, (ids, reason) = requests[j], claims[j]
            scores = score_replayed(logits, list(ids), r.seed, r.params)
            verdict = policy.judge(scores, r.params)
            needed = scores.needed_delta.copy()
            problem = structural_problem(ids, reason, r.params.max_tokens, engine.eos_ids)
            if problem is not None:
                needed[min(problem[0], max(0, len(ids) - 1))] = np.inf
            exact = int(np.sum(scores.expected == np.asarray(ids)))
            out.append(MessageFigures(len(ids), exact, needed,
                                      verdict.passed and problem is None, source(j),
                                      _param_name(r.params)))
        i += size
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
    """max |z_bf16 − z_fp32|: the δ a bf16 server (same weights, bf16 arithmetic)
    would need against the fp32 reference — measured here on the CPU."""
    import copy

    import torch

    bf16 = copy.deepcopy(engine.model).to(torch.bfloat16).eval()
    path = ServingPath(bf16, engine.eos_ids, 0)
    worst = 0.0
    for r in requests:
        (s,) = path.serve([r], ServingConfig(1, 1), keep_logits=True)
        ref = engine.replay(r.prompt_ids, s.token_ids)
        assert s.logits is not None
        worst = max(worst, float(np.abs(s.logits.astype(np.float64) - ref).max()))
    del bf16
    return worst


def run(plan: Plan, *, manifest: Path | None = None, log: Log = lambda _m: None) -> Report:
    """Run every experiment of ``plan``; return the raw figures."""
    from ivp.engine.reference import ReferenceEngine
    from ivp.verify import attacks as attack_mod
    from ivp.verify import calibrate, covert
    from ivp.verify.prompts import CALIBRATION, EVALUATION, encode_prompts

    start = time.perf_counter()
    model, tokenizer, chat, _dir = load_model(plan.model, log)
    engine = ReferenceEngine(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    path = ServingPath(model, engine.eos_ids, int(pad))
    cal_prompts = encode_prompts(tokenizer, CALIBRATION[: plan.calib_prompts], chat)
    eval_prompts = encode_prompts(tokenizer, EVALUATION, chat)

    # 1. δ
    if manifest is not None:
        from ivp.protocol.encoding import decode
        from ivp.protocol.messages import Manifest

        m = decode(Path(manifest).read_bytes(), Manifest)
        if m.noise_bound is None:
            raise ValueError(f"{manifest}: the manifest carries no noise bound")
        nb = m.noise_bound
        dsrc = DeltaSource(nb.delta, f"manifest {manifest}", nb.method, nb.samples)
    else:
        cal_configs = plan.calib_configs or plan.configs
        log(f"calibrating δ: {len(cal_prompts)} prompts x {len(cal_configs)} serving configs")
        cal_params = tuple(SamplingParams(temperature=p.temperature, top_k=p.top_k,
                                          top_p=p.top_p, max_tokens=plan.calib_max_tokens)
                           for p in calibrate.CALIBRATION_PARAMS)
        cal = calibrate.measure(engine, calibrate.calibration_requests(cal_prompts, cal_params),
                                cal_configs)
        dsrc = DeltaSource(cal.delta, "calibration in this run (ivp calibrate, same procedure)",
                           cal.method(), cal.samples, cal.observed, cal.extrapolated,
                           tuple((s.serving, s.replay_group, s.rows, s.max_abs)
                                 for s in cal.sources))
    delta = dsrc.delta
    policy = Policy("tolerant", delta)
    log(f"δ = {delta:.3g} ({dsrc.origin})")

    # 2. honest messages, every nondeterminism source
    honest_req = _requests(eval_prompts, plan.honest_messages, HONEST_PARAMS,
                           plan.honest_max_tokens, seed=1)
    # Balanced, seeded assignment of messages to sources, independent of the parameter
    # and prompt cycles, so every source sees every parameter set and many prompts.
    order = np.resize(np.arange(len(plan.configs)), len(honest_req))
    np.random.default_rng(3).shuffle(order)
    by_config: dict[int, list[int]] = {}
    for i, c in enumerate(order):
        by_config.setdefault(int(c), []).append(i)
    by_config = dict(sorted(by_config.items()))
    claims: list[tuple[tuple[int, ...], str]] = [((), "")] * len(honest_req)
    source = [""] * len(honest_req)
    done = 0
    for c, idx in by_config.items():
        config = plan.configs[c]
        served = path.serve([honest_req[i] for i in idx], config)
        for i, s in zip(idx, served, strict=True):
            claims[i] = (s.token_ids, s.finish_reason)
            source[i] = config.name
        done += len(idx)
        log(f"honest: served {done}/{len(honest_req)} ({config.name})")
    honest = _score_all(engine, honest_req, claims, policy, lambda j: source[j],
                        groups=(1, 2, 3, 4, 5, 6, 7, 8))
    fp = sum(not m.passed for m in honest)
    tokens = sum(m.tokens for m in honest)
    log(f"honest: {len(honest)} messages ({tokens} tokens) scored, {fp} false positives; "
        f"exact-match {sum(m.exact for m in honest) / max(tokens, 1):.6f}; max δ* "
        f"{max((m.statistic for m in honest), default=0.0):.3g}")

    # 3. attacks
    eos_id = int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None
                 else min(engine.eos_ids))
    attack_figs = []
    for k, name in enumerate(attack_mod.ATTACK_NAMES):
        gen = attack_mod.build(name, model, tokenizer, path, eos_id)
        req = _requests(eval_prompts[k % 3 :], plan.attack_messages, (ATTACK_PARAMS,),
                        plan.attack_tokens(name), seed=100 + k)
        out = gen.serve(req)
        figs = _score_all(engine, req, [(c.token_ids, c.finish_reason) for c in out], policy,
                          lambda _j, name=name: name, groups=(4,))
        attack_figs.append(AttackFigures(name, gen.help, tuple(figs)))
        log(f"attack {name}: {sum(not f.passed for f in figs)}/{len(figs)} detected; tokens "
            f"for AUC>0.999: {tokens_for_auc(figs, honest)}; {gen.help}")
        del gen

    # 4. covert channel
    bf16_req = _requests(cal_prompts, plan.bf16_requests, (COVERT_PARAMS,), 16, seed=7)
    bf16_delta = measure_bf16(engine, bf16_req)
    log(f"bf16 server vs fp32 reference: max |Δz| = {bf16_delta:.3g}")
    cov_req = _requests(eval_prompts[1:], plan.covert_messages, (COVERT_PARAMS,),
                        plan.covert_max_tokens, seed=200)
    encoder = covert.BoundedStego(path, delta)
    encoded = encoder.serve(cov_req)
    cov_figs = _score_all(engine, cov_req, [(e.token_ids, e.finish_reason) for e in encoded],
                          policy, lambda _j: "stego-bounded")
    rows = engine.replay_batch([(r.prompt_ids, e.token_ids) for r, e in zip(cov_req, encoded,
                                                                            strict=True)])
    seeds = [r.seed for r in cov_req]
    grid = sorted((("calibrated δ", delta), ("10 δ", 10 * delta), ("100 δ", 100 * delta),
                   ("bf16 server (measured)", bf16_delta), ("0.01", 1e-2), ("0.1", 0.1),
                   ("0.5", 0.5)), key=lambda kv: kv[1])
    figs = covert.channel_growth(rows, seeds, COVERT_PARAMS, [d for _, d in grid])
    growth = [(label, d, f.bits_per_token, f.realised_per_token, f.fraction)
              for (label, d), f in zip(grid, figs, strict=True)]
    at = next(f for f, (label, _) in zip(figs, grid, strict=True) if label == "calibrated δ")
    wide_req = cov_req[: max(1, len(cov_req) // 4)]
    wide = covert.BoundedStego(path, bf16_delta).serve(wide_req)
    wide_figs = _score_all(engine, wide_req, [(e.token_ids, e.finish_reason) for e in wide],
                           Policy("tolerant", bf16_delta), lambda _j: "stego-bounded (bf16 δ)")
    cov = CovertFigures(delta, at.tokens, at.entropy_bits, at.expected_bits, at.realised_bits,
                        sum(len(e.bits) for e in encoded), len(encoded),
                        sum(not f.passed for f in cov_figs), tuple(growth), bf16_delta,
                        sum(len(e.bits) for e in wide), sum(len(e.token_ids) for e in wide),
                        sum(not f.passed for f in wide_figs))
    log(f"covert: {at.bits_per_token:.3g} bits/token ({100 * at.fraction:.3g}% of entropy) "
        f"over {at.tokens} tokens; encoder hid {cov.encoder_bits} bits, "
        f"{cov.encoder_detected} flagged; at bf16 δ {cov.wide_bits} bits, "
        f"{cov.wide_detected} flagged")
    return Report(plan.model, plan, dsrc, tuple(honest), tuple(attack_figs), cov, bf16_delta,
                  time.perf_counter() - start)


# --- views ---------------------------------------------------------------------------------------
def summary(report: Report) -> dict[str, Any]:
    """The ``--json`` object (schema of issue 5)."""
    honest = report.honest
    fp = sum(not m.passed for m in honest)
    tokens = sum(m.tokens for m in honest)
    return {
        "honest": {
            "messages": len(honest),
            "tokens": tokens,
            "exact_match_rate": (sum(m.exact for m in honest) / tokens) if tokens else 0.0,
            "false_positives": fp,
            "fpr_upper_95": clopper_pearson_upper(fp, len(honest)),
        },
        "attacks": [
            {"name": a.name, "messages": len(a.messages), "detected": a.detected,
             "tokens_for_auc_999": tokens_for_auc(a.messages, honest)}
            for a in report.attacks
        ],
        "covert": {
            "delta": report.covert.delta,
            "bits_per_token": (report.covert.expected_bits / report.covert.tokens
                               if report.covert.tokens else 0.0),
            "channel_fraction": (report.covert.expected_bits / report.covert.entropy_bits
                                 if report.covert.entropy_bits else 0.0),
        },
    }


def details(report: Report) -> dict[str, Any]:
    """Everything the markdown needs, as JSON-able raw figures (saved beside the plots)."""
    honest = report.honest
    configs: dict[str, list[MessageFigures]] = {}
    for m in honest:
        configs.setdefault(m.source, []).append(m)
    params: dict[str, list[MessageFigures]] = {}
    for m in honest:
        params.setdefault(m.params, []).append(m)

    def group(ms: list[MessageFigures]) -> dict[str, Any]:
        tok = sum(m.tokens for m in ms)
        return {"messages": len(ms), "tokens": tok,
                "exact_match_rate": sum(m.exact for m in ms) / tok if tok else 0.0,
                "exact_mode_failures": sum(m.exact < m.tokens for m in ms),
                "false_positives": sum(not m.passed for m in ms),
                "max_needed_delta": max((m.statistic for m in ms), default=0.0)}

    def curve_points(a: AttackFigures) -> dict[str, float]:
        longest = max((m.tokens for m in a.messages), default=0)
        curve = detection_curve(a.messages, report.delta.delta, longest)
        return {str(n): float(curve[n - 1]) for n in (1, 2, 4, 8, 16, 32, 64, 100, 128)
                if n <= longest}

    honest_prefix = prefix_statistics(honest, 128)

    def attack_auc(a: AttackFigures, n: int) -> float:
        return auc(prefix_statistics(a.messages, n)[:, n - 1], honest_prefix[:, n - 1])

    return {
        "model": report.model,
        "quick": report.plan.quick,
        "seconds": round(report.seconds, 1),
        "device": report.device,
        "delta": {"value": report.delta.delta, "origin": report.delta.origin,
                  "method": report.delta.method, "samples": report.delta.samples,
                  "observed": report.delta.observed, "extrapolated": report.delta.extrapolated,
                  "per_source": [list(s) for s in report.delta.per_source]},
        "bf16_delta": report.bf16_delta,
        "honest_by_config": {k: group(v) for k, v in configs.items()},
        "honest_by_params": {k: group(v) for k, v in params.items()},
        "honest_max_needed_delta": max((m.statistic for m in honest), default=0.0),
        "attacks": [{"name": a.name, "help": a.help, "messages": len(a.messages),
                     "detected": a.detected,
                     "tokens": sum(m.tokens for m in a.messages),
                     "mean_tokens": float(np.mean([m.tokens for m in a.messages])),
                     "median_statistic": float(np.median([m.statistic for m in a.messages])),
                     "tokens_for_auc_999": tokens_for_auc(a.messages, honest),
                     "auc_at_16": attack_auc(a, 16), "auc_at_100": attack_auc(a, 100),
                     "detected_within": curve_points(a),
                     "undetected_lengths": sorted(m.tokens for m in a.messages
                                                  if m.passed)[:8]}
                    for a in report.attacks],
        "covert": {"delta": report.covert.delta, "tokens": report.covert.tokens,
                   "entropy_bits": report.covert.entropy_bits,
                   "expected_bits": report.covert.expected_bits,
                   "realised_bits": report.covert.realised_bits,
                   "encoder_bits": report.covert.encoder_bits,
                   "encoder_messages": report.covert.encoder_messages,
                   "encoder_detected": report.covert.encoder_detected,
                   "wide": {"delta": report.covert.wide_delta, "bits": report.covert.wide_bits,
                            "tokens": report.covert.wide_tokens,
                            "detected": report.covert.wide_detected,
                            "messages": max(1, report.covert.encoder_messages // 4)},
                   "growth": [list(g) for g in report.covert.growth]},
        "summary": summary(report),
    }


def plots(report: Report, out_dir: Path) -> list[Path]:
    """detection rate vs output tokens per attack; δ* distributions honest vs attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    tag = report.model
    delta = report.delta.delta
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.2))
    upto = max(max((m.tokens for m in a.messages), default=1) for a in report.attacks)
    xs = np.arange(1, upto + 1)
    for a in report.attacks:
        ax.plot(xs, detection_curve(a.messages, delta, upto), label=a.name)
    honest_curve = detection_curve(report.honest, delta, min(upto, max(
        (m.tokens for m in report.honest), default=1)))
    ax.plot(np.arange(1, honest_curve.size + 1), honest_curve, "k--", label="honest (false alarms)")
    ax.set_xscale("log")
    ax.set_xlabel("output tokens audited per message")
    ax.set_ylabel("fraction of messages detected")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{tag}: detection vs output tokens (tolerant, δ = {delta:.2g})")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    p = out_dir / f"verify-detection-{tag}.png"
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    floor = 1e-12
    bins = np.logspace(-12, 3, 61)

    def values(ms: Sequence[MessageFigures]) -> np.ndarray:
        v = np.concatenate([m.needed for m in ms]) if ms else np.zeros(0)
        return np.clip(v[np.isfinite(v)], floor, 1e3)

    hv = values(report.honest)
    ax.hist(hv, bins=bins, density=False, histtype="step", color="k", linewidth=2,
            label=f"honest ({np.mean(hv <= floor):.1%} exact)")
    for a in report.attacks:
        v = values(a.messages)
        ax.hist(v, bins=bins, histtype="step", label=f"{a.name} ({np.mean(v <= floor):.0%} exact)")
    ax.axvline(delta, color="r", linestyle=":", label=f"δ = {delta:.2g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("δ*_t: noise bound needed to explain the token (exact tokens at 1e-12)")
    ax.set_ylabel("positions")
    ax.set_title(f"{tag}: per-position δ*, honest vs attack")
    ax.legend(fontsize=6, loc="upper right")
    p = out_dir / f"verify-margins-{tag}.png"
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


__all__ = [
    "AUC_TARGET",
    "FULL",
    "QUICK",
    "AttackFigures",
    "CovertFigures",
    "DeltaSource",
    "MessageFigures",
    "Plan",
    "Report",
    "auc",
    "clopper_pearson_upper",
    "details",
    "detection_curve",
    "plots",
    "run",
    "summary",
    "tokens_for_auc",
]

