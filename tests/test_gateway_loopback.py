"""Real processes on loopback: `ivp gateway` powering a real `ivp server`, `ivp upload`,
and kill -9 of the gateway during traffic (crash consistency)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from test_gateway_rig import MODEL_ID, tiny

from ivp.errors import PeerDataError
from ivp.protocol import chain
from ivp.protocol.acks import UplinkAck, UplinkReceipt, payload_digest
from ivp.protocol.encoding import canonical, decode, to_builtins
from ivp.protocol.envelope import (
    ACK,
    ALARM,
    AUDIT,
    BOOT,
    CHECKPOINT,
    HEARTBEAT,
    Envelope,
    open_signed,
    sign_message,
)
from ivp.protocol.keys import SigningKey, VerifyKey
from ivp.protocol.messages import AuditRecord, BootRecord, Checkpoint, GatewayAlarm

CONTROL_KEY = SigningKey.generate().verify_key.hex  # a recomputer key nobody here uses

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    """A recomputer's /uplink that applies the recomputer's acceptance rules.

    Signature by the gateway key, audit sequence without gaps or replays per boot
    (``chain.AuditSequence``), ``chain_head == link(chain_prev, pair)``, pairs in
    increasing tag order. A byte-identical resend (the gateway died before it saw the
    ack) is a duplicate, accepted. Anything else is refused and remembered, so a test
    can assert nothing was ever refused.
    """

    def __init__(self) -> None:
        self.key: VerifyKey | None = None
        self.signer = SigningKey.generate()  # the "recomputer" key: it signs every answer
        self.audits: list[AuditRecord] = []
        self.boots: list[BootRecord] = []
        self.checkpoints: list[Checkpoint] = []
        self.alarms: list[GatewayAlarm] = []
        self.refused: list[str] = []
        self.duplicates = 0
        self.stored: dict[tuple[str, int], bytes] = {}
        self.last_pair: dict[str, int] = {}
        self.seqs: dict[str, chain.AuditSequence] = defaultdict(chain.AuditSequence)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/uplink", self._uplink)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def _accept(self, env: Envelope) -> None:
        assert self.key is not None
        payload = open_signed(env, env.payloadType, self.key)
        if env.payloadType == BOOT:
            self.boots.append(decode(payload, BootRecord))
        elif env.payloadType == CHECKPOINT:
            self.checkpoints.append(decode(payload, Checkpoint))
        elif env.payloadType == ALARM:
            self.alarms.append(decode(payload, GatewayAlarm))
        elif env.payloadType == HEARTBEAT:
            return
        elif env.payloadType == AUDIT:
            rec = decode(payload, AuditRecord)
            if self.stored.get((rec.boot_id, rec.audit_seq)) == payload:
                self.duplicates += 1  # a resend after a lost ack: idempotent
                return
            if chain.link(rec.chain_prev, rec.pair) != rec.chain_head:
                raise PeerDataError("chain_head does not link")
            if rec.pair.tag.seq <= self.last_pair.get(rec.boot_id, -1):
                raise PeerDataError("pair out of tag order")
            self.seqs[rec.boot_id].check(rec.audit_seq)
            self.last_pair[rec.boot_id] = rec.pair.tag.seq
            self.stored[(rec.boot_id, rec.audit_seq)] = payload
            self.audits.append(rec)
        else:
            raise PeerDataError("unknown type")

    async def _uplink(self, request: web.Request) -> web.Response:
        results, receipts = [], []
        for raw in json.loads(await request.read())["envelopes"]:
            env = decode(canonical(raw), Envelope)
            payload = json.loads(env.payload_bytes())
            kind = {AUDIT: "audit", BOOT: "boot", CHECKPOINT: "checkpoint", ALARM: "alarm",
                    HEARTBEAT: "heartbeat"}[env.payloadType]
            n = {"audit": payload.get("audit_seq", 0), "alarm": payload.get("seq", 0),
                 "checkpoint": payload.get("pairs_served", 0)}.get(kind, 0)
            status = "stored"
            try:
                self._accept(env)
                results.append({"ok": True, "error": ""})
            except PeerDataError as exc:
                self.refused.append(str(exc))
                results.append({"ok": False, "error": str(exc)})
                status = "refused"
            receipts.append(UplinkReceipt(digest=payload_digest(env.payload_bytes()),
                                          status=status, kind=kind,  # type: ignore[arg-type]
                                          boot_id=payload.get("boot_id"), n=n))
        ack = UplinkAck(gateway_id="gw-loop", results=receipts, time=time.time())
        return web.json_response({"results": results, "signed": to_builtins(
            sign_message(ACK, ack, self.signer))})

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class GatewayProc:
    def __init__(self, state: Path, model_dir: Path, receiver: Receiver,
                 epsilon: float) -> None:
        self.state, self.receiver, self.epsilon = state, receiver, epsilon
        model = tiny(model_dir)
        state.mkdir(parents=True, exist_ok=True)
        (state / "policy.json").write_bytes(canonical(model.policy))
        (state / "whitelist.json").write_bytes(model.whitelist_bytes)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def identity(self) -> dict[str, str]:
        out = subprocess.run([sys.executable, "-m", "ivp.cli", "gateway", "--state",
                              str(self.state), "--gateway-id", "gw-loop", "--print-identity"],
                             check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def start(self) -> None:
        log = open(self.state / "gateway.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([
            sys.executable, "-m", "ivp.cli", "gateway", "--state", str(self.state),
            "--gateway-id", "gw-loop", "--port", str(self.port),
            "--recomputer", self.receiver.url,
            "--recomputer-key", self.receiver.signer.verify_key.hex,
            "--policy", str(self.state / "policy.json"),
            "--whitelist", str(self.state / "whitelist.json"), "--epsilon", str(self.epsilon),
            "--checkpoint-interval", "0.5",
        ], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.state / "gateway.log").read_text()[-2000:]
            try:
                st = self.status()
                if st["server"] == "on":
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("gateway did not come up")

    def status(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(self.url + "/status", timeout=5) as r:
            return json.loads(r.read())

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def receiver():  # type: ignore[no-untyped-def]
    r = Receiver()
    yield r
    r.close()


def _upload_cli(url: str, model_dir: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "ivp.cli", "upload", url, str(model_dir),
                          "--model-id", MODEL_ID], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_real_gateway_boots_a_real_server_and_serves(
        tmp_path: Path, tiny_model_dir: Path, receiver: Receiver) -> None:
    gw = GatewayProc(tmp_path / "gw", tiny_model_dir, receiver, epsilon=1.0)
    receiver.key = VerifyKey.from_hex(gw.identity()["public_key"])
    gw.start()
    try:
        assert gw.status()["state"] == "upload"
        # a flipped byte in the last shard: POWER_KILL, the operator gets a clear 400
        model = tiny(tiny_model_dir)
        bad_dir = tmp_path / "bad"
        bad_dir.mkdir()
        last = model.manifest.files[-1].name
        files = []
        for f in model.manifest.files:
            data = (tiny_model_dir / f.name).read_bytes()
            if f.name == last:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            (bad_dir / f.name).write_bytes(data)
            files.append((bad_dir / f.name, f.size))
        from ivp.gateway.upload import upload_model

        bad = asyncio.run(upload_model(gw.url, bad_dir, MODEL_ID, files=files))
        assert bad["http_status"] == 400 and bad["state"] == "power_kill" and bad["file"] == last
        assert gw.status()["state"] == "upload"
        good = _upload_cli(gw.url, tiny_model_dir)
        assert good["state"] == "serving"

        async def traffic() -> list[tuple[int, Any]]:
            async with aiohttp.ClientSession() as s:
                out = []
                for path, body in (
                    ("/v1/completions", {"model": MODEL_ID, "prompt": "The quick brown",
                                         "max_tokens": 8, "temperature": 0.7}),
                    ("/v1/chat/completions", {"model": MODEL_ID, "max_tokens": 6,
                                              "messages": [{"role": "user", "content": "hi"}]}),
                    ("/v1/completions", {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 5,
                                         "stream": True, "top_k": 5}),
                ):
                    async with s.post(gw.url + path, json=body) as r:
                        out.append((r.status, await r.read()))
                return out

        answers = asyncio.run(traffic())
        assert [a[0] for a in answers] == [200, 200, 200]
        plain = json.loads(answers[0][1])
        assert len(plain["choices"][0]["token_ids"]) == 8
        assert answers[2][1].endswith(b"data: [DONE]\n\n")
        deadline = time.monotonic() + 20
        while len(receiver.audits) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert receiver.refused == []
        assert [a.kind for a in receiver.alarms] == ["power_kill"]  # the bad upload above
        assert [a.audit_seq for a in receiver.audits] == [1, 2, 3]
        assert receiver.audits[0].pair.output_token_ids == plain["choices"][0]["token_ids"]
        assert [b.boot_id for b in receiver.boots] == [good["boot_id"]]
    finally:
        gw.stop()


def test_kill_9_during_traffic_loses_no_released_pair(
        tmp_path: Path, tiny_model_dir: Path, receiver: Receiver) -> None:
    """Crash consistency: every response a client got is in an audit record (ε = 1),
    every boot's records chain from genesis, numbering has no gap, nothing refused."""
    gw = GatewayProc(tmp_path / "gw", tiny_model_dir, receiver, epsilon=1.0)
    receiver.key = VerifyKey.from_hex(gw.identity()["public_key"])
    received: dict[tuple[str, int], list[int]] = {}
    rng = random.Random(7)
    try:
        for _ in range(2):
            gw.start()
            assert _upload_cli(gw.url, tiny_model_dir)["state"] == "serving"
            # kill at a random moment once a random number of answers went out
            target = len(received) + rng.randint(3, 9)
            jitter = rng.uniform(0.0, 0.05)

            async def traffic(target: int, jitter: float) -> None:
                dead = False

                async def worker(s: aiohttp.ClientSession, i: int) -> None:
                    while not dead:
                        body = {"model": MODEL_ID, "prompt": f"request {i}", "max_tokens": 4}
                        try:
                            async with s.post(gw.url + "/v1/completions", json=body) as r:
                                if r.status == 200:
                                    a = json.loads(await r.read())
                                    tag = a["ivp"]["tag"]
                                    received[(tag["boot_id"], tag["seq"])] = \
                                        a["choices"][0]["token_ids"]
                        except (aiohttp.ClientError, ValueError):
                            return  # the gateway died under us

                async with aiohttp.ClientSession() as s:
                    workers = [asyncio.create_task(worker(s, i)) for i in range(6)]
                    deadline = time.monotonic() + 30
                    while len(received) < target and time.monotonic() < deadline:
                        await asyncio.sleep(0.005)
                    await asyncio.sleep(jitter)
                    gw.kill9()
                    dead = True
                    await asyncio.gather(*workers)

            asyncio.run(traffic(target, jitter))
        gw.start()  # recovery: undecided pairs drawn, open boots closed, spool drained
        deadline = time.monotonic() + 30
        while gw.status()["spool_depth"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert gw.status()["spool_depth"] == 0
    finally:
        gw.stop()
    assert receiver.refused == []
    assert len(received) >= 6
    audited = {(a.boot_id, a.pair.tag.seq): a for a in receiver.audits}
    missing = set(received) - set(audited)
    assert not missing, f"{len(missing)} released pair(s) lost"
    for key, ids in received.items():
        assert audited[key].pair.output_token_ids == ids
    for boot in receiver.boots:
        records = [a for a in receiver.audits if a.boot_id == boot.boot_id]
        assert sorted(a.audit_seq for a in records) == list(range(1, len(records) + 1))
        # ε = 1: every chain position of the boot is in exactly one record
        assert sorted(a.chain_pos for a in records) == list(range(1, len(records) + 1))
        by_prev = {a.chain_prev: a for a in records}
        head = chain.genesis("gw-loop", boot.boot_id)
        for _ in records:
            head = by_prev[head].chain_head
        final = [c for c in receiver.checkpoints if c.boot_id == boot.boot_id][-1]
        assert final.chain_head == head and final.pairs_served == len(records)
