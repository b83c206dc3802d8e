"""Scoring from bounded logits: the same figures as ``score``, exact logits only for
the few tokens that can decide them.

``score`` reads every logit and computes Gumbel noise for the whole vocabulary at
every position: at 262,144 tokens that is as costly as the replay itself. With
unrestricted sampling (no top-k / top-p) the figures of position t depend on three
numbers only: s_tok, s_max = max_i s_i and the expected token a = argmax_i s_i
(s_i = z_i/T + g_i; z_i at T = 0), plus a rounding allowance. Given bf16 rows with a
proven bound |ẑ_i − z_i| ≤ e_i (``ivp.engine.head``) and g_i ≤ G_MAX ≈ 22.87:

1. a lower bound L ≤ s_max: the exact s of the claimed token (the maximum itself for
   an honest claim), or of argmax ẑ where that is higher;
2. candidates C1 = {i : ẑ_i + e ≥ T (L − G_MAX)}: no other token can reach L
   (one vectorised comparison over the row; ~4% of Gemma's vocabulary);
3. Gumbel noise for C1 only; C2 = {i ∈ C1 : (ẑ_i + e_i)/T + g_i ≥ L'} with L' the
   best lower bound (ẑ_i − e_i)/T + g_i over C1: the tokens that can be the maximum
   (a handful);
4. exact float32 logits for C2 and the claimed token: a, s_max and the margin exactly
   as ``score`` computes them (a is the lowest id among ties).

Exact entries come from a float32 dot product per entry rather than the full GEMM, so
they may differ from ``score``'s rows in the last ulps (as two GEMM blockings do). The
rounding allowance of δ* uses an upper bound on max |s| instead of its value (relative
1e-12 of it), so δ* here may be that much below ``score``'s. Restricted sampling
(top-k / top-p) reads A(z), which depends on whole rows: those pairs, and rows where
over a quarter of the vocabulary are candidates (high T), are scored by ``score`` on
exact float32 rows.
"""

from __future__ import annotations

import numpy as np

from ivp.engine.head import BoundedLogits
from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import G_MAX, G_MIN, gumbel_pairs
from ivp.verify.bounds import ROUNDING, restricted
from ivp.verify.scoring import Scores, _margin, score

SLACK = 1e-3  # added to every candidate threshold: float32 rounding of the comparisons


def score_replayed(rows: np.ndarray | BoundedLogits, output_ids: list[int], seed: int,
                   params: SamplingParams) -> Scores:
    """``score`` for what ``ReferenceEngine.replay_bounded_batch`` returns: plain rows
    are scored as they are; bounded rows by the pruned rule where sampling is
    unrestricted and the rows are finite, else on their exact full rows."""
    if isinstance(rows, np.ndarray):
        return score(rows, output_ids, seed, params)
    n, vocab = rows.shape
    assert n == len(output_ids), (rows.shape, len(output_ids))
    if (params.temperature > 0 and restricted(params, vocab)) or not rows.finite():
        return score(rows.full(), output_ids, seed, params)
    return _score_bounded(rows, np.asarray(output_ids, dtype=np.int64), seed,
                          params.temperature)


def _score_bounded(rows: BoundedLogits, claimed: np.ndarray, seed: int,
                   temperature: float) -> Scores:
    n, vocab = rows.shape
    valid = (claimed >= 0) & (claimed < vocab)
    tok = np.where(valid, claimed, 0)
    pos = np.arange(n)
    temp = temperature if temperature > 0 else 1.0
    reach = G_MAX if temperature > 0 else 0.0  # how far noise can lift a token

    def noise(t: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return gumbel_pairs(seed, t, ids) if temperature > 0 else np.zeros(len(ids))

    def exact_s(t: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return rows.exact(t, ids) / temp + noise(t, ids)

    # 1-2. L = exact s of the claimed token (s_max itself for an honest claim); where
    # that leaves many candidates (a claim far from the choice), also the row's argmax.
    s_tok = exact_s(pos, tok)
    low = s_tok.copy()
    c1: list[np.ndarray] = []
    for t in range(n):
        ids = rows.candidates(t, temp * (low[t] - reach) - SLACK)
        if len(ids) > vocab // 16:
            top = np.array([rows.argmax(t)])
            s_top = float(exact_s(np.array([t]), top)[0])
            if s_top > low[t]:
                low[t] = s_top
                ids = rows.candidates(t, temp * (s_top - reach) - SLACK)
        c1.append(ids)
    # Dense rows (over a quarter of the vocabulary: high T, flat rows): pruning saves
    # nothing there, so they are scored as ``score`` does, on exact float32 rows.
    dense = np.array([len(ids) > vocab // 4 for ids in c1], dtype=bool)
    sparse = np.flatnonzero(~dense)
    sizes = np.array([0 if dense[t] else len(c1[t]) for t in range(n)])
    t1 = np.repeat(pos, sizes)
    i1 = np.concatenate([c1[t] for t in sparse]) if len(sparse) else np.zeros(0, np.int64)
    # 3. noise for C1; C2 = entries whose upper bound reaches the best lower bound.
    z_low, z_high = rows.bounds(t1, i1)
    g1 = noise(t1, i1)
    best_low = low.copy()
    if len(sparse):  # every sparse row holds its maximum, so no segment is empty
        starts = np.concatenate([[0], np.cumsum(sizes[sparse])[:-1]])
        best_low[sparse] = np.maximum(low[sparse],
                                      np.maximum.reduceat(z_low / temp + g1, starts))
    keep = z_high / temp + g1 >= best_low[t1] - SLACK
    t2, i2 = t1[keep], i1[keep]
    # 4. exact s for C2: the expected token a (lowest id among ties) and s_max.
    s2 = rows.exact(t2, i2) / temp + g1[keep]
    # |s| over the row ≤ max(|s_max|, max|z|/T − G_MIN): the rounding allowance's scale.
    magnitude = rows.magnitude(pos) / temp - (G_MIN if temperature > 0 else 0.0)
    scale = 0.5 if temperature == 0 else temperature / 2
    expected = np.zeros(n, dtype=np.int64)
    margins = np.zeros(n)
    needed = np.zeros(n)
    bounds = np.searchsorted(t2, np.arange(n + 1))
    for t in sparse:
        seg = slice(bounds[t], bounds[t + 1])
        k = int(np.argmax(s2[seg]))  # C2 is ascending in id: ties go to the lower id
        a, s_max = int(i2[seg][k]), float(s2[seg][k])
        expected[t] = a
        if a == tok[t]:
            continue  # the spec's choice: margin 0, explained at δ = 0
        margins[t] = _margin(s_max - s_tok[t], False)
        tol = ROUNDING * scale * (max(abs(s_max), float(magnitude[t])) + 1.0)
        needed[t] = _margin(max(0.0, scale * (s_max - float(s_tok[t])) - tol), False)
    if dense.any():
        rows_d = np.flatnonzero(dense)
        full = score(rows.full_rows(rows_d), [int(x) for x in tok[rows_d]], seed,
                     SamplingParams(temperature=temperature, max_tokens=n),
                     positions=rows_d)
        expected[rows_d], margins[rows_d], needed[rows_d] = \
            full.expected, full.margins, full.needed_delta
    bad = ~valid
    expected[bad], margins[bad], needed[bad] = -1, np.inf, np.inf
    return Scores(expected=expected, margins=margins, outside=bad.copy(),
                  outside_gap=np.where(bad, np.inf, 0.0), needed_delta=needed)


__all__ = ["score_replayed"]
