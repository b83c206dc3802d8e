"""An honest GPU server checked by the CPU recomputer, and replay vs generation on a GPU.

Two halves, run on two machines:

``serve`` (on a CUDA machine) loads Gemma-3-270M from its GGUF (the PyPI package's
file, assembled), and

* times generation (KV cache) against replay and the recomputer's verification
  (``replay_bounded_batch`` on the GPU + ``score_replayed`` on the host CPU) for
  32 / 128 / 512 output tokens, as bench/replay_vs_generate.py does on the CPU;
* serves the evaluation prompts through the batched, left-padded serving path
  (``ivp.verify.serving``, batch sizes 1–8) on the GPU in float32 and in bfloat16,
  T = 0.7 and T = 0, and writes every pair (prompt ids, output ids, seed, params)
  to ``pairs.json`` with a digest of the float32 weights it served.

``verify`` (on the CPU machine) replays every pair with the float32 recomputer
(``ReferenceEngine.replay_bounded_batch`` + ``ivp.verify.score_replayed``, as
``ivp recomputer`` does) and reports, per serving precision, δ* per message (the
smallest noise bound that explains it), the pass rate at the manifest's δ and in
exact mode: the δ a manifest must carry for GPU servers audited on CPUs.

    python bench/gpu_crosscheck.py serve --gguf FILE --out DIR     # GPU machine
    .venv/bin/python bench/gpu_crosscheck.py verify DIR/pairs.json  # here

The last stdout line of each is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # no install needed
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, gemma_dir, machine, note

LENGTHS = (32, 128, 512)
SERVE_TOKENS = 48


def weights_digest(model: Any) -> str:
    """blake3 over the float32 parameters by name: the same weights on both machines."""
    import blake3

    h = blake3.blake3()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Any, rounds: int) -> float:
    fn()  # warm-up: kernels, allocator
    times = []
    for _ in range(rounds):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timing(engine: Any, prompt: list[int], lengths: list[int]) -> dict[str, Any]:
    """Generation vs replay vs verification per output length (medians of rounds)."""
    engine.eos_ids = frozenset()  # outputs run to max_tokens
    out: dict[str, Any] = {}
    for n in lengths:
        out[str(n)] = _time_length(engine, prompt, n)
        note(f"n={n}: {out[str(n)]}")
    return out


def _time_length(engine: Any, prompt: list[int], n: int) -> dict[str, Any]:
    import torch

    from ivp.protocol.messages import SamplingParams
    from ivp.verify import score_replayed

    params = SamplingParams(temperature=0.7, max_tokens=n)
    rounds = 3 if n < 512 else 2
    tokens: list[int] = []

    def generate() -> None:
        tokens[:] = list(engine.generate_stream(prompt, params, 7))

    gen = _timed(generate, rounds)
    pairs = [(prompt, list(tokens))] * 4

    def plain() -> None:
        ids = torch.tensor([prompt + tokens], device=engine.device)
        with torch.inference_mode():
            engine.model(input_ids=ids, use_cache=False, logits_to_keep=n + 1)

    def verify() -> None:
        for rows, (_, o) in zip(engine.replay_bounded_batch(pairs), pairs, strict=True):
            score_replayed(rows, o, 7, params)

    replay = _timed(plain, rounds)
    bounded = _timed(lambda: engine.replay_bounded_batch(pairs), rounds) / 4
    ver = _timed(verify, rounds) / 4
    return {"generate_s": round(gen, 4), "plain_replay_s": round(replay, 5),
            "replay_bounded_per_pair_s": round(bounded, 5), "verify_per_pair_s": round(ver, 5),
            "ratio_plain_replay": round(gen / replay, 1),
            "ratio_replay_bounded": round(gen / bounded, 1), "ratio_verify": round(gen / ver, 1)}


def serve(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ivp.engine.reference import ReferenceEngine
    from ivp.protocol.messages import SamplingParams
    from ivp.verify.prompts import CALIBRATION, EVALUATION, encode_prompts
    from ivp.verify.serving import Request, ServingConfig, ServingPath

    gguf = Path(args.gguf)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    digest = weights_digest(model)
    model = model.to(args.device).eval()
    result: dict[str, Any] = {"bench": "gpu_crosscheck.serve", "machine": machine(),
                              "device": torch.cuda.get_device_name()
                              if args.device == "cuda" else args.device,
                              "torch": torch.__version__, "weights_blake3": digest,
                              "load_s": round(time.perf_counter() - t0, 1)}
    engine = ReferenceEngine(model, tokenizer)
    eos = engine.eos_ids
    prompts = encode_prompts(tokenizer, EVALUATION + CALIBRATION, chat=False)
    result["timing"] = timing(engine, list(prompts[0]),
                              [int(x) for x in args.lengths.split(",")])
    pairs: list[dict[str, Any]] = []
    for precision, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        path = ServingPath(model.to(dtype), eos)
        for temperature in (0.7, 0.0):
            params = SamplingParams(temperature=temperature, max_tokens=SERVE_TOKENS)
            requests = [Request(tuple(p), params, 1_000_003 * i + 17)
                        for i, p in enumerate(prompts[: args.prompts])]
            t = time.perf_counter()
            served = []
            for b in range(0, len(requests), 8):  # batch sizes 1..8 in turn
                size = 1 + (b // 8) % 8
                served += path.serve(requests[b : b + 8], ServingConfig(batch_size=size))
            note(f"served {len(served)} {precision} T={temperature} in "
                 f"{time.perf_counter() - t:.1f} s")
            pairs += [{"precision": precision, "prompt": list(r.prompt_ids),
                       "output": list(s.token_ids), "finish": s.finish_reason,
                       "seed": r.seed, "temperature": temperature, "max_tokens": SERVE_TOKENS,
                       "batch": s.batch_size} for r, s in zip(requests, served, strict=True)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs.json").write_text(json.dumps({"weights_blake3": digest, "pairs": pairs}))
    result["pairs"] = len(pairs)
    (out / "gpu.json").write_text(json.dumps(result, indent=1))
    emit(result)


def verify(args: argparse.Namespace) -> None:
    import numpy as np

    from ivp.engine.loading import load_from_dir
    from ivp.engine.reference import ReferenceEngine
    from ivp.protocol.messages import SamplingParams
    from ivp.verify import Policy, score_replayed

    data = json.loads(Path(args.pairs).read_text())
    model, tokenizer = load_from_dir(gemma_dir(args.gemma_dir))
    digest = weights_digest(model)
    engine = ReferenceEngine(model, tokenizer)
    groups: dict[str, list[float]] = {}
    exact_ok: dict[str, int] = {}
    for p in data["pairs"]:
        params = SamplingParams(temperature=p["temperature"], max_tokens=p["max_tokens"])
        rows = engine.replay_bounded_batch([(p["prompt"], p["output"])])[0]
        scores = score_replayed(rows, p["output"], p["seed"], params)
        key = f"{p['precision']} T={p['temperature']:g}"
        groups.setdefault(key, []).append(scores.max_needed_delta)
        exact_ok[key] = exact_ok.get(key, 0) + Policy("exact").judge(scores, params).passed
    result: dict[str, Any] = {"bench": "gpu_crosscheck.verify", "machine": machine(),
                              "same_weights": digest == data["weights_blake3"],
                              "manifest_delta": args.delta, "groups": {}}
    for key, needed in sorted(groups.items()):
        arr = np.asarray(needed)
        result["groups"][key] = {
            "messages": len(arr), "exact_mode_pass": exact_ok[key],
            "pass_at_manifest_delta": int(np.sum(arr <= args.delta)),
            "max_needed_delta": float(arr.max()), "median_needed_delta": float(np.median(arr)),
        }
    emit(result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="on a CUDA machine: timings and honest GPU pairs")
    s.add_argument("--gguf", required=True, help="gemma-3-270m-q4_k_m.gguf")
    s.add_argument("--out", required=True, help="folder for pairs.json and gpu.json")
    s.add_argument("--prompts", type=int, default=64)
    s.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    s.add_argument("--device", default="cuda")
    v = sub.add_parser("verify", help="here: replay the GPU pairs with the CPU recomputer")
    v.add_argument("pairs", help="pairs.json written by serve")
    v.add_argument("--gemma-dir", default=None,
                   help="converted Gemma-3-270M (default as bench/replay_vs_generate.py)")
    v.add_argument("--delta", type=float, default=2.1e-4,
                   help="the manifest's δ (default: the calibrated CPU δ of VERIFICATION.md)")
    args = parser.parse_args(argv)
    serve(args) if args.cmd == "serve" else verify(args)


if __name__ == "__main__":
    main()
