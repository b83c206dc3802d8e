"""δ-robust bounds on the allowed set A(z) of sampler spec v1.

Tolerant verification must never fail an honest server whose logits z' differ from
the reference z by at most δ in every entry (|z' − z|_∞ ≤ δ). Where top-k or top-p
restricts sampling, the honest server samples from A(z'), not A(z): a token near the
top-k / top-p boundary may be allowed for the server and not for the verifier, or
the reverse. Scoring against A(z) alone would then be unsound (a token ``a`` the
verifier would have picked may be one the server could not pick, so the honest
token's margin against ``a`` is unbounded). This module brackets A(z') for every z'
in the δ-ball:

    A_in(δ)  ⊆  A(z')  ⊆  A_out(δ)        for all |z' − z|_∞ ≤ δ

and a position is *explained at δ* when

    (1) the claimed token lies in A_out(δ), and
    (2) max_{i ∈ A_in(δ)} s_i − s_tok ≤ 2δ/T,   s_i = z_i/T + g_i.

Soundness: the honest token maximises s' over A(z') ⊇ A_in(δ), so for every i in
A_in(δ), s_tok + δ/T ≥ s'_tok ≥ s'_i ≥ s_i − δ/T; and it lies in A(z') ⊆ A_out(δ).

The bounds (T > 0; q_j = e^{z_j/T} / Σ_{l ∈ topk(z)} e^{z_l/T}; p = top_p):

* softmax shift: for any z' in the ball and any token j, with the renormalisation
  over topk(z') (which maximises the sum of e^{z'/T} over k-subsets),
  e^{−2δ/T} q_j ≤ p'_j ≤ e^{2δ/T} q_j.
* i surely in top-k:   #{j ≠ i : z_j ≥ z_i − 2δ} ≤ k − 1  (only those can rank ahead).
* i possibly in top-k: #{j : z_j > z_i + 2δ} ≤ k − 1        (those surely rank ahead).
* i surely in top-p:   e^{2δ/T} Σ_{j ≠ i, z_j ≥ z_i − 2δ} q_j < p   (mass that can be
  ahead of i stays below p, so the prefix never closes before i).
* i possibly in top-p: e^{−2δ/T} Σ_{j : z_j > z_i + 2δ} q_j < p   (mass surely ahead).

Each test depends on z_i only and is monotone in it, so A_in(δ) and A_out(δ) are
prefixes of the tokens sorted by descending z. ``explained`` is monotone in δ (A_in
shrinks, A_out grows, 2δ/T grows), so every position has a critical δ*: the smallest
noise bound that explains it. :func:`needed_delta` computes δ* from below (bisection
keeps the failing end), so ``needed ≤ δ`` holds whenever the position is explained
at δ: the rule stays sound to the last bit. A float slack ``SLACK`` on top-p
comparisons absorbs rounding differences with the spec's cumulative sum.

With no restriction (top_k = 0 or ≥ V, top_p = 1) the rule reduces to the closed
form δ* = T (s_max − s_tok) / 2, and for T = 0 to δ* = (z_max − z_tok) / 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import allowed_set

SLACK = 1e-9  # on top-p probability comparisons (float rounding of the spec's cumsum)
ROUNDING = 1e-12  # relative allowance on logit comparisons (float64 rounding of z/T + g)
_BISECT = 60  # iterations; relative precision 2^-60 of the bracket


def restricted(params: SamplingParams, vocab: int) -> bool:
    """True when top-k or top-p can exclude tokens (T > 0 only; T = 0 ignores both)."""
    if params.temperature == 0:
        return False
    return (0 < params.top_k < vocab) or params.top_p < 1.0


@dataclass(frozen=True)
class RowBounds:
    """One logits row sorted for the δ-robust tests. Build with :func:`row_bounds`."""

    z: np.ndarray  # (V,) float64 logits
    s: np.ndarray  # (V,) float64 z/T + g
    order: np.ndarray  # (V,) token ids by descending z, ties to the lower id
    v: np.ndarray  # (V,) z[order]
    neg_v: np.ndarray  # (V,) ascending copy for searchsorted
    cum_q: np.ndarray  # (V+1,) cum_q[r] = Σ_{first r sorted} q_j
    prefmax_s: np.ndarray  # (V,) running max of s[order]
    exact_size: int  # |A(z)|: A_in is capped to it (z itself is in the ball)
    temperature: float
    top_k: int  # effective k (V when unrestricted)
    top_p: float
    norm: float  # Σ_{topk(z)} e^{(z − z_max)/T}, the normaliser of q
    tol: float  # absolute rounding allowance added to δ in every test

    def count_ge(self, x: float | np.ndarray) -> np.ndarray:
        """#{j : z_j ≥ x}."""
        return np.searchsorted(self.neg_v, -np.asarray(x), side="right")

    def count_gt(self, x: float | np.ndarray) -> np.ndarray:
        """#{j : z_j > x}."""
        return np.searchsorted(self.neg_v, -np.asarray(x), side="left")

    def surely_in(self, x: float | np.ndarray, delta: float) -> np.ndarray:
        """Is a token of logit x in A(z') for every z' within δ? (vectorised over x)."""
        x = np.asarray(x, dtype=np.float64)
        ahead = self.count_ge(x - 2 * delta)  # tokens that may rank at or ahead (incl. itself)
        ok = ahead - 1 <= self.top_k - 1
        if self.top_p < 1.0:
            own = np.exp((x - self.v[0]) / self.temperature) / self.norm
            mass = (self.cum_q[ahead] - own) * np.exp(2 * delta / self.temperature)
            ok &= mass < self.top_p - SLACK
        return ok

    def possibly_in(self, x: float | np.ndarray, delta: float) -> np.ndarray:
        """Is a token of logit x in A(z') for some z' within δ? (vectorised over x)."""
        x = np.asarray(x, dtype=np.float64)
        ahead = self.count_gt(x + 2 * delta)  # tokens that surely rank ahead
        ok = ahead <= self.top_k - 1
        if self.top_p < 1.0:
            mass = self.cum_q[ahead] * np.exp(-2 * delta / self.temperature)
            ok &= mass < self.top_p + SLACK
        return ok

    def in_count(self, delta: float) -> int:
        """|A_in(δ)|: length of the sorted prefix surely allowed (binary search)."""
        lo, hi = 0, self.exact_size  # surely_in holds on [0, lo), fails from hi on
        while lo < hi:
            mid = (lo + hi) // 2
            if bool(self.surely_in(self.v[mid], delta)):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def explained(self, token: int, delta: float) -> bool:
        """Conditions (1) and (2) of the module docstring for ``token`` at δ."""
        delta += self.tol
        if not np.isfinite(self.z[token]):
            return False
        if not bool(self.possibly_in(self.z[token], delta)):
            return False
        r = self.in_count(delta)
        if r == 0:
            return True
        return bool(self.prefmax_s[r - 1] - self.s[token] <= 2 * delta / self.temperature)

    def accepted(self, delta: float) -> np.ndarray:
        """Every token explained at δ (sorted ids): the free choices of a server that
        must stay within the bound — the covert channel's alphabet at this position."""
        delta += self.tol
        finite = np.isfinite(self.z)
        ok = finite & self.possibly_in(self.z, delta)
        r = self.in_count(delta)
        if r:
            ok &= self.prefmax_s[r - 1] - self.s <= 2 * delta / self.temperature
        return np.flatnonzero(ok)


