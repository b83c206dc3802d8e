"""The noise that matters (ivp.verify.noise): half-span, decisive window, and the exact
false-alarm cost — and Theorem 1 of docs/VERIFICATION.md on both scoring paths: an honest
server whose half-span stays within the tolerance never fails, however large a common
shift of its rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ivp.engine.head import BoundedHead, BoundedLogits
from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import choose, gumbel
from ivp.verify import Policy, score, score_replayed
from ivp.verify.noise import (
    RECORD_TEMPERATURES,
    NoiseRecords,
    decisive_span,
    false_alarm_rate,
    greedy_false_alarms,
    half_span,
)


def test_half_span_ignores_a_common_shift() -> None:
    rng = np.random.default_rng(0)
    e = rng.uniform(-1e-5, 1e-5, size=(3, 50))
    shifted = e + 4e-3  # every logit of the row moves by the same amount
    np.testing.assert_allclose(half_span(shifted), half_span(e), rtol=1e-9)
    assert np.all(half_span(e) <= np.abs(e).max(axis=1))
    assert np.abs(shifted).max() > 100 * half_span(shifted).max()


def test_decisive_window_holds_the_top_tokens_only() -> None:
    z = np.array([10.0, 9.5, -30.0, -40.0])
    served = z + np.array([1e-5, -1e-5, 0.3, -0.3])  # large noise, but far below the top
    assert decisive_span(z, served, 1.0) == pytest.approx(1e-5)
    assert decisive_span(z, served, 0.0) == 0.0  # greedy: argmax z = argmax z' = token 0
    tie = np.array([1.0, 1.0 - 1e-6, -5.0])
    flipped = tie + np.array([-1e-6, 1e-6, 0.2])  # the server's argmax is token 1
    assert decisive_span(tie, flipped, 0.0) == pytest.approx(1e-6)
    assert decisive_span(z, served, 5.0) == pytest.approx(0.3)  # W = 5 x 26 reaches them


# --- Theorem 1 on both scoring paths ---------------------------------------------------------
def _head(vocab: int, hidden: int, seed: int) -> BoundedHead:
    gen = torch.Generator().manual_seed(seed)
    return BoundedHead(torch.randn((vocab, hidden), generator=gen) * 0.3, None)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), temperature=st.sampled_from([0.0, 0.3, 1.0, 2.0]),
       shift=st.floats(-5.0, 5.0), noise=st.sampled_from([1e-6, 1e-4, 1e-2]),
       goal=st.sampled_from([None, 1e-4]), data=st.data())
def test_honest_server_within_half_span_passes_on_both_paths(
        seed: int, temperature: float, shift: float, noise: float, goal: float | None,
        data: st.DataObject) -> None:
    """z' = z + c + e with |e| ≤ ω: the old max-norm bound would need |c| + ω, the new
    rule only ω — on score (full rows) and score_replayed (bf16 rows, pruned) alike."""
    head = _head(1024, 32, seed % 1000)
    gen = torch.Generator().manual_seed(seed % 997)
    hidden = torch.randn((6, 32), generator=gen) * 3.0
    bits, norm = head.rows(hidden)
    rows = BoundedLogits(bits, norm, hidden, head)
    full = rows.full().astype(np.float64)
    rng = np.random.default_rng(seed % 2**32)
    e = rng.uniform(-noise, noise, size=full.shape)
    if data.draw(st.booleans()):
        e = noise * rng.choice([-1.0, 1.0], size=full.shape)  # the corners of the box
    served = full + shift + e
    params = SamplingParams(temperature=temperature, max_tokens=6)
    claims = [choose(served[t], seed, t, params) for t in range(6)]
    omega = float(half_span(served - full).max())
    # The pruned path's exact logits are float32 dot products, the full rows a GEMM: they
    # differ in the last ulps, which is honest noise of the same kind.
    t, i = np.indices(full.shape).reshape(2, -1)
    ulps = float(np.abs(rows.exact(t, i) - full.reshape(-1)).max())
    for scores, bound in ((score(full, claims, seed, params), omega),
                          (score_replayed(rows, claims, seed, params), omega + 2 * ulps)):
        assert scores.max_needed_delta <= bound * (1 + 1e-9)
        policy = Policy("tolerant", bound * (1 + 1e-9), channel_goal=goal)
        if policy.tolerance(params) >= bound * (1 + 1e-9):
            assert policy.judge(scores, params).passed


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(-4, 4), min_size=2, max_size=10), st.booleans(),
       st.integers(0, 2**64 - 1), st.sampled_from([0.5, 1.0, 2.0]),
       st.sampled_from([0, 1, 2, 3]), st.sampled_from([1.0, 0.9, 0.5]),
       st.sampled_from([1e-3, 0.05]), st.floats(-50, 50), st.randoms(use_true_random=False))
def test_shifted_honest_server_passes_top_k_top_p(z: list[float], round_ties: bool, seed: int,
                                                  temperature: float, top_k: int, top_p: float,
                                                  delta: float, shift: float, rnd) -> None:  # type: ignore[no-untyped-def]
    """Part (a) with top-k / top-p: the bracket of A(z') holds for z' − c."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=8)
    row = np.round(z) if round_ties else np.array(z)
    ref = np.tile(row, (3, 1))
    served = ref + shift + np.array([[rnd.uniform(-delta, delta) for _ in z] for _ in range(3)])
    claims = [choose(served[t], seed, t, params) for t in range(3)]
    j = Policy("tolerant", delta * (1 + 1e-9)).judge(score(ref, claims, seed, params), params)
    assert j.passed, j.reason


def test_noise_outside_the_decisive_window_never_matters() -> None:
    """Part (b): noise far larger than δ on tokens that cannot win changes no verdict."""
    rng = np.random.default_rng(4)
    params = SamplingParams(temperature=0.5, max_tokens=1)
    for trial in range(300):
        z = np.concatenate([rng.normal(size=5), rng.normal(size=20) - 60.0])
        served = z.copy()
        served[:5] += rng.uniform(-1e-4, 1e-4, 5)
        served[5:] += rng.uniform(-1.0, 1.0, 20)  # W_0.5 = 13: these can never win
        seed = int(rng.integers(0, 2**63))
        tok = choose(served, seed, 0, params)
        omega_t = decisive_span(z, served, params.temperature)
        assert omega_t < 1e-4 < half_span(served - z)
        s = score(z[None], [tok], seed, params)
        assert s.max_needed_delta <= omega_t * (1 + 1e-9), trial


# --- the false-alarm cost -------------------------------------------------------------------
def _records(z: np.ndarray, served: np.ndarray) -> NoiseRecords:
    return NoiseRecords.of(served[None], z[None])


def test_false_alarm_rate_matches_monte_carlo() -> None:
    """Two near-tied tokens with opposite noise: the exact race formula against direct
    simulation of an honest server and the verdict at τ."""
    z = np.array([0.0, -0.02, -3.0, -3.5])
    e = np.array([2e-3, -2e-3, 0.0, 0.0])
    served = z + e
    rec = _records(z, served)
    t, tau = 0.1, 1e-3  # κ = (e_1 − e_2 − 2τ)/T = 0.02 for the pair (token 0 wins)
    fa = false_alarm_rate(rec, t, tau)
    params = SamplingParams(temperature=t, max_tokens=1)
    trials, alarms, flips = 60_000, 0, 0
    for seed in range(trials):
        g = gumbel(seed, 0, 4)
        s, s_served = z / t + g, served / t + g
        tok = int(np.argmax(s_served))  # the honest server's spec choice
        alarms += t * (s.max() - s[tok]) / 2 > tau  # δ* of its token on the replay
        flips += tok != int(np.argmax(s))
        if seed < 20:  # the same verdict as the scoring rule itself
            assert tok == choose(served, seed, 0, params)
            needed = score(z[None], [tok], seed, params).max_needed_delta
            assert (needed > tau) == (t * (s.max() - s[tok]) / 2 > tau)
    assert fa.alarm_rate == pytest.approx(alarms / trials, abs=4 * np.sqrt(fa.alarm_rate / trials))
    assert fa.flip_rate == pytest.approx(flips / trials, abs=4 * np.sqrt(fa.flip_rate / trials))
    assert 0 < fa.alarm_rate < fa.flip_rate


def test_no_false_alarm_when_the_noise_fits_the_tolerance() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=(40, 300)) * 3
    served = z + 7.0 + rng.uniform(-0.9e-5, 0.9e-5, size=z.shape)
    rec = NoiseRecords.of(served, z)
    for t in RECORD_TEMPERATURES:
        assert false_alarm_rate(rec, t, 1e-5).alarm_rate == 0.0
    assert greedy_false_alarms(rec, 1e-5).alarm_rate == 0.0
    with pytest.raises(ValueError, match="recorded temperatures"):
        false_alarm_rate(rec, 0.123, 1e-5)


