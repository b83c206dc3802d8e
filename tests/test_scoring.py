"""Scoring claimed tokens against reference logits (ivp.verify.scoring).

Margins under sampler spec v1 (DESIGN.md, "Verification"):
    T > 0: m_t = (z_a/T + g_a) - (z_tok/T + g_tok), honest within 2δ/T
    T = 0: m_t = z_a - z_tok, honest within 2δ
Temperatures here are powers of two so that bounds like 2δ/T are exact in floating
point and "exactly at the bound" means exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import allowed_set, choose, gumbel
from ivp.verify.scoring import Policy, Scores, score

SEED = 0x0123456789ABCDEF
EXACT = Policy("exact")


def P(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> SamplingParams:
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=64)


def tolerant(delta: float) -> Policy:
    return Policy("tolerant", delta)


def one(z: list[float], tok: int, params: SamplingParams, seed: int = SEED,
        t: int = 0) -> Scores:
    """Score a single claimed token at position t (earlier rows are filled honestly)."""
    rows = np.tile(np.array(z), (t + 1, 1))
    claims = [choose(rows[i], seed, i, params) for i in range(t)] + [tok]
    return score(rows, claims, seed, params)


# --- T = 0 ---------------------------------------------------------------------------------
Z0 = [1.0, 0.5, 0.0, -math.inf]


def test_greedy_match() -> None:
    s = one(Z0, 0, P(0.0))
    assert s.expected.tolist() == [0] and s.margins.tolist() == [0.0]
    assert s.tokens == 1 and s.matches == 1 and not s.outside.any()
    j = EXACT.judge(s, P(0.0))
    assert j.passed and j.failures == 0 and j.bound == 0.0
    assert j.reason == "all 1 tokens explained (max margin 0)"


def test_greedy_mismatch_margin_is_logit_gap() -> None:
    s = one(Z0, 1, P(0.0))
    assert s.margins.tolist() == [0.5] and s.matches == 0
    j = EXACT.judge(s, P(0.0))
    assert not j.passed and j.failures == 1
    assert "1 of 1 tokens not explained" in j.reason and "position 0" in j.reason


@pytest.mark.parametrize(("delta", "passed"), [
    (0.3, True),  # inside: 0.5 < 2δ = 0.6
    (0.25, True),  # exactly at: 0.5 == 2δ
    (0.2, False),  # beyond: 0.5 > 2δ = 0.4
])
def test_greedy_tolerant_bound(delta: float, passed: bool) -> None:
    j = tolerant(delta).judge(one(Z0, 1, P(0.0)), P(0.0))
    assert j.bound == 2 * delta
    assert j.passed is passed and j.max_margin == 0.5


def test_greedy_tie_loser_fails_exact_passes_tolerant() -> None:
    """Ties go to the lower id: the higher id is not the spec's choice, even at margin ~0."""
    z = [1.0, 1.0, 0.0]
    s = one(z, 1, P(0.0))
    assert s.expected.tolist() == [0]
    assert 0.0 < s.margins[0] < 1e-300
    assert not EXACT.judge(s, P(0.0)).passed
    assert tolerant(1e-9).judge(s, P(0.0)).passed
    assert EXACT.judge(one(z, 0, P(0.0)), P(0.0)).passed


def test_padded_and_out_of_vocab_tokens_fail_any_bound() -> None:
    for tok in (3, 4, 100):
        s = one(Z0, tok, P(0.0))
        assert s.margins[0] == math.inf
        assert not tolerant(1e6).judge(s, P(0.0)).passed
    s = one(Z0, 4, P(1.0))
    assert s.expected.tolist() == [-1] and s.outside.tolist() == [True]
    assert not tolerant(1e6).judge(s, P(1.0)).passed


# --- T > 0 ---------------------------------------------------------------------------------
ZT = [0.0, 0.25, 0.5, 0.75, 1.0, -0.5]


