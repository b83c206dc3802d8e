"""Verifying a pair by replay vs the server's own generation of it (issue 4).

For each model (the tiny test model and the real Gemma-3-270M) and each output length
(32 / 128 / 512 tokens), in the same process, in rounds (3; 2 at 512 tokens). Each
round first times

* ``generate`` — the server generating one new pair with its KV cache
  (``ReferenceEngine.generate_stream``, sampler spec v1: prompt, seed and n tokens),

and then, on the pairs generated so far, the verifier's side:

* ``plain_replay`` — the plain-transformers prefill a verifier would write: one
  ``model(prompt + output, logits_to_keep=n + 1)`` for one pair (the reference point:
  16.5x at 128 Gemma tokens on this machine, per ../shared/ANCHORS.md);
* ``replay1`` / ``replay_batch`` — ``ReferenceEngine.replay_batch`` on one pair / on a
  batch of B pairs (time per pair);
* ``score`` — ``ivp.verify.score`` + ``Policy.judge`` on one pair's replayed logits;
* ``verify_batch`` — the recomputer's worker end to end (``Verifier.verify`` on B audit
  records: decode, prechecks, batched replay, scoring, verdicts), per pair.

Generation and verification of a length are timed in the same rounds, so a load spike
on this shared machine hits both. Ratio = generation time / verification time per pair
(medians over the rounds); ``ratio_cpu`` is the same with process CPU time. Goal (issue
4): >= 30x at 128 tokens on Gemma.

Forcing the length: outputs must be exactly n tokens long, so the bench sets
``eos_ids = frozenset()`` on its own engines (the generating one and the verifier's):
generation ignores EOS and runs to ``max_tokens``, and the verifier's prechecks accept
such outputs; nothing outside this script changes. A batch of B pairs cycles through
the pairs generated so far when B exceeds them (a replay's cost does not depend on
which tokens it replays; every record still passes on its own).

    .venv/bin/python bench/replay_vs_generate.py [--quick] [--models tiny,gemma]
        [--lengths 32,128,512] [--gemma-dir DIR]

The last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, gemma_dir, machine, note, work_dir

PROMPTS = (
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain, step by step and in detail, how a datacenter is cooled in summer.",
    "The history of the printing press begins in the fifteenth century, when",
    "List the arguments for and against nuclear power, one paragraph each:",
)
GOAL_RATIO_128_GEMMA = 30.0


@dataclass
class Pair:
    prompt: list[int]
    output: list[int]  # the longest length; shorter outputs are prefixes
    seed: int
    token_times: list[float]  # seconds from the start to each token
    token_cpu: list[float]  # process CPU seconds from the start to each token


def generate(engine: Any, prompt: list[int], params: Any, seed: int) -> Pair:
    """The server's generation (KV cache), timed token by token (wall and CPU)."""
    start, cpu0 = time.perf_counter(), time.process_time()
    tokens, times, cpus = [], [], []
    for tok in engine.generate_stream(prompt, params, seed):
        tokens.append(tok)
        times.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu0)
    return Pair(prompt, tokens, seed, times, cpus)


def load(model_dir: Path) -> tuple[Any, Any, dict[str, bytes]]:
    from ivp.engine.loading import load_model, load_tokenizer, read_dir
    from ivp.engine.reference import ReferenceEngine

    files = read_dir(model_dir)
    engine = ReferenceEngine(load_model(files), load_tokenizer(files))
    engine.eos_ids = frozenset()  # bench only: generation runs to max_tokens
    return engine, files, files


def records(pairs: Sequence[Pair], n: int, params: Any, model_id: str, engine: Any) -> list[Any]:
    """Audit records (as the recomputer stores them) of the n-token prefixes."""
    from ivp.protocol.chain import genesis, link
    from ivp.protocol.messages import AuditRecord, PairRecord, Tag

    out, head = [], genesis("gw-bench", "boot-bench")
    for i, p in enumerate(pairs):
        tokens = p.output[:n]
        pair = PairRecord(
            tag=Tag("gw-bench", "boot-bench", i), model_id=model_id, endpoint="completions",
            input="bench", prompt_token_ids=p.prompt, output_token_ids=tokens,
            output_text=engine.tokenizer.decode(tokens, skip_special_tokens=True),
            finish_reason="length", seed=p.seed, params=params, t_request=0.0, t_response=0.0)
        prev, head = head, link(head, pair)
        out.append(AuditRecord(gateway_id="gw-bench", boot_id="boot-bench", audit_seq=i + 1,
                               chain_prev=prev, chain_head=head, pair=pair))
    return out


