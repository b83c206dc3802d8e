"""The tolerance a verdict applies at temperature T: the manifest's δ, capped so that
the covert channel stays below a goal at every temperature.

A position is explained at tolerance τ when δ*_t ≤ τ (``ivp.verify.scoring``). With
the flat rule τ = δ, a server that never fails can choose among the tokens whose
Gumbel-max score is within 2δ/T of the best, and that window widens without bound as
T falls (issue 16: 0.0087% of the sampling channel at T = 1, 0.24% at T = 0.1). The
rule here is

    τ(T) = min(δ, (T/2) · ln(1 + ε_n))          T > 0, n = the request's max_tokens,
    τ(0) = min(δ, (1/2) · ln(1 + ε_n))          T = 0 (greedy: the T = 1 window),

with ε_n the solution of ε·e^{ε n} = γ (ε_n = W(γ n)/n, W the Lambert function), γ the
channel goal (10^-4 of the sampling channel). Then, for unrestricted sampling at any
T > 0, any prompt and any encoder — even one that knows the recomputer's logits — the
expected number of bits a message can carry without failing is at most γ times the
message's sampling entropy H(Y) (proof in docs/VERIFICATION.md, "The covert channel
at every temperature"): every accepted non-choice token i at a position has
P(accepted, not chosen) ≤ ε p_i (1 − p_i), so the expected number N of accepted
outputs is E_honest[Π_t (1 + r_t)] ≤ 1 + ε e^{ε n} E_honest[Σ_t (1 − p_t)], and
1 − Σ p² ≤ ln 2 · H.

The price: an honest server whose noise on the decisive tokens exceeds τ(T) may fail
at a near tie. ``ivp.verify.noise.false_alarm_rate`` computes that cost from the
calibration's records; docs/VERIFICATION.md states it per temperature. At T = 0 there
is no sampling entropy and no distribution-free bound (a prompt can force exact ties);
the bits are counted absolutely there, as the near-tie rate at 2τ(0).
"""

from __future__ import annotations

import math
from functools import lru_cache

CHANNEL_GOAL = 1e-4  # the policy bar: covert capacity ≤ 0.01% of the sampling channel
# The rule uses 99.9% of ε_n: the headroom absorbs the scoring's rounding allowance
# (relative 1e-12 of the scores, ≤ 1e-3 of τ for T ≥ 1e-3 and logits below 100).
HEADROOM = 0.999


@lru_cache(maxsize=4096)
def channel_epsilon(goal: float, max_tokens: int) -> float:
    """ε with ε·e^{ε n} = goal (so the channel bound ε e^{ε n} H(Y) is goal · H(Y))."""
    if not goal > 0 or max_tokens < 1:
        raise ValueError(f"need goal > 0 and max_tokens >= 1, got {goal!r}, {max_tokens!r}")
    return _lambert_w(goal * max_tokens) / max_tokens


def _lambert_w(x: float) -> float:
    """W(x) for x ≥ 0 (w e^w = x) by Newton's method from log1p(x): monotone, a few steps."""
    w = math.log1p(x)
    for _ in range(50):
        step = (w * math.exp(w) - x) / (math.exp(w) * (w + 1))
        w -= step
        if abs(step) <= 1e-15 * max(1.0, w):
            break
    return w


def channel_window(goal: float, max_tokens: int) -> float:
    """ln(1 + 0.999 ε_n): the widest Gumbel-score gap 2τ/T the rule accepts."""
    return math.log1p(HEADROOM * channel_epsilon(goal, max_tokens))


def tolerance(delta: float, temperature: float, max_tokens: int,
              goal: float | None = CHANNEL_GOAL) -> float:
    """τ(T) of the module doc; the flat δ when ``goal`` is None."""
    if goal is None:
        return delta
    scale = temperature if temperature > 0 else 1.0
    return min(delta, scale * channel_window(goal, max_tokens) / 2)


__all__ = ["CHANNEL_GOAL", "HEADROOM", "channel_epsilon", "channel_window", "tolerance"]