def test_greedy_false_alarm_at_a_near_tie() -> None:
    z = np.array([[1.0, 1.0 - 1e-4, -2.0], [3.0, 0.0, -1.0]])
    served = z + np.array([[-1e-4, 1e-4, 0.0], [0.0, 0.0, 0.0]])  # row 0 flips its argmax
    rec = NoiseRecords.of(served, z)
    assert greedy_false_alarms(rec, 1e-5).alarm_rate == 0.5
    assert greedy_false_alarms(rec, 1e-4).alarm_rate == 0.0
    assert greedy_false_alarms(rec, 1e-4).flip_rate == 0.5


def test_records_keep_the_server_rows_top_tokens() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(size=(5, 500))
    served = z + rng.uniform(-1e-3, 1e-3, size=z.shape)
    rec = NoiseRecords.of(served, z)
    assert rec.served.shape == (5, 64) and np.all(np.diff(rec.served, axis=1) <= 0)
    top = np.argsort(-served, axis=1)[:, :64]
    np.testing.assert_allclose(rec.noise, np.take_along_axis(served - z, top, 1), atol=1e-9)
    g = gumbel(1, 0, 500)  # the records are seed-free
    assert g.shape == (500,)
    both = NoiseRecords.concat([rec, rec])
    assert both.positions == 10


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5), st.integers(1, 200), st.integers(1, 80), st.booleans(),
       st.integers(0, 2**32 - 1))
