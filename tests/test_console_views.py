"""The console's pure parts: fleet states and order, the binomial band, token texts, SVG."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hypothesis import given, settings
from hypothesis import strategies as st

from ivp.recomputer.console import charts, views
from ivp.recomputer.console.reader import BootRow
from ivp.recomputer.ingest import audit_rate_pvalue

NOW = 1_000_000.0


def rc(state: str = "serving", **kw: object) -> dict[str, object]:
    return {"state": state, "last_checkpoint": NOW - 1, "reason": "", **kw}


def test_fleet_state_names_each_condition() -> None:
    live = views.Live(body={"state": "serving"})
    assert views.fleet_state(rc(), live, NOW, 30) == ("serving", "")
    assert views.fleet_state(rc(), views.Live(bricked=True), NOW, 30)[0] == "bricked"
    assert views.fleet_state(rc("shutdown", reason="audit 3 failed"), live, NOW, 30) == \
        ("shutdown", "audit 3 failed")
    state, why = views.fleet_state(rc(), views.Live(error="ClientConnectorError: refused"),
                                   NOW, 30)
    assert state == "silent" and "unreachable" in why
    assert views.fleet_state(rc(last_checkpoint=NOW - 100), live, NOW, 30) == \
        ("silent", "no checkpoint for 100 s")
    assert views.fleet_state(rc(), views.Live(body={"state": "power_kill"}), NOW, 30) == \
        ("upload", "server power-killed")
    assert views.fleet_state(rc("enrolled", last_checkpoint=None), None, NOW, 30)[0] == "upload"


def test_problem_rows_come_first() -> None:
    status = {"gateways": {
        "gw-a": rc(), "gw-b": rc("shutdown"), "gw-c": rc(verdicts={"passed": 3, "failed": 1}),
        "gw-d": rc(), "gw-e": rc("enrolled", last_checkpoint=None)}}
    rows = views.fleet_rows(status, {}, [], {"gw-d": 2}, NOW, 30)
    assert [r["gateway_id"] for r in rows] == ["gw-b", "gw-e", "gw-c", "gw-d", "gw-a"]
    assert [r["problem"] for r in rows] == [True, True, True, True, False]


@settings(max_examples=40, deadline=None)
@given(pairs=st.integers(20, 3000), epsilon=st.floats(0.01, 0.99))
def test_band_edges_are_the_alarms_own_test(pairs: int, epsilon: float) -> None:
    """Inside the band the audit-rate alarm stays quiet, just outside it fires."""
    alpha = 1e-6
    lo, hi = views.audit_rate_band(pairs, epsilon, alpha, 20)
    assert 0 <= lo <= epsilon * pairs + 1 and epsilon * pairs - 1 <= hi <= pairs
    assert audit_rate_pvalue(lo, pairs, epsilon) >= alpha
    assert audit_rate_pvalue(hi, pairs, epsilon) >= alpha
    if lo > 0:
        assert audit_rate_pvalue(lo - 1, pairs, epsilon) < alpha
    if hi < pairs:
        assert audit_rate_pvalue(hi + 1, pairs, epsilon) < alpha


def test_band_is_everything_below_the_alarms_minimum() -> None:
    assert views.audit_rate_band(10, 0.5, 1e-6, 20) == (0, 10)


def test_token_texts_keep_spaces_and_show_broken_characters_as_pieces() -> None:
    vocab = {1: "Hello", 2: " world", 3: b"\xe2".decode("latin-1"), 4: "!"}

    def decode(ids: list[int]) -> str:
        raw = "".join(vocab[i] for i in ids).encode("latin-1")
        return raw.decode("utf-8", errors="replace")

    out = views.token_texts(decode, [1, 2, 3, 4], piece=lambda i: f"<{i}>")
    assert out == [("Hello", False), (" world", False), ("<3>", True), ("!", False)]


def test_health_counts_exact_audits_at_zero_and_flags_implausible_boots() -> None:
    passed = [{"model_id": "m", "delta": 0.5, "position_delta": [0.0, 0.1]},
              {"model_id": "m", "delta": 0.5, "position_delta": [0.0, 0.0]}]
    boots = [BootRow("gw-a", "b1", "m", 0.5, NOW, 1000, 500, 500),
             BootRow("gw-b", "b2", "m", 0.5, NOW, 1000, 100, 100)]
    [m] = views.health(passed, boots, {"m": 0.5}, 1e-6, 20)
    assert m["ratios"] == [0.2, 0.0] and m["exact_zero"] == 1
    assert [b["plausible"] for b in m["boots"]] == [True, False]


def test_charts_are_well_formed_svg() -> None:
    tokens = [views.Token(t, t, f"t{t}", d, d > 0.5, views.shade(d, 0.5))
              for t, d in enumerate([0.0, 0.2, 0.6, 1e300, 0.4])]
    svg = charts.delta_per_position(tokens, 0.5)
    root = ET.fromstring(svg)
    bars = [e for e in root.iter("{http://www.w3.org/2000/svg}rect")]
    assert [b.get("class") for b in bars] == ["bar", "bar", "bar fail", "bar fail", "bar near"]
    ET.fromstring(charts.margin_histogram([0.0, 0.3, 0.99]))
    points = [{"gateway_id": "gw-<a>", "boot_id": "b1", "pairs": 100, "audits": 50,
               "received": 50, "expected": 50.0, "epsilon": 0.5, "p": 1.0,
               "plausible": True}]
    ET.fromstring(charts.audit_rate(points, 1e-6, 20))  # the gateway id is escaped


@given(top=st.floats(1e-9, 1e12))
def test_nice_ticks_cover_the_top(top: float) -> None:
    ticks = charts.nice_ticks(top)
    assert ticks[0] == 0 and ticks[-1] >= top * (1 - 1e-9) and 2 <= len(ticks) <= 12
