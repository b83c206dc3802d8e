"""The red-team suite: every scenario against a live datacenter, and with its defence off.

Two runs share the module, started together in two threads (each is mostly waiting
on its processes):

* ``live``: every scenario, as ``ivp attack run all`` plays them (one shared
  datacenter, a fresh gateway per destructive scenario, a datacenter of its own for
  tamper-recomputer), on the tiny model with ε = 0.5 and 1 s checkpoints;
* ``defenceless``: the scenarios of the audit, sequence, checkpoint and quorum
  defences against a recomputer started with exactly those checks switched off
  (``ivp.attacks.knockouts``): each must then go unnoticed, which shows that its
  ``detected`` comes from that defence and nothing else.

Beside them runs ``ivp demo --attack tamper-gateway --json`` (the demo plays the same
scenario code). Last, the command line's JSON and exit status with a stubbed runner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ivp.attacks import SCENARIOS, Report, Result, Settings, resolve, run_scenarios
from ivp.attacks.base import Evidence
from ivp.attacks.evasions import CHANCE_P

ISSUE_NAMES = {
    "interconnect", "internet-training", "expert-iteration", "rogue-model-persists",
    "covert-rf", "tamper-gateway", "tamper-recomputer", "model-swap-at-upload",
    "upload-exfiltration", "unpaired-output", "forged-audit", "replayed-audit",
    "withheld-audit", "silenced-gateway", "seed-ignored", "stego", "admin-replay",
    "admin-no-quorum", "sensor-spoof", "lone-entry",
    # issue 12: the operator who owns the wire, the disk and the power
    "forged-ack", "abandoned-boot", "gap-then-cheat", "log-rollback", "fake-control",
    "junk-uplink", "timing-channel", "small-holes",
    # issue 15: the trust boundary made real
    "enrolment-bypass", "direct-connection", "store-rollback",
}
#: `ivp demo --attack NAME` run here (issue 3's acceptance; every other scenario takes
#: the same path through the demo, and test_datacenter.py runs the default one)
DEMOS = ("tamper-gateway",)
#: scenario -> the knockout that must make it go unnoticed (withheld-audit rests on the
#: same sequence check as replayed-audit; left out to keep the module's run short)
KNOCKED = {
    "rogue-model-persists": "audit",
    "replayed-audit": "sequence",
    "silenced-gateway": "checkpoint",
    "admin-no-quorum": "quorum",
    "enrolment-bypass": "seal",
    "direct-connection": "isolate",
    "store-rollback": "store-counter",
}
#: scenarios whose play needs a defence another knockout removes, each run against a
#: recomputer with its own knockout alone: store-rollback undoes an audit catch, and
#: with ``audit`` off there is no catch to undo
ALONE = ("store-rollback",)
#: ``IVP_ATTACK_ONLY=a,b``: the two runs play only these scenarios (a targeted run
#: with ``-k``); the tests of the others are skipped
ONLY = tuple(n for n in os.environ.get("IVP_ATTACK_ONLY", "").split(",") if n)

#: scenarios whose victim runs under ``ivp gateway --isolate`` (root, ip, nft, bwrap)
NEEDS_ISOLATION = ("direct-connection",)


def _skip_without_isolation() -> None:
    """Skipped on a developer's machine that cannot isolate (not root); in CI, which
    runs as root with scripts/system-deps.sh, a machine that cannot fails instead."""
    from ivp.errors import MisuseError
    from ivp.gateway.isolation import check_can_isolate

    try:
        check_can_isolate()
    except MisuseError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def demo_procs(tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """`ivp demo --attack NAME --json` for each of DEMOS, started (they run beside the
    two runs of ``runs``: all of them mostly wait on their processes). 24 honest
    requests at ε = 0.5: the chance that none is audited is 0.5^24 (12 at ε = 0.2 left
    it at 7%, and the test then failed on an honest run)."""
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "ivp.cli", "demo", "--json", "--attack", name,
         "--honest", "24", "--epsilon", "0.5",
         "--run-dir", str(tmp_path_factory.mktemp(f"demo-{name}"))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in DEMOS
        if not ONLY or name in ONLY}
    yield procs
    for proc in procs.values():  # a demo nobody waited for (e.g. under -k): let it end
        if proc.poll() is None:  # (it stops its own datacenter; a kill would orphan it)
            proc.communicate(timeout=600)


# --- the two live runs ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
         demo_procs: dict[str, subprocess.Popen[str]]) -> dict[str, Report]:
    """Both runs, side by side (and beside the demo); a run that crashed is re-raised."""
    from transformers import AutoModelForCausalLM  # noqa: F401  (lazy imports are not
    # thread-safe: import here, before the two threads do)

    out: dict[str, Report] = {}
    errors: list[BaseException] = []
    live = Settings(epsilon=0.5, checkpoint_interval=1.0, cap=80, patience=20.0,
                    model_dir=tiny_model_dir)
    together = [n for n in KNOCKED if n not in ALONE]

    def off(names: list[str]) -> Settings:
        return Settings(epsilon=0.5, checkpoint_interval=1.0, cap=40, patience=14.0,
                        knockouts=tuple(sorted({KNOCKED[n] for n in names})),
                        model_dir=tiny_model_dir)

    plans = {"live": (resolve(["all"]), live),
             "defenceless": (resolve(together), off(together)),
             **{f"defenceless-{n}": (resolve([n]), off([n])) for n in ALONE}}
    if ONLY:
        plans = {run: ([s for s in scenarios if s.name in ONLY], settings)
                 for run, (scenarios, settings) in plans.items()}
        plans = {run: plan for run, plan in plans.items() if plan[0]}

    def go(name: str) -> None:
        scenarios, settings = plans[name]
        try:
            out[name] = run_scenarios(scenarios, tmp_path_factory.mktemp(name), settings)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(n,)) for n in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def result_of(report: Report, name: str) -> Result:
    found = [r for r in report.results if r.name == name]
    if not found and ONLY:
        pytest.skip(f"{name} not played (IVP_ATTACK_ONLY={','.join(ONLY)})")
    return found[0]


def defenceless(runs: dict[str, Report], name: str) -> Result:
    """``name``'s result with its defence knocked out (alone, for those in ALONE)."""
    run = f"defenceless-{name}" if name in ALONE else "defenceless"
    if run not in runs and ONLY:
        pytest.skip(f"{name} not played (IVP_ATTACK_ONLY={','.join(ONLY)})")
    return result_of(runs[run], name)