def flops(engine: Any, prompt_len: int, n: int) -> float:
    """~FLOPs of one replay forward: 2 x (decoder params x tokens + head params x rows)
    (attention's L^2 terms left out)."""
    model = engine.model
    head = model.get_output_embeddings().weight.numel()
    embed = model.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - embed \
        - (0 if model.get_output_embeddings().weight is model.get_input_embeddings().weight
           else head)
    return 2.0 * (body * (prompt_len + n - 1) + head * n)


def bench_model(name: str, model_dir: Path, model_id: str, args: argparse.Namespace
                ) -> dict[str, Any]:
    import torch

    from ivp.protocol.messages import SamplingParams
    from ivp.recomputer.workers import ModelSource, Verifier
    from ivp.whitelist import make_manifest

    note(f"{name}: loading")
    engine, files, _ = load(model_dir)
    manifest = make_manifest(model_dir, model_id)
    verifier = Verifier([ModelSource(manifest, files)], "exact")
    for _, v_engine, _ in verifier._models.values():
        v_engine.eos_ids = frozenset()  # bench only, as for the generating engine
    out: dict[str, Any] = {"model_dir": str(model_dir), "params": {
        "temperature": args.temperature, "top_k": 0, "top_p": 1.0},
        "torch_threads": torch.get_num_threads(), "batch": args.batch,
        "vocab": engine.vocab_size, "lengths": {}}
    digest = manifest_digest(manifest)
    warm = engine.tokenizer(PROMPTS[0])["input_ids"]  # first calls pay one-time costs
    engine.generate(warm, SamplingParams(temperature=args.temperature, max_tokens=8), 1)
    for n in sorted(args.lengths):
        rounds = max(1, args.repeats if n < 512 else args.repeats - 1)
        p_n = SamplingParams(temperature=args.temperature, top_k=0, top_p=1.0, max_tokens=n)
        pairs: list[Pair] = []
        wall: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        verdicts: list[Any] = []
        for r in range(rounds):
            # the server's generation, in the same round as the replays it is compared with
            note(f"{name}: n={n}: round {r + 1}/{rounds}")
            prompt = engine.tokenizer(PROMPTS[r % len(PROMPTS)])["input_ids"]
            pairs.append(generate(engine, prompt, p_n, seed=1_000_003 * (r + 1)))
            wall.setdefault("generate", []).append(pairs[-1].token_times[-1])
            cpu.setdefault("generate", []).append(pairs[-1].token_cpu[-1])
            ops = _ops(engine, verifier, pairs, p_n, model_id, digest, args.batch, verdicts)
            if r == 0:
                for fn, _ in ops.values():  # warm-up: a shape's first call pays one-time costs
                    fn()
            for op, (fn, per) in ops.items():
                t, c = time.perf_counter(), time.process_time()
                fn()
                wall.setdefault(op, []).append((time.perf_counter() - t) / per)
                cpu.setdefault(op, []).append((time.process_time() - c) / per)
        t = {k: {"s": statistics.median(wall[k]), "min_s": min(wall[k]),
                 "cpu_s": statistics.median(cpu[k])} for k in wall}
        gen = t.pop("generate")
        per: dict[str, Any] = {
            "rounds": rounds, "distinct_pairs": len(pairs),
            "generate": {k: round(v, 4) for k, v in gen.items()},
            **{k: {m: round(x, 4) for m, x in v.items()} for k, v in t.items()},
            "verdicts_passed": f"{_passed(verdicts[-1])}/{len(verdicts[-1])}",
            "replay_gflops_per_s": round(flops(engine, len(pairs[0].prompt), n)
                                         / t["replay1"]["s"] / 1e9, 1),
        }
        for basis, key in (("ratio", "s"), ("ratio_cpu", "cpu_s")):
            per[basis] = {k: round(gen[key] / t[k][key], 2) for k in t
                          if not k.startswith("score")}
            per[basis]["replay_batch_plus_score"] = round(
                gen[key] / (t["replay_batch"][key] + t["score"][key]), 2)
            per[basis]["replay_bounded_plus_pruned"] = round(
                gen[key] / (t["replay_bounded_batch"][key] + t["score_pruned"][key]), 2)
        out["lengths"][str(n)] = per
        note(f"{name}: n={n}: {per['ratio']}")
    return out


