"""The verification report: statistics, a miniature run end to end, the JSON schema of
`ivp verify-report --json`, and the rendered docs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ivp.verify import report as rep
from ivp.verify.serving import ServingConfig

MICRO = rep.Plan("tiny", calib_prompts=2, calib_max_tokens=4, honest_messages=16,
                 honest_max_tokens=8, attack_messages=4, attack_max_tokens=rep._tokens(16, 8),
                 covert_messages=2, covert_max_tokens=8, bf16_requests=1,
                 configs=(ServingConfig(1, 1), ServingConfig(4, 2)), quick=True)


def test_clopper_pearson() -> None:
    # 0 of n: 1 − 0.05^(1/n); 30,000 messages give < 1e-4 per message
    assert rep.clopper_pearson_upper(0, 30_000) == pytest.approx(9.986e-5, rel=1e-3)
    assert rep.clopper_pearson_upper(0, 30_000) < 1e-4
    assert rep.clopper_pearson_upper(1, 100) == pytest.approx(0.0466, rel=1e-2)
    assert rep.clopper_pearson_upper(5, 5) == 1.0


def test_auc_and_tokens_for_auc() -> None:
    assert rep.auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert rep.auc(np.array([0.0]), np.array([0.0])) == 0.5
    honest = [rep.MessageFigures(4, 4, np.zeros(4), True, "h", "T=1")] * 3
    attack = [rep.MessageFigures(4, 2, np.array([0.0, 0.0, 5.0, 0.0]), False, "a", "T=1"),
              rep.MessageFigures(4, 3, np.array([0.0, 1.0, 0.0, 0.0]), False, "a", "T=1")]
    assert rep.tokens_for_auc(attack, honest) == 3
    curve = rep.detection_curve(attack, 0.5, 4)
    np.testing.assert_allclose(curve, [0.0, 0.5, 1.0, 1.0])


@pytest.fixture(scope="module")
def micro() -> rep.Report:
    return rep.run(MICRO)


def test_micro_run_figures(micro: rep.Report) -> None:
    s = rep.summary(micro)
    assert set(s) == {"honest", "attacks", "covert"}
    assert s["honest"]["messages"] == 16 and s["honest"]["false_positives"] == 0
    assert set(s["honest"]) == {"messages", "tokens", "exact_match_rate", "false_positives",
                                "fpr_upper_95"}
    assert [a["name"] for a in s["attacks"]] == [n for n, _ in MICRO.attack_max_tokens]
    assert "stego-bounded" not in {a["name"] for a in s["attacks"]}
    for a in s["attacks"]:
        assert set(a) == {"name", "messages", "detected", "tokens_for_auc_999"}
        assert a["tokens_for_auc_999"] is None or isinstance(a["tokens_for_auc_999"], int)
    assert set(s["covert"]) == {"delta", "bits_per_token", "channel_fraction"}
    assert s["covert"]["delta"] == micro.delta.delta > 0
    assert micro.covert.encoder_detected == 0  # stego-bounded is never detected
    sources = {m.source for m in micro.honest}
    assert sources == {c.name for c in MICRO.configs}
    json.dumps(rep.details(micro))  # JSON-able


def test_docs_render_and_plots(micro: rep.Report, tmp_path: Path) -> None:
    from ivp.verify.docs import load_runs, render

    img = tmp_path / "img"
    img.mkdir()
    (img / "verification-tiny.json").write_text(json.dumps(rep.details(micro)))
    paths = rep.plots(micro, img)
    assert all(p.is_file() and p.stat().st_size > 1000 for p in paths)
    text = render(load_runs(img))
    assert "Where δ comes from" in text and "max_t δ\\*_t" in text
    assert "Not run" in text  # the Gemma section says plainly that it was not run
    for a in micro.attacks:
        assert f"| {a.name} |" in text


def test_cli_json_is_the_last_line(micro: rep.Report, monkeypatch: pytest.MonkeyPatch) -> None:
    from ivp.cli import app

    monkeypatch.setattr(rep, "run", lambda plan, **_kw: micro)  # the CLI shell only
    res = CliRunner().invoke(app, ["verify-report", "--quick", "--json"])
    last = json.loads(res.stdout.strip().splitlines()[-1])
    failed = last["honest"]["false_positives"] > 0 or any(
        a["detected"] == 0 for a in last["attacks"])
    assert res.exit_code == (1 if failed else 0), res.output
    assert CliRunner().invoke(app, ["verify-report", "--model", "nope"]).exit_code == 2
