"""`ivp calibrate` and `ivp verify-report`: measure δ; measure what verification achieves.

    ivp calibrate MODEL_DIR --model-id ID --manifest-out m.json
    ivp verify-report [--quick] [--json] [--model tiny|gemma-3-270m] [--checkpoint DIR]

δ reaches gateways and the recomputer only inside a new whitelist version signed under
the quorum policy: `ivp calibrate` writes the manifest; the inspectors then run
`ivp whitelist build --manifest m.json --version N+1 …`, `ivp whitelist sign …`, and
install it with a `whitelist_update` admin request.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate)
    app.command("verify-report")(verify_report)


def _err(message: str) -> None:
    Console(stderr=True, highlight=False, markup=False, soft_wrap=True).print(message)


def calibrate(
    model_dir: Path = typer.Argument(..., help="Model directory (config.json, tokenizer, "
                                     ".safetensors shards), as whitelisted."),
    model_id: str = typer.Option(..., "--model-id", help="The model's id in the manifest."),
    manifest_out: Path = typer.Option(..., "--manifest-out", help="Where to write the "
                                      "manifest carrying the calibrated δ."),
    prompts: int = typer.Option(16, "--prompts", min=1, max=16, help="Calibration prompts."),
    max_tokens: int = typer.Option(16, "--max-tokens", min=1, max=512, help="Tokens generated "
                                   "per calibration request."),
    safety: float = typer.Option(4.0, "--safety", min=1.0, help="δ = max(safety x observed, "
                                 "tail extrapolation)."),
    batch_sizes: str = typer.Option("1,2,3,4,5,6,7,8", "--batch-sizes", help="Serving batch "
                                    "sizes to measure (comma-separated)."),
    threads: str = typer.Option("1,2", "--threads", help="Thread counts to measure."),
    attention: str = typer.Option("sdpa", "--attention", help="Attention kernels to measure "
                                  "(comma-separated: sdpa, eager)."),
    per_config: int | None = typer.Option(None, "--per-config", min=1, help="Sweep: each "
                                          "config serves a rotating slice of at least this "
                                          "many requests (default: all of them)."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Directory that keeps "
                                           "each measured source; a rerun resumes from it."),
    algo: str = typer.Option("blake3", "--algo", help="Manifest digest algorithm."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON line."),
    engine_name: str = typer.Option("reference", "--engine", help="The serving engine the "
                                    "manifest is for: reference (ivp's serving path) or vllm "
                                    "(a real vLLM server, run from .venv-vllm)."),
    dtype: str = typer.Option("", "--dtype", help="vllm: the compute dtype (float32 or "
                              "bfloat16; default: the config's)."),
    concurrency: str = typer.Option("1,8,32", "--concurrency", help="vllm: requests in "
                                    "flight, one pass per level (comma-separated)."),
    max_false_alarm: float = typer.Option(
        1e-3, "--max-false-alarm", min=0.0, max=1.0, help="The largest expected chance, at "
        "any temperature, that an honest --max-tokens message fails its audit at the "
        "verdict's tolerance τ(T), priced from the measured noise. Above it no manifest "
        "is written (exit 3): whitelisted, the profile would shut honest servers down. "
        "1 writes it anyway."),
) -> None:
    """Measure the model's noise bound δ over the honest serving path and write a manifest.

    The serving path runs every source of honest nondeterminism given: batch sizes with
    left padding, thread counts, attention kernels, KV-cache decoding; the recomputer's
    replay runs alone and in groups of 4. δ bounds the half-span (max - min)/2 of the
    logit differences per position (a common shift of a row changes no sampled token):
    δ = max(safety x largest half-span, Gumbel-tail extrapolation to 1e12 positions).
    The manifest's NoiseBound records δ, how it was measured and over how many
    positions. Deterministic on one machine.

    With --engine vllm the serving side is a real vLLM server (continuous batching at
    each --concurrency level) that records the logits rows it sampled from; the manifest
    then names engine vllm and the dtype, with the δ measured for them (--batch-sizes,
    --threads, --attention, --per-config and --checkpoint apply to the reference path).

    Next (inspectors): `ivp whitelist build --manifest FILE --version N+1 ...`, then
    `ivp whitelist sign`, then a `whitelist_update` admin request: δ reaches gateways
    and the recomputer only in a whitelist version signed under the quorum policy.
    """
    from ivp.engine.loading import load_from_dir
    from ivp.engine.reference import ReferenceEngine
    from ivp.errors import IvpError
    from ivp.protocol.encoding import canonical
    from ivp.protocol.messages import SamplingParams
    from ivp.verify import calibrate as cal
    from ivp.verify.prompts import CALIBRATION, encode_prompts
    from ivp.verify.views import false_alarm_table

    if not model_dir.is_dir():
        _err(f"error: {model_dir}: not a model directory")
        raise typer.Exit(2)
    try:
        configs = [cal.ServingConfig(int(b), int(t), a.strip()) for a in attention.split(",")
                   for t in threads.split(",") for b in batch_sizes.split(",")]
    except ValueError:
        _err(f"error: bad --batch-sizes {batch_sizes!r}, --threads {threads!r} or --attention "
             f"{attention!r} (comma-separated integers 1-64; kernels sdpa, eager)")
        raise typer.Exit(2) from None
    try:
        model, tokenizer = load_from_dir(model_dir)
        engine = ReferenceEngine(model, tokenizer)
        ids = encode_prompts(tokenizer, CALIBRATION[:prompts],
                             chat=bool(getattr(tokenizer, "chat_template", None)))
        params = tuple(SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                      max_tokens=max_tokens) for p in cal.CALIBRATION_PARAMS)
        start = time.perf_counter()
        requests = cal.calibration_requests(ids, params)
        if engine_name == "vllm":
            result, used_dtype = _calibrate_vllm(model_dir, model_id, engine, requests,
                                                 dtype, concurrency, safety)
        elif engine_name == "reference":
            result = cal.measure(engine, requests, configs, safety=safety,
                                 per_config=per_config, records=True, checkpoint=checkpoint)
            used_dtype = None
        else:
            raise ValueError(f"--engine must be reference or vllm, not {engine_name!r}")
        manifest = cal.calibrated_manifest(model_dir, model_id, result, algo=algo,
                                           engine=engine_name, dtype=used_dtype)
    except (IvpError, ValueError, RuntimeError) as exc:
        _err(f"error: {exc}")
        raise typer.Exit(2) from None
    alarms = false_alarm_table(result.records, result.delta, result.max_tokens)
    worst = max(alarms, key=lambda a: a["per_message"], default=None)
    refused = worst is not None and worst["per_message"] > max_false_alarm
    if not refused:
        manifest_out.write_bytes(canonical(manifest) + b"\n")
    figures = {"model_id": model_id, "engine": manifest.engine, "dtype": manifest.dtype,
               "delta": result.delta, "observed": result.observed,
               "observed_abs": result.observed_abs,
               "extrapolated": result.extrapolated, "safety": result.safety,
               "samples": result.samples, "method": result.method(),
               "seconds": round(time.perf_counter() - start, 1),
               "manifest": None if refused else str(manifest_out)}
    if worst is not None:
        figures["false_alarms"] = [{k: a[k] for k in ("temperature", "tolerance",
                                                      "per_message", "flip_rate")}
                                   for a in alarms]
        figures["worst_false_alarm_per_message"] = worst["per_message"]
    why = "" if not refused else (
        f"error: no manifest written: an honest {result.max_tokens}-token message would "
        f"fail its audit with probability {worst['per_message']:.3g} at T = "
        f"{worst['temperature']:g} (τ(T) = {worst['tolerance']:.3g}, δ = {result.delta:.3g}), "
        f"above --max-false-alarm {max_false_alarm:g}: this engine and dtype are too far "
        "from the recomputer's replay to verify at the covert-channel goal")
    if as_json:
        print(json.dumps(figures))
        if refused:
            _err(why)
            raise typer.Exit(3)
        return
    con = Console(highlight=False, soft_wrap=True)
    table = Table(title=f"{model_id}: noise of z_serve - z_replay per source")
    for col in ("serving config", "replay group", "positions", "max half-span", "max |Δz|"):
        table.add_column(col)
    for s in result.sources:
        table.add_row(s.serving, str(s.replay_group), str(s.rows), f"{s.max_span:.3g}",
                      f"{s.max_abs:.3g}")
    con.print(table)
    if worst is not None:
        costs = Table(title=f"expected honest false alarms per {result.max_tokens}-token "
                            "message at the verdict's tolerance τ(T)")
        for col in ("T", "τ(T)", "per message", "token flips (τ = 0)"):
            costs.add_column(col)
        for a in alarms:
            costs.add_row(f"{a['temperature']:g}", f"{a['tolerance']:.3g}",
                          f"{a['per_message']:.3g}", f"{a['flip_rate']:.3g}")
        con.print(costs)
    con.print(f"observed {result.observed:.3g}; tail extrapolation {result.extrapolated:.3g}; "
              f"δ = {result.delta:.3g} over {result.samples} positions "
              f"({figures['seconds']} s)")
    if refused:
        _err(why)
        raise typer.Exit(3)
    con.print(f"manifest written to {manifest_out}\n"
              f"next: ivp whitelist build --manifest {manifest_out} --version <N+1> "
              f"--expires-days 30 --key <inspector key> --out whitelist.json; "
              f"ivp whitelist sign whitelist.json --key <other party's key>")


def _calibrate_vllm(model_dir: Path, model_id: str, engine: Any, requests: Any, dtype: str,
                    concurrency: str, safety: float) -> tuple[Any, str]:
    """Calibration against a recording vLLM server booted with the model."""
    import os
    import tempfile

    from ivp.verify import calibrate_vllm
    from ivp.whitelist.manifest import make_manifest

    levels = tuple(int(c) for c in concurrency.split(","))
    manifest = make_manifest(model_dir, model_id, engine="vllm", dtype=dtype or None)
    log = Path(tempfile.gettempdir()) / f"ivp-calibrate-vllm-{os.getpid()}.log"
    _err(f"vLLM server log: {log}")
    with calibrate_vllm.vllm_server(manifest, model_dir, log=log) as (url, record):
        result = calibrate_vllm.measure_server(url, record, engine, requests, levels,
                                               safety=safety, dtype=manifest.dtype)
    return result, manifest.dtype


def verify_report(
    quick: bool = typer.Option(False, "--quick", help="Reduced run for CI (tiny model, "
                               "about a minute); writes files only with --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary JSON (per-model, "
                                 "per-temperature figures) as the last line."),
    model: str = typer.Option("tiny", "--model", help="tiny or gemma-3-270m."),
    out: Path | None = typer.Option(None, "--out", help="Docs directory to write "
                                    "VERIFICATION.md and img/ into (default: docs/ for a "
                                    "full run; nothing for --quick)."),
    manifest: Path | None = typer.Option(None, "--manifest", help="Take δ from this "
                                         "manifest instead of calibrating in the run (no "
                                         "false-alarm cost figures then)."),
    honest: int | None = typer.Option(None, "--honest", min=16, help="Override the number "
                                      "of honest messages."),
    int4: int | None = typer.Option(None, "--int4", min=4, help="Override the number of "
                                    "int4 attack messages (the AUC claim at scale)."),
    attack_messages: int | None = typer.Option(None, "--attack-messages", min=4, help="Override "
                                               "the number of messages per attack generator."),
    calib_configs: int | None = typer.Option(None, "--calib-configs", min=1, help="Calibrate "
                                             "on the first N serving configs of the plan's "
                                             "sweep only (a sweep cut short)."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Directory that keeps "
                                           "every finished unit of work (calibration source, "
                                           "served batch, attack chunk); a rerun resumes."),
    render_only: bool = typer.Option(False, "--render-only", help="Only re-render "
                                     "VERIFICATION.md from the figures saved in img/."),
) -> None:
    """Run honest and attack experiments; write docs/VERIFICATION.md and its plots.

    Calibrates δ (or takes it from --manifest); serves honest messages under every
    serving source of the plan (batch sizes, threads, attention kernels) at every
    temperature; answers requests with every attack generator and records whether each
    message changed a token; measures the covert channel per temperature and the
    false-alarm cost of the temperature rule. With --quick the exit status is 1 unless
    there are 0 honest false positives and every generator that changed a token was
    detected at least once.
    """
    from dataclasses import replace

    from ivp.verify import report as rep
    from ivp.verify import views
    from ivp.verify.docs import load_runs, render

    if render_only:
        docs = out if out is not None else Path("docs")
        (docs / "VERIFICATION.md").write_text(render(load_runs(docs / "img")))
        return
    if model not in rep.FULL:
        _err(f"error: --model {model!r}: use tiny or gemma-3-270m")
        raise typer.Exit(2)
    if quick and model != "tiny":
        _err("error: --quick runs on the tiny model only")
        raise typer.Exit(2)
    plan = rep.QUICK if quick else rep.FULL[model]
    if honest is not None:
        plan = replace(plan, honest_messages=honest)
    if int4 is not None:
        plan = replace(plan, int4_messages=int4)
    if attack_messages is not None:
        plan = replace(plan, attack_messages=attack_messages)
    if calib_configs is not None:
        plan = replace(plan, calib_configs=(plan.calib_configs or plan.configs)[:calib_configs])
    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {message}", file=sys.stderr, flush=True)

    result = rep.run(plan, manifest=manifest, checkpoint=checkpoint, log=log)
    summary = views.summary(result)
    docs = out if out is not None else (None if quick else Path("docs"))
    if docs is not None:
        img = docs / "img"
        img.mkdir(parents=True, exist_ok=True)
        (img / f"verification-{model}.json").write_text(
            json.dumps(views.details(result), indent=1, sort_keys=True) + "\n")
        views.plots(result, img)
        (docs / "VERIFICATION.md").write_text(render(load_runs(img)))
        log(f"wrote {docs / 'VERIFICATION.md'} and plots in {img}")
    failures = []
    if summary["honest"]["false_positives"]:
        failures.append(f"{summary['honest']['false_positives']} honest false positives")
    missed = [a["name"] for a in summary["attacks"]
              if a["changed"] and a["detected_changed"] == 0]
    if missed:
        failures.append(f"changed tokens but never detected: {', '.join(missed)}")
    if not as_json:
        _print_summary(summary, failures)
    else:
        print(json.dumps(summary))
    if quick and failures:
        raise typer.Exit(1)


def _print_summary(summary: dict, failures: list[str]) -> None:
    con = Console(highlight=False, soft_wrap=True)
    h = summary["honest"]
    con.print(f"{summary['model']}: δ = {summary['delta']:.3g}; honest: {h['messages']} "
              f"messages, {h['tokens']} tokens, {h['false_positives']} false positives (95% "
              f"bound {h['fpr_upper_95']:.3g}); exact-match rate {h['exact_match_rate']:.4%}")
    for r in summary["by_temperature"]:
        frac = r["channel_fraction"]
        chan = (f"channel {frac:.3%} of the sampling entropy (upper "
                f"{r['channel_fraction_upper']:.3%})" if r["temperature"] > 0 and frac
                is not None else f"channel {r['bits_per_token']:.3g} bits/token")
        fa = r["false_alarm_per_message"]
        con.print(f"  T={r['temperature']:g}: τ = {r['tolerance']:.3g}, {r['messages']} "
                  f"messages, {r['false_positives']} false positives; "
                  f"expected false alarms/message {fa if fa is None else f'{fa:.2g}'}; {chan}")
    for a in summary["attacks"]:
        con.print(f"  {a['name']:16s} changed {a['changed']}/{a['messages']}, detected "
                  f"{a['detected_changed']} of those; tokens for AUC>0.999: "
                  f"{a['tokens_for_auc_999']}")
    c = summary["covert"]
    con.print(f"stego-bounded at τ(1) = {c['tolerance']:.3g}: {c['encoder_bits']} bits, "
              f"{c['encoder_detected']} flagged")
    for f in failures:
        con.print(f"FAILED: {f}")


__all__ = ["calibrate", "register", "verify_report"]
