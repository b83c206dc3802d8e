"""`ivp plan deploy | sampling | preparation` — thin shells around the planners.

Each command prints rich tables; ``--json`` adds one JSON object as the last line of
stdout. Bad input exits with status 2 and a one-line ``error: ...`` on stderr. The
small formatting helpers here are shared with ``ivp sim``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ivp.errors import ValidationError
from ivp.plan import deploy as dep
from ivp.plan import preparation as prep
from ivp.plan import sampling as smp

console = Console()


# --- formatting -------------------------------------------------------------------------
def si(x: float, digits: int = 3) -> str:
    """250000 → '250K', 1e8 → '100M', 2.5e-7 → '2.5e-07'."""
    if not math.isfinite(x):
        return "∞" if x > 0 else "nan"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g}{suffix}"
    return f"{x:.{digits}g}"


def money(x: float) -> str:
    return "$" + si(x)


def percent(x: float, digits: int = 3) -> str:
    return f"{x * 100:.{digits}g}%"


def duration(seconds: float | None) -> str:
    """Seconds in the most readable unit: '42 s', '5.2 h', '2.3 d'; '—' for none."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    for unit, size in (("y", 365.25 * 86400), ("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, tuples and numpy scalars → JSON types; ±inf and nan → None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def print_json(obj: Any) -> None:
    """Print ``obj`` as one line of JSON: the command's last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(to_jsonable(obj), allow_nan=False), flush=True)


def fail(exc: Exception) -> typer.Exit:
    """Report bad input on stderr; the caller raises the returned ``Exit(2)``."""
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


def table(title: str, rows: list[tuple[str, ...]], headers: tuple[str, ...]) -> Table:
    out = Table(title=title, title_justify="left")
    for i, header in enumerate(headers):
        out.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        out.add_row(*row)
    return out


# --- ivp plan deploy ----------------------------------------------------------------------
def deploy_cmd(
    h100e: Annotated[float, typer.Option(help="H100-equivalents to fit with gateways.")] = 100e6,
    h100e_per_server: Annotated[float, typer.Option(help="Average H100e per server.")] = 400.0,
    team_size: Annotated[int, typer.Option(help="People per installation team.")] = 4,
    servers_per_team_hour: Annotated[
        float, typer.Option(help="Servers one team fits per hour.")
    ] = 1.0,
    teams: Annotated[int, typer.Option(help="Installation teams working in parallel.")] = 1000,
    hours_per_week: Annotated[float, typer.Option(help="Working hours per week.")] = 50.0,
    device_cost: Annotated[float, typer.Option(help="Manufacturing cost per server ($).")] = 400.0,
    labour_rate: Annotated[float, typer.Option(help="Labour cost per person-hour ($).")] = 100.0,
    monthly_revenue: Annotated[
        float, typer.Option(help="Monthly revenue of the whole fleet ($).")
    ] = 100e9,
    global_h100e: Annotated[
        float, typer.Option(help="Global AI compute, H100e (250M: '100M is ~40%').")
    ] = 250e6,
    offline_fraction: Annotated[
        float, typer.Option(help="Share of global compute powered off until verified.")
    ] = 0.09,
    phase: Annotated[
        list[str] | None,
        typer.Option(help="Rollout phase NAME=CUMULATIVE_H100E (repeat; default: the note's)."),
    ] = None,
    model_tb: Annotated[float, typer.Option(help="Model size for secure boot (TB).")] = 1.0,
    upload_gbps: Annotated[
        float, typer.Option(help="Gateway upload rate, Gbit/s (assumed; bench/ measures it).")
    ] = 10.0,
    reboot_hours: Annotated[float, typer.Option(help="Forced reboot period (0: none).")] = 24.0,
    json_out: Annotated[bool, typer.Option("--json", help="Last line: one JSON object.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Draw the rollout to this file.")] = None,
) -> None:
    """Reproduce the note's deployment cost, timeline and rollout from its assumptions."""
    try:
        phases = tuple(dep.parse_phase(p) for p in phase) if phase else dep.NOTE_PHASES
        a = dep.DeployAssumptions(
            h100e_total=h100e, h100e_per_server=h100e_per_server, team_size=team_size,
            servers_per_team_hour=servers_per_team_hour, teams=teams,
            hours_per_week=hours_per_week, device_cost=device_cost, labour_rate=labour_rate,
            monthly_revenue=monthly_revenue, global_h100e=global_h100e,
            offline_fraction=offline_fraction, phases=phases,
        )
        costs = dep.cost_table(a)
        roll = dep.rollout(a)
        upload = dep.upload_plan(model_tb * 1e12, upload_gbps * 1e9, reboot_hours, monthly_revenue)
    except ValidationError as exc:
        raise fail(exc) from exc

    console.print(table(
        f"Deployment: {si(a.h100e_total)} H100e ({percent(costs.share_of_global)} of "
        f"{si(a.global_h100e)} global)",
        [
            ("Total servers", si(costs.servers)),
            ("Team-hours", si(costs.team_hours)),
            ("Person-hours", si(costs.person_hours)),
            ("People", si(costs.people)),
            ("Wall clock", f"{costs.wall_clock_hours:.4g} h = {costs.wall_clock_weeks:.4g} weeks"),
            ("Manufacturing cost", money(costs.manufacturing_cost)),
            ("Labour cost", money(costs.labour_cost)),
            ("Total installation cost", money(costs.total_cost)),
            ("Revenue per H100e-month", money(costs.revenue_per_h100e_month)),
            ("Installation cost / monthly revenue", percent(costs.revenue_share)),
        ],
        ("metric", "value"),
    ))
    console.print(table(
        f"Rollout at {si(roll.install_rate_h100e_per_week)} H100e/week",
        [
            (r.name, si(r.cumulative_h100e), f"+{si(r.added_h100e)}", f"{r.weeks:.3g}",
             f"{r.cumulative_weeks:.3g}", percent(r.share_of_global))
            for r in roll.rows
        ] + [(
            "Total", si(roll.rows[-1].cumulative_h100e if roll.rows else 0), "",
            "", f"{roll.total_weeks:.3g} weeks = {roll.total_months:.3g} months",
            percent(roll.covered_share),
        )],
        ("phase", "cumulative H100e", "added", "weeks", "cumulative weeks", "of global"),
    ))
    console.print(
        f"Covered or powered off after the rollout: {percent(roll.covered_or_offline_share)} "
        f"of global compute ({percent(roll.covered_share)} covered + "
        f"{percent(a.offline_fraction)} offline); rollout cost {money(roll.total_cost)}."
    )
    console.print(table(
        "Secure boot upload",
        [
            ("Model size", f"{model_tb:g} TB"),
            ("Upload rate (assumed)", f"{upload_gbps:g} Gbit/s"),
            ("Upload time per boot", duration(upload.upload_seconds)),
            ("Forced reboot period", f"{reboot_hours:g} h" if reboot_hours else "none"),
            ("Serving time lost to uploads", percent(upload.downtime_fraction)),
            ("Revenue lost per month", money(upload.revenue_lost_per_month)),
        ],
        ("metric", "value"),
    ))
    if plot is not None:
        _plot_rollout(a, roll, plot)
        console.print(f"rollout plot written to {plot}")
    if json_out:
        print_json({"assumptions": a, "costs": costs, "rollout": roll, "upload": upload})


