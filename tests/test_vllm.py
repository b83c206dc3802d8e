"""vLLM behind ivp: one shared vLLM server (a tiny random Llama) powered by a gateway.

The module's datacenter is a recomputer and one gateway whose server runs
``ivp server --engine vllm`` in vLLM's own environment (``make vllm``), booted
by the gateway's ordinary upload, with ε = 1 (every pair audited). The server also
records every logits row its spec v1 processor chose from (``--record-logits``), so
the conformance test checks vLLM's own rows, not a recomputation. Tests that need a
seed of their choosing talk to the server directly, as only the gateway may in
service.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from ivp.engine.vllm_env import vllm_python
from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import choose

if vllm_python() is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the vLLM tests: `make test` installs .venv-vllm")
    pytest.skip("vLLM is not installed (make vllm)", allow_module_level=True)

PARAMS = (
    {"temperature": 1.0},
    {"temperature": 0.0},
    {"temperature": 0.8, "top_k": 40},
    {"temperature": 0.7, "top_p": 0.9},
    {"temperature": 1.3, "top_k": 100, "top_p": 0.95},
)


@pytest.fixture(scope="module")
def vllm_dc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from ivp.datacenter import LoopbackDatacenter
    from ivp.engine.tiny import VLLM_HEAD_DIM, build_tiny_model

    root = tmp_path_factory.mktemp("vllm-datacenter")
    model = build_tiny_model(root / "model", head_dim=VLLM_HEAD_DIM)
    record = Path(tempfile.mkdtemp(prefix="ivp-vllm-rows-",
                                   dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    dc = LoopbackDatacenter(root, gateways=1, epsilon=1.0, prebuilt_model=model,
                            engine="vllm", server_args=(
                                "--record-logits", str(record), "--kv-cache-mb", "128",
                                "--max-model-len", "1024", "--max-num-seqs", "64"))
    dc.record = record  # type: ignore[attr-defined]
    with dc:
        yield dc
    import shutil

    shutil.rmtree(record, ignore_errors=True)


def server_url(dc: Any) -> str:
    return f"http://127.0.0.1:{dc.handles[0].server_port}"


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with session.post(url, json=body) as r:
        if body.get("stream"):
            raw = (await r.read()).decode()
            assert r.status == 200, raw
            return [json.loads(e[6:]) for e in raw.split("\n\n")
                    if e.startswith("data: ") and e != "data: [DONE]"]
        answer = await r.json(content_type=None)
        assert r.status == 200, answer
        return answer


def post_all(url: str, bodies: list[dict[str, Any]]) -> list[Any]:
    """POST every body at once (vLLM batches them); the answers in order."""
    async def run() -> list[Any]:
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return await asyncio.gather(*(_post(session, url + "/v1/completions", b)
                                          for b in bodies))
    return asyncio.run(run())


def body(prompt: list[int], seed: int, params: dict[str, Any], max_tokens: int = 12,
         **extra: Any) -> dict[str, Any]:
    return {"model": "tiny-llama", "prompt": prompt, "seed": seed, "max_tokens": max_tokens,
            **params, **extra}


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of mixed lengths (3 to 60 tokens): rows of one batch differ."""
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, 600, size=int(rng.integers(2, 60))).tolist()]
            for _ in range(count)]


def test_honest_vllm_traffic_passes_every_audit(vllm_dc: Any) -> None:
    """Clients through recomputer and gateway, ε = 1: every pair replayed, none fails."""
    answers = vllm_dc.send(40, concurrency=8, max_tokens=16)
    assert [a["status"] for a in answers] == [200] * 40
    vllm_dc.drain()
    verdicts = vllm_dc.verdicts()
    assert len(verdicts) >= 40
    assert [v for v in verdicts if not v["passed"]] == []


def test_vllm_emits_the_spec_v1_choice_of_its_own_rows(vllm_dc: Any) -> None:
    """Conformance: for every generated position, ``choose`` applied to the logits row
    vLLM computed (recorded by the server) picks the token vLLM emitted."""
    bodies = [body(p, 1000 + i, PARAMS[i % len(PARAMS)], max_tokens=10)
              for i, p in enumerate(prompts(24, seed=1))]
    answers = post_all(server_url(vllm_dc), bodies)
    checked = 0
    for b, a in zip(bodies, answers, strict=True):
        tokens = a["choices"][0]["token_ids"]
        folder = vllm_dc.record / a["id"]
        rows = sorted(folder.glob("*.npy"), key=lambda p: int(p.stem))
        assert [int(p.stem) for p in rows] == list(range(len(tokens)))
        params = SamplingParams(max_tokens=b["max_tokens"], **{
            k: b[k] for k in ("temperature", "top_k", "top_p") if k in b})
        for t, path in enumerate(rows):
            row = np.load(path)
            assert row.shape == (640,) and row.dtype == np.float32
            assert choose(row, b["seed"], t, params) == tokens[t], (a["id"], t)
            checked += 1
    assert checked >= 24


