"""Every benchmark's ``--quick`` mode runs and ends with one JSON object (its figures).

The quick modes are smoke runs (tiny sizes, one short round); their figures mean
nothing. They run side by side to keep this test short.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

#: bench -> keys its JSON line must hold
EXPECTED = {
    "gateway_overhead.py": {"direct", "gateway", "nginx", "gateway_added_p50_ms",
                            "gateway_vs_nginx_throughput", "durable_commit_floor"},
    "upload.py": {"gb_per_s", "hash_share_of_transfer", "extrapolation_1tb_400gbit"},
    "ingest.py": {"records_per_s", "store", "refused"},
    "replay_vs_generate.py": {"models"},
    "streaming.py": {"latency", "throughput", "added_ttft_p50_ms", "streamed_tokens_per_s",
                     "durable_commit_floor"},
    "stream_log.py": {"wal_bytes_per_token", "wal_bytes_at_chunk", "cpu_us_per_chunk"},
}


def _runnable(name: str) -> bool:
    """gateway_overhead needs wrk and nginx; the test never installs packages."""
    if name != "gateway_overhead.py":
        return True
    return bool(shutil.which("wrk")) and bool(shutil.which("nginx")
                                               or Path("/usr/sbin/nginx").exists())


@pytest.mark.timeout(240)
def test_every_bench_quick_mode_prints_one_json_object_last() -> None:
    procs = {name: subprocess.Popen([sys.executable, str(BENCH / name), "--quick"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in EXPECTED if _runnable(name)}
    assert "upload.py" in procs
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=200)
        assert proc.returncode == 0, f"{name} failed:\n{err[-3000:]}"
        last = out.strip().splitlines()[-1]
        result = json.loads(last)
        assert isinstance(result, dict) and result["quick"] is True
        missing = EXPECTED[name] - set(result)
        assert not missing, f"{name}: no {sorted(missing)} in {last[:500]}"


def test_stub_server_speaks_the_server_protocol(tmp_path: Path) -> None:
    """The stub boots from exactly total_size streamed bytes and echoes the tag."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(BENCH / "stub_server.py"), "--port",
                             str(port)])
    url = f"http://127.0.0.1:{port}"

    def call(path: str, body: bytes | None = None, chunked: bool = False) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        data: object = body
        if chunked and body is not None:  # an iterable body: urllib sends it chunked
            data = iter([body[:3], body[3:]])
        req = urllib.request.Request(url + path, data=data,  # type: ignore[arg-type]
                                     headers=headers, method="POST" if body else "GET")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert call("/health") == (200, {"state": "empty", "model_id": None})
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert call("/v1/completions", b'{"model": "m"}')[0] == 503  # not booted
        assert call("/boot/manifest", b'{"model_id": "m", "total_size": 7}') == \
            (200, {"state": "loading"})
        assert call("/boot/stream", b"1234567", chunked=True) == (200, {"state": "ready"})
        tag = {"gateway_id": "g", "boot_id": "b", "seq": 3}
        status, answer = call("/v1/completions", json.dumps(
            {"model": "m", "prompt": [1, 2, 3], "max_tokens": 5, "seed": 9,
             "ivp_tag": tag}).encode())
        assert status == 200 and answer["ivp_tag"] == tag
        choice = answer["choices"][0]
        assert len(choice["token_ids"]) == 5 and choice["finish_reason"] == "length"
        assert all(3 <= t < 640 for t in choice["token_ids"])
    finally:
        proc.terminate()
        proc.wait(10)


def test_passthrough_proxy_forwards_answers_unchanged() -> None:
    """The Python floor of the gateway bench forwards the server's answers byte for byte."""
    import socket
    import time
    import urllib.request

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    stub_port, proxy_port = port(), port()
    stub = subprocess.Popen([sys.executable, str(BENCH / "stub_server.py"), "--port",
                             str(stub_port)])
    proxy = subprocess.Popen([sys.executable, str(BENCH / "passthrough_proxy.py"), "--port",
                              str(proxy_port), "--upstream", f"http://127.0.0.1:{stub_port}"])

    def call(p: int, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{p}{path}", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert call(proxy_port, "/health")[0] == 200
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        body = b'{"model": "m"}'
        assert call(proxy_port, "/v1/completions", body) == \
            call(stub_port, "/v1/completions", body)  # 503: not booted, same bytes
        assert call(proxy_port, "/boot/manifest", b'{"model_id": "m", "total_size": 1}') == \
            (200, b'{"state":"loading"}')
    finally:
        for proc in (proxy, stub):
            proc.terminate()
            proc.wait(timeout=10)