def spec_scores(z: list[float], params: SamplingParams, seed: int = SEED,
                t: int = 0) -> np.ndarray:
    return np.array(z) / params.temperature + gumbel(seed, t, len(z))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampled_match_and_margins(temperature: float) -> None:
    params = P(temperature)
    s_all = spec_scores(ZT, params)
    a = int(np.argmax(s_all))
    assert one(ZT, a, params).margins.tolist() == [0.0]
    for tok in range(len(ZT)):
        s = one(ZT, tok, params)
        assert s.expected.tolist() == [a]
        assert s.margins[0] == (0.0 if tok == a else s_all[a] - s_all[tok])
        assert EXACT.judge(s, params).passed is (tok == a)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampled_tolerant_bound_inside_at_beyond(temperature: float) -> None:
    params = P(temperature)
    s_all = spec_scores(ZT, params)
    a = int(np.argmax(s_all))
    tok = int(np.argsort(s_all)[-2])  # the runner-up
    m = s_all[a] - s_all[tok]
    assert m > 0
    at = m * temperature / 2  # bound 2δ/T == m exactly (T a power of two)
    s = one(ZT, tok, params)
    assert tolerant(at).bound(params) == m
    assert tolerant(at).judge(s, params).passed  # exactly at
    assert tolerant(at * 1.001).judge(s, params).passed  # inside
    j = tolerant(at * 0.999).judge(s, params)  # beyond
    assert not j.passed and j.failures == 1
    assert f"margin {m:.4g}" in j.reason


def test_position_and_seed_matter() -> None:
    params = P(1.0)
    rows = np.tile(np.array(ZT), (6, 1))
    honest = [choose(rows[t], SEED, t, params) for t in range(6)]
    s = score(rows, honest, SEED, params)
    assert s.expected.tolist() == honest and s.matches == 6
    assert EXACT.judge(s, params).passed
    other_seed = score(rows, honest, SEED + 1, params)
    assert not EXACT.judge(other_seed, params).passed  # another seed explains less
    shifted = score(rows[1:], honest[:-1], SEED, params)  # positions off by one
    assert shifted.expected.tolist() == honest[:-1] or not EXACT.judge(shifted, params).passed


def test_failure_count_and_first_position() -> None:
    params = P(1.0)
    rows = np.tile(np.array(ZT), (5, 1))
    claims = [choose(rows[t], SEED, t, params) for t in range(5)]
    claims[2] = (claims[2] + 1) % len(ZT)
    claims[4] = (claims[4] + 1) % len(ZT)
    j = EXACT.judge(score(rows, claims, SEED, params), params)
    assert (j.passed, j.failures) == (False, 2)
    assert j.reason.startswith("2 of 5 tokens not explained") and "position 2" in j.reason


def test_empty_output() -> None:
    s = score(np.zeros((0, 4)), [], SEED, P(1.0))
    assert s.tokens == 0
    assert EXACT.judge(s, P(1.0)).passed


def test_policy_bounds() -> None:
    assert EXACT.bound(P(0.5)) == 0.0
    assert tolerant(0.1).bound(P(0.0)) == 0.2
    assert tolerant(0.1).bound(P(0.5)) == 0.4
    assert tolerant(0.1).bound(P(2.0)) == 0.1


# --- tokens outside A(z) -------------------------------------------------------------------
def first_seed(pred) -> int:  # type: ignore[no-untyped-def]
    return next(s for s in range(10_000) if pred(s))


def test_outside_top_k() -> None:
    z = [2.0, 1.0, 0.875, -1.0]
    params = P(1.0, top_k=2)  # A = {0, 1}
    assert allowed_set(np.array(z), params).tolist() == [0, 1]
    # a seed where 2 would win without the filter: only A(z) stops it
    seed = first_seed(lambda s: int(np.argmax(np.array(z) + gumbel(s, 0, 4))) == 2)
    s = one(z, 2, params, seed=seed)
    assert s.outside.tolist() == [True]
    assert s.outside_gap[0] == 0.125  # 1.0 - 0.875
    assert 0 < s.margins[0] < 1e-300  # it out-scores the choice, yet is not it
    assert not EXACT.judge(s, params).passed
    assert tolerant(0.0625).judge(s, params).passed  # gap exactly 2δ
    j = tolerant(0.06).judge(s, params)  # gap beyond 2δ
    assert not j.passed and "outside" in j.reason
    far = one(z, 3, params, seed=seed)
    assert far.outside_gap[0] == 2.0
    assert not tolerant(0.5).judge(far, params).passed


def test_outside_top_p_tie_at_cut() -> None:
    """Tokens 0..3 tie; top_p = 0.5 keeps 0, 1. Claiming 2 is outside by a zero gap:
    exact mode fails it, a tolerant bound > 0 forgives it (a δ-wobble admits it)."""
    z = [0.0, 0.0, 0.0, 0.0]
    params = P(1.0, top_p=0.5)
    seed = first_seed(lambda s: int(np.argmax(gumbel(s, 0, 4))) == 2)
    s = one(z, 2, params, seed=seed)
    assert s.outside.tolist() == [True] and s.outside_gap[0] == 0.0
    assert not EXACT.judge(s, params).passed
    assert tolerant(0.01).judge(s, params).passed
    assert not tolerant(0.0).judge(s, params).passed


