"""The tolerant scoring rule on hand-made logits: inside / at / beyond the bound, T = 0
and T > 0, top-k and top-p boundaries, and soundness against every honest perturbation."""

from __future__ import annotations

import numpy as np
import pytest

from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import choose, gumbel
from ivp.verify import Policy, score
from ivp.verify.bounds import needed_delta, row_bounds

SEED = 0x1234_5678_9ABC_DEF0


def judge(z: list[float] | np.ndarray, tok: int, params: SamplingParams, delta: float,
          seed: int = SEED):
    scores = score(np.asarray([z], dtype=np.float64), [tok], seed, params)
    return scores, Policy("tolerant", delta).judge(scores, params)


# --- T = 0 -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("gap", "delta", "passes"), [
    (0.10, 0.06, True),    # inside: gap 0.1 < 2δ = 0.12
    (0.10, 0.05, True),    # at the bound: gap = 2δ exactly
    (0.10, 0.049, False),  # beyond
])
def test_greedy_margin_inside_at_beyond(gap: float, delta: float, passes: bool) -> None:
    p = SamplingParams(temperature=0.0)
    scores, j = judge([1.0, 1.0 - gap, -3.0], 1, p, delta)
    assert scores.expected[0] == 0
    assert scores.margins[0] == pytest.approx(gap)
    assert scores.needed_delta[0] == pytest.approx(gap / 2)
    assert j.passed is passes
    assert j.bound == pytest.approx(2 * delta)
    if not passes:
        assert j.positions == (0,) and j.excess[0] == pytest.approx(gap / 2 - delta)


def test_greedy_choice_needs_nothing_and_exact_mode_still_works() -> None:
    p = SamplingParams(temperature=0.0)
    scores, j = judge([0.0, 2.0, 1.0], 1, p, 0.0)
    assert j.passed and scores.needed_delta[0] == 0.0
    assert Policy("exact").judge(scores, p).passed
    # a tie that is not the spec's choice (ties go to the lower id): exact fails it,
    # any tolerant bound > 0 accepts it
    scores, j = judge([2.0, 2.0, 1.0], 1, p, 1e-9)
    assert j.passed and not Policy("exact").judge(scores, p).passed
    assert not Policy("tolerant", 0.0).judge(scores, p).passed


# --- T > 0, unrestricted ---------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampled_margin_inside_at_beyond(temperature: float) -> None:
    p = SamplingParams(temperature=temperature)
    z = np.array([0.3, 0.1, -0.2, 0.25, 0.0])
    g = gumbel(SEED, 0, z.shape[0])
    s = z / temperature + g
    a = int(np.argmax(s))
    tok = int(np.argsort(-s)[1])  # the runner-up under the reference
    m = s[a] - s[tok]
    need = temperature * m / 2
    for delta, ok in ((need * 1.01, True), (need, True), (need * 0.99, False)):
        scores, j = judge(z, tok, p, delta)
        assert scores.expected[0] == a
        assert scores.margins[0] == pytest.approx(m)
        assert scores.needed_delta[0] == pytest.approx(need, rel=1e-9)
        assert j.passed is ok, (delta, need)
        assert j.bound == pytest.approx(2 * delta / temperature)


def test_honest_server_exactly_delta_away_passes() -> None:
    """The worst honest server: every logit moved by exactly ±δ to favour its token."""
    p = SamplingParams(temperature=1.0)
    rng = np.random.default_rng(3)
    for trial in range(200):
        z = rng.normal(size=12) * 2
        delta = 0.05
        seed = int(rng.integers(0, 2**63))
        s = z + gumbel(seed, 0, 12)
        target = int(np.argsort(-s)[1])
        zp = z - delta
        zp[target] += 2 * delta
        tok = choose(zp, seed, 0, p)
        assert judge(z, tok, p, delta, seed)[1].passed, trial


