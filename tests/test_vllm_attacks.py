"""Cheats on a vLLM server, each caught by the live recomputer.

Each scenario is a datacenter whose one gateway powers ``ivp server --engine vllm
--attack NAME`` (a server-side switch, dormant until its trigger file exists), ε = 1.
Honest traffic first (every audit passes), then the cheat fires: the recomputer's
replay fails an audit, raises ``verify_fail`` and shuts the gateway down.

* other weights: ``rogue-model-persists`` (2% weight noise);
* one fine-tuning step: ``expert-iteration``;
* quantization: ``int8`` (weights rounded to per-row int8 and back, as an int8
  weight-only quantization computes them);
* an ignored seed: ``seed-ignored``.

The weight cheats alter a transformers copy of the whitelisted model and have vLLM's
workers load it (vLLM's in-place ``reload_weights``), i.e. vLLM really serves other
weights.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ivp.engine.vllm_env import vllm_python

if vllm_python() is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the vLLM tests: `make test` installs .venv-vllm")
    pytest.skip("vLLM is not installed (make vllm)", allow_module_level=True)


# Each scenario starts a vLLM server (~1 min on 2 cores): the suite runs one weight
# cheat and the seed cheat; IVP_VLLM_ALL_ATTACKS=1 adds the other two weight cheats,
# which take the same reload path with another alteration.
ATTACKS = ["rogue-model-persists", "seed-ignored"] + (
    ["expert-iteration", "int8"] if os.environ.get("IVP_VLLM_ALL_ATTACKS") == "1" else [])


@pytest.mark.slow
@pytest.mark.parametrize("attack", ATTACKS)
def test_cheat_on_vllm_is_caught_by_the_live_recomputer(tmp_path: Path, attack: str) -> None:
    from ivp.demo.datacenter import LoopbackDatacenter
    from ivp.engine.tiny import VLLM_HEAD_DIM, build_tiny_model

    model = build_tiny_model(tmp_path / "model", head_dim=VLLM_HEAD_DIM)
    dc = LoopbackDatacenter(tmp_path / "dc", gateways=1, epsilon=1.0, prebuilt_model=model,
                            engine="vllm", attacks={0: attack},
                            server_args=("--kv-cache-mb", "64", "--max-model-len", "512"))
    with dc:
        honest = dc.send(8, concurrency=4, max_tokens=12)
        assert [a["status"] for a in honest] == [200] * 8
        dc.drain()
        assert [v for v in dc.verdicts() if not v["passed"]] == []
        t0 = time.time()
        dc.trigger_attack(0)
        deadline = time.monotonic() + 240
        failed: list[dict] = []
        while time.monotonic() < deadline and not failed:
            dc.send(8, concurrency=4, max_tokens=12)
            dc.drain()
            failed = [v for v in dc.verdicts() if not v["passed"]]
        assert failed, f"{attack} was never caught"
        alarms = [a for a in dc.alarms() if a["kind"] == "verify_fail" and a["time"] >= t0]
        assert alarms
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and dc.gateway_status(0)["state"] != "shutdown":
            time.sleep(0.5)
        assert dc.gateway_status(0)["state"] == "shutdown"