def test_greedy_ignores_filters() -> None:
    """At T = 0 the spec ignores top_k/top_p, so scoring does too."""
    s = one([1.0, 2.0, 3.0], 2, P(0.0, top_k=1, top_p=0.1))
    assert s.margins.tolist() == [0.0] and not s.outside.any()


# --- honest servers within δ pass tolerant mode ------------------------------------------
@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.floats(-8, 8), min_size=2, max_size=10),
    st.integers(0, 2**64 - 1),
    st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    st.sampled_from([1e-3, 0.05, 0.5]),
    st.randoms(use_true_random=False),
)
def test_honest_within_delta_always_passes_unfiltered(
    z: list[float], seed: int, temperature: float, delta: float, rnd
) -> None:  # type: ignore[no-untyped-def]
    """The theorem tolerant mode rests on: |z' - z| <= δ  =>  m_t <= 2δ/T (or 2δ)."""
    params = P(temperature)
    ref = np.tile(np.array(z), (4, 1))
    served = ref + np.array([[rnd.uniform(-delta, delta) for _ in z] for _ in range(4)])
    claims = [choose(served[t], seed, t, params) for t in range(4)]
    j = tolerant(delta * (1 + 1e-9)).judge(score(ref, claims, seed, params), params)
    assert j.passed, j.reason


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.floats(-4, 4), min_size=2, max_size=10),
    st.booleans(),
    st.integers(0, 2**64 - 1),
    st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    st.sampled_from([0, 1, 2, 3]),
    st.sampled_from([1.0, 0.9, 0.5, 0.3]),
    st.sampled_from([1e-3, 0.05, 0.5]),
    st.randoms(use_true_random=False),
)
def test_honest_within_delta_always_passes_filtered(
    z: list[float], round_ties: bool, seed: int, temperature: float, top_k: int,
    top_p: float, delta: float, rnd
) -> None:  # type: ignore[no-untyped-def]
    """Same theorem with top-k / top-p, ties included: no false alarm at a boundary."""
    params = P(temperature, top_k, top_p)
    row = np.round(z) if round_ties else np.array(z)
    ref = np.tile(row, (3, 1))
    served = ref + np.array([[rnd.uniform(-delta, delta) for _ in z] for _ in range(3)])
    claims = [choose(served[t], seed, t, params) for t in range(3)]
    j = tolerant(delta * (1 + 1e-9)).judge(score(ref, claims, seed, params), params)
    assert j.passed, j.reason


# --- honest servers near the edge of A(z) ---------------------------------------------------
def test_honest_top_k_boundary_passes() -> None:
    """A δ-wobble can drop the reference's own choice a from A(z) (top-k cut); the honest
    token must not then be measured against a (it would lose by the full noise gap)."""
    delta, params = 0.01, P(1.0, top_k=1)
    z = np.array([1.0, 0.99])  # within 2δ: an honest server may rank either first
    served = np.array([1.0 - delta, 0.99 + delta])  # honest: |served - z| <= δ
    seed = first_seed(lambda s: gumbel(s, 0, 2)[0] - gumbel(s, 0, 2)[1] > 1.0)
    tok = choose(served, seed, 0, params)
    assert tok == 1
    j = tolerant(delta).judge(score(z[None], [tok], seed, params), params)
    assert j.passed, j.reason


def test_honest_top_p_boundary_passes() -> None:
    """A δ-wobble of the probabilities can admit a token far below A(z)'s lowest logit."""
    delta, params = 0.01, P(1.0, top_p=0.9)
    z = np.array([math.log(9) + 0.005, 0.0])  # p0 just above 0.9: A = {0}
    served = z + np.array([-delta, delta])  # p0 just below 0.9: A' = {0, 1}
    assert allowed_set(z, params).tolist() == [0]
    assert allowed_set(served, params).tolist() == [0, 1]
    seed = first_seed(lambda s: choose(served, s, 0, params) == 1)
    j = tolerant(delta).judge(score(z[None], [1], seed, params), params)
    assert j.passed, j.reason
