"""Streams cut mid-way by killing a party — the client, the server, the gateway itself —
with real processes: every token that reached the client is in a logged, audited
pair whose finish reason says it was cut ("cut"), and that pair passes verification."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_gateway_loopback import GatewayProc, Receiver, _upload_cli
from test_gateway_rig import MODEL_ID, tiny

from ivp.protocol.encoding import canonical, decode
from ivp.protocol.keys import VerifyKey
from ivp.protocol.messages import AuditRecord, Verdict, manifest_digest

pytestmark = pytest.mark.slow

MAX_TOKENS = 200
LONG = {"model": MODEL_ID, "prompt": "It was the best of times", "max_tokens": MAX_TOKENS,
        "temperature": 0, "stream": True}  # greedy: 200 tokens, no EOS, on the tiny model

# A client in its own process: prints every token id as it arrives (one per line).
CLIENT = r"""
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/v1/completions", data=sys.argv[2].encode(),
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=300) as r:
    for line in r:
        if line.startswith(b"data: {"):
            for c in json.loads(line[6:])["choices"]:
                for t in c["token_ids"]:
                    print(t, flush=True)
"""


@pytest.fixture
def receiver():  # type: ignore[no-untyped-def]
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def gateway(tmp_path: Path, tiny_model_dir: Path, receiver: Receiver):  # type: ignore[no-untyped-def]
    gw = GatewayProc(tmp_path / "gw", tiny_model_dir, receiver, epsilon=1.0)
    receiver.key = VerifyKey.from_hex(gw.identity()["public_key"])
    gw.start()
    assert _upload_cli(gw.url, tiny_model_dir)["state"] == "serving"
    yield gw
    gw.stop()


def _client(url: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CLIENT, url, json.dumps(LONG)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)


def _tokens(proc: subprocess.Popen[str], n: int) -> list[int]:
    """The first ``n`` token ids the client printed."""
    assert proc.stdout is not None
    got: list[int] = []
    while len(got) < n:
        line = proc.stdout.readline()
        assert line, "the stream ended early"
        got.append(int(line))
    return got


def _audit_of(receiver: Receiver, finish: set[str], timeout: float = 120) -> AuditRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cut = [a for a in receiver.audits if a.pair.finish_reason in finish]
        if cut:
            return cut[-1]
        time.sleep(0.2)
    raise AssertionError(f"no audit record with finish {finish}: "
                         f"{[a.pair.finish_reason for a in receiver.audits]}")


def _verdict(model_dir: Path, record: AuditRecord) -> Verdict:
    """The recomputer's verification of the record (the same worker code)."""
    from ivp.recomputer.workers import ModelSource, Verifier, VerifyJob
    from ivp.whitelist import read_model_files

    manifest = tiny(model_dir).manifest
    verifier = Verifier([ModelSource(manifest, read_model_files(model_dir, manifest))])
    [out] = verifier.verify([VerifyJob(1, manifest_digest(manifest), canonical(record))])
    assert out.verdict is not None, out
    return decode(out.verdict, Verdict)


def _server_pid(gateway_pid: int) -> int:
    """The gateway's server: its only child process."""
    for task in Path(f"/proc/{gateway_pid}/task").glob("*/children"):
        kids = task.read_text().split()
        if kids:
            return int(kids[0])
    raise AssertionError("the gateway has no server process")


def test_client_killed_mid_stream_leaves_a_cut_pair_that_passes(
        gateway: GatewayProc, receiver: Receiver, tiny_model_dir: Path) -> None:
    client = _client(gateway.url)
    got = _tokens(client, 3)
    os.killpg(client.pid, signal.SIGKILL)
    client.wait()
    record = _audit_of(receiver, {"cut"})
    assert record.pair.output_token_ids[:len(got)] == got  # nothing released is missing
    assert len(record.pair.output_token_ids) < MAX_TOKENS
    verdict = _verdict(tiny_model_dir, record)
    assert verdict.passed, verdict.reason
    assert receiver.refused == []


def test_server_killed_mid_stream_leaves_a_cut_pair_that_passes(
        gateway: GatewayProc, receiver: Receiver, tiny_model_dir: Path) -> None:
    client = _client(gateway.url)
    got = _tokens(client, 3)
    assert gateway.proc is not None
    os.kill(_server_pid(gateway.proc.pid), signal.SIGKILL)
    rest = [int(line) for line in client.stdout or []]  # the stream ends, it does not hang
    client.wait(60)
    record = _audit_of(receiver, {"cut"})
    assert record.pair.output_token_ids[:len(got) + len(rest)] == got + rest
    verdict = _verdict(tiny_model_dir, record)
    assert verdict.passed, verdict.reason
    alarms = {a.kind for a in receiver.alarms}
    assert "server_power_loss" in alarms or "stream_cut" in alarms


def test_gateway_killed_mid_stream_recovers_a_cut_pair_that_passes(
        gateway: GatewayProc, receiver: Receiver, tiny_model_dir: Path) -> None:
    """Power kill of the gateway itself (kill -9): the logged chunks become the pair at
    restart; everything the client got is in it."""
    client = _client(gateway.url)
    got = _tokens(client, 3)
    gateway.kill9()
    rest = [int(line) for line in client.stdout or []]
    client.wait(60)
    gateway.start()  # recovery chains the open stream; ε = 1 draws it
    record = _audit_of(receiver, {"cut"})
    released = got + rest
    assert record.pair.output_token_ids[:len(released)] == released
    verdict = _verdict(tiny_model_dir, record)
    assert verdict.passed, verdict.reason
    assert receiver.refused == []


def test_gateway_killed_after_many_chunks_recovers_every_released_token(
        gateway: GatewayProc, receiver: Receiver, tiny_model_dir: Path) -> None:
    """kill -9 of the gateway after 150 released tokens (as many chunk rows, each only
    what it adds): the pair rebuilt at restart from the first row and the chunks holds
    every token the client got, in order, and passes verification."""
    client = _client(gateway.url)
    got = _tokens(client, 150)
    gateway.kill9()
    rest = [int(line) for line in client.stdout or []]
    client.wait(60)
    gateway.start()
    record = _audit_of(receiver, {"cut"})
    released = got + rest
    assert len(record.pair.output_token_ids) >= len(released) >= 150
    assert record.pair.output_token_ids[:len(released)] == released
    verdict = _verdict(tiny_model_dir, record)
    assert verdict.passed, verdict.reason
    assert receiver.refused == []
