"""Sampler spec v1 at serving speed: the same token as ``protocol.sampler.choose``.

``choose`` draws Gumbel noise for the whole vocabulary: for Gemma's 262,144 tokens
that is 65,536 Philox calls and 524,288 logarithms per generated token (~70 ms in
numpy), more than a forward pass. This module picks the same token from far less:

1. one compiled pass (numba) computes every token's Philox word — the integer part,
   cheap — and an upper bound of its noise from a table: g is increasing in the word,
   so g_i <= GB[w_i >> 16], the noise of the largest word of its 2^16-word bin;
2. L, the exact score z/T + g of the top-ranked token (always allowed), bounds the
   winner's score from below; only tokens with z_i/T + GB[bin] >= L can reach it;
3. the exact scores of those candidates (``gumbel_at``, the very function ``choose``
   uses) and the lowest-id argmax among those of A(z) give the token.

Every maximum of ``choose``'s argmax is a candidate (its score is >= L, and its bound
>= its score), so the token is identical, tie rule included: tested against
``choose`` (``tests/vllm_side``). This is for unrestricted sampling, where A(z) is
the whole row; under top-k / top-p ``choose`` already draws noise only for A(z), and
it is used as it is. Without numba (the main environment) :func:`choose_row` is
``choose`` itself.
"""

from __future__ import annotations

import numpy as np

from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import _gumbel, _uniform, choose, gumbel_at, seed_key

BIN_SHIFT = 16
# GB[b]: the noise of the largest word of bin b, plus a margin that covers any
# last-ulp difference between this table's log and another evaluation of it.
_LAST_WORDS = (np.arange(1 << (32 - BIN_SHIFT), dtype=np.uint64) << np.uint64(BIN_SHIFT)) \
    | np.uint64((1 << BIN_SHIFT) - 1)
_GB = _gumbel(_uniform(_LAST_WORDS))
BOUNDS = _GB + 1e-12 * (1.0 + np.abs(_GB))

try:
    import numba
except ImportError:  # the main environment: the plain rule
    numba = None


if numba is not None:
    _M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    _W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    _MASK, _S32 = np.uint64(0xFFFFFFFF), np.uint64(32)

    @numba.njit(cache=True, nogil=True)
    def _candidates(z, temperature, k0, k1, position, lower, bounds, out):  # pragma: no cover
        """Ids i (ascending) with z_i/T + bounds[w_i >> 16] >= lower; their count."""
        vocab = z.shape[0]
        count = 0
        shift = np.uint64(16)
        words = np.empty(4, np.uint64)
        for block in range((vocab + 3) // 4):
            c0, c1 = np.uint64(block), np.uint64(position)
            c2, c3 = np.uint64(0), np.uint64(0)
            key0, key1 = np.uint64(k0), np.uint64(k1)
            for r in range(10):
                if r:
                    key0 = (key0 + _W0) & _MASK
                    key1 = (key1 + _W1) & _MASK
                p0 = _M0 * c0
                p1 = _M1 * c2
                c0, c1, c2, c3 = ((p1 >> _S32) ^ c1 ^ key0), p1 & _MASK, \
                    ((p0 >> _S32) ^ c3 ^ key1), p0 & _MASK
            words[0], words[1], words[2], words[3] = c0, c1, c2, c3
            for j in range(4):
                i = block * 4 + j
                if i >= vocab:
                    break
                zi = np.float64(z[i])
                if zi / temperature + bounds[np.int64(words[j] >> shift)] >= lower:
                    out[count] = i
                    count += 1
        return count


def choose_row(z: np.ndarray, seed: int, position: int, params: SamplingParams) -> int:
    """The token ``choose(z, seed, position, params)`` returns, computed as above."""
    temperature = params.temperature
    vocab = z.shape[0]
    if numba is None or temperature == 0 or 0 < params.top_k < vocab or params.top_p < 1.0:
        # greedy needs no noise; under top-k / top-p, A(z) is what costs, and choose
        # draws noise only for A(z) already
        return choose(z, seed, position, params)
    z = np.ascontiguousarray(z)
    top = int(np.argmax(z))  # the lowest id among the maxima: always in A(z)
    z_top = float(z[top])
    if not np.isfinite(z_top):
        return choose(z, seed, position, params)
    lower = z_top / temperature + float(gumbel_at(seed, position, np.array([top]))[0])
    # the bound test tolerates rounding: it may only let extra candidates in
    slack = 1e-9 * (1.0 + abs(lower))
    k0, k1 = seed_key(seed)
    out = np.empty(z.shape[0], np.int64)
    n = _candidates(z, temperature, k0, k1, position, lower - slack, BOUNDS, out)
    ids = out[:n]  # A(z) is every finite token here: the candidates are all allowed
    scores = z[ids].astype(np.float64) / temperature + gumbel_at(seed, position, ids)
    return int(ids[int(np.argmax(scores))])


__all__ = ["BOUNDS", "choose_row"]
