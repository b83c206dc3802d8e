"""Honest vLLM load through gateway and recomputer: false positives and the δ* it needs.

    .venv/bin/python bench/vllm_honest_load.py [--model gemma|tiny] [--counts 200,600,1200]
        [--delta-from MANIFEST.json]

A loopback datacenter (recomputer + one gateway powering ``ivp server --engine vllm``)
whitelists the model's vLLM manifest with a δ calibrated against vLLM (from
``--delta-from``, a manifest written by ``ivp calibrate --engine vllm``, else the
demo's cached calibration), ε = 1 (every pair audited). Clients send the demo's mix
(plain and chat, greedy, T = 1, top-k 40, top-p 0.9) at concurrency 1, 8 and 32;
vLLM batches them as it serves. Every verdict is the live recomputer's. Afterwards
each audited pair is scored again offline by the same replay to read δ*, the
smallest noise bound that explains it, so the margin to δ is visible. Last line: one
JSON object.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, gemma_dir, machine, note, work_dir


def delta_stars(state: Path, model_dir: Path) -> dict[int, float]:
    """δ* of every stored audit record, by audit number."""
    from ivp.engine.loading import load_from_dir
    from ivp.engine.reference import ReferenceEngine
    from ivp.protocol.encoding import decode
    from ivp.protocol.messages import AuditRecord
    from ivp.verify import score_replayed

    engine = ReferenceEngine(*load_from_dir(model_dir))
    db = sqlite3.connect(state / "recomputer.sqlite")
    records = [decode(p, AuditRecord) for (p,) in db.execute(
        "SELECT payload FROM audits ORDER BY id")]
    out: dict[int, float] = {}
    for i in range(0, len(records), 8):
        group = [r for r in records[i : i + 8] if r.pair.output_token_ids]
        rows = engine.replay_bounded_batch([(r.pair.prompt_token_ids, r.pair.output_token_ids)
                                            for r in group])
        for r, z in zip(group, rows, strict=True):
            s = score_replayed(z, r.pair.output_token_ids, r.pair.seed, r.pair.params)
            out[r.audit_seq] = s.max_needed_delta
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma")
    ap.add_argument("--gemma-dir", default=None)
    ap.add_argument("--counts", default="200,600,1200", help="messages at concurrency 1,8,32")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--delta-from", type=Path, default=None)
    args = ap.parse_args()

    from ivp.demo.datacenter import LoopbackDatacenter
    from ivp.protocol.encoding import decode
    from ivp.protocol.messages import Manifest
    from ivp.verify.calibrate_vllm import cached_noise_bound

    work = work_dir("vllm-load")
    if args.model == "tiny":
        from ivp.engine.tiny import VLLM_HEAD_DIM, build_tiny_model

        model_dir, model_id = build_tiny_model(work / "model", head_dim=VLLM_HEAD_DIM), \
            "tiny-llama"
    else:
        model_dir, model_id = gemma_dir(args.gemma_dir), "gemma-3-270m"
    if args.delta_from:
        bound = decode(args.delta_from.read_bytes(), Manifest).noise_bound
    else:
        bound = cached_noise_bound(model_dir, model_id, say=note)
    assert bound is not None
    note(f"δ = {bound.delta:.4g} ({bound.method[:120]}...)")
    levels = [int(x) for x in args.levels.split(",")]
    counts = [int(x) for x in args.counts.split(",")]
    dc = LoopbackDatacenter(work / "dc", gateways=1, epsilon=1.0, prebuilt_model=model_dir,
                            model=model_id if model_id != "tiny-llama" else "tiny",
                            engine="vllm", noise_bound=bound, log=note,
                            server_args=("--kv-cache-mb", "1024", "--max-model-len", "2048"))
    per_level: dict[str, Any] = {}
    with dc:
        seen: set[int] = set()
        for level, count in zip(levels, counts, strict=True):
            note(f"concurrency {level}: {count} messages")
            answers = dc.send(count, concurrency=level, max_tokens=args.max_tokens)
            dc.drain(timeout=7200)
            verdicts = [v for v in dc.verdicts() if v["audit_seq"] not in seen]
            seen |= {v["audit_seq"] for v in verdicts}
            per_level[str(level)] = {
                "seqs": [v["audit_seq"] for v in verdicts], "messages": count,
                "answered": sum(1 for a in answers if a["status"] == 200),
                "audited": len(verdicts), "failed": sum(1 for v in verdicts if not v["passed"]),
                "tokens": sum(v["tokens"] for v in verdicts)}
            note(f"  {per_level[str(level)]}")
        state = dc.root / "recomputer"
    note("offline: δ* of every audited pair")
    stars = delta_stars(state, model_dir)
    result: dict[str, Any] = {"model": model_id, "engine": "vllm", "dtype": "float32",
                              "delta": bound.delta, "levels": {}, "machine": machine()}
    for level, figures in per_level.items():
        d = np.array([stars[q] for q in figures.pop("seqs") if q in stars] or [0.0])
        result["levels"][level] = {**figures, "delta_star": {
            "p50": float(np.quantile(d, 0.5)), "p99": float(np.quantile(d, 0.99)),
            "max": float(d.max()), "exact_share": float(np.mean(d == 0.0))}}
    total = [f for f in result["levels"].values()]
    result["messages"] = sum(f["audited"] for f in total)
    result["false_positives"] = sum(f["failed"] for f in total)
    emit(result)


if __name__ == "__main__":
    main()
