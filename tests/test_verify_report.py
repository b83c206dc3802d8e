"""The verification report: statistics, a miniature run end to end (resumable), the
JSON schema of `ivp verify-report --json` (per-model, per-temperature figures), and the
rendered docs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ivp.protocol.messages import SamplingParams
from ivp.verify import report as rep
from ivp.verify import stats, views
from ivp.verify.serving import ServingConfig

MICRO = rep.Plan("tiny", calib_prompts=2, calib_max_tokens=4, honest_messages=30,
                 honest_max_tokens=8, attack_messages=4, attack_max_tokens=rep._tokens(16, 8),
                 covert_messages=2, covert_max_tokens=8, bf16_requests=1,
                 configs=(ServingConfig(1, 1), ServingConfig(4, 2), ServingConfig(3, 1, "eager")),
                 quick=True)


def test_clopper_pearson() -> None:
    # 0 of n: 1 − 0.05^(1/n); 30,000 messages give < 1e-4 per message, 3,000 < 1e-3
    assert stats.clopper_pearson_upper(0, 30_000) == pytest.approx(9.986e-5, rel=1e-3)
    assert stats.clopper_pearson_upper(0, 3_000) < 1e-3
    assert stats.clopper_pearson_upper(1, 100) == pytest.approx(0.0466, rel=1e-2)
    assert stats.clopper_pearson_upper(5, 5) == 1.0
    lo, hi = stats.clopper_pearson(5, 10)
    assert lo < 0.5 < hi and stats.clopper_pearson(0, 10)[0] == 0.0


def test_auc_and_tokens_for_auc() -> None:
    assert stats.auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert stats.auc(np.array([0.0]), np.array([0.0])) == 0.5
    p = SamplingParams(temperature=1.0, max_tokens=4)
    honest = [rep.MessageFigures(4, 4, np.zeros(4), "h", p)] * 3
    attack = [rep.MessageFigures(4, 2, np.array([0.0, 0.0, 5.0, 0.0]), "a", p),
              rep.MessageFigures(4, 3, np.array([0.0, 1.0, 0.0, 0.0]), "a", p)]
    assert stats.tokens_for_auc(attack, honest) == 3
    curve = stats.detection_curve(attack, 0.5, 4)
    np.testing.assert_allclose(curve, [0.0, 0.5, 1.0, 1.0])
    lo, hi = stats.auc_interval(np.array([2.0, 3.0, 0.0]), np.array([0.0, 1.0]), 50)
    assert 0.0 <= lo <= hi <= 1.0
    assert attack[0].changed and not honest[0].changed


def test_requests_and_sources_are_prefix_stable() -> None:
    """A larger plan starts with a smaller plan's messages, sources and batches: its
    checkpoints are reused."""
    prompts = [(1, 2), (3, 4, 5)]
    small = rep.requests_for(prompts, 10, rep.HONEST_PARAMS, 8, seed=1)
    large = rep.requests_for(prompts, 40, rep.HONEST_PARAMS, 8, seed=1)
    assert large[:10] == small
    a, b = rep.assign_sources(25, 6), rep.assign_sources(90, 6)
    np.testing.assert_array_equal(b[:25], a)
    assert sorted(np.bincount(b)) == [15] * 6  # balanced


def test_store_reuses_units(tmp_path: Path) -> None:
    store = rep.Store(tmp_path)
    calls: list[int] = []

    def compute() -> dict[str, int]:
        calls.append(1)
        return {"x": 1}

    assert store.cached("unit", ("a", 1), compute) == {"x": 1}
    assert rep.Store(tmp_path).cached("unit", ("a", 1), compute) == {"x": 1}
    assert rep.Store(tmp_path).cached("unit", ("a", 2), compute) == {"x": 1}
    assert len(calls) == 2 and not list(tmp_path.glob("*.tmp"))


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[rep.Report, Path]:
    checkpoint = tmp_path_factory.mktemp("ck")
    return rep.run(MICRO, checkpoint=checkpoint), checkpoint


@pytest.fixture(scope="module")
def micro(micro_run: tuple[rep.Report, Path]) -> rep.Report:
    return micro_run[0]


def test_micro_run_figures(micro: rep.Report) -> None:
    s = views.summary(micro)
    assert set(s) == {"model", "delta", "honest", "by_temperature", "attacks", "covert"}
    assert s["model"] == "tiny" and s["delta"] == micro.delta.delta > 0
    assert s["honest"]["messages"] == 30 and s["honest"]["false_positives"] == 0
    temps = [r["temperature"] for r in s["by_temperature"]]
    assert temps == sorted(temps) and temps[0] == 0.0 and 1.0 in temps
    for r in s["by_temperature"]:
        assert set(r) == {"temperature", "tolerance", "messages", "false_positives",
                          "fpr_upper_95", "false_alarm_per_message", "channel_fraction",
                          "channel_fraction_upper", "bits_per_token", "channel_goal_met"}
        assert r["tolerance"] <= s["delta"]
        if r["temperature"] > 0:  # Theorem 2: the measured channel is under the goal
            assert r["channel_fraction"] <= 1e-4
    assert [a["name"] for a in s["attacks"]] == [n for n, _ in MICRO.attack_max_tokens]
    for a in s["attacks"]:
        assert set(a) == {"name", "messages", "changed", "detected", "detected_changed",
                          "tokens_for_auc_999"}
        assert a["detected"] >= a["detected_changed"]
    assert micro.covert.encoder_detected == 0  # stego-bounded is never detected
    assert {m.source for m in micro.honest} == {c.name for c in MICRO.configs}
    d = views.details(micro)
    json.dumps(d)  # JSON-able
    assert d["false_alarm_costs"] and d["honest_by_config"]


def test_micro_run_resumes_from_its_checkpoint(micro_run: tuple[rep.Report, Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun over the same checkpoint serves nothing again: the same figures."""
    from ivp.verify.serving import ServingPath

    first, checkpoint = micro_run
    served: list[int] = []
    real = ServingPath.serve
    monkeypatch.setattr(ServingPath, "serve",
                        lambda self, *a, **k: served.append(1) or real(self, *a, **k))
    again = rep.run(MICRO, checkpoint=checkpoint)
    assert not served
    assert [m.statistic for m in again.honest] == [m.statistic for m in first.honest]
    assert views.summary(again) == views.summary(first)


