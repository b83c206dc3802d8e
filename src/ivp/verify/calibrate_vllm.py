"""Calibrate δ for vLLM: its own logits under real batching against the recomputer's replay.

The serving side is a real ``ivp server --engine vllm`` (continuous batching, chunked
prefill, prefix caching, vLLM's kernels), started with ``--record-logits`` so that it
saves every row its spec v1 processor chose from; requests go to it at each
concurrency level (default 1, 8 and 32 in flight), so rows are computed in batches of
every composition that level produces. The replay side is
``ReferenceEngine.replay_batch`` as the recomputer runs it, alone and in groups. δ is
derived exactly as for the reference engine (``ivp.verify.calibrate``): max(safety x
observed, Gumbel-tail extrapolation) of the per-position half-span (max − min)/2 of the
logit differences, and the manifest it goes into names the engine
and dtype it was measured for.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ivp.protocol.encoding import canonical
from ivp.protocol.messages import Manifest
from ivp.verify.calibrate import (
    REPLAY_GROUPS,
    SAFETY,
    Calibration,
    SourceMeasurement,
    tail_extrapolation,
)
from ivp.verify.noise import NoiseRecords
from ivp.verify.serving import Request

if TYPE_CHECKING:
    from ivp.engine.reference import ReferenceEngine

CONCURRENCY = (1, 8, 32)


@dataclass(frozen=True)
class Served:
    """One answer of the vLLM server and the rows it was sampled from."""

    request: Request
    token_ids: list[int]
    logits: np.ndarray  # (n, V) float32, as recorded by the server


def boot(url: str, manifest: Manifest, model_dir: Path, timeout: float = 900.0) -> None:
    """Play the gateway's boot: the manifest, then its files concatenated."""
    import urllib.error
    import urllib.request

    for path, data in (("/boot/manifest", canonical(manifest)),
                       ("/boot/stream", b"".join((Path(model_dir) / f.name).read_bytes()
                                                 for f in manifest.files))):
        req = urllib.request.Request(url + path, data=data, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"the vLLM server refused {path}: HTTP {exc.code} "
                               f"{exc.read()[:2000].decode(errors='replace')}") from None


async def _serve(url: str, requests: Sequence[Request], concurrency: int) -> list[dict[str, Any]]:
    import aiohttp

    gate = asyncio.Semaphore(concurrency)

    async def one(session: aiohttp.ClientSession, r: Request) -> dict[str, Any]:
        body = {"prompt": list(r.prompt_ids), "seed": r.seed, "max_tokens": r.params.max_tokens,
                "temperature": r.params.temperature, "top_k": r.params.top_k,
                "top_p": r.params.top_p}
        async with gate, session.post(url + "/v1/completions", json=body) as resp:
            answer = await resp.json(content_type=None)
            if resp.status != 200:
                raise RuntimeError(f"vLLM server answered {resp.status}: {answer}")
            return answer

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        return await asyncio.gather(*(one(session, r) for r in requests))


def serve(url: str, record_dir: Path, requests: Sequence[Request],
          concurrency: int) -> list[Served]:
    """Send ``requests`` with ``concurrency`` in flight; each answer with its rows (the
    recorded files are removed once read)."""
    answers = asyncio.run(_serve(url, requests, concurrency))
    out = []
    for r, a in zip(requests, answers, strict=True):
        tokens = [int(t) for t in a["choices"][0]["token_ids"]]
        folder = Path(record_dir) / a["id"]
        rows = np.stack([np.load(folder / f"{t}.npy") for t in range(len(tokens))])
        shutil.rmtree(folder, ignore_errors=True)
        out.append(Served(r, tokens, rows))
    return out