def explain(r: Result) -> str:
    return json.dumps(r.summary(), indent=1) + "\n" + json.dumps(r.details, default=str)


@pytest.mark.timeout(1800)  # the fixture plays every scenario, twice over, in this test
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_is_detected_by_the_live_system(runs: dict[str, Report], name: str) -> None:
    if name in NEEDS_ISOLATION:
        _skip_without_isolation()
    r = result_of(runs["live"], name)
    assert not r.error, explain(r)
    assert r.detected, explain(r)
    assert r.evidence and not r.missing
    assert 0 <= r.seconds_to_detect < 120


def test_no_honest_audit_failed(runs: dict[str, Report]) -> None:
    if ONLY:
        pytest.skip("the honest audits are counted over the whole run")
    honest = runs["live"].honest
    assert honest["audited"] >= 10, honest
    assert honest["failed"] == 0, honest


@pytest.mark.parametrize("name", ["rogue-model-persists", "internet-training",
                                  "expert-iteration", "seed-ignored", "stego"])
def test_audit_catch_shuts_the_gateway_down(runs: dict[str, Report], name: str) -> None:
    r = result_of(runs["live"], name)
    assert r.details.get("gateway_state") == "shutdown", explain(r)
    assert r.details.get("failed_verdicts", 0) >= 1, explain(r)
    assert r.requests_before_detection >= 1, explain(r)  # caught by a served, audited pair


