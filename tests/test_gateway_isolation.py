"""`ivp gateway --isolate`: the server is held by the kernel (ivp.gateway.isolation).

Root only (namespaces, nftables, cgroups, mounts). Each test makes its own sandbox and
removes it; `no_sandbox_left` checks that nothing stays behind.
"""

from __future__ import annotations

import ast
import asyncio
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ivp.errors import MisuseError
from ivp.gateway.isolation import IsolatedPower, Sandbox, check_can_isolate


def _why_not() -> str | None:
    try:
        check_can_isolate()
    except MisuseError as exc:
        return str(exc)
    return None


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    missing = _why_not()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    state = tmp_path / "gw"
    state.mkdir()
    box = Sandbox.for_state(state)
    box.setup()
    try:
        yield box
    finally:
        box.teardown()
        assert_gone(box)


def assert_gone(box: Sandbox) -> None:
    assert box.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                           text=True).stdout
    assert box.host_if not in subprocess.run(["ip", "-o", "link"], capture_output=True,
                                             text=True).stdout
    assert box.table not in subprocess.run(["nft", "list", "tables"], capture_output=True,
                                           text=True).stdout
    assert not box.cgroup.exists() and not os.path.ismount(box.ram)


def test_isolate_without_root_is_refused_with_a_clear_message(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ivp.cli import app

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(MisuseError, match="--isolate needs root"):
        check_can_isolate()
    for name in ("policy.json", "wl.json"):
        (tmp_path / name).write_text("{}")
    result = CliRunner().invoke(app, [
        "gateway", "--state", str(tmp_path / "gw"), "--isolate",
        "--policy", str(tmp_path / "policy.json"), "--whitelist", str(tmp_path / "wl.json")])
    assert result.exit_code == 2
    assert "--isolate needs root" in result.output


def test_setup_after_a_killed_gateway_starts_clean(sandbox: Sandbox) -> None:
    """A gateway killed with -9 leaves its sandbox; the next start removes and remakes it."""
    again = Sandbox(sandbox.tag, sandbox.hide)
    again.setup()  # over the live one: torn down first, then made anew
    assert sandbox.netns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                           text=True).stdout
    assert os.path.ismount(sandbox.ram)


def test_sandbox_of_a_killed_gateway_is_swept(sandbox: Sandbox, tmp_path: Path) -> None:
    """A gateway killed with -9 cannot clean up; the next isolated gateway to start on
    this host removes its sandbox (its RAM mount included), and no live one's."""
    from ivp.gateway.isolation import RUN_DIR, sweep_orphans

    other_state = tmp_path / "killed-gw"
    other_state.mkdir()
    dead = Sandbox.for_state(other_state)
    dead.setup()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that is gone
    (RUN_DIR / dead.tag / "owner").write_text(f"{child.pid}\n")
    assert sweep_orphans() == [dead.tag]
    assert_gone(dead)
    assert os.path.ismount(sandbox.ram)  # the live one (owned by this process) stays


# A rogue server: it serves one page on its veth address, and tries, when asked, every
# way out it can think of; each line of its answer says how the attempt ended.
ROGUE = r'''
import http.server, os, socket, sys
ip, targets = sys.argv[1], sys.argv[2:]
def attempts():
    out = []
    for target in targets:
        host, port = target.rsplit(":", 1)
        s = socket.socket(); s.settimeout(3)
        try:
            s.connect((host, int(port))); out.append(f"tcp {target} CONNECTED")
        except OSError as e:
            out.append(f"tcp {target} {e.errno}")
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.sendto(b"x", ("192.0.2.1", 53)); out.append("udp 192.0.2.1:53 SENT")
    except OSError as e:
        out.append(f"udp 192.0.2.1:53 {e.errno}")
    for path in ("/tmp/ivp-escape", os.path.expanduser("~/weights.bin")):
        try:
            open(path, "w").write("x"); out.append(f"write {path} OK")
        except OSError as e:
            out.append(f"write {path} {e.errno}")
    out.append(f"pids {sorted(int(p) for p in os.listdir('/proc') if p.isdigit())}")
    return "\n".join(out)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = attempts().encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer((ip, 18778), H).serve_forever()
'''