def test_calibration_against_vllm_measures_delta_and_the_false_alarm_cost(vllm_dc: Any
                                                                          ) -> None:
    """``ivp calibrate --engine vllm``'s measurement on the live recording server: every
    served row is compared with the replay, and the records it keeps price the honest
    false alarms at the verdict's τ(T) (never fewer than at the looser flat δ)."""
    from ivp.engine.loading import load_from_dir
    from ivp.engine.reference import ReferenceEngine
    from ivp.verify import calibrate as cal
    from ivp.verify.calibrate_vllm import measure_server
    from ivp.verify.views import false_alarm_table

    engine = ReferenceEngine(*load_from_dir(vllm_dc.model_dir))
    params = tuple(SamplingParams(max_tokens=6, temperature=p.temperature, top_k=p.top_k,
                                  top_p=p.top_p) for p in cal.CALIBRATION_PARAMS)
    requests = cal.calibration_requests([tuple(p) for p in prompts(3, seed=7)], params)
    result = measure_server(server_url(vllm_dc), vllm_dc.record, engine, requests, (1, 4),
                            replay_groups=(1,))
    assert result.records is not None
    assert result.records.positions == result.samples
    assert 0 < result.samples <= 2 * len(requests) * 6  # two levels; EOS may end a request
    assert result.observed <= result.delta and result.delta > 0
    assert result.max_tokens == 6
    table = false_alarm_table(result.records, result.delta, result.max_tokens)
    assert table[0]["temperature"] == 0.0 and len(table) > 1
    for row in table:
        assert row["tolerance"] <= result.delta
        assert row["flat_per_message"] <= row["per_message"] <= 1.0


def test_same_tokens_alone_and_in_a_batch_of_32_mixed_requests(vllm_dc: Any) -> None:
    """Batch composition does not change a request's tokens: alone, then among 31
    others (other lengths, parameters, seeds, streaming and not)."""
    target = body([1, 40, 41, 42, 43, 44], 77, {"temperature": 1.0}, max_tokens=24)
    alone = post_all(server_url(vllm_dc), [target])[0]["choices"][0]["token_ids"]
    others = [body(p, 500 + i, PARAMS[i % len(PARAMS)], max_tokens=8 + i % 17,
                   stream=i % 3 == 0)
              for i, p in enumerate(prompts(31, seed=2))]
    batch = [*others[:15], target, *others[15:]]
    answers = post_all(server_url(vllm_dc), batch)
    assert answers[15]["choices"][0]["token_ids"] == alone
    assert len(alone) >= 1


def test_stream_gives_the_same_tokens(vllm_dc: Any) -> None:
    b = body([1, 9, 8, 7], 4242, {"temperature": 0.9, "top_k": 50}, max_tokens=16)
    plain, chunks = post_all(server_url(vllm_dc), [b, {**b, "stream": True}])
    streamed = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    assert streamed == plain["choices"][0]["token_ids"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]


def test_vllm_server_refuses_what_spec_v1_does_not_define(vllm_dc: Any) -> None:
    url = server_url(vllm_dc) + "/v1/completions"
    for bad, needle in (({"presence_penalty": 0.5}, "presence_penalty"),
                        ({"prompt": [1, 99999]}, "outside the vocabulary"),
                        ({"max_tokens": 2000}, "context")):
        req = urllib.request.Request(url, data=json.dumps(
            {**body([1, 5, 6], 1, {"temperature": 1.0}), **bad}).encode())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 400
        assert needle in json.loads(err.value.read())["error"]["message"]


def test_weights_are_in_ram_only_and_power_kill_frees_them(vllm_dc: Any) -> None:
    """The server and vLLM's processes hold the weights in memory only: no open file
    outside memfds and sockets, no link directory left; a SIGKILL of the server alone
    (its gateway's death signal) leaves no vLLM process behind, nor would POWER_KILL
    (SIGKILL of the whole group). Runs last: it kills the shared server."""
    pid = _server_pid(vllm_dc.handles[0].server_port)
    group = os.getpgid(pid)
    members = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
               and _pgid(int(p.name)) == group]
    assert len(members) >= 2  # the server and vLLM's engine process(es)
    for member in members:
        for fd in Path(f"/proc/{member}/fd").iterdir():
            target = os.readlink(fd) if fd.is_symlink() else ""
            assert not target.endswith(".safetensors"), (member, target)
    assert not list(Path("/dev/shm").glob(f"ivp-model-{pid}-*"))
    # the server alone killed (its gateway died: the death signal): vLLM's processes
    # go with it (the group guard), then what is left of the group is the power switch's
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive_in(group, m) for m in members):
        time.sleep(0.2)
    assert not [m for m in members if _alive_in(group, m)]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)  # what the gateway's power switch does


def _server_pid(port: int) -> int:
    """The ``ivp server`` process listening on ``port`` (found by its command line)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"server" in argv and b"--port" in argv and \
                argv[argv.index(b"--port") + 1] == str(port).encode():
            return int(proc.name)
    raise AssertionError(f"no server process on port {port}")


def _alive_in(group: int, pid: int) -> bool:
    """``pid`` runs (not a zombie awaiting its reaper) in process group ``group``."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and _pgid(pid) == group


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return -1


def test_fast_chooser_equals_choose_in_vllms_environment() -> None:
    """The processor's compiled chooser (numba, only in .venv-vllm) picks choose's token:
    tests/vllm_side, run with that environment's pytest."""
    import subprocess
    import sys

    python = vllm_python()
    assert python is not None
    side = Path(__file__).parent / "vllm_side"
    out = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(side)],
                         capture_output=True, text=True, timeout=900)
    sys.stdout.write(out.stdout[-2000:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