def test_docs_render_and_plots(micro: rep.Report, tmp_path: Path) -> None:
    from ivp.verify.docs import load_runs, render

    img = tmp_path / "img"
    img.mkdir()
    (img / "verification-tiny.json").write_text(json.dumps(views.details(micro)))
    paths = views.plots(micro, img)
    assert len(paths) == 4 and all(p.is_file() and p.stat().st_size > 1000 for p in paths)
    text = render(load_runs(img))
    for section in ("Where δ comes from", "Theorem 1", "Theorem 2", "Per temperature",
                    "Where a goal is not met", "what each changed"):
        assert section in text
    assert "Not run" in text  # the Gemma section says plainly that it was not run
    for a in micro.attacks:
        assert f"| {a.name} |" in text


def test_cli_json_is_the_last_line(micro: rep.Report, monkeypatch: pytest.MonkeyPatch) -> None:
    from ivp.cli import app

    monkeypatch.setattr(rep, "run", lambda plan, **_kw: micro)  # the CLI shell only
    res = CliRunner().invoke(app, ["verify-report", "--quick", "--json"])
    last = json.loads(res.stdout.strip().splitlines()[-1])
    failed = last["honest"]["false_positives"] > 0 or any(
        a["changed"] and a["detected_changed"] == 0 for a in last["attacks"])
    assert res.exit_code == (1 if failed else 0), res.output
    assert CliRunner().invoke(app, ["verify-report", "--model", "nope"]).exit_code == 2
