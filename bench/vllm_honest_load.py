"""Honest vLLM load through gateway and recomputer: false positives and the δ* it needs.

    .venv/bin/python bench/vllm_honest_load.py [--model gemma|tiny] [--counts 200,600,1200]
        [--delta-from MANIFEST.json] [--dtype float32|bfloat16] [--work DIR]

A loopback datacenter (recomputer + one gateway powering ``ivp server --engine vllm``)
whitelists the model's vLLM manifest with a δ calibrated against vLLM (from
``--delta-from``, a manifest written by ``ivp calibrate --engine vllm``, else the
demo's cached calibration), ε = 1 (every pair audited). Clients send the demo's mix
(plain and chat, greedy, T = 1, top-k 40, top-p 0.9) at concurrency 1, 8 and 32;
vLLM batches them as it serves. Every verdict is the live recomputer's, and so is
every δ* reported: the smallest noise bound that explains each audited position
(the verdict's ``position_delta``), so the margin to δ is visible.

With ``--work DIR`` the run keeps its datacenter's logs there (the vLLM server's
included) and checkpoints each finished level to ``DIR/levels.json``: run the same
command again after an interruption and the finished levels are kept, not redone.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, gemma_dir, machine, note, work_dir

UNEXPLAINED = 1e299  # position_delta holds 1e300 where no noise bound explains a token


def summary(stars: list[float]) -> dict[str, float]:
    d = np.array(stars or [0.0])
    return {"p50": float(np.quantile(d, 0.5)), "p99": float(np.quantile(d, 0.99)),
            "p999": float(np.quantile(d, 0.999)), "max": float(d.max()),
            "exact_share": float(np.mean(d == 0.0)), "positions": int(d.size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma")
    ap.add_argument("--gemma-dir", default=None)
    ap.add_argument("--counts", default="200,600,1200", help="messages at each level")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--delta-from", type=Path, default=None)
    ap.add_argument("--dtype", default=None, help="vLLM's compute dtype (default: config's)")
    ap.add_argument("--kv-cache-mb", default="512")
    ap.add_argument("--work", type=Path, default=None, help="keep logs and checkpoints here")
    args = ap.parse_args()

    from ivp.datacenter import LoopbackDatacenter
    from ivp.protocol.encoding import decode
    from ivp.protocol.messages import Manifest
    from ivp.verify.calibrate_vllm import cached_noise_bound

    work = args.work or work_dir("vllm-load")
    work.mkdir(parents=True, exist_ok=True)
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
    note(f"δ = {bound.delta:.4g} ({bound.method[:120]}...)")
    levels = [int(x) for x in args.levels.split(",")]
    counts = [int(x) for x in args.counts.split(",")]
    checkpoint = work / "levels.json"
    done: dict[str, Any] = json.loads(checkpoint.read_text()) if checkpoint.is_file() else {}
    todo = [(lv, n) for lv, n in zip(levels, counts, strict=True) if str(lv) not in done]
    if todo:
        dc = LoopbackDatacenter(work / f"dc-{int(time.time())}", gateways=1, epsilon=1.0,
                                prebuilt_model=model_dir,
                                model=model_id if model_id != "tiny-llama" else "tiny",
                                engine="vllm", noise_bound=bound, dtype=dtype, log=note,
                                server_args=("--kv-cache-mb", args.kv_cache_mb,
                                             "--max-model-len", "2048"))
        with dc:
            seen: set[int] = set()
            for level, count in todo:
                note(f"concurrency {level}: {count} messages (logs: {dc.root / 'logs'})")
                t0 = time.monotonic()
                answers = dc.send(count, concurrency=level, max_tokens=args.max_tokens)
                dc.drain(timeout=14400)
                verdicts = [v for v in dc.verdicts() if v["audit_seq"] not in seen]
                seen |= {v["audit_seq"] for v in verdicts}
                stars = [min(float(d), UNEXPLAINED) for v in verdicts
                         for d in v.get("position_delta", [])]
                done[str(level)] = {
                    "messages": count, "seconds": round(time.monotonic() - t0, 1),
                    "answered": sum(1 for a in answers if a["status"] == 200),
                    "audited": len(verdicts), "failed": sum(1 for v in verdicts if not v["passed"]),
                    "tokens": sum(v["tokens"] for v in verdicts),
                    "judged_at_delta": sorted({v.get("delta", 0.0) for v in verdicts}),
                    "delta_star": summary(stars),
                    "message_delta_star_max": summary(
                        [max(map(float, v["position_delta"]), default=0.0)
                         for v in verdicts if v.get("position_delta")])}
                checkpoint.write_text(json.dumps(done, indent=1))
                note(f"  {done[str(level)]}")
    result: dict[str, Any] = {"model": model_id, "engine": "vllm", "dtype": dtype,
                              "delta": bound.delta, "levels": done, "machine": machine()}
    result["messages"] = sum(f["audited"] for f in done.values())
    result["false_positives"] = sum(f["failed"] for f in done.values())
    emit(result)


if __name__ == "__main__":
    main()
