"""Statistics of the verification report: confidence bounds, AUC, detection curves.

The per-message statistic everywhere is **max_t δ*_t** over the first n tokens (the
smallest noise bound that explains them; +∞ at a structural problem): a message is
flagged at tolerance τ iff it exceeds τ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

AUC_TARGET = 0.999


class HasNeeded(Protocol):
    """Anything with per-position δ* (``report.MessageFigures``)."""

    @property
    def needed(self) -> np.ndarray: ...

    @property
    def tokens(self) -> int: ...


def clopper_pearson_upper(failures: int, n: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound on a rate from ``failures`` of ``n``."""
    if n == 0 or failures >= n:
        return 1.0
    if failures == 0:
        return 1.0 - (1.0 - confidence) ** (1.0 / n)
    from scipy.stats import beta

    return float(beta.ppf(confidence, failures + 1, n - failures))


def clopper_pearson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided exact interval on a proportion."""
    if n == 0:
        return (0.0, 1.0)
    from scipy.stats import beta

    a = (1 - confidence) / 2
    lo = 0.0 if successes == 0 else float(beta.ppf(a, successes, n - successes + 1))
    hi = 1.0 if successes == n else float(beta.ppf(1 - a, successes + 1, n - successes))
    return (lo, hi)


def auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(attack statistic > honest statistic) + ½ P(equal) (Mann–Whitney)."""
    if positives.size == 0 or negatives.size == 0:
        return float("nan")
    neg = np.sort(negatives)
    below = np.searchsorted(neg, positives, side="left")
    equal = np.searchsorted(neg, positives, side="right") - below
    return float((below.sum() + 0.5 * equal.sum()) / (positives.size * neg.size))


def auc_interval(positives: np.ndarray, negatives: np.ndarray, resamples: int = 300,
                 seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of :func:`auc` (both samples resampled)."""
    if positives.size == 0 or negatives.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    values = [auc(positives[rng.integers(0, positives.size, positives.size)],
                  negatives[rng.integers(0, negatives.size, negatives.size)])
              for _ in range(resamples)]
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def prefix_statistics(messages: Sequence[HasNeeded], upto: int) -> np.ndarray:
    """(messages, upto): entry [m, n−1] = max δ*_t over the first n tokens of message m
    (its whole length when shorter)."""
    out = np.zeros((len(messages), upto))
    for i, m in enumerate(messages):
        if m.needed.size:
            run = np.maximum.accumulate(m.needed[:upto])
            out[i, : run.size] = run
            out[i, run.size :] = run[-1]
    return out


def tokens_for_auc(attack: Sequence[HasNeeded], honest: Sequence[HasNeeded],
                   target: float = AUC_TARGET) -> int | None:
    """Smallest n such that the AUC of max_{t<n} δ*_t (attack vs honest) exceeds
    ``target``; None if no message length reaches it."""
    longest = max((m.tokens for m in attack), default=0)
    if longest == 0 or not honest:
        return None
    a = prefix_statistics(attack, longest)
    h = prefix_statistics(honest, longest)
    for n in range(1, longest + 1):
        if auc(a[:, n - 1], h[:, n - 1]) > target:
            return n
    return None


def detection_curve(messages: Sequence[HasNeeded], tolerance: float | np.ndarray,
                    upto: int) -> np.ndarray:
    """(upto,) fraction of messages flagged when auditing only their first n tokens
    (``tolerance``: one τ, or one per message)."""
    if not messages:
        return np.zeros(upto)
    tau = np.broadcast_to(np.asarray(tolerance, dtype=np.float64), (len(messages),))
    return (prefix_statistics(messages, upto) > tau[:, None]).mean(axis=0)


__all__ = ["AUC_TARGET", "auc", "auc_interval", "clopper_pearson", "clopper_pearson_upper",
           "detection_curve", "prefix_statistics", "tokens_for_auc"]
