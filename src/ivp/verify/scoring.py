"""Score a claimed output against reference logits under sampler spec v1.

This module measures; it does not judge. :func:`score` returns, for every generated
position t, the spec's choice ``a_t`` under the reference logits and the margin

    m_t = (z_a/T + g_a) - (z_tok/T + g_tok)      (T > 0)
    m_t = z_a - z_tok                            (T = 0)

which is 0 exactly when the claimed token is the spec's choice and grows with how
far the claim is from being explained. An honest server whose logits differ from
the reference by at most δ (max-norm) has m_t <= 2δ/T (T > 0) or <= 2δ (T = 0).
:class:`Policy` turns the figures into pass/fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import allowed_set, gumbel


@dataclass(frozen=True)
class Scores:
    """Raw figures for one message. Arrays have one entry per output position."""

    expected: np.ndarray  # (n,) int64: the spec's choice under the reference logits
    margins: np.ndarray  # (n,) float64, >= 0
    outside: np.ndarray  # (n,) bool: claimed token outside A(z) of the reference
    outside_gap: np.ndarray  # (n,) float64: how far (in z) the claim is from entering A(z)

    @property
    def tokens(self) -> int:
        return int(self.margins.shape[0])

    @property
    def matches(self) -> int:
        return int(np.sum(self.margins == 0.0) - np.sum(self.outside & (self.margins == 0.0)))


def _entry_gap(z: np.ndarray, tok: int, allowed: np.ndarray) -> float:
    """z-distance the claimed token would need to gain to rank inside A(z).

    A(z) is a top-ranked set, so a token enters it by reaching the lowest-ranked
    allowed logit; within a noise bound δ on every logit, that needs a gap <= 2δ.
    """
    return max(0.0, float(z[allowed].min() - z[tok]))


def score(
    logits: np.ndarray, output_ids: list[int], seed: int, params: SamplingParams
) -> Scores:
    """Margins of ``output_ids`` under reference ``logits`` (n, V) at positions 0..n-1."""
    n = len(output_ids)
    assert logits.ndim == 2 and logits.shape[0] == n, (logits.shape, n)  # (n, V)
    expected = np.zeros(n, dtype=np.int64)
    margins = np.zeros(n, dtype=np.float64)
    outside = np.zeros(n, dtype=bool)
    gaps = np.zeros(n, dtype=np.float64)
    vocab = logits.shape[1]
    for t, tok in enumerate(output_ids):
        z = np.asarray(logits[t], dtype=np.float64)
        if not 0 <= tok < vocab:
            expected[t], margins[t], outside[t], gaps[t] = -1, np.inf, True, np.inf
            continue
        if params.temperature == 0:
            a = int(np.argmax(z))
            expected[t], margins[t] = a, z[a] - z[tok]
            continue
        allowed = allowed_set(z, params)
        s = z / params.temperature + gumbel(seed, t, vocab)
        a = int(allowed[int(np.argmax(s[allowed]))])
        expected[t] = a
        margins[t] = max(0.0, s[a] - s[tok]) if tok != a else 0.0
        if not np.any(allowed == tok):
            outside[t], gaps[t] = True, _entry_gap(z, tok, allowed)
    return Scores(expected=expected, margins=margins, outside=outside, outside_gap=gaps)


@dataclass(frozen=True)
class Judgement:
    passed: bool
    failures: int  # positions that exceed the bound
    max_margin: float
    bound: float
    reason: str


@dataclass(frozen=True)
class Policy:
    """Pass/fail rule. ``exact``: every token is the spec's choice. ``tolerant``:
    every margin within 2δ/T (2δ at T = 0) and every token within 2δ of A(z)."""

    mode: Literal["exact", "tolerant"] = "exact"
    delta: float = 0.0

    def bound(self, params: SamplingParams) -> float:
        if self.mode == "exact":
            return 0.0
        return 2 * self.delta / params.temperature if params.temperature > 0 else 2 * self.delta

    def judge(self, scores: Scores, params: SamplingParams) -> Judgement:
        bound = self.bound(params)
        over = scores.margins > bound
        if self.mode == "exact":
            over |= scores.outside
        else:
            over |= scores.outside & (scores.outside_gap > 2 * self.delta)
        failures = int(np.sum(over))
        max_margin = float(scores.margins.max()) if scores.tokens else 0.0
        if failures:
            first = int(np.flatnonzero(over)[0])
            reason = (
                f"{failures} of {scores.tokens} tokens not explained by the whitelisted model "
                f"(first at position {first}: margin {scores.margins[first]:.4g} > "
                f"bound {bound:.4g})"
            )
        else:
            reason = f"all {scores.tokens} tokens explained (max margin {max_margin:.3g})"
        return Judgement(failures == 0, failures, max_margin, bound, reason)
