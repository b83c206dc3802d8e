"""The fleet simulator against the closed forms of `plan sampling`, attacks, bad input.

Every test uses a fixed seed, so the statistical tolerances below are checked once
and the tests are deterministic, not flaky.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from ivp.cli import app
from ivp.errors import ValidationError
from ivp.sim import fleet as fl

runner = CliRunner()

# A small fleet: 2000 servers at 10 requests/s, 10 of them cheating on 10% of their
# requests, ε = 1e-5, d = 0.5: λ = 10·10·0.1·1e-5·0.5 = 5e-5/s, median ≈ 3.9 h.
SMALL = fl.SimConfig(
    fleet=fl.Fleet(servers=2000, rate=10.0, epsilon=1e-5, detection_power=0.5, reboot_hours=0),
    attack=fl.Attack(server_fraction=0.005, request_fraction=0.1),
    days=3.0,
    trials=400,
    seed=7,
)


def with_(config: fl.SimConfig, days: float | None = None, **changes: object) -> fl.SimConfig:
    fleet = dataclasses.replace(config.fleet, **{k: v for k, v in changes.items()
                                                 if k in fl.Fleet.__dataclass_fields__})
    attack = dataclasses.replace(config.attack, **{k: v for k, v in changes.items()
                                                   if k in fl.Attack.__dataclass_fields__})
    return dataclasses.replace(config, fleet=fleet, attack=attack, days=days or config.days)


def test_iid_detection_times_follow_the_closed_form() -> None:
    """Simulated detection times vs the closed form 1 − (1 − εfd)^(Rt), n = 1000 trials.

    Tolerances: the KS distance below its α = 0.01 critical value 1.63/√n (0.052);
    quantiles and the mean number of cheating messages within 3.5 standard errors
    (exponential: SE of the p-quantile √(p/((1−p)n)) / −ln(1−p), of the mean 1/√n).
    """
    config = dataclasses.replace(SMALL, trials=1000)
    result = fl.simulate(config)
    times = result.detection_s
    n = config.trials
    assert np.all(times <= config.horizon_s)  # P(undetected in 3 days) ≈ 2e-6
    ks = stats.kstest(times, lambda t: fl.closed_form_cdf(config, t)).statistic
    assert ks < 1.63 / math.sqrt(n)
    for p in (0.25, 0.5, 0.9):
        se = math.sqrt(p / ((1 - p) * n)) / -math.log1p(-p)
        expected = fl.closed_form_quantile(config, p)
        assert np.quantile(times, p) == pytest.approx(expected, rel=3.5 * se)
    # mean cheating messages before detection: f·R/λ ≈ 1/(ε·d) = 2e5
    expected = 1 / (config.fleet.epsilon * config.fleet.detection_power)
    assert result.cheat_messages.mean() == pytest.approx(expected, rel=3.5 / math.sqrt(n))


def test_staggered_reboots_remove_upload_time_from_serving() -> None:
    """Uploads take 10% of each cycle, so detection slows by exactly 1/0.9."""
    config = with_(SMALL, reboot_hours=4.0, upload_minutes=24.0)
    times = fl.simulate(config).detection_s
    mean_closed = 1 / (-config.fleet.servers * config.fleet.rate * math.log1p(
        -fl.closed_form(config)[0]))
    assert times.mean() == pytest.approx(mean_closed / 0.9, rel=0.12)


def test_cheating_only_after_synchronised_reboots_diverges() -> None:
    """1 h of cheating per 24 h cycle: detection ≈ 24× later than the closed form."""
    config = with_(SMALL, days=12.0, reboot_hours=24.0, reboot_sync=True,
                   strategy="after-reboot", burst_minutes=60.0)
    result = fl.simulate(config)
    summary = fl.summarise(result)
    closed_median = fl.closed_form_quantile(config, 0.5)
    assert np.median(result.detection_s) > 10 * closed_median
    # every detection falls in a burst: within the first hour of some day
    within = result.detection_s[np.isfinite(result.detection_s)]
    assert np.all(within % 86_400 <= 3600 + 1e-6)
    assert summary["detected_fraction"] < summary["closed_form"]["detected_fraction"]


def test_an_overloaded_recomputer_delays_verdicts() -> None:
    """Capacity half the audit rate: an audit arriving at t waits t, so verdicts come at 2t."""
    audit_rate = SMALL.fleet.servers * SMALL.fleet.rate * SMALL.fleet.epsilon  # 0.2/s
    config = with_(SMALL, days=6.0, capacity=audit_rate / 2)
    result = fl.simulate(config)
    summary = fl.summarise(result)
    assert np.median(result.detection_s) == pytest.approx(
        2 * fl.closed_form_quantile(config, 0.5), rel=0.15
    )
    assert summary["utilisation"] == pytest.approx(1.0, abs=0.01)
    assert summary["backlog_fraction"] > 0.99
    assert summary["queue_max"] == pytest.approx(audit_rate / 2 * config.horizon_s, rel=0.05)


def test_stego_within_the_covert_capacity_is_never_detected() -> None:
    config = with_(SMALL, days=1.0, stego_bits=4.0, covert_capacity=8.0)
    result = fl.simulate(config)
    assert np.all(np.isinf(result.detection_s))
    expected = 4.0 * 10 * 10.0 * 0.1 * config.horizon_s  # bits · m · r · g · horizon
    assert result.bits.mean() == pytest.approx(expected, rel=0.01)


def test_bits_exfiltrated_before_detection() -> None:
    """Detectable stego: mean bits before detection ≈ b/(ε·d)."""
    result = fl.simulate(with_(SMALL, stego_bits=16.0, covert_capacity=8.0))
    assert result.bits.mean() == pytest.approx(16 / (1e-5 * 0.5), rel=0.15)


def test_false_alarms_scale_with_honest_audits() -> None:
    config = with_(SMALL, days=1.0, fpr=1e-3)
    result = fl.simulate(config)
    honest_audits_per_day = (2000 - 10) * 10.0 * 1e-5 * 86_400
    assert result.false_alarms.mean() == pytest.approx(honest_audits_per_day * 1e-3, rel=0.05)
    assert np.median(result.first_false_alarm_s) == pytest.approx(
        math.log(2) / (honest_audits_per_day * 1e-3 / 86_400), rel=0.2
    )


def test_cheating_under_load_is_detected_later() -> None:
    """Cheating only while L(t) = 1 + 0.5·sin(2πt/day) ≥ 1.3: 7.1 h a day at mean load 1.43.

    The closed form's median, 19.3 h of i.i.d. cheating, takes 13.5 h of cheating at
    that load: all of day 1's window and 6.4 h of day 2's, which ends at ≈ 33 h (×1.7).
    """
    config = with_(SMALL, days=20.0, epsilon=2e-6, diurnal=0.5, strategy="under-load",
                   load_threshold=1.3)
    times = fl.simulate(config).detection_s
    assert np.median(times) > 1.4 * fl.closed_form_quantile(config, 0.5)
    times = times[np.isfinite(times)]
    step_mid = (np.floor(times / config.step_s) + 0.5) * config.step_s
    load = 1 + 0.5 * np.sin(2 * math.pi * step_mid / 86_400)
    assert np.all(load >= 1.3)  # every detection happened while the attacker was active


def test_same_seed_same_result() -> None:
    small = dataclasses.replace(SMALL, trials=20)
    a, b = fl.simulate(small), fl.simulate(small)
    assert np.array_equal(a.detection_s, b.detection_s)
    c = fl.simulate(dataclasses.replace(small, seed=8))
    assert not np.array_equal(a.detection_s, c.detection_s)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: fl.Fleet(servers=0), "servers must be >= 1"),
        (lambda: fl.Fleet(epsilon=0.0), "epsilon must be in \\(0, 1\\]"),
        (lambda: fl.Fleet(epsilon=1.5), "epsilon must be in \\(0, 1\\]"),
        (lambda: fl.Fleet(rate=-1.0), "rate must be > 0"),
        (lambda: fl.Fleet(capacity=0.0), "capacity"),
        (lambda: fl.Fleet(reboot_hours=1.0, upload_minutes=90.0), "upload time"),
        (lambda: fl.Attack(strategy="sometimes"), "unknown strategy"),
        (lambda: fl.Attack(server_fraction=-0.1), "server fraction"),
        (lambda: fl.SimConfig(days=0), "days must be > 0"),
        (lambda: fl.SimConfig(trials=0), "trials"),
        (lambda: fl.SimConfig(fleet=fl.Fleet(servers=100), attack=fl.Attack(server_fraction=1e-3)),
         "rounds to no server"),
        (lambda: fl.SimConfig(fleet=fl.Fleet(reboot_hours=0),
                              attack=fl.Attack(strategy="after-reboot")), "needs forced reboots"),
    ],
)
def test_bad_input_is_rejected(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make()


def test_sim_cli_json_and_plot(tmp_path) -> None:
    plot = tmp_path / "ttd.png"
    result = runner.invoke(app, [
        "sim", "--servers", "2000", "--rate", "10", "--epsilon", "1e-5", "--cheat-servers",
        "0.005", "--cheat-requests", "0.1", "--days", "1", "--trials", "50", "--json",
        "--plot", str(plot),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["summary"]["cheating_servers"] == 10
    assert data["summary"]["recomputer_gpus"] == 1  # 0.2 audits/s fit one GPU (16.5/s)
    assert data["config"]["fleet"]["capacity"] == pytest.approx(16.5)
    assert plot.stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--servers", "0"], "servers must be >= 1"),
        (["--epsilon", "2"], "epsilon must be in (0, 1]"),
        (["--rate", "-3"], "rate must be > 0"),
        (["--strategy", "sometimes"], "unknown strategy"),
        (["--recomputer-gpus", "-1"], "recomputer GPUs must be >= 0"),
    ],
)
def test_sim_cli_bad_input(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["sim", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
