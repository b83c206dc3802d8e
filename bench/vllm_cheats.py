"""Cheats on a vLLM server, each caught by the live recomputer, on a real model.

    .venv/bin/python bench/vllm_cheats.py [--model gemma|tiny]
        [--attacks rogue-model-persists,expert-iteration,int8,seed-ignored]
        [--delta-from MANIFEST.json] [--work DIR]

For each attack, a loopback datacenter (recomputer + one gateway powering ``ivp server
--engine vllm --attack NAME``, ε = 1) whitelists the model's vLLM manifest with a δ
calibrated against vLLM (``--delta-from``, else the demo's cached calibration). Honest
traffic first (every audit must pass), then the attack's trigger file; traffic goes on
in rounds of 8 requests until the recomputer fails an audit. Reported per attack: the
requests and seconds from trigger to the first failed verdict, its reason and δ*
against δ, the ``verify_fail`` alarm, and the gateway's state (SHUTDOWN expected).

The weight cheats (other weights: ``rogue-model-persists``; one fine-tuning step:
``expert-iteration``; quantized weights: ``int8``) really make vLLM serve other weights
(vLLM's in-place ``reload_weights``); ``seed-ignored`` samples with a seed of its own.
With ``--work DIR`` each finished attack is kept in ``DIR/cheats.json`` (a rerun skips
it) and the datacenters' logs stay there. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, note, vllm_model_and_bound, work_dir

ATTACKS = "rogue-model-persists,expert-iteration,int8,seed-ignored"
UNEXPLAINED = 1e299  # position_delta holds 1e300 where no noise bound explains a token


def run_attack(attack: str, root: Path, model_dir: Path, model_id: str, bound: Any,
               dtype: str, honest: int, max_tokens: int, deadline_s: float) -> dict[str, Any]:
    from ivp.datacenter import LoopbackDatacenter

    dc = LoopbackDatacenter(root, gateways=1, epsilon=1.0, prebuilt_model=model_dir,
                            model=model_id if model_id != "tiny-llama" else "tiny",
                            engine="vllm", noise_bound=bound, dtype=dtype, log=note,
                            attacks={0: attack},
                            server_args=("--kv-cache-mb", "512", "--max-model-len", "2048"))
    with dc:
        answers = dc.send(honest, concurrency=4, max_tokens=max_tokens)
        dc.drain(timeout=1800)
        before = dc.verdicts()
        out: dict[str, Any] = {
            "honest_answered": sum(1 for a in answers if a["status"] == 200),
            "honest_audited": len(before),
            "honest_failed": sum(1 for v in before if not v["passed"])}
        seen = {v["audit_seq"] for v in before}
        t0 = time.time()
        dc.trigger_attack(0)
        sent, failed = 0, []
        stop = time.monotonic() + deadline_s
        while time.monotonic() < stop and not failed:
            replies = dc.send(8, concurrency=4, max_tokens=max_tokens)
            sent += len(replies)
            dc.drain(timeout=1800)
            failed = [v for v in dc.verdicts() if v["audit_seq"] not in seen and not v["passed"]]
        out["detected"] = bool(failed)
        out["requests_after_trigger"] = sent
        if failed:
            first = min(failed, key=lambda v: v["time"])
            stars = [float(d) for d in first["position_delta"]]
            out.update({
                "seconds_to_first_failed_verdict": round(first["time"] - t0, 1),
                "reason": first["reason"][:300], "delta": first["delta"],
                "failed_positions": len(first["failed_positions"]),
                "positions": len(stars),
                "delta_star_max": min(max(stars, default=0.0), UNEXPLAINED),
                "unexplained_positions": sum(1 for d in stars if d >= UNEXPLAINED)})
        out["verify_fail_alarms"] = sum(1 for a in dc.alarms()
                                        if a["kind"] == "verify_fail" and a["time"] >= t0)
        wait = time.monotonic() + 60
        while time.monotonic() < wait and dc.gateway_status(0)["state"] != "shutdown":
            time.sleep(0.5)
        out["gateway_state"] = dc.gateway_status(0)["state"]
    out["caught"] = (out["detected"] and out["verify_fail_alarms"] > 0
                     and out["gateway_state"] == "shutdown" and out["honest_failed"] == 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma")
    ap.add_argument("--gemma-dir", default=None)
    ap.add_argument("--attacks", default=ATTACKS)
    ap.add_argument("--honest", type=int, default=8, help="honest requests before the trigger")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--deadline", type=float, default=900.0,
                    help="seconds of traffic after the trigger before giving up")
    ap.add_argument("--delta-from", type=Path, default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--work", type=Path, default=None, help="keep logs and results here")
    args = ap.parse_args()


    work = args.work or work_dir("vllm-cheats")
    work.mkdir(parents=True, exist_ok=True)
    model_dir, model_id, bound, dtype = vllm_model_and_bound(args, work)
    note(f"δ = {bound.delta:.4g}")
    record = work / "cheats.json"
    done: dict[str, Any] = json.loads(record.read_text()) if record.is_file() else {}
    for attack in args.attacks.split(","):
        if attack in done:
            continue
        note(f"{attack}: datacenter under {work / attack}")
        t0 = time.monotonic()
        done[attack] = run_attack(attack, work / f"{attack}-{int(time.time())}", model_dir,
                                  model_id, bound, dtype, args.honest, args.max_tokens,
                                  args.deadline)
        done[attack]["scenario_seconds"] = round(time.monotonic() - t0, 1)
        record.write_text(json.dumps(done, indent=1))
        note(f"  {done[attack]}")
    emit({"model": model_id, "engine": "vllm", "dtype": dtype, "delta": bound.delta,
          "attacks": done, "all_caught": all(r["caught"] for r in done.values()),
          "machine": machine()})


if __name__ == "__main__":
    main()
