"""The release policy (``ivp.gateway.release``): a response's release time is fixed by
its request, whatever the server does, except when the server is late (alarmed)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ivp.errors import TransportError
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


# --- the datapath under the policy (in-memory server) -------------------------------------------
def test_release_time_is_the_budget_whatever_the_servers_delay(tmp_path, tiny_model_dir) -> None:
    """Attack: a server that delays answers to signal bits (0 ms or 60 ms). Under the
    policy both leave at the budget: the client measures the same latency."""
    import asyncio
    import time

    from test_gateway_rig import COMPLETION, make_rig, run, started

    policy = ReleasePolicy(base=0.15, late_steps=2)

    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, release=policy,
                                     with_uplink=False))
        await rig.upload()
        seen = []
        for delay in (0.0, 0.06, 0.0, 0.06):
            rig.server.delay = delay
            t = time.monotonic()
            reply = await rig.gw.complete("completions", COMPLETION)
            seen.append(time.monotonic() - t)
            await reply.after_release()
        assert all(0.15 <= s < 0.15 + 0.05 for s in seen), seen
        rig.server.delay = 0.2  # late: released at budget·2, counted and alarmed
        t = time.monotonic()
        await (await rig.gw.complete("completions", COMPLETION)).after_release()
        assert 0.3 <= time.monotonic() - t < 0.35
        assert [a["kind"] for a in rig.log.alarms()] == ["release_late"]
        rig.server.delay = 1.0  # past the last point (0.6 s): dropped, nothing released
        t = time.monotonic()
        with pytest.raises(TransportError, match="timed out"):
            await rig.gw.complete("completions", COMPLETION)
        # The server is given what is left of the 0.6 s from the request's start (the
        # gateway's own work first takes some of it), so the wait ends at 0.6 s.
        assert 0.59 <= time.monotonic() - t < 0.65
        assert rig.gw.metrics.late.labels("dropped")._value.get() == 1
        await asyncio.sleep(0)
        await rig.gw.close()
    run(body())
