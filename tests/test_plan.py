"""The planners: the note's tables recomputed, the closed forms, bad input."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from typer.testing import CliRunner

from ivp.cli import app
from ivp.errors import ValidationError
from ivp.plan import deploy as dep
from ivp.plan import preparation as prep
from ivp.plan import sampling as smp

runner = CliRunner()


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


# --- deploy: the note's "Deployment Timeline & Costs" -------------------------------------------
def test_cost_table_reproduces_every_figure_of_the_note() -> None:
    c = dep.cost_table(dep.DeployAssumptions())
    assert c.servers == 250_000  # "Total servers 250K"
    assert c.team_hours == 250_000
    assert c.person_hours == 1_000_000  # "1M hrs"
    assert c.people == 4000
    assert c.wall_clock_hours == 250
    assert c.wall_clock_weeks == 5  # "5 weeks (50-hr weeks)"
    assert c.manufacturing_cost == 100e6  # "$100M ($400/server)"
    assert c.labour_cost == 100e6  # "$100M (1M hrs × $100/hr)"
    assert c.total_cost == 200e6  # "$200M"
    assert c.revenue_share == pytest.approx(0.002)  # "0.2%"
    assert c.share_of_global == pytest.approx(0.4)  # "~40% of global AI compute"
    assert c.revenue_per_h100e_month == 1000


def test_rollout_with_the_notes_phases() -> None:
    r = dep.rollout(dep.DeployAssumptions())
    assert r.install_rate_h100e_per_week == 20e6
    assert [row.weeks for row in r.rows] == [2.5, 2.5, 0.0]  # the note says 2.5, +2.5, +5
    assert [row.cumulative_weeks for row in r.rows] == [2.5, 5.0, 5.0]
    assert [row.added_servers for row in r.rows] == [125_000, 125_000, 0]
    assert r.total_weeks == 5
    assert r.covered_share == pytest.approx(0.4)  # not "~90%": 100M of 250M
    assert r.covered_or_offline_share == pytest.approx(0.49)  # not "99%"
    assert r.total_cost == 200e6


def test_rollout_inconsistencies_of_the_note() -> None:
    # Phase 3 at "+5 weeks" means +100M H100e at the note's own install rate ...
    phases = (*dep.NOTE_PHASES[:2], dep.Phase(">100K H100e clusters", 200e6))
    r = dep.rollout(dep.DeployAssumptions(phases=phases))
    assert [row.weeks for row in r.rows] == [2.5, 2.5, 5.0]
    assert r.total_weeks == 10
    assert r.total_months == pytest.approx(10 / (365.25 / 7 / 12))  # ≈ 2.3, not "3 months"
    assert r.total_months < 2.5
    assert r.total_cost == 400e6  # ... and doubles the installation cost
    # "~90% of global compute" for 100M H100e means a global of ~111M, not 250M.
    ninety = dep.rollout(dep.DeployAssumptions(global_h100e=100e6 / 0.9))
    assert ninety.covered_share == pytest.approx(0.9)
    assert ninety.covered_or_offline_share == pytest.approx(0.99)  # the note's "99%"


def test_every_figure_follows_its_assumptions() -> None:
    base = dep.DeployAssumptions()
    doubled = dep.cost_table(dataclasses.replace(base, teams=2000))
    assert doubled.wall_clock_weeks == 2.5
    assert doubled.labour_cost == 100e6  # same person-hours, more people
    small = dep.cost_table(dataclasses.replace(base, h100e_per_server=8))
    assert small.servers == 12.5e6
    assert small.wall_clock_weeks == 250
    assert small.total_cost == 12.5e6 * 400 + 12.5e6 * 4 * 100
    fast = dep.cost_table(dataclasses.replace(base, servers_per_team_hour=2, hours_per_week=40))
    assert fast.wall_clock_hours == 125
    assert fast.wall_clock_weeks == 125 / 40


def test_upload_time_of_a_1tb_model() -> None:
    u = dep.upload_plan(1e12, 10e9, 24, 100e9)
    assert u.upload_seconds == 800
    assert u.downtime_fraction == pytest.approx(800 / 86400)
    assert u.revenue_lost_per_month == pytest.approx(100e9 * 800 / 86400)
    assert dep.upload_plan(1e12, 100e9, 0, 100e9).downtime_fraction == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("h100e_total", -1.0), ("h100e_per_server", 0.0), ("teams", 0), ("hours_per_week", 200.0),
     ("device_cost", -400.0), ("offline_fraction", 1.5), ("global_h100e", 0.0)],
)
def test_deploy_rejects_bad_assumptions(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        dep.DeployAssumptions(**{field: value})


def test_phases_must_not_decrease_and_must_parse() -> None:
    with pytest.raises(ValidationError, match="must not decrease"):
        dep.DeployAssumptions(phases=(dep.Phase("a", 50e6), dep.Phase("b", 10e6)))
    assert dep.parse_phase(">10M clusters=50M") == dep.Phase(">10M clusters", 50e6)
    assert dep.parse_phase("x=2.5K").cumulative_h100e == 2500
    for bad in ("no-equals", "=5M", "x=lots", "x=-5M"):
        with pytest.raises(ValidationError):
            dep.parse_phase(bad)
    with pytest.raises(ValidationError):
        dep.upload_plan(1e12, 0, 24, 1e9)


def test_deploy_cli_json_and_plot(tmp_path) -> None:
    plot = tmp_path / "rollout.png"
    result = runner.invoke(app, ["plan", "deploy", "--json", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    data = last_json(result.output)
    assert data["costs"]["total_cost"] == 200e6
    assert [row["weeks"] for row in data["rollout"]["rows"]] == [2.5, 2.5, 0.0]
    assert data["upload"]["upload_seconds"] == 800
    assert plot.stat().st_size > 0
    result = runner.invoke(app, ["plan", "deploy", "--json", "--phase", "all=250M"])
    assert last_json(result.output)["rollout"]["total_weeks"] == 12.5


def test_deploy_cli_bad_input_is_a_clear_error() -> None:
    result = runner.invoke(app, ["plan", "deploy", "--h100e-per-server", "0"])
    assert result.exit_code == 2
    assert "h100e_per_server must be > 0" in result.output
    result = runner.invoke(app, ["plan", "deploy", "--phase", "oops"])
    assert result.exit_code == 2
    assert "NAME=CUMULATIVE" in result.output


# --- sampling: closed forms ---------------------------------------------------------------------
def test_epsilon_meets_the_target_exactly() -> None:
    p = smp.plan(smp.SamplingInputs())
    assert p.fleet_rate == 100e6
    assert p.window_requests == 100e6 * 86400
    assert p.feasible
    assert p.per_request == pytest.approx(p.epsilon * 1e-7 * 0.5)
    assert smp.p_detect(p.window_requests, p.per_request) == pytest.approx(0.99, rel=1e-9)
    assert p.p_within_window == pytest.approx(0.99, rel=1e-9)
    lam = -p.fleet_rate * math.log1p(-p.per_request)
    assert p.mean_time_s == pytest.approx(1 / lam)
    assert p.median_time_s == pytest.approx(math.log(2) / lam)
    assert smp.cdf_time(p.median_time_s, p.per_request, p.fleet_rate) == pytest.approx(0.5)
    assert p.cheat_messages_before_detection == pytest.approx(1 / (p.epsilon * 0.5), rel=1e-6)
    assert p.audits_per_s == pytest.approx(p.epsilon * 100e6)
    assert p.recomputer_gpus == pytest.approx(p.audits_per_s / 16.5)
    assert p.recomputer_share == pytest.approx(p.epsilon / 16.5)  # r = h·g here
    assert p.recomputer_cost_per_month == pytest.approx(p.recomputer_gpus * 1000)


def test_given_epsilon_is_evaluated_not_solved() -> None:
    p = smp.plan(smp.SamplingInputs(epsilon=1e-6))
    q = 1e-6 * 1e-7 * 0.5
    assert p.epsilon == 1e-6
    # (1 − q)^N in float64 loses q = 5e-14 to rounding; evaluate it as exp(N·ln(1 − q))
    assert p.p_within_window == pytest.approx(1 - math.exp(100e6 * 86400 * math.log1p(-q)))
    assert p.feasible == (p.p_within_window >= 0.99)


def test_unreachable_target_is_reported() -> None:
    p = smp.plan(smp.SamplingInputs(servers=1, rate=1, cheat_fraction=1e-6, window_s=60))
    assert not p.feasible
    assert p.epsilon == 1
    assert p.p_within_window < 0.99


def test_scaling_with_fleet_size() -> None:
    sizes = [1000, 10_000, 250_000]
    fixed_f = smp.sweep_servers(smp.SamplingInputs(), sizes)
    audits = [p.audits_per_s for p in fixed_f]
    assert audits == pytest.approx([audits[0]] * 3, rel=1e-6)  # same absolute recomputer
    assert fixed_f[0].epsilon == pytest.approx(250 * fixed_f[2].epsilon, rel=1e-6)
    fixed_rate = smp.sweep_servers(smp.SamplingInputs(), sizes, cheat_rate=10.0)
    eps = [p.epsilon for p in fixed_rate]
    assert eps == pytest.approx([eps[0]] * 3, rel=1e-6)  # ε independent of n
    assert fixed_rate[2].audits_per_s == pytest.approx(250 * fixed_rate[0].audits_per_s)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": -5.0}, "rate"),
        ({"rate": 0.0}, "rate"),
        ({"servers": 0}, "servers must be >= 1"),
        ({"epsilon": 0.0}, "epsilon must be in \\(0, 1\\]"),
        ({"epsilon": 1.5}, "epsilon must be in \\(0, 1\\]"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"cheat_fraction": 0.0}, "cheat fraction"),
        ({"detection_power": 2.0}, "detection power"),
        ({"target": 1.0}, "target"),
        ({"window_s": -1.0}, "window"),
        ({"replay_ratio": 0.0}, "replay ratio"),
    ],
)
def test_sampling_rejects_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        smp.SamplingInputs(**kwargs)


def test_cheat_rate_beyond_the_fleet_is_rejected() -> None:
    with pytest.raises(ValidationError, match="exceeds"):
        smp.cheat_fraction_from_rate(1e9, 400, 1000)


def test_sampling_cli() -> None:
    result = runner.invoke(
        app, ["plan", "sampling", "--json", "--sweep-servers", "1K,250K", "--cheat-rate", "10"]
    )
    assert result.exit_code == 0, result.output
    data = last_json(result.output)
    assert data["plan"]["p_within_window"] == pytest.approx(0.99)
    assert len(data["sweep"]) == 2
    for args, message in [
        (["--servers", "0"], "servers must be >= 1"),
        (["--epsilon", "0"], "epsilon must be in (0, 1]"),
        (["--epsilon", "1.5"], "epsilon must be in (0, 1]"),
        (["--rate", "-1"], "rate (requests/s per server) must be > 0"),
    ]:
        result = runner.invoke(app, ["plan", "sampling", *args])
        assert result.exit_code == 2, args
        assert message in result.output
        assert "Traceback" not in result.output


# --- preparation ----------------------------------------------------------------------------------
def test_preparation_timeline_and_exposure() -> None:
    p = prep.plan(prep.PreparationInputs())
    assert p.removal_rate_h100e_per_week == 80e6  # 1000 teams × 50 h × 4 servers × 400
    assert p.removal_end_week == 1 + 100e6 / 80e6
    assert p.install_start_week == 26  # devices are the bottleneck, not the teams
    assert p.online_verified_week == 26 + 100e6 / 20e6
    # intact: 100M for 1 week, then a ramp down over 1.25 weeks
    assert p.intact_h100e_weeks == pytest.approx(100e6 * 1 + 0.5 * 100e6 * 1.25)
    # bare: ramp up (1.25 w), 100M until week 26, ramp down over the 5-week installation
    assert p.bare_h100e_weeks == pytest.approx(0.5 * 100e6 * 1.25 + 100e6 * 23.75 + 0.5 * 100e6 * 5)
    per_week = 989e12 * 0.4 * 7 * 86400
    assert p.intact_flop == pytest.approx(p.intact_h100e_weeks * per_week)
    assert p.bare_flop == pytest.approx(p.bare_h100e_weeks * per_week * 0.5)
    first = p.milestones[0]
    assert first.interconnect_removed_week == pytest.approx(1 + 50e6 / 80e6)
    assert first.devices_installed_week == pytest.approx(26 + 50e6 / 20e6)


def test_preparation_supply_limited_with_offline_compute() -> None:
    p = prep.plan(prep.PreparationInputs(devices_per_week=10_000, offline_fraction=0.1))
    assert p.supply_rate_h100e_per_week == 4e6
    assert p.online_verified_week == pytest.approx(26 + 90e6 / 4e6)
    assert p.all_verified_week == pytest.approx(26 + 100e6 / 4e6)
    # offline 10M H100e from week 0 to 48.5, then brought in over 2.5 weeks
    assert p.offline_h100e_weeks == pytest.approx(10e6 * 48.5 + 0.5 * 10e6 * 2.5)
    assert p.offline_cost == pytest.approx(p.offline_h100e_weeks / (365.25 / 7 / 12) * 1000)


@pytest.mark.parametrize(
    ("field", "value"),
    [("teams", 0), ("devices_per_week", -1.0), ("device_lead_weeks", -2.0),
     ("offline_fraction", 1.0), ("utilisation", 1.5)],
)
def test_preparation_rejects_bad_input(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        prep.PreparationInputs(**{field: value})


def test_preparation_cli() -> None:
    result = runner.invoke(app, ["plan", "preparation", "--json"])
    assert result.exit_code == 0, result.output
    assert last_json(result.output)["online_verified_week"] == 31
    result = runner.invoke(app, ["plan", "preparation", "--devices-per-week", "0"])
    assert result.exit_code == 2
    assert "devices_per_week must be > 0" in result.output
