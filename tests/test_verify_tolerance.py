"""The temperature rule τ(T) (ivp.verify.tolerance) and Theorem 2 of docs/VERIFICATION.md:
the covert channel it leaves is below γ of the sampling channel, checked by counting
accepted outputs directly on small models."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import choose
from ivp.verify import CHANNEL_GOAL, Policy, score
from ivp.verify.covert import accepted_tokens
from ivp.verify.tolerance import HEADROOM, channel_epsilon, channel_window, tolerance
from ivp.verify.traffic import TrafficStats, channel_at


@pytest.mark.parametrize("n", [1, 16, 64, 1024, 32768, 65536])
def test_channel_epsilon_solves_its_equation(n: int) -> None:
    eps = channel_epsilon(CHANNEL_GOAL, n)
    assert eps * math.exp(eps * n) == pytest.approx(CHANNEL_GOAL, rel=1e-9)
    assert eps <= CHANNEL_GOAL
    assert channel_window(CHANNEL_GOAL, n) == pytest.approx(math.log1p(HEADROOM * eps))


def test_tolerance_scales_with_temperature_and_never_exceeds_delta() -> None:
    delta = 1e-3
    window = channel_window(CHANNEL_GOAL, 64)
    for t in (1e-3, 0.1, 0.5, 1.0, 2.0, 50.0):
        tau = tolerance(delta, t, 64)
        assert tau == pytest.approx(min(delta, t * window / 2))
        assert tau <= delta
    assert tolerance(delta, 0.0, 64) == pytest.approx(min(delta, window / 2))
    assert tolerance(delta, 0.1, 64, goal=None) == delta  # the flat rule
    with pytest.raises(ValueError):
        channel_epsilon(0.0, 64)
    with pytest.raises(ValueError):
        Policy("tolerant", 1e-3, channel_goal=2.0)


def test_policy_judges_at_the_temperature_tolerance() -> None:
    z = np.array([[0.0, -1e-5, -4.0]])
    p = SamplingParams(temperature=0.1, max_tokens=16)
    flat, rule = Policy("tolerant", 1e-3), Policy("tolerant", 1e-3, channel_goal=CHANNEL_GOAL)
    served = z[0] + [0, 3e-4, 0]  # a server whose noise on the top pair exceeds τ(0.1)
    seed = next(s for s in range(20_000) if choose(served, s, 0, p) == 1
                and score(z, [1], s, p).max_needed_delta > rule.tolerance(p))
    scores = score(z, [1], seed, p)
    assert flat.judge(scores, p).passed  # within δ: the flat rule passes it
    j = rule.judge(scores, p)
    assert not j.passed and "τ(T)" in j.reason
    assert rule.bound(p) == pytest.approx(2 * rule.tolerance(p) / 0.1)
    assert Policy("exact", 1e-3, channel_goal=CHANNEL_GOAL).tolerance(p) == 0.0


@settings(max_examples=120, deadline=None)
@given(st.lists(st.floats(-6, 6), min_size=2, max_size=12), st.integers(0, 2**64 - 1),
       st.sampled_from([0.0, 0.05, 0.3, 1.0, 2.0]), st.sampled_from([1e-6, 1e-4, 1e-2]),
       st.randoms(use_true_random=False))
def test_honest_within_the_tolerance_passes_the_temperature_rule(
        z: list[float], seed: int, temperature: float, delta: float, rnd) -> None:  # type: ignore[no-untyped-def]
    """Soundness of the rule itself: noise (half-span) within τ(T) never fails."""
    params = SamplingParams(temperature=temperature, max_tokens=64)
    rule = Policy("tolerant", delta, channel_goal=CHANNEL_GOAL)
    tau = rule.tolerance(params)
    ref = np.tile(np.array(z), (3, 1))
    served = ref + rnd.uniform(-9, 9) + np.array(
        [[rnd.uniform(-tau, tau) for _ in z] for _ in range(3)]) * (1 - 1e-9)
    claims = [choose(served[t], seed, t, params) for t in range(3)]
    j = rule.judge(score(ref, claims, seed, params), params)
    assert j.passed, j.reason


# --- Theorem 2, counted -----------------------------------------------------------------------
def _tree_count(rows: list[np.ndarray], seed: int, params: SamplingParams, tau: float,
                prefix: tuple[int, ...] = ()) -> int:
    """N: accepted outputs of a toy model whose row at a position depends on the prefix
    (rows[hash(prefix) % len(rows)]), by walking the whole tree."""
    t = len(prefix)
    if t == params.max_tokens:
        return 1
    row = rows[hash(prefix) % len(rows)]
    return sum(_tree_count(rows, seed, params, tau, (*prefix, int(i)))
               for i in accepted_tokens(row, seed, t, params, tau))


@pytest.mark.parametrize("temperature", [0.05, 0.3, 1.0])
def test_accepted_outputs_stay_below_the_theorem_bound(temperature: float) -> None:
    """log2 E[N] ≤ ε e^{εn} H(Y), with a tolerance large enough that the tree branches."""
    rng = np.random.default_rng(int(temperature * 100))
    n, vocab = 3, 5
    rows = [rng.normal(size=vocab) * 2 * temperature for _ in range(7)]
    tau = 0.02 * temperature  # ε = e^{0.04} − 1 ≈ 0.04: far above γ, so N > 1 is seen
    params = SamplingParams(temperature=temperature, max_tokens=n)
    counts = [_tree_count(rows, s, params, tau) for s in range(3000)]
    eps = math.expm1(2 * tau / temperature)
    # H(Y): the honest output's entropy, exactly, over the same toy tree
    def entropy(prefix: tuple[int, ...] = ()) -> float:
        if len(prefix) == n:
            return 0.0
        z = rows[hash(prefix) % len(rows)] / temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        h = float(-(p * np.log2(p)).sum())
        return h + float(sum(p[i] * entropy((*prefix, i)) for i in range(vocab)))
    h_y = entropy()
    mean_n = float(np.mean(counts))
    assert mean_n > 1.01  # the channel is there
    assert math.log2(mean_n) <= eps * math.exp(eps * n) * h_y
    # and the estimator of the report (mean over honest paths of Π(1 + r_t)) agrees
    stats = []
    for s in range(3000):
        prefix: tuple[int, ...] = ()
        ps, hs = [], []
        for t in range(n):
            row = rows[hash(prefix) % len(rows)]
            z = row / temperature
            p = np.exp(z - z.max())
            p /= p.sum()
            tok = choose(row, s, t, params)
            ps.append(p[tok])
            hs.append(float(-(p * np.log2(p)).sum()))
            prefix = (*prefix, tok)
        stats.append(TrafficStats(np.array(hs), np.array(ps), np.zeros((n, 8)),
                                  np.zeros((n, 8))))
    ch = channel_at(stats, temperature, tau, n, resamples=50)
    assert ch.bound_bits == pytest.approx(math.log2(mean_n), abs=0.03)
    assert ch.entropy_bits == pytest.approx(h_y, rel=0.05)


def test_the_rule_keeps_the_counted_channel_below_the_goal() -> None:
    rng = np.random.default_rng(7)
    n, vocab, temperature = 3, 6, 0.2
    rows = [rng.normal(size=vocab) * 0.3 for _ in range(5)]
    params = SamplingParams(temperature=temperature, max_tokens=n)
    goal = 1e-2  # a loose goal, so that a few thousand seeds can see the channel
    tau = tolerance(10.0, temperature, n, goal)
    counts = [_tree_count(rows, s, params, tau) for s in range(4000)]
    bits = math.log2(float(np.mean(counts)))
    assert 0 < bits <= goal * n * math.log2(vocab)  # H(Y) ≤ n log2 V
