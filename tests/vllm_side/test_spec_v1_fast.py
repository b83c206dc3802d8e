"""Run in vLLM's environment (numba there): ``choose_rows`` is ``choose``, token for token.

``tests/test_vllm.py`` runs this file with .venv-vllm's pytest; the main suite does not
collect it (``tests/conftest.py``), since the main environment has no numba.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ivp.engine import spec_v1_fast
from ivp.engine.spec_v1_fast import choose_row, choose_rows, top_ranked_fast
from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import choose, top_ranked

ROWS = st.one_of(
    st.lists(st.floats(-30, 30, allow_nan=False), min_size=1, max_size=300),
    st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0, -math.inf, 20.0, -20.0]), min_size=1,
             max_size=64),
    st.tuples(st.lists(st.sampled_from([0.0, 1.0, 2.0, -1.0]), min_size=1, max_size=8),
              st.integers(20, 200)).map(lambda a: a[0] * a[1]),  # long rows, many ties
)


def test_numba_is_used_here() -> None:
    assert spec_v1_fast.numba is not None


@given(ROWS, st.integers(0, 2**64 - 1), st.integers(0, 5000),
       st.sampled_from([0.0, 0.01, 0.3, 1.0, 2.5, 100.0]), st.sampled_from([0, 1, 2, 5, 40, 400]),
       st.sampled_from([1.0, 0.999, 0.9, 0.5, 1e-9]), st.booleans())
@settings(max_examples=500, deadline=None)
def test_choose_row_equals_choose(z: list[float], seed: int, t: int, temperature: float,
                                  top_k: int, top_p: float, as_float32: bool) -> None:
    row = np.array(z, dtype=np.float32 if as_float32 else np.float64)
    if not np.isfinite(row).any():
        row[0] = 0.0
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    assert choose_row(row, seed, t, params) == choose(row, seed, t, params)


PARAMS = st.builds(SamplingParams, temperature=st.sampled_from([0.0, 0.01, 0.3, 1.0, 2.5, 100.0]),
                   top_k=st.sampled_from([0, 1, 2, 5, 40, 400]),
                   top_p=st.sampled_from([1.0, 0.999, 0.9, 0.5, 1e-9]))


@st.composite
def batches(draw: st.DrawFn) -> tuple[np.ndarray, list[int], list[int], list[int],
                                      list[SamplingParams]]:
    """A (batch, V) block as vLLM hands it over: some rows to choose for, in any order,
    the others padding (NaN, +inf, garbage) that must not be read; rows with ties,
    -inf entries, peaked and flat ones."""
    vocab = draw(st.integers(1, 300))
    n = draw(st.integers(1, 12))
    kind = st.sampled_from(["normal", "ties", "peaked", "masked", "flat"])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    block = np.empty((n, vocab), np.float32)
    for r in range(n):
        k = draw(kind)
        if k == "normal":
            block[r] = rng.standard_normal(vocab) * draw(st.sampled_from([0.1, 3.0, 30.0]))
        elif k == "ties":
            block[r] = rng.integers(-2, 3, vocab)
        elif k == "peaked":
            block[r] = rng.standard_normal(vocab)
            block[r, rng.integers(0, vocab, 3)] = 25.0
        elif k == "masked":
            block[r] = rng.standard_normal(vocab)
            block[r, rng.random(vocab) < 0.5] = -np.inf
            block[r, rng.integers(0, vocab)] = 1.0
        else:
            block[r] = 0.0
    rows = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    for pad in set(range(n)) - set(rows):  # padding: never read
        block[pad] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30]))
    seeds = draw(st.lists(st.integers(0, 2**64 - 1), min_size=len(rows), max_size=len(rows)))
    positions = draw(st.lists(st.integers(0, 5000), min_size=len(rows), max_size=len(rows)))
    params = draw(st.lists(PARAMS, min_size=len(rows), max_size=len(rows)))
    return block, rows, seeds, positions, params


@given(batches(), st.booleans())
@settings(max_examples=400, deadline=None)
def test_choose_rows_equals_choose_on_every_row(batch: tuple, as_float64: bool) -> None:
    block, rows, seeds, positions, params = batch
    if as_float64:
        block = block.astype(np.float64)
    tokens, markable = choose_rows(block, rows, seeds, positions, params)
    assert tokens.tolist() == [choose(block[r], s, t, p)
                               for r, s, t, p in zip(rows, seeds, positions, params, strict=True)]
    assert markable.tolist() == [not (np.isnan(block[r]).any() or np.isposinf(block[r]).any())
                                 for r in rows]


@given(ROWS, st.integers(1, 400))
@settings(max_examples=300, deadline=None)
def test_top_ranked_fast_equals_top_ranked(z: list[float], m: int) -> None:
    row = np.array(z, dtype=np.float64)
    assert top_ranked_fast(row, m).tolist() == top_ranked(row, m).tolist()


def test_choose_rows_gemma_sized_batch() -> None:
    """A batch of 32 Gemma-sized rows, the demo's mix of parameters, one call."""
    rng = np.random.default_rng(11)
    block = (rng.standard_normal((32, 262_144)) * 3.8).astype(np.float32)
    block[:, rng.integers(0, 262_144, 40)] += 18.0  # a peaked head, as real rows have
    mix = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
           SamplingParams(temperature=0.8, top_k=40), SamplingParams(temperature=0.7, top_p=0.9)]
    params = [mix[i % 4] for i in range(32)]
    rows = list(range(31, -1, -1))
    seeds = [17 + i for i in range(32)]
    tokens, _ = choose_rows(block, rows, seeds, [3] * 32, params)
    assert tokens.tolist() == [choose(block[r], s, 3, p)
                               for r, s, p in zip(rows, seeds, params, strict=True)]


def test_gemma_sized_rows() -> None:
    """Gemma's vocabulary, flat and peaked rows, every filter: the same token."""
    rng = np.random.default_rng(7)
    for scale in (0.3, 3.0, 12.0):
        row = (rng.standard_normal(262_144) * scale).astype(np.float32)
        for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=40),
                       SamplingParams(temperature=0.7, top_p=0.9),
                       SamplingParams(temperature=100.0)):
            for t in range(3):
                assert choose_row(row, 99 + t, t, params) == choose(row, 99 + t, t, params)


def test_noise_bound_covers_every_word() -> None:
    """The compiled pass's arithmetic bound is >= the spec's noise for every word class:
    the extremes, every power of two and its neighbours, and a million random words."""
    from ivp.protocol.sampler import _gumbel, _uniform

    edges = [0, 1, 2, 3, 2**32 - 1, 2**32 - 2, 2**31, 2**31 - 1]
    edges += [(1 << b) + d for b in range(32) for d in (-1, 0, 1) if 0 <= (1 << b) + d < 2**32]
    rng = np.random.default_rng(5)
    words = np.concatenate([np.array(edges, np.uint64),
                            rng.integers(0, 2**32, 1_000_000, dtype=np.uint64)]).astype(np.uint32)
    row = np.zeros((1, words.shape[0]), np.float32)
    bound = np.empty(words.shape[0])
    flip = np.empty(words.shape[0], np.float32)
    spec_v1_fast._bounded_scores(row[0], 0, words.shape[0], 1.0, words, flip,
                                 flip.view(np.uint32), bound)
    assert np.all(bound >= _gumbel(_uniform(words.astype(np.uint64))))
