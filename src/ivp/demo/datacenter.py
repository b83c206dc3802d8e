"""A whole datacenter on loopback: recomputer, gateways and their servers as processes.

Used by `ivp demo`, by the attack suite and by the test suite's shared fixture. It
plays every human role of the note in software: the inspectors (two parties, US and
CN, whose keys sign the whitelist and enrol the gateways), the operator (who uploads
the weights through each gateway and can flip a server into cheating) and the clients
(who send INPUT requests to the recomputer). The gateways and the recomputer learn of
a cheat only through the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from ivp.protocol.encoding import canonical, to_builtins
from ivp.protocol.envelope import ADMIN, sign
from ivp.protocol.keys import SigningKey, VerifyKey
from ivp.protocol.messages import AdminRequest, Whitelist
from ivp.protocol.quorum import InspectorKey, QuorumPolicy
from ivp.whitelist import make_manifest, sign_whitelist

PROMPTS = (
    "The gateway logs every request",
    "Tell me about the weather in",
    "Once upon a time there was a",
    "The inspectors arrived at the datacenter",
    "A short poem about silicon:",
    "Explain why interconnect matters for training",
    "List three colours:",
    "The recomputer checks a random sample of",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Inspectors:
    """Two inspector parties; every admin request and whitelist needs both."""

    keys: list[SigningKey]
    policy: QuorumPolicy

    @classmethod
    def create(cls, out_dir: Path) -> Inspectors:
        out_dir.mkdir(parents=True, exist_ok=True)
        keys, entries = [], []
        for name, party in (("us-1", "US"), ("cn-1", "CN")):
            key = SigningKey.generate()
            key.save(out_dir / f"{name}.key")
            keys.append(key)
            entries.append(InspectorKey(keyid=key.keyid, party=party,
                                        public_key=key.verify_key.hex, name=name))
        policy = QuorumPolicy(threshold=2, keys=entries, required_parties=["US", "CN"])
        (out_dir / "policy.json").write_bytes(canonical(policy))
        return cls(keys, policy)

    def admin_envelope(self, instruction: str, args: dict[str, Any],
                       ttl: float = 300.0, signers: Sequence[SigningKey] | None = None) -> bytes:
        request = AdminRequest(instruction=instruction, args=args,  # type: ignore[arg-type]
                               nonce=secrets.token_hex(16), expires=time.time() + ttl)
        keys = self.keys if signers is None else signers
        return sign(ADMIN, canonical(request), keys).to_bytes()


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@dataclass
class GatewayHandle:
    gateway_id: str
    url: str
    state_dir: Path
    public_key: str
    process: Process | None = None
    attack: str | None = None
    trigger: Path | None = None


@dataclass
class LoopbackDatacenter:
    """Build, start and drive a datacenter on 127.0.0.1.

    Args:
        root: run directory (keys, model, state and logs of every process).
        gateways: number of gateway+server pairs.
        epsilon: audit sampling probability ε of every gateway.
        model: "tiny" (random-weight test model) or "gemma-3-270m".
        attacks: gateway index -> server attack name (the cheat lives only in that
            server process and stays dormant until :meth:`trigger_attack`).
    """

    root: Path
    gateways: int = 2
    epsilon: float = 0.2
    model: str = "tiny"
    attacks: dict[int, str] = field(default_factory=dict)
    checkpoint_interval: float = 5.0
    workers: int = 1
    log: Callable[[str], None] = lambda message: None

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.procs: list[Process] = []
        self.handles: list[GatewayHandle] = []
        self.model_id = "tiny-llama" if self.model == "tiny" else self.model
        self.recomputer_url = ""
        self.recomputer_key = ""

    # --- set-up ---------------------------------------------------------------------------
    def prepare_model(self) -> Path:
        if self.model == "tiny":
            from ivp.engine.tiny import build_tiny_model

            return build_tiny_model(self.root / "model")
        if self.model == "gemma-3-270m":
            from ivp.engine.gemma import prepare_gemma

            cache = Path(os.environ.get("IVP_CACHE", Path.home() / ".cache" / "ivp"))
            return prepare_gemma(cache / "gemma-3-270m")
        raise ValueError(f"unknown model {self.model!r} (tiny or gemma-3-270m)")

    def _spawn(self, name: str, args: list[str]) -> Process:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        popen = subprocess.Popen(
            [sys.executable, "-m", "ivp.cli", *args],
            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env,  # noqa: SIM115
            start_new_session=True,
        )
        proc = Process(name, popen, log)
        self.procs.append(proc)
        return proc

    def _identity(self, args: list[str]) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "ivp.cli", *args, "--print-identity"],
                             check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.log("building and whitelisting the model")
        self.model_dir = self.prepare_model()
        self.inspectors = Inspectors.create(self.root / "inspectors")
        self.manifest = make_manifest(self.model_dir, self.model_id)
        whitelist = Whitelist(version=1, expires=time.time() + 30 * 86400,
                              manifests=[self.manifest])
        self.whitelist_path = self.root / "whitelist.json"
        self.whitelist_path.write_bytes(sign_whitelist(whitelist, self.inspectors.keys).to_bytes())
        policy = str(self.root / "inspectors" / "policy.json")

        self.log("starting the recomputer")
        rc_state = self.root / "recomputer"
        self.recomputer_key = self._identity(["recomputer", "--state", str(rc_state)])["public_key"]
        port = free_port()
        self.recomputer_url = f"http://127.0.0.1:{port}"
        self._spawn("recomputer", [
            "recomputer", "--state", str(rc_state), "--port", str(port), "--policy", policy,
            "--whitelist", str(self.whitelist_path),
            "--model", f"{self.model_id}={self.model_dir}", "--workers", str(self.workers),
            "--checkpoint-period", str(self.checkpoint_interval),
        ])

        for i in range(self.gateways):
            gid = f"gw-{chr(ord('a') + i)}"
            state = self.root / gid
            ident = self._identity(["gateway", "--state", str(state), "--gateway-id", gid])
            handle = GatewayHandle(gid, f"http://127.0.0.1:{free_port()}", state,
                                   ident["public_key"], attack=self.attacks.get(i))
            self.handles.append(handle)
        self.wait_http(self.recomputer_url + "/status", "recomputer")
        self.log("enrolling the gateways (quorum of US + CN inspectors)")
        for h in self.handles:
            self.enrol(h)
        self.log("starting gateways and servers")
        for h in self.handles:
            self.start_gateway(h, policy)
        for h in self.handles:
            self.wait_http(h.url + "/status", h.gateway_id)
        self.log("uploading the whitelisted weights through every gateway")
        for h in self.handles:
            result = self.upload(h)
            if result.get("state") != "serving":
                raise RuntimeError(f"{h.gateway_id}: upload failed: {result}")
        self.wait_routable()

    def start_gateway(self, h: GatewayHandle, policy: str) -> None:
        server_cmd = f"{sys.executable} -m ivp.cli server --port {{port}}"
        if h.attack:
            h.trigger = self.root / f"{h.gateway_id}.attack"
            server_cmd += f" --attack {h.attack} --attack-trigger {h.trigger}"
        port = h.url.rsplit(":", 1)[1]
        h.process = self._spawn(h.gateway_id, [
            "gateway", "--state", str(h.state_dir), "--gateway-id", h.gateway_id,
            "--port", port, "--recomputer", self.recomputer_url,
            "--recomputer-key", self.recomputer_key, "--policy", policy,
            "--whitelist", str(self.whitelist_path), "--epsilon", str(self.epsilon),
            "--server-port", str(free_port()), "--server-cmd", server_cmd,
            "--checkpoint-interval", str(self.checkpoint_interval),
        ])

    def enrol(self, h: GatewayHandle) -> dict[str, Any]:
        body = self.inspectors.admin_envelope("enrol_device", {
            "device_id": h.gateway_id, "public_key": h.public_key, "kind": "gateway",
            "url": h.url,
        })
        status, answer = self.post(self.recomputer_url + "/admin", body)
        if status != 200:
            raise RuntimeError(f"enrolment of {h.gateway_id} refused: {answer}")
        return answer

    def upload(self, h: GatewayHandle) -> dict[str, Any]:
        from ivp.gateway.upload import upload_model

        return asyncio.run(upload_model(h.url, self.model_dir, self.model_id))

    def wait_http(self, url: str, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.get(url)
                return
            except OSError:
                for p in self.procs:
                    if not p.alive():
                        raise RuntimeError(f"{p.name} exited; see {p.log}") from None
                time.sleep(0.2)
        raise RuntimeError(f"{what} did not come up at {url} within {timeout:.0f} s")

    def wait_routable(self, timeout: float = 60.0) -> None:
        """Wait until the recomputer has every gateway's BOOT record (it can route)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            serving = self.recomputer_status().get("gateways", {})
            if all(serving.get(h.gateway_id, {}).get("state") == "serving"
                   for h in self.handles):
                return
            time.sleep(0.2)
        raise RuntimeError("recomputer never saw every gateway's BOOT record")

    # --- driving --------------------------------------------------------------------------
    def trigger_attack(self, index: int) -> None:
        h = self.handles[index]
        if h.trigger is None:
            raise ValueError(f"{h.gateway_id} has no attack configured")
        h.trigger.write_text("on\n")

    def get(self, url: str) -> Any:
        import urllib.request

        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    def post(self, url: str, body: bytes) -> tuple[int, Any]:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def recomputer_status(self) -> dict[str, Any]:
        return self.get(self.recomputer_url + "/status")

    def gateway_status(self, index: int) -> dict[str, Any]:
        return self.get(self.handles[index].url + "/status")

    def verdicts(self) -> list[dict[str, Any]]:
        return self.get(self.recomputer_url + "/verdicts")

    def alarms(self) -> list[dict[str, Any]]:
        return self.get(self.recomputer_url + "/alarms")

    def send(self, count: int, *, concurrency: int = 4, max_tokens: int = 24,
             stop_when: Callable[[], bool] | None = None,
             on_done: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Send ``count`` INPUT requests through the recomputer; return the answers."""
        return asyncio.run(self._send(count, concurrency, max_tokens, stop_when, on_done))

    async def _send(self, count: int, concurrency: int, max_tokens: int,
                    stop_when: Callable[[], bool] | None,
                    on_done: Callable[[int, dict[str, Any]], None] | None,
                    ) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        next_index = 0
        stopped = False

        async def worker(session: aiohttp.ClientSession) -> None:
            nonlocal next_index, stopped
            while not stopped and next_index < count:
                i = next_index
                next_index += 1
                body = self.request_body(i, max_tokens)
                path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                async with session.post(self.recomputer_url + path, json=body) as r:
                    answer = {"status": r.status, "body": await r.json(content_type=None)}
                results.append(answer)
                if on_done:
                    on_done(i, answer)
                if stop_when is not None and await asyncio.to_thread(stop_when):
                    stopped = True

        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return results

    def request_body(self, i: int, max_tokens: int) -> dict[str, Any]:
        """A varied mix: plain and chat, greedy and sampled, top-k and top-p."""
        prompt = PROMPTS[i % len(PROMPTS)]
        body: dict[str, Any] = {"model": self.model_id, "max_tokens": max_tokens}
        if i % 3 == 2:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        kind = i % 4
        if kind == 0:
            body["temperature"] = 0.0
        elif kind == 1:
            body["temperature"] = 1.0
        elif kind == 2:
            body.update(temperature=0.8, top_k=40)
        else:
            body.update(temperature=0.7, top_p=0.9)
        return body

    def drain(self, timeout: float = 300.0) -> None:
        """Wait until every gateway's spool is empty and the recomputer queue is empty."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spools = 0
            for i, h in enumerate(self.handles):
                if h.process is not None and h.process.alive():
                    with contextlib.suppress(OSError):
                        spools += int(self.gateway_status(i).get("spool_depth", 0))
            if spools == 0 and int(self.recomputer_status().get("queue_depth", 0)) == 0:
                return
            time.sleep(0.3)
        raise RuntimeError("audit queue did not drain in time")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    def __enter__(self) -> LoopbackDatacenter:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def verdict_counts(verdicts: list[dict[str, Any]]) -> dict[str, int]:
    passed = sum(1 for v in verdicts if v["passed"])
    return {"audited": len(verdicts), "passed": passed, "failed": len(verdicts) - passed}


def public_json(obj: object) -> str:
    return json.dumps(to_builtins(obj), sort_keys=True)


__all__ = ["GatewayHandle", "Inspectors", "LoopbackDatacenter", "VerifyKey", "verdict_counts"]
