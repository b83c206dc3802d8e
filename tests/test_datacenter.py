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