# --- top-k / top-p boundaries --------------------------------------------------------------------
def test_top_k_boundary_is_sound() -> None:
    """z0 and z1 within 2δ: an honest z' may rank 1 first and allow only it (top_k = 1).

    Scoring against the reference's A(z) = {0} alone would fail that honest token
    whenever g_0 ≫ g_1; the δ-robust rule knows 0 is not surely allowed."""
    p = SamplingParams(temperature=1.0, top_k=1)
    delta = 0.01
    z = [1.0, 0.99, -2.0]
    honest = [0.99, 1.0, -2.0]  # within δ of z in every entry
    for seed in range(50):
        tok = choose(np.array(honest), seed, 0, p)
        assert tok == 1
        scores, j = judge(z, tok, p, delta, seed)
        assert scores.outside[0]  # outside the reference's own A(z)…
        assert j.passed  # …yet explained at δ
        assert not Policy("tolerant", 0.004).judge(scores, p).passed  # 0.01 apart needs δ ≥ 0.005
    # a token that no z' within δ puts in the top 1 fails
    assert not judge(z, 2, p, delta)[1].passed


def test_top_p_boundary_is_sound() -> None:
    """Token 1 sits on the top-p edge: in A(z') for some z' within δ, not in A(z)."""
    p = SamplingParams(temperature=1.0, top_p=0.6)
    z = np.log(np.array([0.6, 0.3, 0.1]))  # mass before token 1 is 0.6: token 1 excluded
    delta = 0.02
    zp = z.copy()
    zp[0] -= delta
    zp[1:] += delta  # p'_0 < 0.6: token 1 is allowed for this honest server
    allowed_any = False
    for seed in range(200):
        tok = choose(zp, seed, 0, p)
        allowed_any |= tok == 1
        assert judge(z, tok, p, delta, seed)[1].passed, seed
    assert allowed_any
    assert not judge(z, 2, p, delta)[1].passed  # token 2 is never allowed within δ


def test_needed_delta_is_the_critical_bound() -> None:
    """needed ≤ δ ⟺ explained at δ (the value is approached from the failing side)."""
    rng = np.random.default_rng(9)
    for _ in range(100):
        z = np.round(rng.normal(size=15) * 2, 1)
        p = SamplingParams(temperature=float(rng.choice([0.7, 1.0])),
                           top_k=int(rng.choice([0, 3, 5])), top_p=float(rng.choice([1.0, 0.8])))
        seed = int(rng.integers(0, 2**63))
        rb = row_bounds(z, gumbel(seed, 0, 15), p)
        for tok in range(15):
            d = needed_delta(rb, tok)
            assert not rb.explained(tok, d * (1 - 1e-6)) or d == 0.0
            assert rb.explained(tok, d * (1 + 1e-6) + 1e-12)


def test_honest_within_delta_never_fails_random() -> None:
    """Randomised soundness: any z' within δ, any sampler parameters, any seed."""
    rng = np.random.default_rng(2026)
    for trial in range(3000):
        vocab = int(rng.integers(2, 30))
        z = rng.normal(size=vocab) * float(rng.choice([0.5, 2.0, 6.0]))
        if rng.random() < 0.3:
            z = np.round(z, 1)  # ties and near ties
        p = SamplingParams(temperature=float(rng.choice([0.0, 0.3, 1.0, 1.7])),
                           top_k=int(rng.choice([0, 1, 2, 4, vocab])),
                           top_p=float(rng.choice([1.0, 0.2, 0.5, 0.9, 0.99])))
        delta = float(rng.choice([1e-6, 1e-3, 0.05, 0.5]))
        noise = rng.uniform(-delta, delta, vocab) if rng.random() < 0.5 else \
            delta * rng.choice([-1.0, 1.0], vocab)
        seed = int(rng.integers(0, 2**63))
        t = int(rng.integers(0, 4))
        tok = choose(z + noise, seed, t, p)
        logits = np.tile(z, (t + 1, 1))
        ids = [choose(z, seed, i, p) for i in range(t)] + [tok]
        j = Policy("tolerant", delta).judge(score(logits, ids, seed, p), p)
        assert j.passed, (trial, z, p, delta, j.reason)


def test_policy_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        Policy("tolerant", -1.0)
    with pytest.raises(ValueError):
        Policy("lenient", 0.1)  # type: ignore[arg-type]
