"""Secure boot's cost: weights through the gateway (hash + forward) vs a plain transfer.

In the same run, over the same bytes (a whitelisted model: the tiny model's config and
tokenizer plus ``--size-mb`` of weight shards, in the page cache):

* ``blake3``       — raw BLAKE3 in memory: one thread in 1 MiB updates (what the gateway
  does per file) and all threads (``max_threads=AUTO``); SHA-256 for reference;
* ``plain``        — a plain loopback transfer: the operator's client (the same aiohttp
  streaming code as ``ivp upload``) POSTs the bytes straight to the stub server's
  ``/boot/stream`` (bench/stub_server.py counts and drops them);
* ``gateway``      — ``ivp upload`` to ``ivp gateway`` (each file hashed and checked
  against the whitelisted manifest as it passes, forwarded to its stub server, BOOT
  record committed). Each round starts a fresh gateway, so the timed upload finds a
  freshly powered server (no power cycle inside the timing);
* ``gateway_hpke`` — the same, encrypted to the gateway's device key (``ivp upload
  --encrypt-to``: HPKE, the client seals, the gateway opens before it hashes); and raw
  HPKE seal / open rates in memory (``hpke_seal``, ``hpke_open``).

Hashing's share = time to hash the bytes / time of the plain transfer, with the faster
of one thread and all threads (the gateway hashes weight shards on all threads; the
one-thread share is reported too). Goal: < 20%. The extrapolation to a 1 TB model at
400 Gb/s assumes hashing runs alongside the transfer (as in the gateway) on k cores at
this machine's per-core rate.

    .venv/bin/python bench/upload.py [--quick] [--size-mb 1024] [--rounds 3]

The last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BENCH,
    PY,
    cpu_seconds,
    emit,
    free_port,
    gateway_args,
    http_json,
    machine,
    note,
    processes,
    spawn,
    wait_http,
    whitelist_for,
    work_dir,
)

MODEL_ID = "bench-upload"
CHUNK = 1 << 20  # the operator client's read size (as ivp.gateway.upload)
TB = 1e12
LINE_RATE = 400e9 / 8  # 400 Gb/s in bytes/s


def make_model(root: Path, size: int, shards: int) -> Path:
    """The tiny model's config + tokenizer and ``shards`` random weight files."""
    from ivp.engine.tiny import build_tiny_model

    tiny = build_tiny_model(root / "tiny")
    model = root / "model"
    model.mkdir()
    for f in tiny.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, model / f.name)
    per = size // shards
    for i in range(shards):
        with open(model / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as out:
            left = per
            while left:
                n = min(left, 16 << 20)
                out.write(os.urandom(n))
                left -= n
    return model


def ordered_files(model: Path) -> list[Path]:
    from ivp.gateway.upload import upload_order

    return [p for p, _ in upload_order(model, MODEL_ID)]


# --- raw hashing ------------------------------------------------------------------------------
def hash_rates(data: bytes) -> dict[str, float]:
    """GB/s of BLAKE3 (1 thread in 1 MiB updates; all threads) and SHA-256 over ``data``."""
    import blake3

    view = memoryview(data)

    def one_thread() -> None:
        h = blake3.blake3()
        for i in range(0, len(view), CHUNK):
            h.update(view[i:i + CHUNK])
        h.digest()

    out = {}
    for name, fn in (
        ("blake3_1thread", one_thread),
        ("blake3_all_threads",
         lambda: blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()),
        ("sha256_1thread", lambda: hashlib.sha256(data).digest()),
    ):
        t = time.perf_counter()
        fn()
        out[name] = len(data) / (time.perf_counter() - t) / 1e9
    return out


def hpke_rates(data: bytes) -> dict[str, float]:
    """GB/s of sealing and opening ``data`` as an encrypted upload (one thread)."""
    from ivp.device import SoftDevice
    from ivp.protocol.hpke import StreamOpener, StreamSealer, device_kem_key, upload_info

    device = SoftDevice(work_dir("upload") / "hpke-device")
    key = device_kem_key(device)
    sealer = StreamSealer(bytes(key.public_key.to_public_bytes()), upload_info(MODEL_ID))
    t = time.perf_counter()
    frames = [sealer.header]
    for i in range(0, len(data), CHUNK):
        frames += sealer.push(data[i:i + CHUNK])
    frames.append(sealer.close())
    seal = len(data) / (time.perf_counter() - t) / 1e9
    opener = StreamOpener(key, upload_info(MODEL_ID))
    t = time.perf_counter()
    for frame in frames:
        opener.feed(frame)
    opener.finish()
    return {"hpke_seal_1thread": seal,
            "hpke_open_1thread": len(data) / (time.perf_counter() - t) / 1e9}


# --- transfers --------------------------------------------------------------------------------
class Clock:
    """When the client handed each chunk to the transport: the steady-state rate between
    10% and 90% of the bytes leaves out one-time costs (connection, the gateway's first
    tokenizer load, the BOOT record's commit) that a 1 TB upload would not notice. With
    ``pid``, the CPU seconds that process spent in the same window are read too."""

    def __init__(self, total: int, pid: int | None = None) -> None:
        self.total, self.sent, self.pid = total, 0, pid
        self.window: list[tuple[int, float, float]] = []  # (bytes, seconds, cpu seconds)

    async def body(self, files: list[Path]) -> AsyncIterator[bytes]:
        marks = [0.1 * self.total, 0.9 * self.total]
        for path in files:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    self.sent += len(chunk)
                    if marks and self.sent >= marks[0]:
                        marks.pop(0)
                        cpu = cpu_seconds(self.pid) if self.pid else 0.0
                        self.window.append((self.sent, time.perf_counter(), cpu))
                    yield chunk

    def steady_gbs(self) -> float:
        (n0, t0, _), (n1, t1, _) = self.window
        return (n1 - n0) / max(t1 - t0, 1e-9) / 1e9

    def steady_cpu_s_per_gb(self) -> float:
        (n0, _, c0), (n1, _, c1) = self.window
        return (c1 - c0) / ((n1 - n0) / 1e9)


async def plain_transfer(url: str, files: list[Path], total: int) -> tuple[float, float]:
    """(end-to-end GB/s, steady GB/s) POSTing the bytes straight to the stub."""
    import aiohttp

    clock = Clock(total)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as s:
        async with s.post(url + "/boot/manifest",
                          json={"model_id": MODEL_ID, "total_size": total}) as r:
            await r.read()
        t = time.perf_counter()
        async with s.post(url + "/boot/stream", data=clock.body(files),
                          headers={"Content-Type": "application/octet-stream"}) as r:
            answer = await r.json(content_type=None)
        seconds = time.perf_counter() - t
    if answer.get("state") != "ready":
        raise RuntimeError(f"stub refused the stream: {answer}")
    return total / seconds / 1e9, clock.steady_gbs()


async def operator_upload(url: str, files: list[Path], total: int, pid: int,
                          encrypt_to: bytes | None = None
                          ) -> tuple[dict[str, Any], float, Clock]:
    """What ``ivp upload`` sends (same client code path: raw, or sealed to
    ``encrypt_to``), timed: (answer, e2e, clock)."""
    import aiohttp

    from ivp.gateway.upload import HPKE_UPLOAD
    from ivp.protocol.hpke import StreamSealer, upload_info

    clock = Clock(total, pid)
    body = clock.body(files)
    kind = "application/octet-stream"
    if encrypt_to is not None:
        sealer, plain = StreamSealer(encrypt_to, upload_info(MODEL_ID)), body
        kind = HPKE_UPLOAD

        async def sealed() -> AsyncIterator[bytes]:
            yield sealer.header
            async for chunk in plain:
                for frame in sealer.push(chunk):
                    yield frame
            yield sealer.close()

        body = sealed()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as s:
        t = time.perf_counter()
        async with s.post(url + "/upload", params={"model_id": MODEL_ID}, data=body,
                          headers={"Content-Type": kind}) as r:
            answer = await r.json(content_type=None)
        seconds = time.perf_counter() - t
    return answer, total / seconds / 1e9, clock


def gateway_upload(work: Path, trust: dict[str, Path], files: list[Path], total: int,
                   round_: int, encrypt: bool = False) -> dict[str, float]:
    """One upload through a fresh gateway: e2e and steady GB/s, gateway CPU s/GB (all of
    the upload, and in the steady window); with ``encrypt``, sealed to its KEM key."""
    import json
    import subprocess

    suffix = "_hpke" if encrypt else ""
    with processes() as procs:
        port = free_port()
        name = f"gw-upload{suffix.replace('_', '-')}-{round_}"
        state = work / f"{name}-state"
        key = None
        if encrypt:
            ident = subprocess.run([PY, "-m", "ivp.cli", "gateway", "--state", str(state),
                                    "--print-identity"], check=True, capture_output=True,
                                   text=True).stdout
            key = bytes.fromhex(json.loads(ident.strip().splitlines()[-1])["kem_public_key"])
        p = spawn(name, gateway_args(name, state, port, trust), work)
        procs.append(p)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/status", timeout=120, proc=p.popen)
        _wait_fresh(url)
        cpu0 = cpu_seconds(p.popen.pid)
        answer, e2e, clock = asyncio.run(operator_upload(url, files, total, p.popen.pid,
                                                         key))
        cpu = cpu_seconds(p.popen.pid) - cpu0
        if answer.get("state") != "serving":
            raise RuntimeError(f"upload refused: {answer}\n{p.tail()}")
    return {f"gateway_upload{suffix}": e2e, f"gateway_upload_steady{suffix}": clock.steady_gbs(),
            f"gateway_cpu_s_per_gb{suffix}": cpu / (total / 1e9),
            f"gateway_cpu_s_per_gb_steady{suffix}": clock.steady_cpu_s_per_gb()}


def _wait_fresh(url: str, timeout: float = 60.0) -> None:
    """Until the gateway reports its server powered (it powers it on at start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, status = http_json(url + "/status")
        if status.get("server") == "on":
            time.sleep(0.5)  # the power-on health check settles
            return
        time.sleep(0.1)
    raise TimeoutError("gateway's server never came up")


# --- run ----------------------------------------------------------------------------------------
def extrapolate(blake3_1: float, blake3_all: float, cpus: int) -> dict[str, Any]:
    """Secure boot of a 1 TB model at 400 Gb/s: hashing alongside the transfer."""
    per_core = blake3_all / max(1, cpus)  # GB/s per core when all cores hash
    transfer_s = TB / LINE_RATE
    return {
        "model_bytes": TB, "line_rate_gbit_s": 400, "transfer_only_s": round(transfer_s, 1),
        "one_thread_s": round(max(transfer_s, TB / (blake3_1 * 1e9)), 1),
        "all_cores_of_this_machine_s": round(max(transfer_s, TB / (blake3_all * 1e9)), 1),
        "cores_to_keep_up": round(LINE_RATE / (max(per_core, blake3_1) * 1e9), 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = work_dir("upload")
    note(f"work dir {work}; writing {args.size_mb} MiB of weights")
    size = args.size_mb << 20
    model = make_model(work, size, args.shards)
    trust = whitelist_for(model, MODEL_ID, work / "trust")
    files = ordered_files(model)
    total = sum(p.stat().st_size for p in files)
    data = b"".join(p.read_bytes() for p in files)  # also puts the files in the page cache
    result: dict[str, Any] = {"bench": "upload", "quick": args.quick, "bytes": total,
                              "files": len(files), "rounds": args.rounds,
                              "machine_before": machine()}
    rates: dict[str, list[float]] = {}
    runs: dict[str, list[float]] = {k: [] for k in (
        "plain_transfer", "plain_transfer_steady", *(
            f"{k}{suffix}" for suffix in ("", "_hpke") for k in (
                "gateway_upload", "gateway_upload_steady", "gateway_cpu_s_per_gb",
                "gateway_cpu_s_per_gb_steady")))}
    with processes() as procs:
        port = free_port()
        stub = spawn("stub-plain", [PY, str(BENCH / "stub_server.py"), "--port", str(port)],
                     work)
        procs.append(stub)
        stub_url = f"http://127.0.0.1:{port}"
        wait_http(stub_url + "/health", proc=stub.popen)
        for r in range(args.rounds):
            note(f"round {r + 1}/{args.rounds}")
            for k, v in (hash_rates(data) | hpke_rates(data)).items():
                rates.setdefault(k, []).append(v)
            e2e, steady = asyncio.run(plain_transfer(stub_url, files, total))
            runs["plain_transfer"].append(e2e)
            runs["plain_transfer_steady"].append(steady)
            for encrypt in (False, True):  # the same bytes, raw then encrypted
                for k, v in gateway_upload(work, trust, files, total, r, encrypt).items():
                    runs[k].append(v)
    med = {k: round(statistics.median(v), 3) for k, v in (rates | runs).items()}
    result.update({
        "gb_per_s": {k: v for k, v in med.items() if "cpu" not in k},
        "gateway_cpu_s_per_gb": {"end_to_end": med["gateway_cpu_s_per_gb"],
                                 "steady": med["gateway_cpu_s_per_gb_steady"],
                                 "hpke_end_to_end": med["gateway_cpu_s_per_gb_hpke"],
                                 "hpke_steady": med["gateway_cpu_s_per_gb_steady_hpke"]},
        "all_rounds": {k: [round(x, 3) for x in v] for k, v in (rates | runs).items()},
        # hashing the bytes, as a share of the plain transfer's time: on one thread, and
        # on all threads (what the gateway does for weight shards)
        "hash_share_of_transfer": round(med["plain_transfer_steady"] / max(
            med["blake3_1thread"], med["blake3_all_threads"]), 4),
        "hash_share_one_thread": round(med["plain_transfer_steady"] / med["blake3_1thread"],
                                       4),
        "gateway_vs_plain_steady": round(med["gateway_upload_steady"]
                                         / med["plain_transfer_steady"], 4),
        "gateway_vs_plain_end_to_end": round(med["gateway_upload"] / med["plain_transfer"], 4),
        # what encrypting the upload to the gateway costs, same bytes, same run
        "hpke_vs_raw_gateway_steady": round(med["gateway_upload_steady_hpke"]
                                            / med["gateway_upload_steady"], 4),
        "hpke_extra_gateway_cpu_s_per_gb": round(med["gateway_cpu_s_per_gb_steady_hpke"]
                                                 - med["gateway_cpu_s_per_gb_steady"], 4),
        "extrapolation_1tb_400gbit": extrapolate(med["blake3_1thread"],
                                                 med["blake3_all_threads"],
                                                 os.cpu_count() or 1),
        "machine_after": machine(),
    })
    result["goal_hash_share_below_20pct"] = result["hash_share_of_transfer"] < 0.2
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB, one round")
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mb, args.rounds, args.shards = 32, 1, 2
    emit(run(args))


if __name__ == "__main__":
    main()
