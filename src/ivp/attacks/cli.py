"""`ivp attack list` and `ivp attack run NAME|all [--json]`."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from ivp.attacks.runner import Report

attack_app = typer.Typer(
    name="attack",
    help=(
        "The red-team suite: play each attack of the note (and on the protocol itself) "
        "against a live loopback datacenter and report whether the system noticed, from "
        "its own alarms, verdicts, status and refusals. See docs/THREATS.md."
    ),
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add `attack` to the root CLI."""
    app.add_typer(attack_app, name="attack")


@attack_app.command("list")
def list_attacks(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Every scenario: name, origin, what the attacker does, the defence expected.

    Origin "note" is a row of the note's Attack Vectors & Mitigations table;
    "protocol" an attack on ivp's own protocol. Nothing is run (see `ivp attack run`).
    """
    from ivp.attacks.registry import SCENARIOS

    if as_json:
        typer.echo(json.dumps({"attacks": [
            {"name": s.name, "family": s.family, "summary": s.summary, "defence": s.defence,
             "needs": s.needs} for s in SCENARIOS.values()]}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ivp attack scenarios", show_lines=True)
    for col in ("name", "from", "the attacker", "defence"):
        table.add_column(col)
    for s in SCENARIOS.values():
        table.add_row(s.name, s.family, s.summary, s.defence)
    Console().print(table)


@attack_app.command("run", no_args_is_help=True)
def run(
    names: Annotated[list[str], typer.Argument(help="Scenario names, or 'all'.")],
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object as the last line of stdout: "
        '{"attacks": [{"name", "detected", "seconds_to_detect", '
        '"requests_before_detection", "defence", "evidence"}], "honest": {...}}.')] = False,
    model: Annotated[str, typer.Option(
        help="'tiny' (random-weight test model) or 'gemma-3-270m'.")] = "tiny",
    epsilon: Annotated[float, typer.Option(
        min=0.0001, max=1.0, help="Audit probability ε of every gateway.")] = 0.2,
    cap: Annotated[int, typer.Option(
        min=1, help="Most client requests one scenario sends while waiting.")] = 200,
    patience: Annotated[float, typer.Option(
        min=1.0, help="Most seconds one scenario waits for a timed alarm.")] = 60.0,
    checkpoint_interval: Annotated[float, typer.Option(
        min=0.5, help="Seconds between the gateways' signed checkpoints.")] = 2.0,
    run_dir: Annotated[Path | None, typer.Option(
        help="Keep keys, state and logs here (default: a temporary directory, removed "
        "after).")] = None,
) -> None:
    """Play scenarios against live loopback datacenters and report what they noticed.

    One datacenter is shared; a scenario that breaks a gateway gets a fresh one, and
    one that breaks the recomputer a datacenter of its own. `detected` comes only from
    the live system's alarms, verdicts, status and refusals (docs/THREATS.md).

    Exit status 0 only if every scenario run was detected and no honest audit failed.
    """
    from rich.console import Console

    from ivp.attacks.registry import resolve
    from ivp.attacks.runner import Settings, run_scenarios

    try:
        scenarios = resolve(names)
    except KeyError as exc:
        raise typer.BadParameter(str(exc.args[0])) from None
    err = Console(stderr=True)
    root = run_dir or Path(tempfile.mkdtemp(prefix="ivp-attack-"))

    def say(message: str) -> None:
        err.print(f"[dim]·[/dim] {message}")

    settings = Settings(model=model, epsilon=epsilon, cap=cap, patience=patience,
                        checkpoint_interval=checkpoint_interval, say=say)
    try:
        report = run_scenarios(scenarios, root, settings)
    finally:
        if run_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print_report(report, Console(file=sys.stderr if as_json else sys.stdout))
    if as_json:
        print(json.dumps(report.to_json()))
    raise typer.Exit(0 if report.ok else 1)


def print_report(report: Report, console: Console) -> None:
    """The results as a table (what the live system said for each attack)."""
    from rich.table import Table

    table = Table(title="ivp attack — what the live system noticed")
    for col in ("attack", "detected", "seconds", "requests", "evidence"):
        table.add_column(col, justify="right" if col in ("seconds", "requests") else "left")
    for r in report.results:
        shown = [str(e) for e in r.evidence[:2]] + [f"MISSING: {m}" for m in r.missing]
        shown += [f"NOTE: {n}" for n in r.notes] + ([f"ERROR: {r.error}"] if r.error else [])
        table.add_row(r.name, "[green]yes[/green]" if r.detected else "[red]NO[/red]",
                      f"{r.seconds_to_detect:.1f}", str(r.requests_before_detection),
                      "\n".join(s[:140] for s in shown))
    console.print(table)
    h = report.honest
    console.print(
        f"honest audits: {h.get('audited', 0)} verified, {h.get('failed', 0)} failed; "
        f"{sum(r.detected for r in report.results)}/{len(report.results)} attacks detected "
        f"in {report.seconds:.0f} s — " + ("[green]PASS[/green]" if report.ok
                                          else "[red]FAIL[/red]"))