def test_secure_boot_refuses_other_weights(runs: dict[str, Report]) -> None:
    swap = result_of(runs["live"], "model-swap-at-upload")
    assert swap.details["swap_answer"]["state"] == "power_kill", explain(swap)
    assert swap.details["routed_by_recomputer"] is False, explain(swap)
    ei = result_of(runs["live"], "expert-iteration")
    assert ei.details["upload_answer"]["state"] == "power_kill", explain(ei)


@pytest.mark.parametrize("name", ["upload-exfiltration", "unpaired-output"])
def test_server_data_never_leaves_the_gateway(runs: dict[str, Report], name: str) -> None:
    """The marker the server tried to send out is readable nowhere: not in what the
    operator or clients got, nor in any /status, /alarms or /metrics."""
    r = result_of(runs["live"], name)
    assert r.details["leaked_via"] == [], explain(r)


def test_unpaired_output_never_reaches_a_client(runs: dict[str, Report]) -> None:
    r = result_of(runs["live"], "unpaired-output")
    assert r.requests_before_detection == 0, explain(r)


def test_timing_channel_is_bounded(runs: dict[str, Report]) -> None:
    """What a delaying server gets through under the release policy (issue 12, class 7)."""
    r = result_of(runs["live"], "timing-channel")
    within, past = r.details["within_budget"], r.details["past_budget"]
    assert within["p_chance"] >= CHANCE_P, explain(r)  # latency reads no better than chance
    assert past["bits_per_response"] <= r.details["bound_bits_per_response"], explain(r)


def test_rolled_back_log_and_forged_acks_lose_no_record(runs: dict[str, Report]) -> None:
    for name in ("forged-ack", "abandoned-boot"):
        r = result_of(runs["live"], name)
        assert any("arrived and was verified" in str(e) for e in r.evidence), explain(r)
    r = result_of(runs["live"], "log-rollback")
    assert r.details["input_after_restore"] == 403, explain(r)  # serves nothing


def test_silenced_gateway_loses_nothing(runs: dict[str, Report]) -> None:
    r = result_of(runs["live"], "silenced-gateway")
    assert r.details["spool_depth_when_reconnected"] > 0, explain(r)  # it kept serving
    assert r.details["nothing_lost"] is True, explain(r)


def test_rf_burst_is_located(runs: dict[str, Report]) -> None:
    r = result_of(runs["live"], "covert-rf")
    assert r.details["fix_error_m"] < 3.0, explain(r)
    assert len(r.details["sensors"]) >= 3, explain(r)


def test_tampered_devices_stay_bricked(runs: dict[str, Report]) -> None:
    gw = result_of(runs["live"], "tamper-gateway")
    assert gw.details["gateway_state"] == "bricked", explain(gw)
    rc = result_of(runs["live"], "tamper-recomputer")
    assert any("restart" in e.source for e in rc.evidence), explain(rc)
    assert rc.details["honest"]["failed"] == 0, explain(rc)


# --- the same scenarios with their defence switched off --------------------------------------
@pytest.mark.parametrize("name", list(KNOCKED))
def test_scenario_goes_unnoticed_without_its_defence(runs: dict[str, Report],
                                                     name: str) -> None:
    r = defenceless(runs, name)
    assert not r.error, explain(r)
    assert not r.detected, f"{name} still detected with {KNOCKED[name]} off:\n{explain(r)}"
    if name == "rogue-model-persists":  # the cheat was audited, and passed
        assert r.details["victim_verdicts"] >= 1, explain(r)
    if name == "silenced-gateway":  # silent well past the 3 periods that alarm
        assert r.seconds_to_detect > 3 * 1.0, explain(r)
    if name == "admin-no-quorum":  # the under-signed request took effect
        assert r.details["model_epsilon_after"], explain(r)
    if name == "enrolment-bypass":  # the written row was trusted: the rogue BOOT admitted
        assert r.details["rogue_boot_answer"]["ok"] is True, explain(r)
    if name == "direct-connection":  # not isolated: the server reached them straight
        assert any("recomputer" in x for x in r.details["reached"]), explain(r)
    if name == "store-rollback":  # the copy is trusted: the caught gateway serves again
        before, after = r.details["before_restore"], r.details["after_restore"]
        assert before["victim_at_recomputer"] == "shutdown", explain(r)
        assert before["victim_failed_verdicts"] >= 1, explain(r)
        assert after["victim_at_recomputer"] == "serving", explain(r)
        assert after["victim_failed_verdicts"] == 0, explain(r)
        assert r.details["input_after_restore"] != 409, explain(r)


