"""Sampler spec v1 at serving speed: the tokens of ``protocol.sampler.choose``, a batch at once.

``choose`` draws Gumbel noise for the whole vocabulary and ranks it with numpy's
partition: for Gemma's 262,144 tokens 2-13 ms per token, so a loop over the rows of a
batch of 32 costs more than vLLM's forward pass. :func:`choose_rows` returns the
same tokens for every row of a step with one argmax pass, compiled passes (numba)
and one numpy noise call for the whole batch:

* the argmax of each row is the greedy token, and the top-ranked token (always in
  A(z)) of the others;
* unrestricted rows (no top-k / top-p): a compiled pass computes every token's
  Philox word (the ten rounds vectorised over 32-bit lanes) and an upper bound of its
  noise by arithmetic on the word (:func:`noise_bound_doc`). L, the exact score
  z/T + g of the top-ranked token, bounds the winner's score from below, so only
  tokens with z_i/T + bound_i >= L can win;
* top-k / top-p rows: A(z) exactly as ``choose`` computes it
  (``sampler.allowed_set``), the ranking's selection done by a compiled histogram
  select instead of ``np.partition`` (:func:`top_ranked_fast`, the same ids);
* the exact scores of every row's candidates (unrestricted) or allowed set (filtered)
  come from one ``sampler.gumbel_keyed`` call — the very functions ``choose`` uses —
  and each row's lowest-id maximum is its token.

Every maximum of ``choose``'s argmax is a candidate (its score is >= L and its bound
>= its score), so the token is identical, tie rule included: tested against
``choose`` (``tests/vllm_side``). Rows holding NaN, or whose candidates overflow the
buffer (rows so flat that almost every token could win), take ``choose`` itself.
Without numba (the main environment) every row takes ``choose``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import allowed_set, choose, gumbel_keyed, top_ranked

CANDIDATES_PER_ROW = 8192  # more than this: the row is flat, ``choose`` is as fast
_LN2 = math.log(2.0)


# The noise bound of the compiled pass, without a table lookup (a gather per token
# costs more than the ten Philox rounds on this kind of CPU). For word w,
# u = (w + 1/2)/2^32 and v = 1 - u = (x + 1/2)/2^32 with x = 2^32 - 1 - w:
#   -log u = v + v^2/2 + v^3/3 + ... >= v + v^2/2, so
#   g = -log(-log u) <= -log v - log(1 + v/2) <= -log v - v/3
#       (log(1 + a) >= a/(1 + a) >= 2a/3 for 0 <= a <= 1/2);
#   -log v = 32 ln2 - ln(x + 1/2) <= 32 ln2 - ln x, and for float32(x) = 2^(e-127)(1+f),
#   ln x >= ln2 (e - 127 + f) - 1e-7 (log2(1 + f) >= f on [0, 1]; rounding x to
#   float32 moves ln x by at most 6e-8). So g <= ln2 (159 - e - f) + 1e-7 - v/3,
#   x = 0 included (float32(0) has e = f = 0: a bound of 110 > G_MAX).
# It is loose by ~0.13 at the median word and tight where g is large, the words that win.


try:
    import numba
except ImportError:  # the main environment: the plain rule
    numba = None


if numba is not None:
    _LANES = 256  # Philox blocks computed together (32-bit lanes the compiler vectorises)
    _HIST = 4096  # buckets of the histogram select

    @numba.njit(cache=True, nogil=True, inline="always")
    def _philox_words(start, n, position, key0, key1, c0, c1, c2, c3, words
                      ):  # pragma: no cover
        """words[4j + l] = word l of Philox4x32-10 at counter (start + j, position, 0, 0)."""
        m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
        lo, s32 = np.uint64(0xFFFFFFFF), np.uint64(32)
        for j in range(n):
            c0[j] = np.uint32(start + j)
            c1[j] = np.uint32(position)
            c2[j] = np.uint32(0)
            c3[j] = np.uint32(0)
        k0, k1 = np.uint32(key0), np.uint32(key1)
        for rnd in range(10):
            if rnd:
                k0 = np.uint32(k0 + np.uint32(0x9E3779B9))
                k1 = np.uint32(k1 + np.uint32(0xBB67AE85))
            for j in range(n):
                p0 = m0 * np.uint64(c0[j])
                p1 = m1 * np.uint64(c2[j])
                a = np.uint32(p1 >> s32) ^ c1[j] ^ k0
                b = np.uint32(p0 >> s32) ^ c3[j] ^ k1
                c1[j] = np.uint32(p1 & lo)
                c3[j] = np.uint32(p0 & lo)
                c0[j] = a
                c2[j] = b
        for j in range(n):
            words[4 * j], words[4 * j + 1] = c0[j], c1[j]
            words[4 * j + 2], words[4 * j + 3] = c2[j], c3[j]

    @numba.njit(cache=True, nogil=True)
    def _bounded_scores(row, base, width, inv_t, words, flip, bits, out):  # pragma: no cover
        """out[q] >= z/T + g for token base + q (noise_bound_doc; loose by <= 1e-9
        relative in z/T, which the caller's slack covers)."""
        ones = np.uint32(0xFFFFFFFF)
        for q in range(width):
            flip[q] = np.float32(np.int64(ones - words[q]))
        for q in range(width):
            e = np.float64(np.int32(bits[q] >> np.uint32(23)))
            f = np.float64(np.int32(bits[q] & np.uint32(0x7FFFFF))) * (1.0 / 8388608.0)
            v = (np.float64(np.int64(ones - words[q])) + 0.5) * (1.0 / 4294967296.0)
            out[q] = np.float64(row[base + q]) * inv_t \
                + (_LN2 * (159.0 - e - f) + 1e-7 - v * (1.0 / 3.0))

    @numba.njit(cache=True, nogil=True)
    def _open_candidates(z, rows, inv_temps, keys0, keys1, positions, lowers, out, counts
                         ):  # pragma: no cover
        """Per selected row: ids (ascending) whose bounded score reaches lowers[r] into
        out[r] (as many as fit), and their count."""
        vocab = z.shape[1]
        blocks = (vocab + 3) // 4
        cap = out.shape[1]
        c0 = np.empty(_LANES, np.uint32)
        c1 = np.empty(_LANES, np.uint32)
        c2 = np.empty(_LANES, np.uint32)
        c3 = np.empty(_LANES, np.uint32)
        words = np.empty(4 * _LANES, np.uint32)
        flip = np.empty(4 * _LANES, np.float32)
        bits = flip.view(np.uint32)
        score = np.empty(4 * _LANES, np.float64)
        for r in range(rows.shape[0]):
            row = z[rows[r]]
            lower, count = lowers[r], 0
            for start in range(0, blocks, _LANES):
                n = min(_LANES, blocks - start)
                _philox_words(start, n, positions[r], keys0[r], keys1[r], c0, c1, c2, c3, words)
                base = 4 * start
                width = min(4 * n, vocab - base)
                _bounded_scores(row, base, width, inv_temps[r], words, flip, bits, score)
                for q in range(width):
                    if score[q] >= lower:
                        if count < cap:
                            out[r, count] = base + q
                        count += 1
            counts[r] = count

    @numba.njit(cache=True, nogil=True)
    def _top_candidates(z, m, low, scale, buckets, out):  # pragma: no cover
        """Ids (ascending) whose value reaches the m-th largest of the finite row z
        (1 <= m < len(z)) into out; their count. A histogram of the values finds the
        bucket holding the m-th largest; only the values of that bucket and above are
        sorted (buckets are monotone in the value: every value outside them is smaller
        than every value inside)."""
        n = z.shape[0]
        for i in range(n):
            buckets[i] = np.uint16(min(_HIST - 1, np.int64((z[i] - low) * scale)))
        hist = np.zeros(_HIST, np.int64)
        for i in range(n):
            hist[buckets[i]] += 1
        cut, above = _HIST - 1, hist[_HIST - 1]
        while above < m:
            cut -= 1
            above += hist[cut]
        ids = np.empty(above, np.int64)
        values = np.empty(above, np.float64)
        c, floor = 0, np.uint16(cut)
        for i in range(n):
            if buckets[i] >= floor:
                ids[c], values[c] = i, z[i]
                c += 1
        threshold = np.sort(values)[above - m]  # the m-th largest value of z
        count = 0
        for j in range(above):
            if values[j] >= threshold:
                out[count] = ids[j]
                count += 1
        return count

def top_ranked_fast(z: np.ndarray, m: int) -> np.ndarray:
    """``sampler.top_ranked(z, m)`` (the first m ids by descending z, ties to the lower
    id) with a compiled select instead of a partition of the whole row."""
    low, high = (float(z.min()), float(z.max())) if z.size else (0.0, 0.0)
    if numba is None or m >= z.shape[0] or not (math.isfinite(low) and math.isfinite(high)):
        return top_ranked(z, m)  # NaN propagates through min / max: caught here too
    z = np.ascontiguousarray(z, dtype=np.float64)
    span = high - low
    scale = (_HIST - 1) / span if 0 < span < math.inf else 0.0
    out = np.empty(z.shape[0], np.int64)
    n = _top_candidates(z, m, low, scale, np.empty(z.shape[0], np.uint16), out)
    candidates = out[:n]
    return candidates[np.argsort(-z[candidates], kind="stable")][:m]


def _unrestricted(params: SamplingParams, vocab: int) -> bool:
    return not 0 < params.top_k < vocab and params.top_p >= 1.0


def choose_rows(z: np.ndarray, rows: Sequence[int], seeds: Sequence[int],
                positions: Sequence[int], params: Sequence[SamplingParams]
                ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, markable): ``choose(z[rows[j]], seeds[j], positions[j], params[j])``
    for every j (int64), and whether row j holds neither NaN nor +inf (bool), i.e.
    whether +inf at its token makes that token the row's only maximum.

    z: (batch, V) logits (float32 as engines emit them, or float64); only the listed
    rows are read (others may hold anything: padding, requests sampled otherwise).
    """
    n = len(rows)
    picked = np.asarray(rows, np.int64)
    z = np.ascontiguousarray(z)
    # np.argmax: the first maximum, or the first NaN: choose's greedy token either way
    block = z if np.array_equal(picked, np.arange(z.shape[0])) else z[picked]
    tops = np.argmax(block, axis=1) if n else np.zeros(0, np.int64)
    markable = np.isfinite(block[np.arange(n), tops]) if n else np.zeros(0, np.bool_)
    tokens = np.empty(n, np.int64)
    if numba is None:
        for j in range(n):
            tokens[j] = choose(z[picked[j]], seeds[j], positions[j], params[j])
        return tokens, markable
    vocab = z.shape[1]
    temps = np.array([p.temperature for p in params], np.float64)
    seeds_u = np.array(seeds, np.uint64)
    pos = np.asarray(positions, np.int64)
    greedy = temps == 0
    unrestricted = np.array([_unrestricted(p, vocab) for p in params], np.bool_)
    tokens[greedy] = tops[greedy]
    fallback = [int(j) for j in np.flatnonzero(~greedy & ~markable)]

    # candidate sets: (batch position j, ascending ids) whose exact scores decide
    sets: list[tuple[int, np.ndarray]] = []
    j_open = np.flatnonzero(~greedy & markable & unrestricted)
    if j_open.size:
        lower = z[picked[j_open], tops[j_open]].astype(np.float64) / temps[j_open] \
            + gumbel_keyed(seeds_u[j_open], pos[j_open], tops[j_open])
        lower -= 1e-9 * (1.0 + np.abs(lower))  # the bound test may only let extra ids in
        out = np.empty((j_open.size, min(vocab, CANDIDATES_PER_ROW)), np.int64)
        counts = np.empty(j_open.size, np.int64)
        _open_candidates(z, picked[j_open], 1.0 / temps[j_open],
                         seeds_u[j_open] & np.uint64(0xFFFFFFFF),
                         seeds_u[j_open] >> np.uint64(32), pos[j_open], lower, out, counts)
        for r, j in enumerate(j_open):
            if not 0 < counts[r] <= out.shape[1] or not math.isfinite(lower[r]):
                fallback.append(int(j))  # flat row, or z/T beyond float64
            else:
                sets.append((int(j), out[r, : counts[r]]))
    for j in np.flatnonzero(~greedy & markable & ~unrestricted):
        row = z[picked[j]].astype(np.float64)
        sets.append((int(j), allowed_set(row, params[j], top_ranked_fast)))

    if sets:
        ids = np.concatenate([s for _, s in sets])
        owner = np.repeat(np.array([j for j, _ in sets], np.int64),
                          [s.shape[0] for _, s in sets])
        scores = z[picked[owner], ids].astype(np.float64) / temps[owner] \
            + gumbel_keyed(seeds_u[owner], pos[owner], ids)
        start = 0
        for j, s in sets:  # the lowest-id maximum of each row's scores
            tokens[j] = s[int(np.argmax(scores[start : start + s.shape[0]]))]
            start += s.shape[0]
    for j in fallback:
        tokens[j] = choose(z[picked[j]], seeds[j], positions[j], params[j])
    return tokens, markable


def choose_row(z: np.ndarray, seed: int, position: int, params: SamplingParams) -> int:
    """The token ``choose(z, seed, position, params)`` returns (one row)."""
    return int(choose_rows(np.asarray(z)[None, :], [0], [seed], [position], [params])[0][0])


__all__ = ["CANDIDATES_PER_ROW", "choose_row", "choose_rows", "top_ranked_fast"]
