"""A newcomer at the command line: clean one-line errors (each fails locally, before
anything is sent or started), `ivp --version`, `ivp model`, `ivp status` / `ivp alarms`
tables, and `ivp demo --serve` used with the real `openai` package."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

IVP = [sys.executable, "-m", "ivp.cli"]


def ivp(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IVP_KEY_PASSPHRASE": "a passphrase for the tests"}
    return subprocess.run([*IVP, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield int(s.getsockname()[1])


@pytest.fixture
def listener() -> Iterator[tuple[str, socket.socket]]:
    """A URL whose port listens but never answers: a command that sends anything
    leaves a connection waiting there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        s.setblocking(False)
        yield f"http://127.0.0.1:{s.getsockname()[1]}", s


def _nothing_sent(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


def _one_clean_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and "listening" not in out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.mark.parametrize("command", [
    ["server"],
    ["recomputer", "--policy", "policy.json"],
    ["gateway", "--policy", "p.json", "--whitelist", "w.json", "--recomputer-key", "ab" * 32],
])
def test_port_already_in_use_is_one_line_exit_2(tmp_path: Path, busy_port: int,
                                                command: list[str]) -> None:
    from ivp.protocol.encoding import canonical
    from ivp.protocol.keys import SigningKey
    from ivp.protocol.quorum import InspectorKey, QuorumPolicy

    key = SigningKey.generate()
    (tmp_path / "policy.json").write_bytes(canonical(QuorumPolicy(threshold=1, keys=[
        InspectorKey(keyid=key.keyid, party="US", public_key=key.verify_key.hex)])))
    name = command[0]
    args = [*command, "--port", str(busy_port)]
    if name != "server":
        args += ["--state", str(tmp_path / "state")]
    out = subprocess.run([*IVP, *args], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    line = _one_clean_line(out)
    assert line == (f"ivp {name}: cannot listen on 127.0.0.1:{busy_port}: port {busy_port} "
                    "is already in use (stop what holds it, or choose another --port)")


def test_gateway_without_recomputer_key_refuses_to_start(tmp_path: Path) -> None:
    """Attack: a gateway started without the recomputer's key could never obey a
    Shutdown: caught, it would keep serving. It does not start."""
    out = ivp("gateway", "--state", str(tmp_path / "s"), "--policy", "p.json",
              "--whitelist", "w.json")
    line = _one_clean_line(out)
    assert "--recomputer-key is required" in line and "keep serving" in line
    assert not (tmp_path / "s" / "log.sqlite").exists()
    out = ivp("gateway", "--state", str(tmp_path / "s"), "--policy", "p.json",
              "--whitelist", "w.json", "--recomputer-key", "not-hex")
    assert "--recomputer-key: expected the recomputer's public key" in _one_clean_line(out)


def test_admin_enrol_without_a_key_fails_locally(listener) -> None:
    url, sock = listener
    out = ivp("admin", "enrol", url, "--device-id", "gw-a", "--public-key", "ab" * 32)
    line = _one_clean_line(out)
    assert "give at least one --key" in line and "Nothing was sent" in line
    assert _nothing_sent(sock)


def test_admin_send_of_a_broken_file_fails_locally(tmp_path: Path, listener) -> None:
    url, sock = listener
    for name, data, why in (
            ("junk.json", b"{not json", "not a request that can be sent"),
            ("other.json", json.dumps({"payloadType": "x", "payload": "", "signatures": []}
                                      ).encode(), "not an admin request"),
    ):
        (tmp_path / name).write_bytes(data)
        line = _one_clean_line(ivp("admin", "send", url, str(tmp_path / name)))
        assert why in line and "Nothing was sent" in line, line
    line = _one_clean_line(ivp("admin", "send", url, str(tmp_path / "missing.json")))
    assert "missing.json" in line and "No such file" in line
    assert _nothing_sent(sock)


def test_admin_send_of_an_unsigned_request_fails_locally(tmp_path: Path, listener) -> None:
    url, sock = listener
    request = tmp_path / "req.json"
    out = ivp("admin", "request", "set_epsilon", "--args", '{"epsilon": 0.1}', "--out",
              str(request))
    assert out.returncode == 0, out.stderr
    line = _one_clean_line(ivp("admin", "send", url, str(request)))
    assert "not signed" in line and _nothing_sent(sock)


def test_upload_of_a_malformed_url_says_so(tmp_path: Path) -> None:
    line = _one_clean_line(ivp("upload", "not-a-url", str(tmp_path), "--model-id", "m"))
    assert line == ("ivp upload: 'not-a-url' is a malformed URL: expected http://HOST:PORT of "
                    "a gateway, e.g. http://127.0.0.1:8200")
    line = _one_clean_line(ivp("upload", "http://127.0.0.1:99999", str(tmp_path),
                               "--model-id", "m"))
    assert "malformed URL" in line


def test_signing_a_whitelist_with_a_key_outside_the_policy_warns(tmp_path: Path,
                                                                 tiny_model_dir: Path) -> None:
    for name, party in (("us-1", "US"), ("cn-1", "CN"), ("stranger", "US")):
        assert ivp("keys", "new", "--out", str(tmp_path), "--name", name, "--party",
                   party).returncode == 0
    assert ivp("keys", "policy", str(tmp_path / "us-1.pub.json"),
               str(tmp_path / "cn-1.pub.json"), "--threshold", "2", "--require", "US",
               "--require", "CN", "--out", str(tmp_path / "policy.json")).returncode == 0
    assert ivp("whitelist", "manifest", str(tiny_model_dir), "--model-id", "tiny",
               "--out", str(tmp_path / "m.json")).returncode == 0
    out = ivp("whitelist", "build", "--manifest", str(tmp_path / "m.json"), "--version", "1",
              "--expires-days", "1", "--key", str(tmp_path / "stranger.key"), "--policy",
              str(tmp_path / "policy.json"), "--out", str(tmp_path / "wl.json"))
    assert out.returncode == 0 and "warning: key" in out.stderr
    assert "is not an inspector key of" in out.stderr
    out = ivp("whitelist", "sign", str(tmp_path / "wl.json"), "--key",
              str(tmp_path / "us-1.key"), "--policy", str(tmp_path / "policy.json"))
    assert out.returncode == 0 and "warning" not in out.stderr


def test_version() -> None:
    from importlib.metadata import version

    out = ivp("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"ivp {version('ivp')}"


def test_model_tiny_builds_the_model_a_datacenter_needs(tmp_path: Path,
                                                        tiny_model_dir: Path) -> None:
    out = ivp("model", "tiny", "--out", str(tmp_path / "tiny"))
    assert out.returncode == 0 and "random-weight" in out.stdout
    built = sorted(p.name for p in (tmp_path / "tiny").iterdir())
    assert built == sorted(p.name for p in tiny_model_dir.iterdir())
    for name in built:  # deterministic: the same files as the tests' own build
        assert (tmp_path / "tiny" / name).read_bytes() == (tiny_model_dir / name).read_bytes()


# --- status tables -------------------------------------------------------------------------
def test_status_and_alarms_print_80_column_tables_or_json(datacenter) -> None:
    datacenter.send(2, max_tokens=4)
    env = {**os.environ, "COLUMNS": "200"}  # a wide terminal: tables still fit 80
    for url in (datacenter.recomputer_url, datacenter.handles[0].url):
        for command in ("status", "alarms"):
            out = subprocess.run([*IVP, command, url], capture_output=True, text=True,
                                 timeout=60, env=env)
            assert out.returncode == 0, out.stderr
            lines = out.stdout.splitlines()
            assert lines and all(len(line) <= 80 for line in lines), out.stdout
            raw = subprocess.run([*IVP, command, url, "--json"], capture_output=True,
                                 text=True, timeout=60)
            assert raw.returncode == 0
            json.loads(raw.stdout)
    out = ivp("status", datacenter.recomputer_url)
    assert "gw-a" in out.stdout and "serving" in out.stdout and "tiny-llama" in out.stdout
    out = ivp("status", datacenter.handles[0].url)
    assert "pairs served" in out.stdout and "serving" in out.stdout


def test_status_tables_fit_80_columns_with_long_names() -> None:
    from rich.console import Console

    from ivp.recomputer.tables import alarm_table, recomputer_status

    data = {"keyid": "k" * 64, "mode": "tolerant", "queue_depth": 3,
            "whitelist": {"version": 9, "models": ["m" * 50]},
            "verdicts": {"passed": 10**9, "failed": 10**9}, "alarms": 5, "open_alarms": 5,
            "gateways": {f"gateway-with-a-long-name-{i}": {
                "state": "serving", "healthy": True, "model_id": "a-very-long-model-id" * 3,
                "pairs_served": 10**12, "audits_received": 10**9,
                "verdicts": {"passed": 10**9, "failed": 10**9}} for i in range(3)}}
    alarms = [{"id": 10**6, "kind": "gateway:unpaired_output", "gateway_id": "g" * 40,
               "detail": "word " * 80, "time": 1.7e9, "count": 10**6, "acknowledged": True}]
    console = Console(width=80, record=True)
    for part in [*recomputer_status(data), alarm_table(alarms)]:
        console.print(part)
    assert all(len(line) <= 80 for line in console.export_text().splitlines())


def test_status_of_an_unreachable_service_is_one_line() -> None:
    line = _one_clean_line(ivp("status", "http://127.0.0.1:9"))
    assert line.startswith("ivp: cannot read http://127.0.0.1:9/status")


# --- ivp demo --serve ------------------------------------------------------------------------
def _read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> list[str]:
    """stdout lines of ``proc`` up to the one holding ``marker`` (read on a thread:
    a buffered pipe cannot be polled line by line)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        assert line is not None, "\n".join(seen)  # the process ended first
        seen.append(line)
        if marker in line:
            return seen
    raise AssertionError(f"no {marker!r} within {timeout:.0f} s: {seen}")


def _refuses(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/status", timeout=5)
    except OSError:
        return True
    return False


def test_demo_serve_keeps_a_datacenter_up_for_the_openai_package_until_ctrl_c(
        tmp_path: Path) -> None:
    import openai

    proc = subprocess.Popen([*IVP, "demo", "--serve", "--port", "0", "--run-dir",
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        lines = _read_until(proc, "Ctrl-C stops it", timeout=600)
        text = "\n".join(lines)
        assert "random weights: it answers gibberish" in text
        base = next(line.split(": ", 1)[1] for line in lines if line.startswith("base URL:"))
        gateways = next(line.split(": ", 1)[1] for line in lines
                        if line.startswith("gateways:")).split(", ")
        assert f'OpenAI(base_url="{base}", api_key="ivp")' in text
        client = openai.OpenAI(base_url=base, api_key="ivp", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny-llama"]
        answer = client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
        assert answer.choices[0].finish_reason in ("stop", "length")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    recomputer = base.removesuffix("/v1")
    assert all(_refuses(url) for url in (recomputer, *gateways))


def test_demo_serve_on_a_busy_port_is_one_line(busy_port: int) -> None:
    line = _one_clean_line(ivp("demo", "--serve", "--port", str(busy_port)))
    assert f"port {busy_port} is already in use" in line
