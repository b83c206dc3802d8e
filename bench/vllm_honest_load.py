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
included) and checkpoints every ``--chunk`` messages to ``DIR/levels.json``: run the same
command again after an interruption and it goes on where it stopped (a cut-off loses
at most one chunk). The last line also gives the 95% upper bound on the false-positive
rate the audited count supports (0 failures in n: 1 - 0.05^(1/n)) and messages/hour.
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
from _common import emit, machine, note, vllm_model_and_bound, work_dir

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
    ap.add_argument("--chunk", type=int, default=48, help="messages between checkpoints")
    args = ap.parse_args()

    from ivp.datacenter import LoopbackDatacenter

    work = args.work or work_dir("vllm-load")
    work.mkdir(parents=True, exist_ok=True)
    model_dir, model_id, bound, dtype = vllm_model_and_bound(args, work)
    note(f"δ = {bound.delta:.4g} ({bound.method[:120]}...)")
    levels = [int(x) for x in args.levels.split(",")]
    counts = [int(x) for x in args.counts.split(",")]
    checkpoint = work / "levels.json"
    # Raw per-level tallies (δ* values included), extended after every chunk: a cut-off
    # run loses at most one chunk, and a rerun goes on where it stopped.
    raw: dict[str, Any] = json.loads(checkpoint.read_text()) if checkpoint.is_file() else {}
    todo = [(lv, n) for lv, n in zip(levels, counts, strict=True)
            if raw.get(str(lv), {}).get("messages", 0) < n]
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
                tally = raw.setdefault(str(level), {
                    "messages": 0, "seconds": 0.0, "answered": 0, "audited": 0, "failed": 0,
                    "tokens": 0, "judged_at_delta": [], "stars": [], "message_max": []})
                note(f"concurrency {level}: {count - tally['messages']} more messages "
                     f"(logs: {dc.root / 'logs'})")
                while tally["messages"] < count:
                    n = min(args.chunk, count - tally["messages"])
                    t0 = time.monotonic()
                    answers = dc.send(n, concurrency=level, max_tokens=args.max_tokens)
                    dc.drain(timeout=14400)
                    verdicts = [v for v in dc.verdicts() if v["audit_seq"] not in seen]
                    seen |= {v["audit_seq"] for v in verdicts}
                    tally["messages"] += n
                    tally["seconds"] = round(tally["seconds"] + time.monotonic() - t0, 1)
                    tally["answered"] += sum(1 for a in answers if a["status"] == 200)
                    tally["audited"] += len(verdicts)
                    tally["failed"] += sum(1 for v in verdicts if not v["passed"])
                    tally["tokens"] += sum(v["tokens"] for v in verdicts)
                    tally["judged_at_delta"] = sorted(set(tally["judged_at_delta"])
                                                      | {v.get("delta", 0.0) for v in verdicts})
                    tally["stars"] += [min(float(d), UNEXPLAINED) for v in verdicts
                                       for d in v.get("position_delta", [])]
                    tally["message_max"] += [min(max(map(float, v["position_delta"])),
                                                 UNEXPLAINED)
                                             for v in verdicts if v.get("position_delta")]
                    checkpoint.write_text(json.dumps(raw))
                    note(f"  c={level}: {tally['audited']}/{count} audited, "
                         f"{tally['failed']} failed, {tally['seconds']:.0f} s")
    done = {level: {**{k: v for k, v in t.items() if k not in ("stars", "message_max")},
                    "delta_star": summary(t["stars"]),
                    "message_delta_star_max": summary(t["message_max"])}
            for level, t in raw.items()}
    result: dict[str, Any] = {"model": model_id, "engine": "vllm", "dtype": dtype,
                              "delta": bound.delta, "levels": done, "machine": machine()}
    result["messages"] = sum(f["audited"] for f in done.values())
    result["false_positives"] = sum(f["failed"] for f in done.values())
    result["delta_star_all"] = summary([d for t in raw.values() for d in t["stars"]])
    # With 0 failures in n audits, the one-sided 95% upper bound on the false-positive
    # rate is 1 - 0.05^(1/n) (exact binomial; ~3/n). Over the FAILED count it is not a
    # zero-failure bound, so it is only reported when none failed.
    n = result["messages"]
    if n and result["false_positives"] == 0:
        result["fp_rate_upper_95"] = 1.0 - 0.05 ** (1.0 / n)
    seconds = sum(f["seconds"] for f in done.values())
    result["messages_per_hour"] = round(3600.0 * n / seconds, 1) if seconds else None
    emit(result)


if __name__ == "__main__":
    main()
