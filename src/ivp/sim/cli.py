"""`ivp sim` — run the fleet simulator and compare it with the closed form."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ivp.errors import ValidationError
from ivp.plan.cli import console, duration, fail, percent, print_json, si, table
from ivp.plan.sampling import REPLAY_RATIO_GEMMA_270M_CPU
from ivp.sim import fleet as fl


def recomputer_capacity(
    gpus: float, epsilon: float, fleet_rate: float, gpu_rate: float, replay_ratio: float,
    headroom: float,
) -> tuple[float, float]:
    """(GPUs, audits/s). ``gpus`` 0 sizes it: ceil(headroom · ε·R / (g·ρ)); inf: unlimited.

    Each GPU verifies g·ρ audits per second (it generates g requests/s, and a replay
    is ρ times cheaper than generation).
    """
    if gpus < 0 or math.isnan(gpus):
        raise ValidationError(f"recomputer GPUs must be >= 0 (0: size it) (got {gpus})")
    if headroom <= 0:
        raise ValidationError(f"headroom must be > 0 (got {headroom})")
    if gpu_rate <= 0 or replay_ratio <= 0:
        raise ValidationError("GPU rate and replay ratio must be > 0")
    if gpus == 0:
        gpus = max(1.0, math.ceil(headroom * epsilon * fleet_rate / (gpu_rate * replay_ratio)))
    return gpus, gpus * gpu_rate * replay_ratio


def sim_cmd(
    servers: Annotated[int, typer.Option(help="Servers, one gateway each.")] = 250_000,
    days: Annotated[float, typer.Option(help="Simulated horizon (days).")] = 30.0,
    step: Annotated[float, typer.Option(help="Time step (seconds).")] = 60.0,
    trials: Annotated[int, typer.Option(help="Independent copies of the fleet.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    rate: Annotated[float, typer.Option(help="Mean requests/s per server.")] = 400.0,
    diurnal: Annotated[float, typer.Option(help="Daily load swing a: L = 1 + a·sin.")] = 0.0,
    epsilon: Annotated[float, typer.Option(help="Gateway sampling probability ε.")] = 1e-6,
    detection_power: Annotated[
        float, typer.Option(help="d: P(an audited cheating message fails replay).")
    ] = 0.5,
    fpr: Annotated[float, typer.Option(help="P(an audited honest message fails).")] = 0.0,
    recomputer_gpus: Annotated[
        float, typer.Option(help="Recomputer GPUs (0: size for the mean load; inf: unlimited).")
    ] = 0.0,
    headroom: Annotated[float, typer.Option(help="Sizing margin over the mean load.")] = 1.25,
    gpu_rate: Annotated[float, typer.Option(help="Requests/s one GPU generates.")] = 1.0,
    replay_ratio: Annotated[
        float, typer.Option(help="Generation / replay cost (16.5: Gemma-3-270M, CPU).")
    ] = REPLAY_RATIO_GEMMA_270M_CPU,
    reboot_hours: Annotated[float, typer.Option(help="Forced reboot period (0: none).")] = 24.0,
    reboot_sync: Annotated[
        bool, typer.Option(help="All gateways reboot together (else staggered).")
    ] = False,
    upload_minutes: Annotated[
        float, typer.Option(help="Secure-boot upload time per reboot (serves nothing).")
    ] = 0.0,
    cheat_servers: Annotated[float, typer.Option(help="Fraction of servers cheating.")] = 0.001,
    cheat_requests: Annotated[
        float, typer.Option(help="Fraction of a cheating server's requests that cheat.")
    ] = 1e-4,
    stego_bits: Annotated[float, typer.Option(help="Bits hidden per cheating message.")] = 0.0,
    covert_capacity: Annotated[
        float, typer.Option(help="Bits/message the verifier cannot see (covert bound).")
    ] = 0.0,
    strategy: Annotated[
        str, typer.Option(help="always | between-reboots | after-reboot | under-load.")
    ] = "always",
    setup_minutes: Annotated[
        float, typer.Option(help="between-reboots: minutes to re-establish after a reboot.")
    ] = 60.0,
    burst_minutes: Annotated[
        float, typer.Option(help="after-reboot: minutes of cheating after each reboot.")
    ] = 60.0,
    load_threshold: Annotated[
        float, typer.Option(help="under-load: cheat while load L ≥ this.")
    ] = 1.0,
    json_out: Annotated[bool, typer.Option("--json", help="Last line: one JSON object.")] = False,
    plot: Annotated[
        Path | None, typer.Option(help="Draw time-to-detection vs the closed form to this file.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Progress bar on stderr (a terminal).")] = True,
) -> None:
    """Simulate a fleet of gateways under attack: time to detection, bits, queue, alarms."""
    try:
        gpus, capacity = recomputer_capacity(
            recomputer_gpus, epsilon, servers * rate, gpu_rate, replay_ratio, headroom
        )
        config = fl.SimConfig(
            fleet=fl.Fleet(
                servers=servers, rate=rate, diurnal=diurnal, epsilon=epsilon,
                detection_power=detection_power, fpr=fpr, capacity=capacity,
                reboot_hours=reboot_hours, reboot_sync=reboot_sync,
                upload_minutes=upload_minutes,
            ),
            attack=fl.Attack(
                server_fraction=cheat_servers, request_fraction=cheat_requests,
                stego_bits=stego_bits, covert_capacity=covert_capacity, strategy=strategy,
                setup_minutes=setup_minutes, burst_minutes=burst_minutes,
                load_threshold=load_threshold,
            ),
            days=days, step_s=step, trials=trials, seed=seed,
        )
    except ValidationError as exc:
        raise fail(exc) from exc

    with Progress(
        TextColumn("simulating"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(), console=Console(stderr=True),
        disable=not (progress and sys.stderr.isatty()), transient=True,
    ) as bar:
        task = bar.add_task("sim", total=config.steps)
        result = fl.simulate(config, lambda done, total: bar.update(task, completed=done))
    summary = fl.summarise(result)
    summary["recomputer_gpus"] = gpus
    _print(config, summary)
    if plot is not None:
        _plot(result, plot)
        console.print(f"time-to-detection plot written to {plot}")
    if json_out:
        print_json({"config": config, "summary": summary})


def _print(config: fl.SimConfig, s: dict) -> None:
    fleet, attack = config.fleet, config.attack
    console.print(
        f"{si(fleet.servers)} servers × {config.trials} trials, {config.days:g} days in "
        f"{config.step_s:g} s steps: {s['cheating_servers']} cheating servers "
        f"({attack.strategy}), ε = {fleet.epsilon:g}, d = {fleet.detection_power:g}. "
        f"Ran in {s['elapsed_s']:.1f} s."
    )
    closed = s["closed_form"]
    rows = [
        (f"q{float(p) * 100:g}", duration(v), duration(closed["detection_s"][p]))
        for p, v in s["detection_s"].items()
    ]
    rows.append(("mean", duration(s["detection_mean_s"]), "—"))
    rows.append((
        "detected by the horizon", percent(s["detected_fraction"], 4),
        percent(closed["detected_fraction"], 4),
    ))
    console.print(table(
        "Time to first detection (verdict)", rows, ("", "simulated", "closed form (i.i.d.)")
    ))
    bits = s["bits_before_detection"]
    cap = s["capacity_per_s"]
    console.print(table(
        "Attack, recomputer, false alarms",
        [
            ("Cheating messages before detection (mean)", si(s["cheat_messages_mean"])),
            ("Bits exfiltrated before detection (mean / q50 / q99)",
             f"{si(bits['mean'])} / {si(bits['0.5'])} / {si(bits['0.99'])}"),
            ("Audits / capacity", f"{s['audits_per_s']:.4g}/s / "
             + (f"{cap:.4g}/s ({s['recomputer_gpus']:g} GPUs)" if cap else "unlimited")),
            ("Utilisation", percent(s["utilisation"])),
            ("Queue: mean / max (audits)", f"{s['queue_mean']:.3g} / {s['queue_max']:.3g}"),
            ("Steps ending with a backlog", percent(s["backlog_fraction"])),
            ("False alarms per day (mean)", f"{s['false_alarms_per_day']:.4g}"),
            ("First false alarm (median)", duration(s["first_false_alarm_median_s"])),
        ],
        ("figure", "value"),
    ))


def _plot(result: fl.SimResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cfg = result.config
    hours = cfg.horizon_s / 3600
    times = np.sort(result.detection_s[result.detection_s <= cfg.horizon_s]) / 3600
    ecdf = np.arange(1, times.size + 1) / cfg.trials
    grid = np.linspace(0, hours, 400)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step(np.r_[0, times, hours], np.r_[0, ecdf, ecdf[-1] if ecdf.size else 0],
            where="post", label=f"simulated ({cfg.trials} trials)")
    closed = fl.closed_form_cdf(cfg, grid * 3600)
    ax.plot(grid, closed, ls="--", label="closed form 1 − (1 − εfd)^(Rt)")
    ax.set_xlabel("hours")
    ax.set_ylabel("P(first detection by t)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{cfg.attack.strategy}: {cfg.cheating_servers} of {si(cfg.fleet.servers)} "
                 f"servers cheat, ε = {cfg.fleet.epsilon:g}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def register(app: typer.Typer) -> None:
    """Add ``ivp sim`` to the root app."""
    app.command("sim")(sim_cmd)
