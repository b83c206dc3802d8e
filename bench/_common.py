"""Helpers shared by the benchmarks: machine facts, processes, ports, the JSON last line.

Every benchmark prints, as its LAST line, one JSON object with its figures. Nothing
here invents a figure: each helper measures or reads what it reports.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PY = sys.executable


def emit(result: dict[str, Any]) -> None:
    """Print ``result`` as the benchmark's last line (one JSON object)."""
    print(json.dumps(result, sort_keys=True), flush=True)


def note(message: str) -> None:
    """Progress on stderr (stdout's last line is the JSON result)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the figures were measured on, and how busy it was (1/5/15-min load)."""
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in load]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None
              ) -> None:
    """Wait until ``url`` answers any HTTP status."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError as exc:
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s ({last})")


def http_json(url: str, body: bytes | None = None, timeout: float = 30.0) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@dataclass
class Proc:
    """A child process in its own process group (stopped with the whole group)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()

    def tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-n:]
        return ""


def spawn(name: str, args: Sequence[str], log_dir: Path,
          env: dict[str, str] | None = None) -> Proc:
    log = log_dir / f"{name}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                **(env or {})}
    popen = subprocess.Popen(list(args), stdout=open(log, "ab"),  # noqa: SIM115
                             stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    return Proc(name, popen, log)


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    """A list to append :class:`Proc` to; every one is stopped on exit."""
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for p in reversed(procs):
            p.stop()


def ensure_apt(binary: str, package: str) -> str:
    """Path of ``binary``, installing the Debian ``package`` with apt-get when missing."""
    found = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}")
                                     .exists() else None)
    if found:
        return found
    note(f"{binary} missing: apt-get install {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get"] if os.geteuid() == 0 else ["sudo", "-n", "apt-get"]
    subprocess.run([*apt, "update", "-qq"], check=False, env=env, capture_output=True)
    subprocess.run([*apt, "install", "-y", "-qq", package], check=True, env=env,
                   capture_output=True)
    found = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}")
                                     .exists() else None)
    if not found:
        raise RuntimeError(f"{package} installed but {binary} not found")
    return found


def work_dir(prefix: str) -> Path:
    """A scratch directory under the system's temporary directory (the durable-commit
    benches measure what a commit costs there: :func:`durable_commit_ms`). Removed when
    the benchmark exits, unless IVP_BENCH_KEEP=1 (to read the processes' logs)."""
    path = Path(tempfile.mkdtemp(prefix=f"ivp-bench-{prefix}-"))
    if os.environ.get("IVP_BENCH_KEEP") != "1":
        atexit.register(shutil.rmtree, path, True)
    return path


def durable_commit_ms(directory: Path, commits: int = 60) -> dict[str, float]:
    """Median and p90 of one SQLite WAL ``synchronous=FULL`` commit in ``directory``:
    the floor under any response released only after a durable commit."""
    path = directory / "fsync-probe.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (a BLOB)")
        times = []
        for _ in range(commits):
            t = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t VALUES (?)", (os.urandom(512),))
            db.execute("COMMIT")
            times.append((time.perf_counter() - t) * 1e3)
    finally:
        db.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.unlink(f"{path}{suffix}")
    times.sort()
    return {"p50_ms": round(statistics.median(times), 3),
            "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3)}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def whitelist_for(model_dir: Path, model_id: str, out_dir: Path,
                  engine: str = "reference") -> dict[str, Path]:
    """A one-inspector quorum policy and a signed whitelist naming ``model_dir`` (its
    manifest for ``engine``).

    Returns paths: model, policy, whitelist.
    """
    from ivp.protocol.encoding import canonical
    from ivp.protocol.keys import SigningKey
    from ivp.protocol.messages import Whitelist
    from ivp.protocol.quorum import InspectorKey, QuorumPolicy
    from ivp.whitelist import make_manifest, sign_whitelist

    out_dir.mkdir(parents=True, exist_ok=True)
    key = SigningKey.generate()
    policy = QuorumPolicy(threshold=1, keys=[InspectorKey(
        keyid=key.keyid, party="US", public_key=key.verify_key.hex, name="bench")])
    (out_dir / "policy.json").write_bytes(canonical(policy))
    # The engine is named only when it is not the default, so that a baseline checkout
    # from before engines existed (bench/gateway_overhead.py --baseline-src) runs this too.
    profile = {} if engine == "reference" else {"engine": engine}
    whitelist = Whitelist(version=1, expires=time.time() + 86400,
                          manifests=[make_manifest(model_dir, model_id, **profile)])
    (out_dir / "whitelist.json").write_bytes(sign_whitelist(whitelist, [key]).to_bytes())
    return {"model": model_dir, "policy": out_dir / "policy.json",
            "whitelist": out_dir / "whitelist.json"}


