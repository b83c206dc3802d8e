"""vLLM serving under ivp: what sampler spec v1 and the gateway cost, side by side.

    .venv/bin/python bench/vllm_serving.py [--model tiny|gemma] [--levels 1,8,32] [--rounds N]

At each concurrency level (requests in flight), the same requests (the demo's mix:
greedy, T = 1, top-k 40, top-p 0.9) are served by:

1. plain vLLM with its own seeded sampler, the same requests all greedy (vLLM's
   argmax: the cheapest sampling there is, the floor), and
2. vLLM with the spec v1 logits processor — all by ONE in-process AsyncLLM in
   vLLM's environment (bench/_vllm_inproc.py), one right after the other, each
   request generating exactly --max-tokens tokens;
3. ``ivp server --engine vllm`` over HTTP, straight to the server, and
4. the same server behind ``ivp gateway`` (durable log on: SQLite synchronous=FULL,
   fsync before every release; ε = 0.2), one right after the other.

Then the recomputer's replay (bf16 head with its bound, pruned scoring: what its
workers run) verifies the pairs of (3); its tokens verified per second is set against
vLLM's tokens served per second at its best level. Ratios compare runs made minutes
apart on the same machine: on a shared machine, read them with the load average the
last line reports. The gateway streams: each chunk of tokens is released once it is
durably logged (group commit), so its added time to first token is one durable commit
on top of the server's; the figures for the gateway are its added p50 time to first
token and added p50 latency against (3). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    BENCH,
    PY,
    control_key,
    emit,
    free_port,
    gemma_dir,
    machine,
    note,
    processes,
    spawn,
    wait_http,
    whitelist_for,
    work_dir,
)

PARAMS = ({"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 0.8, "top_k": 40},
          {"temperature": 0.7, "top_p": 0.9})


async def _serve(url: str, model_id: str, prompts: list[list[int]], level: int, count: int,
                 max_tokens: int) -> dict[str, Any]:
    import aiohttp

    gate = asyncio.Semaphore(level)
    ttft: list[float] = []
    latency: list[float] = []
    pairs: list[tuple[list[int], list[int], dict[str, Any]]] = []
    tokens = 0

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal tokens
        body = {"model": model_id, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                "stream": True, **PARAMS[i % len(PARAMS)]}
        async with gate:
            t0 = time.perf_counter()
            ids: list[int] = []
            first = None
            async with session.post(url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                async for line in r.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    new = chunk["choices"][0].get("token_ids", [])
                    if new and first is None:
                        first = time.perf_counter() - t0
                    ids += new
            latency.append(time.perf_counter() - t0)
            ttft.append(first if first is not None else latency[-1])
            tokens += len(ids)
            pairs.append((body["prompt"], ids, PARAMS[i % len(PARAMS)]))

    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        await asyncio.gather(*(one(session, i) for i in range(count)))
    wall = time.perf_counter() - start
    return {"tokens_per_s": tokens / wall, "ttft_p50_ms": statistics.median(ttft) * 1e3,
            "latency_p50_ms": statistics.median(latency) * 1e3, "tokens": tokens,
            "requests": count, "seconds": wall, "pairs": pairs}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median throughput, with every round's throughput beside it."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ranked[(len(ranked) - 1) // 2],
            "rounds_tokens_per_s": [round(r["tokens_per_s"], 2) for r in runs]}


def verify_rate(model_dir: Path, pairs: list[tuple[list[int], list[int], dict[str, Any]]]
                ) -> dict[str, float]:
    """Tokens per second the recomputer's replay + scoring verifies (seeds made up:
    the cost does not depend on them)."""
    from ivp.engine.loading import load_from_dir
    from ivp.engine.reference import ReferenceEngine
    from ivp.protocol.messages import SamplingParams
    from ivp.verify import score_replayed

    engine = ReferenceEngine(*load_from_dir(model_dir))
    work = [(p, o, SamplingParams(max_tokens=max(1, len(o)), **k)) for p, o, k in pairs if o]
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(work), 8):  # the recomputer's workers replay in small batches
        group = work[i : i + 8]
        rows = engine.replay_bounded_batch([(p, o) for p, o, _ in group])
        for (_, o, params), r in zip(group, rows, strict=True):
            score_replayed(r, o, 1234, params)
            tokens += len(o)
    wall = time.perf_counter() - start
    return {"tokens_per_s": tokens / wall, "tokens": tokens, "seconds": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma", help="gemma (Gemma-3-270M) or tiny")
    ap.add_argument("--gemma-dir", default=None)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="alternate the compared modes "
                    "this many times per level; each mode's figures are its median round")
    args = ap.parse_args()

    from ivp.engine.loading import load_tokenizer, read_dir
    from ivp.engine.vllm_env import require_vllm_python
    from ivp.gateway.upload import upload_model
    from ivp.verify.prompts import CALIBRATION, encode_prompts

    vllm_py = require_vllm_python()
    work = work_dir("vllm")
    if args.model == "tiny":
        from ivp.engine.tiny import VLLM_HEAD_DIM, build_tiny_model

        model_dir, model_id = build_tiny_model(work / "model", head_dim=VLLM_HEAD_DIM), "tiny"
    else:
        model_dir, model_id = gemma_dir(args.gemma_dir), "gemma-3-270m"
    tokenizer = load_tokenizer(read_dir(model_dir))
    prompts = encode_prompts(tokenizer, CALIBRATION, chat=bool(tokenizer.chat_template))
    (work / "prompts.json").write_text(json.dumps([list(p) for p in prompts]))
    levels = [int(x) for x in args.levels.split(",")]

    note("1+2: plain vLLM and vLLM + spec v1, one in-process engine (.venv-vllm)")
    inproc = subprocess.run([vllm_py, str(BENCH / "_vllm_inproc.py"), "--model", str(model_dir),
                             "--levels", args.levels, "--max-tokens", str(args.max_tokens),
                             "--prompts", str(work / "prompts.json"),
                             "--rounds", str(args.rounds)],
                            stdout=subprocess.PIPE, check=True, text=True)
    engine_figures = json.loads(inproc.stdout.strip().splitlines()[-1])

    note("3+4: ivp server --engine vllm, direct and behind ivp gateway (durable log)")
    trust = whitelist_for(model_dir, model_id, work / "trust", engine="vllm")
    served: dict[str, Any] = {}
    with processes() as procs:
        port, server_port = free_port(), free_port()
        server_cmd = (f"{vllm_py} -m ivp.cli server --engine vllm --port {{port}} "
                      "--kv-cache-mb 1024 --max-model-len 2048")
        procs.append(spawn("gateway", [
            PY, "-m", "ivp.cli", "gateway", "--state", str(work / "gw"), "--gateway-id", "gw",
            "--port", str(port), "--recomputer-key", control_key(),
            "--policy", str(trust["policy"]), "--whitelist",
            str(trust["whitelist"]), "--epsilon", "0.2", "--sync", "FULL", "--engine", "vllm",
            "--server-port", str(server_port), "--server-cmd", server_cmd,
            "--checkpoint-interval", "10"], work))
        gateway = f"http://127.0.0.1:{port}"
        wait_http(gateway + "/status", 120, procs[-1].popen)
        result = asyncio.run(upload_model(gateway, model_dir, model_id))
        assert result.get("state") == "serving", result
        server = f"http://127.0.0.1:{server_port}"
        asyncio.run(_serve(server, model_id, prompts, 4, 8, args.max_tokens))  # warm up
        for level in levels:
            count = max(8, 2 * level)
            runs: dict[str, list[dict[str, Any]]] = {"server": [], "gateway": []}
            for _ in range(args.rounds):  # interleaved: load drift hits both alike
                runs["server"].append(asyncio.run(_serve(server, model_id, prompts, level,
                                                         count, args.max_tokens)))
                runs["gateway"].append(asyncio.run(_serve(gateway, model_id, prompts, level,
                                                          count, args.max_tokens)))
            served[str(level)] = {k: median_run(v) for k, v in runs.items()}
            direct, behind = served[str(level)]["server"], served[str(level)]["gateway"]
            note(f"level {level}: server {direct['tokens_per_s']:.1f} tok/s, gateway "
                 f"{behind['tokens_per_s']:.1f} tok/s")

    figures: dict[str, Any] = {"model": model_id, "max_tokens": args.max_tokens,
                               "rounds": args.rounds,
                               "levels": {}, "machine": machine()}
    for level in levels:
        e, s = engine_figures[str(level)], served[str(level)]
        plain, greedy, spec = e["plain"], e["greedy"], e["spec_v1"]
        direct, behind = s["server"], s["gateway"]
        figures["levels"][str(level)] = {
            "plain_tokens_per_s": round(plain["tokens_per_s"], 2),
            "greedy_tokens_per_s": round(greedy["tokens_per_s"], 2),
            "spec_v1_tokens_per_s": round(spec["tokens_per_s"], 2),
            "server_tokens_per_s": round(direct["tokens_per_s"], 2),
            "gateway_tokens_per_s": round(behind["tokens_per_s"], 2),
            "spec_v1_cost": round(1 - spec["tokens_per_s"] / plain["tokens_per_s"], 4),
            "spec_v1_cost_vs_greedy": round(1 - spec["tokens_per_s"] / greedy["tokens_per_s"], 4),
            "gateway_cost": round(1 - behind["tokens_per_s"] / direct["tokens_per_s"], 4),
            "plain_ttft_p50_ms": round(plain["ttft_p50_ms"], 1),
            "greedy_ttft_p50_ms": round(greedy["ttft_p50_ms"], 1),
            "spec_v1_ttft_p50_ms": round(spec["ttft_p50_ms"], 1),
            "server_ttft_p50_ms": round(direct["ttft_p50_ms"], 1),
            "gateway_ttft_p50_ms": round(behind["ttft_p50_ms"], 1),
            "gateway_added_ttft_p50_ms": round(behind["ttft_p50_ms"] - direct["ttft_p50_ms"], 2),
            "server_latency_p50_ms": round(direct["latency_p50_ms"], 1),
            "gateway_latency_p50_ms": round(behind["latency_p50_ms"], 1),
            "gateway_added_latency_p50_ms": round(behind["latency_p50_ms"]
                                                  - direct["latency_p50_ms"], 1),
            "rounds_tokens_per_s": {name: run.get("rounds_tokens_per_s") for name, run in (
                ("plain", plain), ("greedy", greedy), ("spec_v1", spec), ("server", direct),
                ("gateway", behind))},
        }
    best = max(levels, key=lambda c: served[str(c)]["server"]["tokens_per_s"])
    note("recomputer: replay + scoring of the pairs served at the best level")
    rate = verify_rate(model_dir, served[str(best)]["server"]["pairs"])
    figures["recomputer"] = {
        "best_level": best, "served_tokens_per_s":
            round(served[str(best)]["server"]["tokens_per_s"], 2),
        "verified_tokens_per_s": round(rate["tokens_per_s"], 2),
        "affordable_epsilon": round(min(1.0, rate["tokens_per_s"]
                                        / served[str(best)]["server"]["tokens_per_s"]), 4)}
    emit(figures)


if __name__ == "__main__":
    main()