# --- ivp demo --attack NAME (the same scenario code) -------------------------------------------
@pytest.fixture(scope="module")
def demos(demo_procs: dict[str, subprocess.Popen[str]]
          ) -> dict[str, tuple[int, dict[str, Any]]]:
    out = {}
    for name, proc in demo_procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        lines = stdout.strip().splitlines()
        assert lines, stderr[-3000:]
        out[name] = (proc.returncode, json.loads(lines[-1]))
    return out


@pytest.mark.parametrize("name", DEMOS)
def test_demo_runs_the_scenario(demos: dict[str, tuple[int, dict[str, Any]]],
                                name: str) -> None:
    if name not in demos and ONLY:
        pytest.skip(f"{name} not played (IVP_ATTACK_ONLY={','.join(ONLY)})")
    code, summary = demos[name]
    assert code == 0, summary
    assert summary["honest"]["failed"] == 0 and summary["honest"]["audited"] >= 1
    attack = summary["attack"]
    assert attack["name"] == name and attack["detected"] is True
    assert {"requests", "audited", "failed", "alarms", "gateway_state"} <= set(attack)
    if name == "tamper-gateway":
        assert attack["gateway_state"] == "bricked", attack
    else:
        assert attack["alarms"] >= 1, attack


# --- the command line ----------------------------------------------------------------------------
def test_every_issue_scenario_is_registered() -> None:
    assert set(SCENARIOS) == ISSUE_NAMES
    assert [s.name for s in resolve(["all"])] == list(SCENARIOS)
    with pytest.raises(KeyError, match="no-such"):
        resolve(["no-such"])


def test_attack_list_json() -> None:
    from ivp.cli import app

    out = CliRunner().invoke(app, ["attack", "list", "--json"])
    assert out.exit_code == 0, out.output
    listed = json.loads(out.output.strip().splitlines()[-1])["attacks"]
    assert {a["name"] for a in listed} == ISSUE_NAMES
    assert all(a["defence"] for a in listed)


def _fake_report(detected: bool, honest_failed: int = 0) -> Report:
    r = Result("forged-audit", "signatures", started=100.0, ended=101.0)
    if detected:
        r.evidence.append(Evidence(100.5, "recomputer /alarms", "forged"))
    else:
        r.missing.append("a forged alarm")
    return Report([r], {"audited": 3, "passed": 3 - honest_failed, "failed": honest_failed},
                  1.0)


@pytest.mark.parametrize(("detected", "honest_failed", "code"),
                         [(True, 0, 0), (False, 0, 1), (True, 1, 1)])
def test_attack_run_json_and_exit_status(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         detected: bool, honest_failed: int,
                                         code: int) -> None:
    import ivp.attacks.runner as runner
    from ivp.cli import app

    def fake(scenarios: Any, root: Path, settings: Settings) -> Report:
        assert [s.name for s in scenarios] == ["forged-audit"]
        return _fake_report(detected, honest_failed)

    monkeypatch.setattr(runner, "run_scenarios", fake)
    out = CliRunner().invoke(app, ["attack", "run", "forged-audit", "--json",
                                   "--run-dir", str(tmp_path)])
    assert out.exit_code == code, out.output
    last = json.loads(out.stdout.strip().splitlines()[-1])
    entry = last["attacks"][0]
    assert set(entry) >= {"name", "detected", "seconds_to_detect",
                          "requests_before_detection", "defence"}
    assert entry["detected"] is detected
    assert entry["seconds_to_detect"] == (0.5 if detected else 1.0)


def test_attack_run_refuses_unknown_names() -> None:
    from ivp.cli import app

    out = CliRunner().invoke(app, ["attack", "run", "no-such-attack"])
    assert out.exit_code != 0
    assert "no-such-attack" in out.output