def _ops(engine: Any, verifier: Any, pairs: list[Pair], params: Any, model_id: str,
         digest: str, batch: int, verdicts: list[Any]
         ) -> dict[str, tuple[Callable[[], Any], int]]:
    """The verifier-side operations on the pairs generated so far: op -> (call, pairs).
    A batch cycles through the distinct pairs when it holds more than there are."""
    import torch

    from ivp.protocol.encoding import canonical
    from ivp.recomputer.workers import VerifyJob
    from ivp.verify import Policy, score, score_replayed

    last = pairs[-1]
    cycle = [(pairs[i % len(pairs)].prompt, pairs[i % len(pairs)].output)
             for i in range(batch)]
    jobs = [VerifyJob(i, digest, canonical(rec)) for i, rec in enumerate(records(
        [pairs[i % len(pairs)] for i in range(batch)], params.max_tokens, params, model_id,
        engine))]
    logits = engine.replay(last.prompt, last.output)
    bounded = engine.replay_bounded_batch([(last.prompt, last.output)])[0]

    def plain() -> None:
        ids = torch.tensor([last.prompt + last.output])
        with torch.inference_mode():
            engine.model(input_ids=ids, use_cache=False, logits_to_keep=len(last.output) + 1)

    return {
        "plain_replay": (plain, 1),
        "replay1": (lambda: engine.replay(last.prompt, last.output), 1),
        "replay_batch": (lambda: engine.replay_batch(cycle), batch),
        "replay_bounded_batch": (lambda: engine.replay_bounded_batch(cycle), batch),
        "score": (lambda: Policy("exact").judge(score(logits, last.output, last.seed, params),
                                                params), 1),
        "score_pruned": (lambda: Policy("exact").judge(
            score_replayed(bounded, last.output, last.seed, params), params), 1),
        "verify_batch": (lambda: verdicts.append(verifier.verify(jobs)), batch),
    }


def manifest_digest(manifest: Any) -> str:
    from ivp.protocol.messages import manifest_digest as digest

    return str(digest(manifest))


def _passed(outcomes: Sequence[Any]) -> int:
    from ivp.protocol.encoding import decode
    from ivp.protocol.messages import Verdict

    return sum(1 for o in outcomes if o.verdict is not None and decode(o.verdict, Verdict).passed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, short outputs")
    parser.add_argument("--models", default="tiny,gemma")
    parser.add_argument("--lengths", default="32,128,512")
    parser.add_argument("--gemma-dir", default=None,
                        help="converted Gemma-3-270M (default: $IVP_CACHE/gemma-3-270m; "
                             "without IVP_CACHE, ~/.cache/ivp or an existing "
                             "/tmp/ivpwork/gemma-3-270m; converted once if absent)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per batched replay")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.lengths, args.repeats, args.batch = "tiny", "16", 1, 2
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"bench": "replay_vs_generate", "quick": args.quick,
                              "machine_before": machine(), "models": {}}
    for name in args.models.split(","):
        if name == "tiny":
            from ivp.engine.tiny import build_tiny_model

            model_dir, model_id = build_tiny_model(work_dir("tiny") / "model"), "tiny-llama"
        elif name == "gemma":
            model_dir, model_id = gemma_dir(args.gemma_dir), "gemma-3-270m"
        else:
            raise SystemExit(f"unknown model {name!r} (tiny, gemma)")
        result["models"][name] = bench_model(name, model_dir, model_id, args)
    result["machine_after"] = machine()
    gemma = result["models"].get("gemma", {}).get("lengths", {}).get("128")
    if gemma:
        result["gemma_128"] = {"ratio_verify": gemma["ratio"]["verify_batch"],
                               "ratio_replay_only": gemma["ratio"]["replay_batch"],
                               "ratio_verify_cpu": gemma["ratio_cpu"]["verify_batch"],
                               "ratio_replay_only_cpu": gemma["ratio_cpu"]["replay_batch"]}
        result["goal_met"] = gemma["ratio"]["verify_batch"] >= GOAL_RATIO_128_GEMMA
    emit(result)


if __name__ == "__main__":
    main()
