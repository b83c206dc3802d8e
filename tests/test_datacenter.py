"""End-to-end tests on the shared loopback datacenter, and the demo's acceptance."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_honest_traffic_is_audited_and_passes(datacenter) -> None:
    answers = datacenter.send(40, concurrency=4, max_tokens=16)
    assert all(a["status"] == 200 for a in answers), answers[:3]
    for a in answers:
        choice = a["body"]["choices"][0]
        assert isinstance(choice["token_ids"], list)
        assert choice["finish_reason"] in ("stop", "length")
    datacenter.drain()
    verdicts = datacenter.verdicts()
    assert len(verdicts) >= 5  # ε = 0.5 over 40 requests: P(< 5) is ~1e-7
    assert all(v["passed"] for v in verdicts), [v for v in verdicts if not v["passed"]][:2]
    assert datacenter.alarms() == []


def test_model_not_on_the_whitelist_gets_404_naming_it(datacenter) -> None:
    """Not 503: a client must not retry a model that is not here (503 + Retry-After is
    for a whitelisted model no gateway serves now: test_recomputer_service)."""
    status, body = datacenter.post(
        datacenter.recomputer_url + "/v1/completions",
        json.dumps({"model": "no-such-model", "prompt": "hi"}).encode(),
    )
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert "no-such-model" in body["error"]["message"]


@pytest.mark.parametrize("param", [
    {"logit_bias": {"5": 10}}, {"n": 2}, {"logprobs": True}, {"seed": 7},
    {"presence_penalty": 0.5}, {"frequency_penalty": 1.0}, {"best_of": 2},
])
def test_unsupported_sampling_parameter_is_refused(datacenter, param) -> None:
    body = {"model": datacenter.model_id, "prompt": "hello", "max_tokens": 4, **param}
    status, answer = datacenter.post(datacenter.recomputer_url + "/v1/completions",
                                     json.dumps(body).encode())
    assert status == 400, answer
    assert next(iter(param)) in answer["error"]["message"]


def test_demo_catches_rogue_model(tmp_path) -> None:
    """Acceptance of the end-to-end loop: `ivp demo --json` on the tiny model."""
    out = subprocess.run(
        [sys.executable, "-m", "ivp.cli", "demo", "--json", "--run-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["honest"]["failed"] == 0
    assert summary["honest"]["audited"] >= 5
    assert summary["attack"]["failed"] >= 1
    assert summary["attack"]["alarms"] >= 1
    assert summary["attack"]["gateway_state"] == "shutdown"


class _Alive:
    def alive(self) -> bool:
        return True


class _ScriptedDatacenter:
    """What ``LoopbackDatacenter.drain`` reads, scripted: one gateway whose status
    answers come from ``answers`` in turn (the last one repeats)."""

    def __init__(self, answers: list[dict]) -> None:
        from types import SimpleNamespace
        self.handles = [SimpleNamespace(process=_Alive())]
        self.answers, self.asked = answers, 0

    def gateway_status(self, index: int) -> dict:
        self.asked += 1
        return self.answers[min(self.asked, len(self.answers)) - 1]

    def recomputer_status(self) -> dict:
        return {"queue_depth": 0}


def _status(settling: int, rounds: int, spool_depth: int = 0) -> dict:
    return {"settling": settling, "spool_depth": spool_depth, "uplink": {"rounds": rounds}}


def test_drain_waits_for_the_last_draw_and_a_round_begun_after_it(monkeypatch) -> None:
    """The CI failure it fixes: the client had its answer, the draw was not made yet,
    and the spool (as of the last uplink round) was empty: drain returned one verdict
    short. Now it waits for ``settling`` 0, then two more uplink rounds."""
    from ivp.datacenter import LoopbackDatacenter

    monkeypatch.setattr("ivp.datacenter.time.sleep", lambda s: None)
    script = [_status(1, 7), _status(1, 7), _status(0, 7), _status(0, 8), _status(0, 9)]
    dc = _ScriptedDatacenter(script)
    LoopbackDatacenter.drain(dc)  # type: ignore[arg-type]
    assert dc.asked == len(script)  # returned at the first answer that settles it

    still_spooled = _ScriptedDatacenter([_status(0, 3), _status(0, 9, spool_depth=1)])
    with pytest.raises(RuntimeError, match="did not drain"):
        LoopbackDatacenter.drain(still_spooled, timeout=0.2)  # type: ignore[arg-type]
