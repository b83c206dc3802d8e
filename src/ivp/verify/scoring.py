"""Score a claimed output against reference logits under sampler spec v1.

This module measures; it does not judge. :func:`score` returns, for every generated
position t, the spec's choice ``a_t`` under the reference logits and the margin

    m_t = (z_a/T + g_a) - (z_tok/T + g_tok)      (T > 0)
    m_t = z_a - z_tok                            (T = 0)

which is 0 exactly when the claimed token is the spec's choice and grows with how
far the claim is from being explained. An honest server whose logits differ from
the reference by at most δ (max-norm) has m_t <= 2δ/T (T > 0) or <= 2δ (T = 0)
when sampling is unrestricted.

Where top-k / top-p restrict sampling, the honest server samples from A(z'), which
may differ from the verifier's A(z) near the boundary; m_t against A(z) is then no
longer bounded. Each position therefore also carries ``needed_delta``: the smallest
noise bound δ* under which the claimed token is explained by the sound rule of
:mod:`ivp.verify.bounds` (inside A_out(δ), within 2δ/T of every token surely in
A(z') for all z' in the δ-ball). Without restriction δ* = T·m_t/2 (T > 0) and
δ* = m_t/2 (T = 0). A message is explained at δ iff max_t δ*_t ≤ δ: the statistic
is policy-free, so one scoring pass serves any δ.
:class:`Policy` turns the figures into pass/fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import allowed_set, gumbel
from ivp.verify.bounds import ROUNDING, restricted, row_bounds
from ivp.verify.bounds import needed_delta as _bisect_needed
from ivp.verify.tolerance import tolerance


@dataclass(frozen=True)
class Scores:
    """Raw figures for one message. Arrays have one entry per output position."""

    expected: np.ndarray  # (n,) int64: the spec's choice under the reference logits
    margins: np.ndarray  # (n,) float64, >= 0
    outside: np.ndarray  # (n,) bool: claimed token outside A(z) of the reference
    outside_gap: np.ndarray  # (n,) float64: how far (in z) the claim is from entering A(z)
    # (n,) float64: smallest δ that explains position t (sound: computed from below)
    needed_delta: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def tokens(self) -> int:
        return int(self.margins.shape[0])

    @property
    def max_needed_delta(self) -> float:
        """The smallest δ that explains the whole message (0 for an empty one)."""
        return float(self.needed_delta.max()) if self.needed_delta.size else 0.0

    def excess(self, delta: float) -> np.ndarray:
        """(n,) how far each position is beyond δ (0 where explained)."""
        return np.maximum(0.0, self.needed_delta - delta)

    @property
    def matches(self) -> int:
        return int(np.sum(self.margins == 0.0) - np.sum(self.outside & (self.margins == 0.0)))


# A token that ties the spec's choice but is not it (ties go to the lower id) still
# loses: its margin is the smallest positive float, so exact mode (bound 0) fails it
# while any tolerant bound > 0 passes it. Without this a tie at T = 0, common with
# low-precision logits, would be a free covert bit that exact mode never sees.
_TIE = float(np.finfo(np.float64).smallest_subnormal)


def _margin(diff: float, is_choice: bool) -> float:
    if is_choice:
        return 0.0
    return float(diff) if diff > 0 else _TIE


def _entry_gap(z: np.ndarray, tok: int, allowed: np.ndarray) -> float:
    """z-distance the claimed token would need to gain to rank inside A(z).

    A(z) is a top-ranked set, so a token enters it by reaching the lowest-ranked
    allowed logit; within a noise bound δ on every logit, that needs a gap <= 2δ.
    """
    return max(0.0, float(z[allowed].min() - z[tok]))


def unrestricted_needed(z: np.ndarray, g: np.ndarray | None, temperature: float) -> np.ndarray:
    """(V,) δ* of every token when top-k/top-p do not restrict (or T = 0).

    T = 0: δ*_i = (z_max − z_i)/2.  T > 0: δ*_i = T (s_max − s_i)/2 with s = z/T + g.
    ``score`` and the covert-channel code both use this one expression, so "accepted at
    δ" (δ*_i ≤ δ) means exactly the same thing to the verifier and to the encoder.
    """
    s = z if temperature == 0 else z / temperature + g
    finite = s[np.isfinite(s)]
    if not finite.size:
        return np.full_like(z, np.inf)
    scale = 0.5 if temperature == 0 else temperature / 2
    # Rounding allowance: an honest z' exactly δ away must not fail by one ulp.
    tol = ROUNDING * scale * (float(np.abs(finite).max()) + 1.0)
    with np.errstate(invalid="ignore"):
        d = np.maximum(0.0, scale * (finite.max() - s) - tol)
        return np.where(np.isfinite(s), d, np.inf)


def score(
    logits: np.ndarray, output_ids: list[int], seed: int, params: SamplingParams,
    positions: np.ndarray | None = None,
) -> Scores:
    """Margins of ``output_ids`` under reference ``logits`` (n, V) at positions 0..n-1
    (or at the generated positions ``positions``, one per row), and δ*_t, the smallest
    noise bound explaining each position (see module doc)."""
    n = len(output_ids)
    assert logits.ndim == 2 and logits.shape[0] == n, (logits.shape, n)  # (n, V)
    expected = np.zeros(n, dtype=np.int64)
    margins = np.zeros(n, dtype=np.float64)
    outside = np.zeros(n, dtype=bool)
    gaps = np.zeros(n, dtype=np.float64)
    needed = np.zeros(n, dtype=np.float64)
    vocab = logits.shape[1]
    for t, tok in enumerate(output_ids):
        z = np.asarray(logits[t], dtype=np.float64)
        if not 0 <= tok < vocab:
            expected[t], margins[t], outside[t], gaps[t] = -1, np.inf, True, np.inf
            needed[t] = np.inf
            continue
        if params.temperature == 0:
            a = int(np.argmax(z))
            expected[t], margins[t] = a, _margin(z[a] - z[tok], tok == a)
            needed[t] = _margin(unrestricted_needed(z, None, 0.0)[tok], tok == a)
            continue
        allowed = allowed_set(z, params)
        g = gumbel(seed, t if positions is None else int(positions[t]), vocab)
        s = z / params.temperature + g
        a = int(allowed[int(np.argmax(s[allowed]))])
        expected[t] = a
        margins[t] = _margin(s[a] - s[tok], tok == a)
        if not np.any(allowed == tok):
            outside[t], gaps[t] = True, _entry_gap(z, tok, allowed)
        if tok == a:  # the spec's choice is explained at δ = 0 (a ∈ A(z) ⊆ A_out, margin 0)
            d = 0.0
        elif restricted(params, vocab):
            d = _bisect_needed(row_bounds(z, g, params), tok)
        else:
            d = float(unrestricted_needed(z, g, params.temperature)[tok])
        needed[t] = _margin(d, tok == a)
    return Scores(expected=expected, margins=margins, outside=outside, outside_gap=gaps,
                  needed_delta=needed)


@dataclass(frozen=True)
class Judgement:
    """A verdict with its figures: which positions exceed the bound, and by how much."""

    passed: bool
    failures: int  # positions that exceed the bound
    max_margin: float
    bound: float  # margin bound 2δ/T (2δ at T = 0; 0 in exact mode)
    reason: str
    positions: tuple[int, ...] = ()  # the positions that exceed it
    excess: tuple[float, ...] = ()  # per such position: δ*_t − δ (tolerant) or m_t (exact)
    max_needed_delta: float = 0.0  # the smallest δ that would explain the whole message


@dataclass(frozen=True)
class Policy:
    """Pass/fail rule over :class:`Scores`.

    ``exact``: every token is the spec's choice under the reference (m_t = 0 and the
    token inside A(z)): same engine, deterministic kernels.
    ``tolerant``: every position explained at the manifest's δ (δ*_t ≤ δ). For
    unrestricted sampling that is m_t ≤ 2δ/T (2δ at T = 0); with top-k / top-p it also
    keeps the claimed token inside A_out(δ) (the tokens some z' within δ allows) and
    measures its margin only against tokens every such z' allows, so an honest server
    within δ never fails at a top-k / top-p boundary (``ivp.verify.bounds``).
    """

    mode: Literal["exact", "tolerant"] = "exact"
    delta: float = 0.0
    # None: the flat rule (tolerance δ at every T). A goal γ: the tolerance at T is
    # min(δ, T ln(1 + ε_n)/2), which keeps the covert channel below γ of the sampling
    # channel at every temperature (``ivp.verify.tolerance``).
    channel_goal: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "tolerant"):
            raise ValueError(f"unknown policy mode {self.mode!r} (exact or tolerant)")
        if not (self.delta >= 0.0 and np.isfinite(self.delta)):
            raise ValueError(f"delta must be finite and >= 0, got {self.delta!r}")
        if self.channel_goal is not None and not 0.0 < self.channel_goal < 1.0:
            raise ValueError(f"channel_goal must lie in (0, 1), got {self.channel_goal!r}")

    def tolerance(self, params: SamplingParams) -> float:
        """The noise bound a position must be explained within at these parameters."""
        if self.mode == "exact":
            return 0.0
        return tolerance(self.delta, params.temperature, params.max_tokens, self.channel_goal)

    def bound(self, params: SamplingParams) -> float:
        """The margin bound 2τ/T (2τ at T = 0) of unrestricted sampling."""
        tau = self.tolerance(params)
        return 2 * tau / params.temperature if params.temperature > 0 else 2 * tau

    def judge(self, scores: Scores, params: SamplingParams) -> Judgement:
        bound = self.bound(params)
        tau = self.tolerance(params)
        has_needed = scores.needed_delta.shape[0] == scores.tokens
        if self.mode == "exact":
            over = (scores.margins > 0.0) | scores.outside
            excess = scores.margins
        elif has_needed:
            over = scores.needed_delta > tau
            excess = scores.needed_delta - tau
        else:  # Scores built by hand without δ*: the unrestricted rule
            over = (scores.margins > bound) | (scores.outside
                                               & (scores.outside_gap > 2 * tau))
            excess = scores.margins - bound
        failures = int(np.sum(over))
        max_margin = float(scores.margins.max()) if scores.tokens else 0.0
        positions = tuple(int(i) for i in np.flatnonzero(over))
        if failures:
            first = positions[0]
            if self.mode == "tolerant" and has_needed:
                limit = (f"τ(T) = {tau:.4g}" if tau < self.delta else f"δ = {self.delta:.4g}")
                why = (f"explained only by δ ≥ {scores.needed_delta[first]:.4g} > "
                       f"{limit}; margin {scores.margins[first]:.4g}")
            elif scores.margins[first] > bound:
                why = f"margin {scores.margins[first]:.4g} > bound {bound:.4g}"
            else:  # within the margin bound, but outside the allowed set A(z)
                why = (f"token outside the top-k/top-p set by {scores.outside_gap[first]:.4g} "
                       f"in z > {2 * tau:.4g}")
            if self.mode == "tolerant" and has_needed and scores.outside[first]:
                why += " (outside the reference's top-k/top-p set)"
            reason = (
                f"{failures} of {scores.tokens} tokens not explained by the whitelisted model "
                f"(first at position {first}: {why})"
            )
        else:
            reason = f"all {scores.tokens} tokens explained (max margin {max_margin:.3g})"
        return Judgement(failures == 0, failures, max_margin, bound, reason, positions,
                         tuple(float(excess[i]) for i in positions),
                         scores.max_needed_delta if has_needed else float("nan"))
