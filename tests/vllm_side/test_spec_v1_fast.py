"""Run in vLLM's environment (numba there): ``choose_row`` is ``choose``, token for token.

``tests/test_vllm.py`` runs this file with .venv-vllm's pytest; the main suite does not
collect it (``tests/conftest.py``), since the main environment has no numba.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ivp.engine import spec_v1_fast
from ivp.engine.spec_v1_fast import choose_row
from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import choose

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


def test_bounds_cover_every_word_of_their_bin() -> None:
    """GB[b] bounds the noise of every word in bin b (spot-checked at bin edges)."""
    from ivp.protocol.sampler import _gumbel, _uniform

    bins = np.array([0, 1, 1000, 65534, 65535], dtype=np.uint64)
    for offset in (0, 1, 65535):
        words = (bins << np.uint64(16)) + np.uint64(offset)
        assert np.all(_gumbel(_uniform(words)) <= spec_v1_fast.BOUNDS[bins.astype(np.int64)])
