"""Sampler spec v1 at serving speed: the tokens of ``protocol.sampler.choose``, a batch at once.

``choose`` draws Gumbel noise for the whole vocabulary and ranks it with numpy's
partition: for Gemma's 262,144 tokens 2-13 ms per token, a loop over the rows of a
batch of 32 costs more than vLLM's forward pass. :func:`choose_rows` returns the
same tokens for every row of a step with a few compiled passes (numba) and one numpy
noise call for the whole batch:

* one pass over each row finds its argmax (the greedy token, and the top-ranked
  token, always allowed) and whether the row is finite;
* unrestricted rows (no top-k / top-p): one compiled pass computes every token's
  Philox word (vectorised over 32-bit lanes) and bounds its noise by a table — g is
  increasing in the word, so g_i <= GB[w_i >> 16], the noise of the largest word of
  its 2^16-word bin. L, the exact score z/T + g of the top-ranked token, bounds the
  winner's score from below, so only tokens with z_i/T + GB[bin] >= L can win;
* top-k / top-p rows: A(z) exactly as ``choose`` computes it
  (``sampler.allowed_set``), with the ranking's selection done by a compiled
  histogram select instead of ``np.partition`` (:func:`top_ranked_fast`, the same ids);
* the exact scores of every row's candidates (unrestricted) or allowed set (filtered)
  come from one ``sampler.gumbel_keyed`` call — the very functions ``choose`` uses —
  and each row's lowest-id argmax is its token.

Every maximum of ``choose``'s argmax is a candidate (its score is >= L and its bound
>= its score), so the token is identical, tie rule included: tested against
``choose`` (``tests/vllm_side``). Rows that are not finite, or whose candidates
overflow the buffer (rows so flat that almost every token could win), take
``choose`` itself. Without numba (the main environment) every row takes ``choose``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import (
    _gumbel,
    _uniform,
    allowed_set,
    choose,
    gumbel_keyed,
    top_ranked,
)

BIN_SHIFT = 16
# GB[b]: the noise of the largest word of bin b, plus a margin that covers any
# last-ulp difference between this table's log and another evaluation of it.
_LAST_WORDS = (np.arange(1 << (32 - BIN_SHIFT), dtype=np.uint64) << np.uint64(BIN_SHIFT)) \
    | np.uint64((1 << BIN_SHIFT) - 1)
_GB = _gumbel(_uniform(_LAST_WORDS))
BOUNDS = _GB + 1e-12 * (1.0 + np.abs(_GB))
CANDIDATES_PER_ROW = 8192  # more than this: the row is flat, ``choose`` is as fast

try:
    import numba
except ImportError:  # the main environment: the plain rule
    numba = None


if numba is not None:
    _LANES = 256  # Philox blocks computed together (32-bit lanes the compiler vectorises)
    _HIST = 4096  # buckets of the histogram select

    @numba.njit(cache=True, nogil=True)
    def _scan(z, rows, tops, finite):  # pragma: no cover
        """Per selected row: the first index of its maximum; whether it is all finite."""
        for r in range(rows.shape[0]):
            row = z[rows[r]]
            best, top, ok = row[0], 0, np.isfinite(row[0])
            for i in range(1, row.shape[0]):
                x = row[i]
                if not np.isfinite(x):
                    ok = False
                if x > best:
                    best, top = x, i
            tops[r], finite[r] = top, ok

    @numba.njit(cache=True, nogil=True)
    def _open_candidates(z, rows, temps, keys0, keys1, positions, lowers, bounds,
                         out, counts):  # pragma: no cover
        """Per selected row: ids (ascending) with z_i/T + bounds[w_i >> 16] >= lower
        into out[r] (as many as fit), and their count."""
        vocab = z.shape[1]
        blocks = (vocab + 3) // 4
        cap = out.shape[1]
        c0 = np.empty(_LANES, np.uint32)
        c1 = np.empty(_LANES, np.uint32)
        c2 = np.empty(_LANES, np.uint32)
        c3 = np.empty(_LANES, np.uint32)
        words = np.empty(4 * _LANES, np.uint32)
        m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
        lo, s32, shift = np.uint64(0xFFFFFFFF), np.uint64(32), np.uint32(16)
        for r in range(rows.shape[0]):
            row = z[rows[r]]
            temperature, lower, count = temps[r], lowers[r], 0
            for start in range(0, blocks, _LANES):
                n = min(_LANES, blocks - start)
                for j in range(n):
                    c0[j] = np.uint32(start + j)
                    c1[j] = np.uint32(positions[r])
                    c2[j] = np.uint32(0)
                    c3[j] = np.uint32(0)
                k0, k1 = np.uint32(keys0[r]), np.uint32(keys1[r])
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
                base = 4 * start
                for q in range(min(4 * n, vocab - base)):
                    i = base + q
                    if np.float64(row[i]) / temperature + bounds[words[q] >> shift] >= lower:
                        if count < cap:
                            out[r, count] = i
                        count += 1
            counts[r] = count

    @numba.njit(cache=True, nogil=True)
    def _top_candidates(z, m, out):  # pragma: no cover
        """Ids (ascending) whose value reaches the m-th largest of z (1 <= m < len(z)),
        into out; their count, or -1 if z is not finite. A histogram of the values
        finds the bucket holding the m-th largest; only the values of that bucket and
        above are sorted (buckets are monotone in the value, so every value outside
        them is smaller than every value inside)."""
        n = z.shape[0]
        lo_v, hi_v = z[0], z[0]
        for i in range(n):
            x = z[i]
            if not np.isfinite(x):
                return -1
            lo_v = min(lo_v, x)
            hi_v = max(hi_v, x)
        span = hi_v - lo_v
        scale = (_HIST - 1) / span if span > 0 and np.isfinite(span) else 0.0
        hist = np.zeros(_HIST, np.int64)
        for i in range(n):
            hist[min(_HIST - 1, int((z[i] - lo_v) * scale))] += 1
        cut, above = _HIST - 1, hist[_HIST - 1]
        while above < m:
            cut -= 1
            above += hist[cut]
        ids = np.empty(above, np.int64)
        values = np.empty(above, np.float64)
        c = 0
        for i in range(n):
            if min(_HIST - 1, int((z[i] - lo_v) * scale)) >= cut:
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
    if numba is None or m >= z.shape[0]:
        return top_ranked(z, m)
    z = np.ascontiguousarray(z, dtype=np.float64)
    out = np.empty(z.shape[0], np.int64)
    n = _top_candidates(z, m, out)
    if n < 0:
        return top_ranked(z, m)
    candidates = out[:n]
    return candidates[np.argsort(-z[candidates], kind="stable")][:m]


def _unrestricted(params: SamplingParams, vocab: int) -> bool:
    return not 0 < params.top_k < vocab and params.top_p >= 1.0


def choose_rows(z: np.ndarray, rows: Sequence[int], seeds: Sequence[int],
                positions: Sequence[int], params: Sequence[SamplingParams]
                ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, finite): ``choose(z[rows[j]], seeds[j], positions[j], params[j])`` for
    every j (int64), and whether row j is all finite (bool).

    z: (batch, V) logits (float32 as engines emit them, or float64); only the listed
    rows are read (others may hold anything: padding, requests sampled otherwise).
    """
    n = len(rows)
    tokens = np.empty(n, np.int64)
    if numba is None or n == 0:
        for j in range(n):
            tokens[j] = choose(z[rows[j]], seeds[j], positions[j], params[j])
        return tokens, np.array([np.isfinite(z[r]).all() for r in rows], np.bool_)
    z = np.ascontiguousarray(z)
    vocab = z.shape[1]
    picked = np.asarray(rows, np.int64)
    tops = np.empty(n, np.int64)
    finite = np.empty(n, np.bool_)
    _scan(z, picked, tops, finite)
    temps = np.array([p.temperature for p in params], np.float64)
    seeds_u = np.array(seeds, np.uint64)
    pos = np.asarray(positions, np.int64)

    greedy = temps == 0
    unrestricted = np.array([_unrestricted(p, vocab) for p in params], np.bool_)
    tokens[greedy & finite] = tops[greedy & finite]
    open_rows = np.flatnonzero(~greedy & finite & unrestricted)
    filtered = np.flatnonzero(~greedy & finite & ~unrestricted)
    fallback = [int(j) for j in np.flatnonzero(~finite)]

    # candidate sets: (batch position j, ascending ids) whose exact scores decide
    sets: list[tuple[int, np.ndarray]] = []
    if open_rows.size:
        j_open = open_rows
        top_g = gumbel_keyed(seeds_u[j_open], pos[j_open], tops[j_open])
        lower = z[picked[j_open], tops[j_open]].astype(np.float64) / temps[j_open] + top_g
        lower -= 1e-9 * (1.0 + np.abs(lower))  # the bound test may only let extra ids in
        out = np.empty((j_open.size, min(vocab, CANDIDATES_PER_ROW)), np.int64)
        counts = np.empty(j_open.size, np.int64)
        _open_candidates(z, picked[j_open], temps[j_open], seeds_u[j_open] & np.uint64(
            0xFFFFFFFF), seeds_u[j_open] >> np.uint64(32), pos[j_open], lower, BOUNDS,
            out, counts)
        for r, j in enumerate(j_open):
            if counts[r] > out.shape[1]:
                fallback.append(int(j))
            else:
                sets.append((int(j), out[r, : counts[r]]))
    for j in filtered:
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
    return tokens, finite


def choose_row(z: np.ndarray, seed: int, position: int, params: SamplingParams) -> int:
    """The token ``choose(z, seed, position, params)`` returns (one row)."""
    return int(choose_rows(np.asarray(z)[None, :], [0], [seed], [position], [params])[0][0])


__all__ = ["BOUNDS", "CANDIDATES_PER_ROW", "choose_row", "choose_rows", "top_ranked_fast"]
