"""When a response may leave the gateway: the timing side channel, bounded (pure).

A server that delays its answers can signal through *when* they arrive: with release
at once it got 8.2 bit/s through at 94% accuracy, and a fixed release grid only lowers
the rate (a 600 ms delay still crosses a 500 ms grid: 1.4 bit/s). A grid does not
bound the channel because the release time still follows the server's.

:class:`ReleasePolicy` releases every response at a time fixed by the *request* and
the whitelisted model's throughput, never by the server:

    budget(request) = base + per_prompt_token · prompt tokens + per_token · max_tokens

A response ready within its budget is released exactly ``budget`` after the request
arrived. A later one is released at the next of ``late_steps`` fixed points
``budget · 2^k`` (k = 1 … late_steps), counted and alarmed (``server_slow``); one not
ready by the last point is dropped (the request fails) and alarmed. So a response
either leaves at one of ``late_steps + 1`` times that the request alone determines or
not at all: its timing carries at most ``log2(late_steps + 2)`` bits, and only a
response that is late — each one counted and alarmed — can carry any
(:meth:`bits_per_response`; docs/THREATS.md states the bound). A server always within
its budget makes every release time a function of the request: zero bits.

The cost is latency: every response waits for its budget. The inspectors set the
budget from the whitelisted model's measured throughput with a margin; a server slower
than that is itself an alarm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Release:
    """Where one response stands against its budget."""

    at: float  # when to release, on the request's clock (seconds after it arrived)
    late_step: int  # 0: within budget; k: released at budget · 2^k (late, alarmed)
    dropped: bool = False  # later than the last step: never released


@dataclass(frozen=True)
class ReleasePolicy:
    """Release at a time that depends only on the request (module docstring).

    Attributes:
        base: seconds every request may take (the model's fixed cost, with margin).
        per_prompt_token: seconds per prompt token (prefill).
        per_token: seconds per requested output token (``max_tokens``: the request's
            own bound, not the output's length, which the server chooses).
        late_steps: fixed late release points after the budget, each double the last.
    """

    base: float
    per_prompt_token: float = 0.0
    per_token: float = 0.0
    late_steps: int = 3

    def __post_init__(self) -> None:
        if self.base <= 0 or self.per_prompt_token < 0 or self.per_token < 0:
            raise ValueError("a release budget needs base > 0 and per-token costs >= 0")
        if not 0 <= self.late_steps <= 16:
            raise ValueError("late_steps must be in 0..16")

    def budget(self, prompt_tokens: int, max_tokens: int) -> float:
        """Seconds a request of this shape may take."""
        return self.base + self.per_prompt_token * prompt_tokens + self.per_token * max_tokens

    def deadline(self, budget: float) -> float:
        """Seconds after which the answer is no longer awaited (dropped)."""
        return budget * 2 ** self.late_steps

    def release(self, budget: float, ready: float) -> Release:
        """When the response ready ``ready`` seconds after its request is released."""
        if ready <= budget:
            return Release(budget, 0)
        for step in range(1, self.late_steps + 1):
            point = budget * 2 ** step
            if ready <= point:
                return Release(point, step)
        return Release(self.deadline(budget), self.late_steps + 1, dropped=True)

    @property
    def bits_per_response(self) -> float:
        """The most a response's release time can say: it is one of ``late_steps + 1``
        points fixed by the request (or the request fails: one outcome more)."""
        return math.log2(self.late_steps + 2)


__all__ = ["Release", "ReleasePolicy"]
