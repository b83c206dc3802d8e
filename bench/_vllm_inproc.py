"""Half of bench/vllm_serving.py that runs in vLLM's environment (.venv-vllm).

One AsyncLLM with the spec v1 logits processor serves, at each concurrency level,
the same requests three times, one right after the other: with vLLM's own seeded
sampler (plain: no spec v1 argument, the processor leaves those rows alone), all
greedy with vLLM's argmax (vLLM's cheapest sampling: the floor any sampler is
measured against) and with sampler spec v1. Prints one JSON object: per level and
mode, output tokens/s and time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

PARAMS = ({"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 0.8, "top_k": 40},
          {"temperature": 0.7, "top_p": 0.9})  # the demo's mix, a quarter each
MODES = ("plain", "greedy", "spec_v1")


def median_run(runs: list[dict[str, float]]) -> dict[str, object]:
    """The run of median throughput, with every round's throughput beside it."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ranked[(len(ranked) - 1) // 2],
            "rounds_tokens_per_s": [round(r["tokens_per_s"], 2) for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompts", required=True, help="JSON file: list of token-id lists")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the modes this many "
                    "times per level; each mode's figures are its median round")
    args = ap.parse_args()

    from vllm import SamplingParams as VllmParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from ivp.engine.vllm_sampler import PROCESSOR, spec_args
    from ivp.protocol.messages import SamplingParams

    prompts = json.loads(Path(args.prompts).read_text())
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=args.model, dtype="float32", max_model_len=2048, enforce_eager=True,
        skip_tokenizer_init=True, seed=0, max_num_seqs=64, kv_cache_memory_bytes=1 << 30,
        logits_processors=[PROCESSOR], disable_log_stats=True))

    def sampling(i: int, mode: str) -> VllmParams:
        p = PARAMS[i % len(PARAMS)]
        seed = 1000 + i
        # a fixed length (EOS ignored): every mode generates the same number of tokens
        common = {"max_tokens": args.max_tokens, "ignore_eos": True,
                  "detokenize": False, "output_kind": RequestOutputKind.DELTA}
        if mode == "spec_v1":
            params = SamplingParams(max_tokens=args.max_tokens, **p)
            return VllmParams(temperature=0.0, extra_args=spec_args(seed, params), **common)
        if mode == "greedy":
            return VllmParams(temperature=0.0, **common)
        return VllmParams(temperature=p["temperature"], top_k=p.get("top_k", 0),
                          top_p=p.get("top_p", 1.0), seed=seed, **common)

    async def run(level: int, mode: str, count: int, tag: str) -> dict[str, float]:
        gate = asyncio.Semaphore(level)
        ttft: list[float] = []
        tokens = 0

        async def one(i: int) -> None:
            nonlocal tokens
            async with gate:
                t0 = time.perf_counter()
                first = True
                async for out in engine.generate(
                        TokensPrompt(prompt_token_ids=prompts[i % len(prompts)]),
                        sampling(i, mode), f"{tag}-{i}"):
                    n = len(out.outputs[0].token_ids)
                    if n and first:
                        ttft.append(time.perf_counter() - t0)
                        first = False
                    tokens += n

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        wall = time.perf_counter() - start
        return {"tokens_per_s": tokens / wall, "ttft_p50_ms": statistics.median(ttft) * 1e3,
                "tokens": tokens, "requests": count, "seconds": wall}

    async def bench() -> dict[str, object]:
        for mode in MODES:  # compile the chooser, fill caches
            await run(4, mode, 8, f"warm-{mode}")
        out: dict[str, dict[str, object]] = {}
        for level in (int(x) for x in args.levels.split(",")):
            count = max(8, 2 * level)
            runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
            for r in range(args.rounds):  # modes interleaved: load drift hits each alike
                for mode in MODES:
                    runs[mode].append(await run(level, mode, count, f"{mode}{level}-{r}"))
            out[str(level)] = {mode: median_run(runs[mode]) for mode in MODES}
            print(f"level {level}: " + ", ".join(
                f"{mode} {out[str(level)][mode]['tokens_per_s']:.1f} tok/s"  # type: ignore[index]
                for mode in MODES), file=sys.stderr, flush=True)
        return out

    result = asyncio.run(bench())
    engine.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
