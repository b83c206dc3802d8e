"""The release policy (``ivp.gateway.release``): a response's release time is fixed by
its request, whatever the server does, except when the server is late (alarmed)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ivp.gateway.release import ReleasePolicy

POLICY = ReleasePolicy(base=0.2, per_prompt_token=0.001, per_token=0.01, late_steps=3)


def test_budget_depends_only_on_the_request() -> None:
    assert POLICY.budget(10, 16) == pytest.approx(0.2 + 0.01 + 0.16)
    assert POLICY.deadline(1.0) == 8.0


@given(st.integers(1, 4096), st.integers(1, 4096), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_a_server_within_budget_cannot_move_the_release(prompt: int, max_tokens: int,
                                                        a: float, b: float) -> None:
    """Attack: a server delaying its answers to signal. Any two readiness times within
    the budget give the same release time: timing carries nothing."""
    budget = POLICY.budget(prompt, max_tokens)
    first, second = POLICY.release(budget, a * budget), POLICY.release(budget, b * budget)
    assert first == second
    assert first.at == budget and first.late_step == 0 and not first.dropped


@given(st.floats(0.01, 10.0), st.floats(0.0, 100.0))
def test_release_times_are_a_few_fixed_points(budget: float, ready: float) -> None:
    """Whatever the server does, the release is one of late_steps + 1 points fixed by
    the request, or the request is dropped: log2(late_steps + 2) bits at most."""
    r = POLICY.release(budget, ready)
    points = {budget * 2 ** k for k in range(POLICY.late_steps + 1)}
    if r.dropped:
        assert ready > POLICY.deadline(budget) and r.late_step == POLICY.late_steps + 1
    else:
        assert r.at in points and r.at >= ready
        assert (r.late_step == 0) == (ready <= budget)
    assert POLICY.bits_per_response == pytest.approx(math.log2(5))


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="base > 0"):
        ReleasePolicy(base=0)
    with pytest.raises(ValueError, match="late_steps"):
        ReleasePolicy(base=1.0, late_steps=17)