def row_bounds(z: np.ndarray, g: np.ndarray, params: SamplingParams) -> RowBounds:
    """Sort row ``z`` (with Gumbel noise ``g``) for the δ-robust tests. T > 0 only."""
    assert params.temperature > 0
    z = np.asarray(z, dtype=np.float64)
    vocab = z.shape[0]
    t = params.temperature
    order = np.argsort(-z, kind="stable")
    v = z[order]
    k = params.top_k if 0 < params.top_k < vocab else vocab
    w = np.exp((v - v[0]) / t)  # (V,) e^{(z − z_max)/T}, in (0, 1]; −inf → 0
    norm = float(w[:k].sum())
    cum_q = np.concatenate([[0.0], np.cumsum(w / norm)])
    s = z / t + g
    with np.errstate(invalid="ignore"):
        prefmax = np.maximum.accumulate(s[order])
    fz, fs = z[np.isfinite(z)], s[np.isfinite(s)]
    tol = ROUNDING * (float(np.abs(fz).max(initial=0.0)) + t * float(np.abs(fs).max(initial=0.0))
                      + 1.0)
    return RowBounds(z=z, s=s, order=order, v=v, neg_v=-v, cum_q=cum_q, prefmax_s=prefmax,
                     exact_size=int(allowed_set(z, params).shape[0]), temperature=t,
                     top_k=k, top_p=params.top_p, norm=norm, tol=tol)


def needed_delta(rb: RowBounds, token: int) -> float:
    """The smallest δ explaining ``token`` at this row, approached from below.

    Returns a value ``lo`` with explained(token, lo) False (or lo = 0 when explained at
    0), so the true critical δ* ≥ lo: an honest token within δ gets ``lo ≤ δ``.
    """
    if not np.isfinite(rb.z[token]):
        return float("inf")
    if rb.explained(token, 0.0):
        return 0.0
    finite_s = rb.s[np.isfinite(rb.s)]
    hi = max(rb.temperature * (float(finite_s.max()) - float(rb.s[token])) / 2,
             (float(rb.v[0]) - float(rb.z[token])) / 2, 1e-300)
    while not rb.explained(token, hi):  # the closed form above always explains; guard anyway
        hi *= 2
    lo = 0.0
    for _ in range(_BISECT):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if rb.explained(token, mid):
            hi = mid
        else:
            lo = mid
    return lo


__all__ = ["ROUNDING", "SLACK", "RowBounds", "needed_delta", "restricted", "row_bounds"]