def tiny_whitelisted(out_dir: Path, model_id: str = "tiny",
                     src: str | None = None) -> dict[str, Path]:
    """The tiny model plus a policy and whitelist naming it (see :func:`whitelist_for`).

    With ``src`` (another checkout's ``src`` directory) they are written by that
    checkout's code in a child process, so a gateway of that checkout can read them
    (its whitelist format may predate fields the current one writes).
    """
    if src is not None:
        code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
                "from _common import tiny_whitelisted; "
                "tiny_whitelisted(Path(sys.argv[2]), sys.argv[3])")
        subprocess.run([PY, "-c", code, str(BENCH), str(out_dir), model_id], check=True,
                       env={**os.environ, "PYTHONPATH": src}, timeout=300)
        return {"model": out_dir / "model", "policy": out_dir / "policy.json",
                "whitelist": out_dir / "whitelist.json"}
    from ivp.engine.tiny import build_tiny_model

    return whitelist_for(build_tiny_model(out_dir / "model"), model_id, out_dir)


def control_key() -> str:
    """A recomputer key for gateways that no recomputer controls in a bench (a fresh
    key whose private half is dropped: no Shutdown can ever verify)."""
    from ivp.protocol.keys import SigningKey

    return SigningKey.generate().verify_key.hex


def gateway_args(name: str, state: Path, port: int, trust: dict[str, Path], sync: str = "FULL",
                 epsilon: float = 0.2) -> list[str]:
    """``ivp gateway`` powering a bench/stub_server.py on a free loopback port."""
    stub_cmd = f"{PY} {BENCH / 'stub_server.py'} --port {{port}}"
    return [PY, "-m", "ivp.cli", "gateway", "--state", str(state), "--gateway-id", name,
            "--port", str(port), "--recomputer-key", control_key(),
            "--policy", str(trust["policy"]), "--whitelist",
            str(trust["whitelist"]), "--epsilon", str(epsilon), "--sync", sync,
            "--server-port", str(free_port()), "--server-cmd", stub_cmd,
            "--checkpoint-interval", "10"]


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids = [int(c) for c in task.read_text().split()]
                out += kids
                todo += kids
    return out


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU seconds of a process (and, optionally, of its live
    descendants: a gateway's server, a recomputer's worker processes)."""
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid, *(descendants(pid) if children else [])]
    total = 0.0
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


__all__ = ["BENCH", "PY", "ROOT", "Proc", "cpu_seconds", "durable_commit_ms", "emit",
           "ensure_apt", "free_port", "gateway_args", "http_json", "machine", "median", "note",
           "processes", "spawn", "tiny_whitelisted", "wait_http", "whitelist_for", "work_dir"]


def gemma_dir(arg: str | None) -> Path:
    """The converted Gemma-3-270M: ``arg``, else $IVP_CACHE/gemma-3-270m (without
    IVP_CACHE, ~/.cache/ivp or an existing /tmp/ivpwork/gemma-3-270m); converted once
    if absent."""
    from ivp.engine.gemma import default_gemma_dir, is_complete, prepare_gemma

    path = Path(arg) if arg else default_gemma_dir()
    if not is_complete(path) and Path("/tmp/ivpwork/gemma-3-270m").is_dir() and not arg \
            and "IVP_CACHE" not in os.environ:
        path = Path("/tmp/ivpwork/gemma-3-270m")
    if not is_complete(path):
        note(f"converting Gemma-3-270M into {path} (once)")
        path = prepare_gemma(path)
    return path


def vllm_model_and_bound(args: Any, work: Path) -> tuple[Path, str, Any, str]:
    """The vLLM benches' model (``--model tiny`` built in ``work``, else the converted
    Gemma) and its noise bound and dtype: from ``--delta-from`` (a manifest of ``ivp
    calibrate --engine vllm``), else the demo's cached calibration against vLLM."""
    from ivp.protocol.encoding import decode
    from ivp.protocol.messages import Manifest
    from ivp.verify.calibrate_vllm import cached_noise_bound

    if args.model == "tiny":
        from ivp.engine.tiny import VLLM_HEAD_DIM, build_tiny_model

        model_dir, model_id = build_tiny_model(work / "model", head_dim=VLLM_HEAD_DIM), \
            "tiny-llama"
    else:
        model_dir, model_id = gemma_dir(args.gemma_dir), "gemma-3-270m"
    if args.delta_from:
        manifest = decode(args.delta_from.read_bytes(), Manifest)
        bound, dtype = manifest.noise_bound, args.dtype or manifest.dtype
    else:
        dtype = args.dtype or "float32"
        bound = cached_noise_bound(model_dir, model_id, dtype, say=note)
    assert bound is not None
    return model_dir, model_id, bound, dtype
