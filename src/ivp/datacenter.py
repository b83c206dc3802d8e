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
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from ivp.protocol.encoding import canonical, to_builtins
from ivp.protocol.envelope import ADMIN, sign
from ivp.protocol.keys import SigningKey, VerifyKey
from ivp.protocol.messages import AdminRequest, NoiseBound, Whitelist
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
        """Two inspectors' keys, held in memory, and saved encrypted under a random
        passphrase in ``out_dir/passphrase`` (a demo stand-in for each inspector's own:
        ``IVP_KEY_PASSPHRASE_FILE=out_dir/passphrase ivp admin ... --key out_dir/us-1.key``)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(24)
        fd = os.open(out_dir / "passphrase", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        keys, entries = [], []
        for name, party in (("us-1", "US"), ("cn-1", "CN")):
            key = SigningKey.generate()
            key.save(out_dir / f"{name}.key", passphrase=secret.encode())
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
    stopped: bool = False  # stopped on purpose (not a crash)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        self.stopped = True
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@dataclass
class GatewayHandle:
    """One gateway of the datacenter (and the server it powers).

    ``uplink_url``: where the gateway sends its audit/BOOT/checkpoint envelopes (None:
    straight to the recomputer; the attack suite puts an operator-controlled tap there).
    ``reboot_interval``: the gateway's forced reboot period in seconds (0: off).
    ``enrol_url``: the URL enrolled for it (None: its own; the attack suite puts an
    operator-controlled proxy there). ``extra_args``: more ``ivp gateway`` flags.
    """

    gateway_id: str
    url: str
    state_dir: Path
    public_key: str
    process: Process | None = None
    attack: str | None = None
    trigger: Path | None = None
    uplink_url: str | None = None
    reboot_interval: float = 0.0
    enrol_url: str | None = None
    extra_args: tuple[str, ...] = ()
    server_port: int = 0
    device_args: list[str] = field(default_factory=list)  # e.g. --device tpm --tpm TCTI
    isolate: bool | None = None  # --isolate for this one (None: the datacenter's choice)


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
        recomputer_args: extra arguments of ``ivp recomputer`` (e.g.
            ``--allow-tamper-endpoint``).
        recomputer_launcher: how the recomputer process is started, before its
            ``recomputer`` sub-command (default ``-m ivp.cli``; the attack suite's own
            tests start it through ``ivp.attacks.knockouts`` to switch a defence off).
        prebuilt_model: an already built model directory to use instead of building one.
        recomputer_port: the recomputer's port (0: a free one).
        engine: the servers' engine, "reference" or "vllm" (run with vLLM's own
            Python, ``ivp.engine.vllm_env``); ``server_args``: more ``ivp server`` flags;
            ``noise_bound``: the δ the whitelisted manifest carries (calibrated for it);
            ``dtype``: the dtype the manifest and the gateways name (default: the
            config's).
        console: serve the recomputer's read-only inspectors' console on 127.0.0.1
            (``console_url``).
        device: the devices of the gateways and the recomputer: "soft" (key in a file)
            or "tpm" (each gets a software TPM of its own, swtpm, which the datacenter
            starts and stops).
        isolate: start every gateway with ``--isolate`` (root only): each server in its
            own network namespace, cgroup and bubblewrap sandbox.
        seal_uplink: gateways seal their uplink bodies to the recomputer's KEM key
            (``--recomputer-kem-key``); a gateway whose uplink crosses the attack suite's
            tap (``uplink_url``) does not, so that the tap can pick records by content.
    """

    root: Path
    gateways: int = 2
    epsilon: float = 0.2
    model: str = "tiny"
    attacks: dict[int, str] = field(default_factory=dict)
    checkpoint_interval: float = 5.0
    workers: int = 1
    log: Callable[[str], None] = lambda message: None
    recomputer_args: list[str] = field(default_factory=list)
    recomputer_launcher: tuple[str, ...] = ("-m", "ivp.cli")
    prebuilt_model: Path | None = None
    engine: str = "reference"
    server_args: tuple[str, ...] = ()
    noise_bound: NoiseBound | None = None
    dtype: str | None = None
    console: bool = True
    device: str = "soft"
    isolate: bool = False
    recomputer_port: int = 0
    seal_uplink: bool = True

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.procs: list[Process] = []
        self.handles: list[GatewayHandle] = []
        self.model_id = "tiny-llama" if self.model == "tiny" else self.model
        self.recomputer_url = ""
        self.console_url = ""
        self.recomputer_key = ""
        self.recomputer_kem_key = ""  # gateways seal their uplink to it (--seal-uplink)
        self._lock = threading.Lock()  # add_gateway may run in several threads
        self._named = 0
        self._tpms: list[Any] = []  # ivp.device.swtpm.Swtpm, one per TPM gateway

    # --- set-up ---------------------------------------------------------------------------
    def prepare_model(self) -> Path:
        if self.prebuilt_model is not None:
            return Path(self.prebuilt_model)
        if self.model == "tiny":
            from ivp.engine.tiny import HEAD_DIM, VLLM_HEAD_DIM, build_tiny_model

            return build_tiny_model(self.root / "model", head_dim=VLLM_HEAD_DIM
                                    if self.engine == "vllm" else HEAD_DIM)
        if self.model == "gemma-3-270m":
            from ivp.engine.gemma import prepare_gemma

            cache = Path(os.environ.get("IVP_CACHE", Path.home() / ".cache" / "ivp"))
            return prepare_gemma(cache / "gemma-3-270m")
        raise ValueError(f"unknown model {self.model!r} (tiny or gemma-3-270m)")

    def _spawn(self, name: str, args: list[str],
               launcher: Sequence[str] = ("-m", "ivp.cli")) -> Process:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        popen = subprocess.Popen(
            [sys.executable, *launcher, *args],
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
        self.manifest = make_manifest(self.model_dir, self.model_id, engine=self.engine,
                                      noise_bound=self.noise_bound, dtype=self.dtype)
        whitelist = Whitelist(version=1, expires=time.time() + 30 * 86400,
                              manifests=[self.manifest])
        self.whitelist_path = self.root / "whitelist.json"
        self.whitelist_path.write_bytes(sign_whitelist(whitelist, self.inspectors.keys).to_bytes())
        self.policy_path = str(self.root / "inspectors" / "policy.json")

        self.log("starting the recomputer")
        rc_state = self.root / "recomputer"
        rc_device: list[str] = []
        if self.device == "tpm":  # the recomputer's keys in a TPM of its own too
            from ivp.device.swtpm import Swtpm

            tpm = Swtpm(self.root / "tpms" / "recomputer")
            with self._lock:
                self._tpms.append(tpm)
            rc_device = ["--device", "tpm", "--tpm", tpm.tcti]
        ident = self._identity(["recomputer", "--state", str(rc_state), *rc_device])
        self.recomputer_key, self.recomputer_kem_key = ident["public_key"], ident["kem_public_key"]
        port = self.recomputer_port or free_port()
        self.recomputer_url = f"http://127.0.0.1:{port}"
        self._recomputer_args = [
            "recomputer", "--state", str(rc_state), "--port", str(port),
            "--policy", self.policy_path, "--whitelist", str(self.whitelist_path),
            "--model", f"{self.model_id}={self.model_dir}", "--workers", str(self.workers),
            "--checkpoint-period", str(self.checkpoint_interval), *rc_device,
            *self.recomputer_args,
        ]
        if self.console:
            console_port = free_port()
            self.console_url = f"http://127.0.0.1:{console_port}"
            self._recomputer_args += ["--console", "--console-port", str(console_port)]
        self.recomputer = self._spawn("recomputer", self._recomputer_args,
                                      self.recomputer_launcher)

        for i in range(self.gateways):
            self.handles.append(self._new_handle(attack=self.attacks.get(i)))
        self.wait_http(self.recomputer_url + "/status", "recomputer")
        if self.console_url:
            self.log(f"inspectors' console (read-only): {self.console_url}")
        self.log("enrolling the gateways (quorum of US + CN inspectors)")
        for h in self.handles:
            self.enrol(h)
        self.log("starting gateways and servers")
        for h in self.handles:
            self.start_gateway(h, self.policy_path)
        for h in self.handles:
            self.wait_http(h.url + "/status", h.gateway_id)
        self.log("uploading the whitelisted weights through every gateway")
        for h in self.handles:
            result = self.upload(h)
            if result.get("state") != "serving":
                raise RuntimeError(f"{h.gateway_id}: upload failed: {result}")
        self.wait_routable()

    def _new_handle(self, attack: str | None = None, uplink_url: str | None = None,
                    reboot_interval: float = 0.0) -> GatewayHandle:
        """A new gateway identity (gw-a, gw-b, ...): its device key is made inside it."""
        with self._lock:
            i, self._named = self._named, self._named + 1
        gid = f"gw-{chr(ord('a') + i)}" if i < 26 else f"gw-{i}"
        state = self.root / gid
        device_args = []
        if self.device == "tpm":
            from ivp.device.swtpm import Swtpm

            tpm = Swtpm(self.root / "tpms" / gid)
            with self._lock:
                self._tpms.append(tpm)
            device_args = ["--device", "tpm", "--tpm", tpm.tcti]
        ident = self._identity(["gateway", "--state", str(state), "--gateway-id", gid,
                                *device_args])
        return GatewayHandle(gid, f"http://127.0.0.1:{free_port()}", state,
                             ident["public_key"], attack=attack, uplink_url=uplink_url,
                             reboot_interval=reboot_interval, device_args=device_args)

    def start_gateway(self, h: GatewayHandle, policy: str) -> None:
        python = sys.executable
        if self.engine == "vllm":
            from ivp.engine.vllm_env import require_vllm_python

            python = require_vllm_python()
        server_cmd = " ".join([python, "-m", "ivp.cli", "server", "--host", "{host}", "--port",
                               "{port}", "--engine", self.engine, *self.server_args])
        isolate = self.isolate if h.isolate is None else h.isolate
        if isolate:
            server_cmd += " --weights-dir {weights}"
        if h.attack:
            h.trigger = self.root / f"{h.gateway_id}.attack"
            server_cmd += f" --attack {h.attack} --attack-trigger {h.trigger}"
        port = h.url.rsplit(":", 1)[1]
        h.server_port = free_port()
        h.process = self._spawn(h.gateway_id, [
            "gateway", "--state", str(h.state_dir), "--gateway-id", h.gateway_id,
            "--port", port, "--recomputer", h.uplink_url or self.recomputer_url,
            "--recomputer-key", self.recomputer_key, "--policy", policy,
            "--whitelist", str(self.whitelist_path), "--epsilon", str(self.epsilon),
            "--server-port", str(h.server_port), "--server-cmd", server_cmd,
            "--checkpoint-interval", str(self.checkpoint_interval),
            "--reboot-interval", str(h.reboot_interval), "--engine", self.engine,
            *(["--dtype", self.manifest.dtype] if self.dtype else []), *h.device_args,
            *(["--isolate"] if isolate else []),
            # sealed to the recomputer, unless the operator's tap must read the records
            *(["--recomputer-kem-key", self.recomputer_kem_key]
              if self.seal_uplink and h.uplink_url is None else []),
            *h.extra_args,
        ])

    def add_gateway(self, attack: str | None = None, *, uplink_url: str | None = None,
                    upload: bool = True, reboot_interval: float = 0.0,
                    extra_args: tuple[str, ...] = (),
                    enrol_url: Callable[[str], str] | None = None,
                    isolate: bool | None = None) -> int:
        """Enrol, start and (by default) boot one more gateway after :meth:`start`.

        Args:
            attack: server attack name (dormant until :meth:`trigger_attack`).
            uplink_url: where its uplink goes (default: the recomputer).
            upload: upload the whitelisted weights and wait until the recomputer routes
                to it; False leaves it powered in UPLOAD mode.
            reboot_interval: its forced reboot period in seconds (0: off).
            extra_args: more ``ivp gateway`` flags (e.g. ``--allow-tamper-endpoint``).
            enrol_url: given the gateway's URL, the URL to enrol instead (a proxy).
            isolate: start this one with (True) or without (False) ``--isolate``
                whatever the datacenter's ``isolate`` (None: as the datacenter).

        Returns:
            The new gateway's index in :attr:`handles`. Safe to call from several
            threads at once.
        """
        h = self._new_handle(attack, uplink_url, reboot_interval)
        h.extra_args = tuple(extra_args)
        h.isolate = isolate
        h.enrol_url = enrol_url(h.url) if enrol_url is not None else None
        with self._lock:
            self.handles.append(h)
            index = len(self.handles) - 1
        self.enrol(h)
        self.start_gateway(h, self.policy_path)
        self.wait_http(h.url + "/status", h.gateway_id)
        if upload:
            self.boot(index)
        return index

    def boot(self, index: int) -> dict[str, Any]:
        """Upload the whitelisted weights through gateway ``index`` and wait until the
        recomputer routes to it; the gateway's answer.

        Raises:
            RuntimeError: the gateway did not reach SERVING.
        """
        result = self.upload(self.handles[index])
        if result.get("state") != "serving":
            raise RuntimeError(f"{self.handles[index].gateway_id}: upload failed: {result}")
        self.wait_routable([index])
        return result

    def stop_gateway(self, index: int) -> None:
        """Stop one gateway process (its server goes with it)."""
        h = self.handles[index]
        if h.process is not None:
            h.process.stop()

    def kill_gateway(self, index: int) -> None:
        """kill -9 one gateway (its server dies with it): a power cut, or the operator."""
        h = self.handles[index]
        if h.process is not None and h.process.alive():
            h.process.stopped = True
            h.process.popen.kill()
            h.process.popen.wait()

    def restart_gateway(self, index: int) -> None:
        """Start gateway ``index`` again on its state directory (after a stop or kill)."""
        h = self.handles[index]
        self.start_gateway(h, self.policy_path)
        self.wait_http(h.url + "/status", h.gateway_id)

    def restart_recomputer(self, wait: bool = True, timeout: float = 60.0) -> Process:
        """Stop the recomputer and start it again on the same state and port.

        With ``wait``, waits until it answers HTTP again, or returns as soon as the new
        process has exited (a bricked recomputer refuses to start).
        """
        self.recomputer.stop()
        self.recomputer = self._spawn("recomputer", self._recomputer_args,
                                      self.recomputer_launcher)
        deadline = time.monotonic() + timeout
        while wait and time.monotonic() < deadline and self.recomputer.alive():
            try:
                self.get(self.recomputer_url + "/identity")
                break
            except OSError:
                time.sleep(0.2)
        return self.recomputer

    def enrol(self, h: GatewayHandle) -> dict[str, Any]:
        body = self.inspectors.admin_envelope("enrol_device", {
            "device_id": h.gateway_id, "public_key": h.public_key, "kind": "gateway",
            "url": h.enrol_url or h.url,
        })
        status, answer = self.post(self.recomputer_url + "/admin", body)
        if status != 200:
            raise RuntimeError(f"enrolment of {h.gateway_id} refused: {answer}")
        return answer

    def enrol_device(self, device_id: str, public_key: str, kind: str,
                     url: str = "") -> tuple[int, Any]:
        """Send an ``enrol_device`` admin request signed by both inspector parties."""
        args = {"device_id": device_id, "public_key": public_key, "kind": kind}
        if url:
            args["url"] = url
        body = self.inspectors.admin_envelope("enrol_device", args)
        return self.post(self.recomputer_url + "/admin", body)

    def upload(self, h: GatewayHandle, model_dir: Path | None = None,
               model_id: str | None = None) -> dict[str, Any]:
        """The operator's boot: stream ``model_dir`` (default: the whitelisted model)
        through gateway ``h``; the gateway's JSON answer plus ``http_status``."""
        from ivp.gateway.upload import upload_model

        return asyncio.run(upload_model(h.url, model_dir or self.model_dir,
                                        model_id or self.model_id))

    def post_sensors(self, envelopes: Sequence[dict[str, Any]]) -> tuple[int, Any]:
        """POST signed sensor readings to the recomputer's ``/sensors``."""
        body = json.dumps({"envelopes": list(envelopes)}).encode()
        return self.post(self.recomputer_url + "/sensors", body)

    def wait_http(self, url: str, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.get(url)
                return
            except OSError:
                for p in self.procs:
                    if not p.alive() and not p.stopped:
                        raise RuntimeError(f"{p.name} exited; see {p.log}") from None
                time.sleep(0.2)
        raise RuntimeError(f"{what} did not come up at {url} within {timeout:.0f} s")

    def wait_routable(self, indices: Sequence[int] | None = None,
                      timeout: float = 60.0) -> None:
        """Wait until the recomputer has the BOOT record of every gateway in ``indices``
        (default: all), i.e. it can route to them."""
        handles = self.handles if indices is None else [self.handles[i] for i in indices]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            serving = self.recomputer_status().get("gateways", {})
            if all(serving.get(h.gateway_id, {}).get("state") == "serving"
                   and serving.get(h.gateway_id, {}).get("healthy", True)
                   for h in handles):
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
        """Wait until every audit record of the pairs served so far is at the recomputer
        and verified: each gateway has made every draw (``settling`` 0), then finished
        two uplink rounds (the first may have begun before the last record was spooled)
        and left nothing spooled; and the recomputer's queue is empty."""
        deadline = time.monotonic() + timeout
        settled: dict[int, int] = {}  # gateway -> its uplink rounds when all were drawn
        while time.monotonic() < deadline:
            waiting = False
            for i, h in enumerate(self.handles):
                if h.process is None or not h.process.alive():
                    continue
                try:
                    st = self.gateway_status(i)
                except OSError:
                    waiting = True
                    continue
                if "uplink" not in st:  # bricked, or built without one: nothing will leave
                    continue
                rounds = int(st["uplink"].get("rounds", 0))
                if st.get("settling", 0):
                    settled.pop(i, None)
                    waiting = True
                elif i not in settled:
                    settled[i], waiting = rounds, True
                elif rounds < settled[i] + 2 or int(st.get("spool_depth", 0)):
                    waiting = True
            if not waiting and int(self.recomputer_status().get("queue_depth", 0)) == 0:
                return
            time.sleep(0.3)
        raise RuntimeError("audit queue did not drain in time")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        for tpm in self._tpms:
            tpm.stop()

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