def _plot_rollout(a: dep.DeployAssumptions, roll: dep.Rollout, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    weeks, cumulative = [0.0], [0.0]
    for i, r in enumerate(roll.rows):
        weeks.append(r.cumulative_weeks)
        cumulative.append(r.cumulative_h100e)
        ax.annotate(f"phase {i + 1}: {r.name}", (r.cumulative_weeks, r.cumulative_h100e / 1e6),
                    fontsize=8, textcoords="offset points", xytext=(-150, 10 + 12 * i))
    ax.plot(weeks, [c / 1e6 for c in cumulative], marker="o", label="fitted with gateways")
    ax.axhline(a.global_h100e / 1e6, color="grey", ls="--", label="global AI compute")
    ax.set_ylim(0, a.global_h100e / 1e6 * 1.15)
    ax.axhline(a.h100e_total / 1e6, color="C1", ls=":", label="fleet in the cost table")
    ax.set_xlabel("weeks from start")
    ax.set_ylabel("cumulative H100e (millions)")
    ax.set_title(f"Rollout at {si(roll.install_rate_h100e_per_week)} H100e/week")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- ivp plan sampling -------------------------------------------------------------------------
def sampling_cmd(
    rate: Annotated[float, typer.Option(help="Requests/s per server.")] = 400.0,
    servers: Annotated[int, typer.Option(help="Servers (one gateway each).")] = 250_000,
    cheat_fraction: Annotated[
        float, typer.Option(help="f: fraction of all requests that cheat.")
    ] = 1e-7,
    cheat_rate: Annotated[
        float | None,
        typer.Option(help="Cheating requests/s (absolute); overrides --cheat-fraction."),
    ] = None,
    detection_power: Annotated[
        float, typer.Option(help="d: P(one replayed cheating message fails); placeholder.")
    ] = 0.5,
    target: Annotated[float, typer.Option(help="P: target detection probability.")] = 0.99,
    window_hours: Annotated[float, typer.Option(help="W: window for the target (hours).")] = 24.0,
    epsilon: Annotated[
        float | None, typer.Option(help="Evaluate this ε instead of solving for it.")
    ] = None,
    replay_ratio: Annotated[
        float, typer.Option(help="Generation cost / replay cost (16.5: Gemma-3-270M, CPU).")
    ] = smp.REPLAY_RATIO_GEMMA_270M_CPU,
    gpu_rate: Annotated[float, typer.Option(help="Requests/s one GPU (H100e) generates.")] = 1.0,
    gpus_per_server: Annotated[float, typer.Option(help="GPUs (H100e) per server.")] = 400.0,
    revenue_per_gpu_month: Annotated[
        float, typer.Option(help="Revenue of one GPU-month ($): the recomputer's cost.")
    ] = 1000.0,
    sweep_servers: Annotated[
        str | None, typer.Option(help="Comma-separated fleet sizes to compare, e.g. 1K,10K,250K.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Last line: one JSON object.")] = False,
) -> None:
    """ε needed for a detection target, time to first detection, recomputer size."""
    try:
        if cheat_rate is not None:
            cheat_fraction = smp.cheat_fraction_from_rate(cheat_rate, rate, servers)
        inputs = smp.SamplingInputs(
            rate=rate, servers=servers, cheat_fraction=cheat_fraction,
            detection_power=detection_power, target=target, window_s=window_hours * 3600,
            epsilon=epsilon, replay_ratio=replay_ratio, gpu_rate=gpu_rate,
            gpus_per_server=gpus_per_server, revenue_per_gpu_month=revenue_per_gpu_month,
        )
        result = smp.plan(inputs)
        sweep = []
        if sweep_servers:
            sizes = [int(dep.parse_quantity(s)) for s in sweep_servers.split(",") if s.strip()]
            sweep = smp.sweep_servers(inputs, sizes, cheat_rate)
    except ValidationError as exc:
        raise fail(exc) from exc

    solved = "given" if epsilon is not None else f"for P = {target:g} within {window_hours:g} h"
    rows = [
        ("Fleet request rate R", f"{si(result.fleet_rate)}/s"),
        ("Cheating fraction f / rate", f"{result.inputs.cheat_fraction:.3g} / "
         f"{si(result.cheat_rate)}/s"),
        (f"ε ({solved})", f"{result.epsilon:.4g}"),
        ("Target reachable", "yes" if result.feasible else "NO (even ε = 1 falls short)"),
        ("Per-request detection q = ε·f·d", f"{result.per_request:.4g}"),
        (f"P(detect within {window_hours:g} h)", f"{result.p_within_window:.6g}"),
        ("Mean / median time to first detection",
         f"{duration(result.mean_time_s)} / {duration(result.median_time_s)}"),
        ("Cheating messages before detection (mean)", si(result.cheat_messages_before_detection)),
        ("Audits (replays)", f"{si(result.audits_per_s)}/s; "
         f"{result.audits_per_server_per_day:.3g} per server-day"),
        ("Recomputer GPUs", f"{result.recomputer_gpus:.4g}"),
        ("Recomputer / fleet", f"{percent(result.recomputer_share)} of {si(result.fleet_gpus)}"),
        ("Recomputer cost (revenue forgone)", f"{money(result.recomputer_cost_per_month)}/month"),
    ]
    console.print(table("Sampling coverage", rows, ("figure", "value")))
    if sweep:
        what = f"fixed {si(cheat_rate)} cheating requests/s" if cheat_rate else (
            f"fixed f = {cheat_fraction:.3g}"
        )
        console.print(table(
            f"Scaling with fleet size ({what})",
            [
                (si(p.inputs.servers), f"{p.epsilon:.3g}", f"{si(p.audits_per_s)}/s",
                 f"{p.recomputer_gpus:.3g}", percent(p.recomputer_share),
                 duration(p.mean_time_s))
                for p in sweep
            ],
            ("servers", "ε", "audits", "recomputer GPUs", "of fleet", "mean detection"),
        ))
    if json_out:
        print_json({"plan": result, "sweep": sweep})


# --- ivp plan preparation -------------------------------------------------------------------------
def preparation_cmd(
    h100e: Annotated[float, typer.Option(help="H100e in the fleet.")] = 100e6,
    h100e_per_server: Annotated[float, typer.Option(help="H100e per server.")] = 400.0,
    teams: Annotated[int, typer.Option(help="Teams (removal, then installation).")] = 1000,
    hours_per_week: Annotated[float, typer.Option(help="Working hours per week.")] = 50.0,
    install_servers_per_team_hour: Annotated[
        float, typer.Option(help="Device installation rate (the note: 1).")
    ] = 1.0,
    removal_servers_per_team_hour: Annotated[
        float, typer.Option(help="Interconnect removal rate (assumption).")
    ] = 4.0,
    removal_start_weeks: Annotated[
        float, typer.Option(help="Weeks to field the teams (assumption).")
    ] = 1.0,
    device_lead_weeks: Annotated[
        float, typer.Option(help="Weeks until the first devices exist (assumption).")
    ] = 26.0,
    devices_per_week: Annotated[
        float, typer.Option(help="Devices manufactured per week (assumption).")
    ] = 50_000.0,
    offline_fraction: Annotated[
        float, typer.Option(help="Share of the fleet powered off until verified.")
    ] = 0.0,
    phase: Annotated[
        list[str] | None,
        typer.Option(help="Cluster class NAME=CUMULATIVE_H100E, largest first (repeat)."),
    ] = None,
    flop_per_h100e: Annotated[
        float, typer.Option(help="Peak FLOP/s of one H100e (dense BF16).")
    ] = 989e12,
    utilisation: Annotated[float, typer.Option(help="MFU of a covert run (assumption).")] = 0.4,
    lowcomm_efficiency: Annotated[
        float, typer.Option(help="Training efficiency without interconnect (assumption).")
    ] = 0.5,
    revenue_per_h100e_month: Annotated[
        float, typer.Option(help="Revenue of one H100e-month ($).")
    ] = 1000.0,
    json_out: Annotated[bool, typer.Option("--json", help="Last line: one JSON object.")] = False,
) -> None:
    """The buffer before devices exist: what interconnect removal alone leaves undetected."""
    try:
        phases = tuple(dep.parse_phase(p) for p in phase) if phase else dep.NOTE_PHASES
        inputs = prep.PreparationInputs(
            h100e_total=h100e, h100e_per_server=h100e_per_server, teams=teams,
            hours_per_week=hours_per_week,
            install_servers_per_team_hour=install_servers_per_team_hour,
            removal_servers_per_team_hour=removal_servers_per_team_hour,
            removal_start_weeks=removal_start_weeks, device_lead_weeks=device_lead_weeks,
            devices_per_week=devices_per_week, offline_fraction=offline_fraction,
            phases=phases, flop_per_h100e_s=flop_per_h100e, utilisation=utilisation,
            lowcomm_efficiency=lowcomm_efficiency,
            revenue_per_h100e_month=revenue_per_h100e_month,
        )
        result = prep.plan(inputs)
    except ValidationError as exc:
        raise fail(exc) from exc

    console.print(table(
        "Preparation phase timeline (weeks from the agreement)",
        [
            ("Interconnect removal", f"{inputs.removal_start_weeks:.3g} → "
             f"{result.removal_end_week:.3g}",
             f"{si(result.removal_rate_h100e_per_week)} H100e/week"),
            ("First devices", f"{inputs.device_lead_weeks:.3g}",
             f"{si(result.supply_rate_h100e_per_week)} H100e/week made"),
            ("Device installation", f"{result.install_start_week:.3g} → "
             f"{result.all_verified_week:.3g}", _install_pace(result)),
            ("Buffer: online fleet all verified", f"{result.online_verified_week:.3g}", ""),
        ],
        ("step", "weeks", "rate"),
    ))
    console.print(table(
        "What stays undetected until devices are installed",
        [
            ("Interconnect intact (cluster-scale training possible)",
             si(result.intact_h100e_weeks), f"{result.intact_fleet_weeks:.3g}",
             f"{result.intact_flop:.3g}"),
            ("Interconnect removed, no device (single-server, low-comm., RL)",
             si(result.bare_h100e_weeks), f"{result.bare_fleet_weeks:.3g}",
             f"{result.bare_flop:.3g}"),
            ("One server for the whole buffer", "", "", f"{result.single_server_flop:.3g}"),
        ],
        ("state", "H100e-weeks", "fleet-weeks", "training FLOP (upper bound)"),
    ))
    console.print(table(
        "Cluster classes (largest first)",
        [
            (m.name, si(m.cumulative_h100e), f"{m.interconnect_removed_week:.3g}",
             f"{m.devices_installed_week:.3g}")
            for m in result.milestones
        ],
        ("clusters", "cumulative H100e", "interconnect gone (week)", "devices in (week)"),
    ))
    if offline_fraction:
        console.print(
            f"Powered-off compute: {si(result.offline_h100e_weeks)} H100e-weeks, "
            f"{money(result.offline_cost)} of revenue forgone."
        )
    if json_out:
        print_json(result)


def _install_pace(result: prep.PreparationPlan) -> str:
    teams, supply = result.install_rate_h100e_per_week, result.supply_rate_h100e_per_week
    limit = "teams" if teams <= supply else "device supply"
    return f"≤ {si(min(teams, supply))} H100e/week fitted ({limit} limit)"


def register(app: typer.Typer) -> None:
    """Add ``ivp plan deploy | sampling | preparation`` to the root app."""
    plan_app = typer.Typer(
        help="Planners: deployment cost and timeline, sampling coverage, preparation phase.",
        no_args_is_help=True,
    )
    plan_app.command("deploy")(deploy_cmd)
    plan_app.command("sampling")(sampling_cmd)
    plan_app.command("preparation")(preparation_cmd)
    app.add_typer(plan_app, name="plan")