def measure_server(url: str, record_dir: Path, engine: ReferenceEngine,
                   requests: Sequence[Request], concurrency: Sequence[int] = CONCURRENCY,
                   replay_groups: Sequence[int] = REPLAY_GROUPS, *, safety: float = SAFETY,
                   device: str = "cpu", dtype: str = "float32") -> Calibration:
    """δ of a running, booted vLLM server (started with ``--record-logits record_dir``)."""
    if safety < 1.0:
        raise ValueError("the safety factor must be at least 1")
    sources: list[SourceMeasurement] = []
    row_span: list[np.ndarray] = []
    records: list[NoiseRecords] = []  # what the honest false-alarm cost is computed from
    for level in concurrency:
        served = serve(url, record_dir, requests, level)
        pairs = [(s.request.prompt_ids, s.token_ids) for s in served]
        for group in replay_groups:
            spans, absolute = [], [0.0]
            for i in range(0, len(pairs), group):
                for s, ref in zip(served[i : i + group], engine.replay_batch(pairs[i : i + group]),
                                  strict=True):
                    record = NoiseRecords.of(s.logits, ref)  # its span: ω of each row
                    records.append(record)
                    spans.append(record.span)
                    absolute.append(float(np.abs(s.logits.astype(np.float64) - ref)
                                          .max(initial=0.0)))
            rows = np.concatenate(spans) if spans else np.zeros(0)
            row_span.append(rows)
            sources.append(SourceMeasurement(f"vllm {dtype}, concurrency {level}", group,
                                             int(rows.shape[0]), float(rows.max(initial=0.0)),
                                             float(rows.mean()) if rows.size else 0.0,
                                             max(absolute)))
    pooled = np.concatenate(row_span) if row_span else np.zeros(0)
    observed = float(pooled.max(initial=0.0))
    extrapolated = tail_extrapolation(pooled)
    levels = "/".join(str(c) for c in concurrency)
    return Calibration(tuple(sources), pooled, observed, extrapolated, safety,
                       max(safety * observed, extrapolated), len(requests) * len(concurrency),
                       device, records=NoiseRecords.concat(records),
                       max_tokens=max((r.params.max_tokens for r in requests), default=0),
                       serving=f"vLLM {dtype} server (continuous batching), "
                               f"concurrency {levels}")


@contextlib.contextmanager
def vllm_server(manifest: Manifest, model_dir: Path, *, kv_cache_mb: int = 1024,
                max_model_len: int = 2048, log: Path | None = None
                ) -> Iterator[tuple[str, Path]]:
    """A recording ``ivp server --engine vllm`` booted with ``manifest``: (url, rows dir)."""
    from ivp.datacenter import free_port
    from ivp.engine.vllm_env import require_vllm_python

    port = free_port()
    record = Path(tempfile.mkdtemp(prefix="ivp-calibrate-rows-",
                                   dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [require_vllm_python(), "-m", "ivp.cli", "server", "--engine", "vllm", "--port",
         str(port), "--record-logits", str(record), "--kv-cache-mb", str(kv_cache_mb),
         "--max-model-len", str(max_model_len), "--max-num-seqs", "64"],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, proc)
        boot(url, manifest, model_dir)
        yield url, record
    finally:
        import os
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(record, ignore_errors=True)


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the vLLM server exited before it listened")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the vLLM server did not answer at {url} within {timeout:.0f} s")




def cached_noise_bound(model_dir: Path, model_id: str, dtype: str = "float32", *,
                       cache: Path | None = None, say: Any = lambda _m: None) -> Any:
    """A δ for (model, vllm, dtype) from a short calibration (6 prompts x 3 parameter sets
    x 16 tokens, concurrency 1 and 8), kept under $IVP_CACHE/calibration keyed by the
    model's file digests: what ``ivp demo --engine vllm`` whitelists. A deployment
    calibrates with ``ivp calibrate --engine vllm`` (more prompts, concurrency to 32)."""
    import json
    import os

    from ivp.engine.loading import load_from_dir
    from ivp.engine.reference import ReferenceEngine
    from ivp.protocol.encoding import canonical, decode
    from ivp.protocol.messages import NoiseBound, SamplingParams, manifest_digest
    from ivp.verify import calibrate as cal
    from ivp.verify.prompts import CALIBRATION, encode_prompts
    from ivp.whitelist.manifest import make_manifest

    manifest = make_manifest(model_dir, model_id, engine="vllm", dtype=dtype)
    digest = manifest_digest(manifest)[:16]
    root = cache or Path(os.environ.get("IVP_CACHE", Path.home() / ".cache" / "ivp"))
    path = root / "calibration" / f"{model_id}-vllm-{dtype}-{digest}-span.json"
    if path.is_file():
        return decode(path.read_bytes(), NoiseBound)
    model, tokenizer = load_from_dir(model_dir)
    engine = ReferenceEngine(model, tokenizer)
    ids = encode_prompts(tokenizer, CALIBRATION[:6],
                         chat=bool(getattr(tokenizer, "chat_template", None)))
    params = tuple(SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                  max_tokens=16) for p in cal.CALIBRATION_PARAMS)
    with vllm_server(manifest, model_dir, kv_cache_mb=512) as (url, record):
        result = measure_server(url, record, engine, cal.calibration_requests(ids, params),
                                (1, 8), dtype=dtype)
    bound = cal.noise_bound(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json.loads(canonical(bound)), indent=1) + "\n")
    say(f"δ = {bound.delta:.3g} (observed {result.observed:.3g} over {result.samples} "
        f"positions)")
    return bound

__all__ = ["CONCURRENCY", "Served", "boot", "cached_noise_bound", "measure_server", "serve",
           "vllm_server"]