class Listener:
    """A TCP listener that records whether anyone connected (a target of the rogue)."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.sock.settimeout(0.2)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


async def _get(host: str, port: int) -> str:
    for _ in range(300):
        try:
            reader, writer = await asyncio.open_connection(host, port)
            break
        except OSError:
            await asyncio.sleep(0.05)
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data.decode().split("\r\n\r\n", 1)[1]


def test_direct_connections_fail_in_the_kernel_and_the_gateway_notices(
        sandbox: Sandbox, tmp_path: Path) -> None:
    """Red team: the server tries the recomputer (loopback), the host's services through
    its gateway's own address, another gateway and an outside address. Each attempt
    fails in the kernel, no listener ever sees a connection, and the counters the
    gateway reads report the attempts (the alarm server_network)."""
    other_state = tmp_path / "other-gw"
    other_state.mkdir()
    other = Sandbox.for_state(other_state)
    other.setup()
    recomputer = Listener("127.0.0.1")
    host_service = Listener("0.0.0.0")
    alarms: list[str] = []

    async def body() -> str:
        power = IsolatedPower(sandbox, [
            sys.executable, "-c", ROGUE, sandbox.server_ip,
            f"127.0.0.1:{recomputer.port}", f"{sandbox.gateway_ip}:{host_service.port}",
            f"{other.gateway_ip}:{host_service.port}", f"{other.server_ip}:18778",
            "192.0.2.1:80"], log_path=tmp_path / "server.log", poll=0.1)
        power.on_net_attempt(alarms.append)
        await power.power_on()
        try:
            answer = await _get(sandbox.server_ip, 18778)  # the gateway reaches it
            grown = await power.check_counters()
            return answer + f"\nlate {grown}"
        finally:
            await power.power_off()

    try:
        answer = asyncio.run(body())
    finally:
        recomputer.close()
        host_service.close()
        other.teardown()
    lines = dict(line.rsplit(" ", 1) for line in answer.splitlines() if line[:3] in (
        "tcp", "udp", "wri"))
    assert lines == {
        f"tcp 127.0.0.1:{recomputer.port}": "111",  # ECONNREFUSED: its own loopback
        f"tcp {sandbox.gateway_ip}:{host_service.port}": "111",  # rejected by nftables
        f"tcp {other.gateway_ip}:{host_service.port}": "101",  # ENETUNREACH: no route
        f"tcp {other.server_ip}:18778": "101",
        "tcp 192.0.2.1:80": "101",
        "udp 192.0.2.1:53": "101",
        "write /tmp/ivp-escape": "30",  # EROFS: the whole file system is read-only
        f"write {sandbox.ram}/weights.bin": "OK",  # its RAM directory is its only place
    }, answer
    assert recomputer.connections == 0 and host_service.connections == 0
    assert not Path("/tmp/ivp-escape").exists()
    pids = next(line for line in answer.splitlines() if line.startswith("pids"))
    assert max(ast.literal_eval(pids[5:])) < 10  # own PID namespace: no host process seen
    assert alarms, "the gateway noticed nothing"
    text = " ".join(alarms)
    assert "rejected" in text and "no route" in text and "TCP connection" in text


DAEMON = r'''
import os, sys, time
open(os.path.join(os.environ["HOME"], "weights.bin"), "wb").write(b"w" * 4096)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open(os.path.join(os.environ["HOME"], "daemon.pid"), "w").write(str(os.getpid()))
        while True:
            time.sleep(1)
    os._exit(0)
while True:
    time.sleep(1)
'''


def test_power_kill_kills_the_whole_cgroup_and_frees_the_ram(sandbox: Sandbox,
                                                            tmp_path: Path) -> None:
    """A server that hides a daemon outside its process group (setsid, double fork)
    still loses it at POWER_KILL, and its RAM mount with the weights is gone."""
    async def body() -> None:
        power = IsolatedPower(sandbox, [sys.executable, "-c", DAEMON],
                              log_path=tmp_path / "server.log")
        await power.power_on()
        for _ in range(200):
            if (sandbox.ram / "daemon.pid").exists():
                break
            await asyncio.sleep(0.05)
        assert (sandbox.ram / "weights.bin").stat().st_size == 4096
        assert len(sandbox.processes()) >= 3  # bwrap, the server, the daemon
        await power.power_off()
        assert sandbox.processes() == []
        assert not os.path.ismount(sandbox.ram) and not (sandbox.ram / "weights.bin").exists()
        await power.power_on()  # a fresh RAM mount at the next power on
        assert os.path.ismount(sandbox.ram)
        await power.power_off()

    asyncio.run(body())


def test_isolated_datacenter_serves_and_audits_honest_traffic(tmp_path: Path) -> None:
    """The whole path under --isolate: upload into the sandboxed server's RAM mount,
    serve through the veth, audit at the recomputer; no network attempt, no alarm."""
    missing = _why_not()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    from ivp.demo.datacenter import LoopbackDatacenter

    with LoopbackDatacenter(tmp_path / "dc", gateways=1, epsilon=1.0, isolate=True) as dc:
        box = Sandbox.for_state(dc.handles[0].state_dir)
        assert os.path.ismount(box.ram) and list(box.ram.glob("*.safetensors"))
        answers = dc.send(4, concurrency=2, max_tokens=8)
        assert all(a["status"] == 200 for a in answers), answers[:2]
        dc.drain()
        verdicts = dc.verdicts()
        assert len(verdicts) == 4 and all(v["passed"] for v in verdicts), verdicts[:2]
        assert dc.alarms() == []
    assert_gone(box)  # the gateway removed its sandbox when it stopped


def test_each_counted_attempt_becomes_the_gateway_alarm_server_network() -> None:
    """The CLI's wiring: what IsolatedPower reports is raised as the signed gateway
    alarm server_network (which the uplink carries to the recomputer)."""
    from ivp.gateway.cli import _alarm_on_network_attempts

    raised: list[tuple[str, str]] = []

    class Core:
        async def alarm(self, kind: str, message: str) -> None:
            raised.append((kind, message))

    class Power:
        def on_net_attempt(self, callback):  # type: ignore[no-untyped-def]
            self.callback = callback

    power = Power()
    _alarm_on_network_attempts(Core(), power)

    async def body() -> None:
        power.callback("1 TCP connection attempt(s)")
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(body())
    assert raised == [("server_network", "1 TCP connection attempt(s)")]
