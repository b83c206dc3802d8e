"""The recomputer's fast path: bf16 head rows with a proven bound (engine.head) and the
pruned scoring rule (verify.pruned) give the same figures as full float32 rows + score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ivp.engine.head import ABSOLUTE, BoundedHead, BoundedLogits, bf16_bits, bf16_values
from ivp.engine.loading import load_from_dir
from ivp.engine.reference import ReferenceEngine
from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import choose
from ivp.verify import Policy, score, score_replayed
from ivp.verify.scoring import Scores


def _head(vocab: int, hidden: int, scale: float, seed: int) -> BoundedHead:
    gen = torch.Generator().manual_seed(seed)
    return BoundedHead(torch.randn((vocab, hidden), generator=gen) * scale, None)


def _rows(head: BoundedHead, n: int, scale: float, seed: int) -> BoundedLogits:
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn((n, head.weight.shape[1]), generator=gen) * scale
    bits, norm = head.rows(hidden)
    return BoundedLogits(bits, norm, hidden, head)


def assert_same(a: Scores, b: Scores) -> None:
    """Same choices and verdict-relevant figures; δ* and margins equal up to float32
    ulps of the logits (a dot product vs a GEMM)."""
    np.testing.assert_array_equal(a.expected, b.expected)
    np.testing.assert_array_equal(a.margins == 0, b.margins == 0)
    np.testing.assert_array_equal(a.outside, b.outside)
    np.testing.assert_allclose(a.margins, b.margins, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.needed_delta, b.needed_delta, rtol=1e-5, atol=1e-5)


# --- the bound ---------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), w_scale=st.sampled_from([0.01, 0.1, 1.0]),
       x_scale=st.sampled_from([0.1, 1.0, 30.0]))
def test_bf16_rows_stay_within_the_bound(seed: int, w_scale: float, x_scale: float) -> None:
    head = _head(512, 64, w_scale, seed)
    rows = _rows(head, 6, x_scale, seed)
    exact = rows.full().astype(np.float64)
    t, i = np.indices(exact.shape).reshape(2, -1)
    low, high = rows.bounds(t, i)
    assert np.all(low <= exact.reshape(-1)) and np.all(exact.reshape(-1) <= high)
    # and the bound is not vacuous: within a few percent of the logits' spread
    assert np.max(high - low) < 0.1 * (exact.max() - exact.min()) + 4 * ABSOLUTE


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), threshold=st.floats(-40, 40))
def test_candidates_hold_every_token_that_reaches_the_threshold(seed: int,
                                                                  threshold: float) -> None:
    head = _head(512, 64, 0.3, seed)
    rows = _rows(head, 3, 3.0, seed)  # logits of order ±20: positive and negative thresholds
    exact = rows.full()
    for t in range(3):
        ids = rows.candidates(t, threshold)
        assert np.all(np.diff(ids) > 0)
        assert set(np.flatnonzero(exact[t] >= threshold)) <= set(ids.tolist())


def test_bf16_bit_patterns_round_to_nearest_like_torch() -> None:
    values = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 50
    ours = bf16_values(bf16_bits(values))
    theirs = torch.from_numpy(values).bfloat16().double().numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_a_kernel_that_breaks_the_bound_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    head = _head(256, 32, 0.1, 1)
    assert head.self_check()
    rows = BoundedHead.rows

    def sloppy(self: BoundedHead, hidden: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        bits, norm = rows(self, hidden)
        return bf16_bits(bf16_values(bits).astype(np.float32) + 0.5), norm

    monkeypatch.setattr(BoundedHead, "rows", sloppy)
    assert not head.self_check()


# --- the pruned rule against score ------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), temperature=st.sampled_from([0.0, 0.3, 0.7, 1.0, 2.5]),
       x_scale=st.sampled_from([0.5, 3.0, 8.0]), data=st.data())
def test_pruned_scores_equal_full_scores(seed: int, temperature: float, x_scale: float,
                                         data: st.DataObject) -> None:
    head = _head(2048, 64, 0.3, seed % 1000)
    rows = _rows(head, 8, x_scale, seed % 997)
    params = SamplingParams(temperature=temperature, max_tokens=8)
    full = rows.full()
    honest = [_choice(full[t], seed, t, params) for t in range(8)]
    claims = [honest, data.draw(st.lists(st.integers(0, 2047), min_size=8, max_size=8))]
    mixed = list(honest)
    mixed[data.draw(st.integers(0, 7))] = data.draw(st.integers(-5, 2100))  # also out of range
    claims.append(mixed)
    for claim in claims:
        pruned, plain = score_replayed(rows, claim, seed, params), score(full, claim, seed,
                                                                          params)
        assert_same(pruned, plain)
        for policy in (Policy("exact"), Policy("tolerant", 0.01), Policy("tolerant", 1.0)):
            assert policy.judge(pruned, params).passed == policy.judge(plain, params).passed


def _choice(row: np.ndarray, seed: int, t: int, params: SamplingParams) -> int:
    return choose(row, seed, t, params)


def test_restricted_sampling_is_scored_on_full_rows() -> None:
    head = _head(1024, 32, 0.3, 3)
    rows = _rows(head, 5, 3.0, 3)
    for params in (SamplingParams(temperature=0.8, top_k=20, max_tokens=5),
                   SamplingParams(temperature=0.8, top_p=0.9, max_tokens=5)):
        claim = [_choice(rows.full()[t], 7, t, params) for t in range(5)]
        claim[2] = (claim[2] + 1) % 1024
        assert_same(score_replayed(rows, claim, 7, params),
                    score(rows.full(), claim, 7, params))


# --- on the engine --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> ReferenceEngine:
    model, tokenizer = load_from_dir(tiny_model_dir)
    engine = ReferenceEngine(model, tokenizer)
    engine.bounded_min_vocab = 0  # the tiny vocabulary would replay on the plain head
    return engine


def test_small_vocabularies_replay_on_the_plain_head(tiny_model_dir: Path) -> None:
    engine = ReferenceEngine(*load_from_dir(tiny_model_dir))
    assert engine.vocab_size < engine.bounded_min_vocab and engine.bounded_head is None
    prompt = engine.tokenizer("The gateway")["input_ids"]
    out = engine.generate(prompt, SamplingParams(max_tokens=4), 1).token_ids
    rows = engine.replay_bounded_batch([(prompt, out)])[0]
    assert isinstance(rows, np.ndarray)
    np.testing.assert_array_equal(rows, engine.replay(prompt, out))


def test_engine_replays_bounded_rows_that_score_like_full_rows(engine: ReferenceEngine) -> None:
    assert engine.bounded_head is not None
    prompt = engine.tokenizer("The gateway logs every request")["input_ids"]
    for temperature in (0.0, 0.7, 1.5):
        params = SamplingParams(temperature=temperature, max_tokens=24)
        out = engine.generate(prompt, params, 42).token_ids
        tampered = list(out)
        tampered[len(out) // 2] = (tampered[len(out) // 2] + 7) % engine.vocab_size
        pairs = [(prompt, out), (prompt, tampered)]
        for (_, o), full, bounded in zip(pairs, engine.replay_batch(pairs),
                                         engine.replay_bounded_batch(pairs), strict=True):
            assert isinstance(bounded, BoundedLogits)
            np.testing.assert_allclose(bounded.full(), full, rtol=1e-5, atol=1e-5)
            assert_same(score_replayed(bounded, o, 42, params), score(full, o, 42, params))
        honest = score_replayed(engine.replay_bounded_batch(pairs[:1])[0], out, 42, params)
        assert Policy("exact").judge(honest, params).passed