def test_top_ranks_is_the_stable_sorts_top_k(rows: int, vocab: int, k: int, ties: bool,
                                            seed: int) -> None:
    """The records' top tokens equal a full stable sort's, ties by lower id first."""
    from ivp.verify.noise import top_ranks

    rng = np.random.default_rng(seed)
    z = rng.integers(-3, 4, size=(rows, vocab)).astype(np.float64) if ties \
        else rng.normal(size=(rows, vocab))
    assert np.array_equal(top_ranks(z, k), np.argsort(-z, axis=1, kind="stable")[:, :k])


def test_false_alarm_rates_are_probabilities_even_for_noise_far_above_t() -> None:
    """Noise of bf16 size (0.9) at T = 0.01: the bound saturates at 1 per position (the
    tail term alone is e^{2ω/T}), it never reads as a rate above 1."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(30, 400)) * 3
    rec = NoiseRecords.of(z + rng.uniform(-0.9, 0.9, size=z.shape), z)
    for t in RECORD_TEMPERATURES:
        fa = false_alarm_rate(rec, t, 1e-6)
        assert 0.0 <= fa.alarm_rate <= 1.0 and 0.0 <= fa.flip_rate <= 1.0
        assert fa.worst <= 1.0
    assert false_alarm_rate(rec, 0.01, 1e-6).worst == 1.0
