"""The preparation phase: the buffer period before verification devices exist.

The note asks: if the gateways (SNG) and recomputers (SRC) were not manufactured in
advance, how long is the buffer, and what do interim measures deter? This module is
a deliberately simple, explicit model. Time runs in weeks from the agreement (t = 0).

Compute H H100e (h per server), of which a fraction o is powered off from t = 0
until verified; the rest, H_on = (1 − o)·H, stays online. One workforce of ``teams``
teams working ``hours_per_week``:

1. **Interconnect removal** starts at t_r (time to field the teams) and removes
   inter-server interconnect (InfiniBand / scale-out Ethernet; the NVLink domain
   inside one "server" stays) at k_r servers per team-hour, largest clusters first:
   removed(t) = min(H_on, R_r·(t − t_r)⁺),  R_r = teams·hours·k_r·h  [H100e/week].
2. **Devices** exist from t_d (design, validation, first production: the lead time)
   and are made at M per week: supply(t) = M·h·(t − t_d)⁺ H100e.
3. **Installation** (the note's k_i servers per team-hour) begins once devices exist
   and removal is done, t_i = max(t_d, end of removal), online servers first:
   installed(t) = min(H, R_i·(t − t_i)⁺, supply(t)),  R_i = teams·hours·k_i·h.

Undetected exposure, integrated from 0 until every online server has a device:

    intact     ∫ (H_on − removed(t)) dt       cluster-scale training still possible
    bare       ∫ (removed(t) − min(installed(t), H_on)) dt
               no large synchronous runs, but undetected: single-server training,
               low-communication training over the datacenter network, RL/expert
               iteration with gradients elsewhere
    [H100e-weeks]; in FLOP at peak F per H100e and utilisation u:
    intact_flop = intact·F·u·604800,  bare_flop = bare·F·u·e·604800
    with e the efficiency of low-communication training relative to full interconnect.

The buffer period is the time until every online server has a device; until then the
undetected fraction of online compute is 1 − min(installed, H_on)/H_on. All defaults
below that the note does not give are assumptions, marked as such in the CLI and in
docs/PLANNING.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ivp.errors import ValidationError
from ivp.plan.deploy import NOTE_PHASES, WEEKS_PER_MONTH, Phase

SECONDS_PER_WEEK = 7 * 86_400


@dataclass(frozen=True)
class PreparationInputs:
    """Inputs of the preparation-phase model (weeks, H100e, servers)."""

    h100e_total: float = 100e6  # note
    h100e_per_server: float = 400.0  # note
    teams: int = 1000  # note
    hours_per_week: float = 50.0  # note
    install_servers_per_team_hour: float = 1.0  # note (device installation)
    removal_servers_per_team_hour: float = 4.0  # assumption: pulling cables is quicker
    removal_start_weeks: float = 1.0  # assumption: time to field vetted teams
    device_lead_weeks: float = 26.0  # assumption: design → validated devices, none in stock
    devices_per_week: float = 50_000.0  # assumption: manufacturing rate once started
    offline_fraction: float = 0.0  # share of H powered off until verified
    phases: tuple[Phase, ...] = field(default=NOTE_PHASES)
    flop_per_h100e_s: float = 989e12  # H100 SXM dense BF16 peak
    utilisation: float = 0.4  # model FLOP utilisation of a covert run (assumption)
    lowcomm_efficiency: float = 0.5  # assumption: low-communication training vs full
    revenue_per_h100e_month: float = 1000.0  # note: $100B per month from 100M H100e

    def __post_init__(self) -> None:
        for name in (
            "h100e_total", "h100e_per_server", "teams", "hours_per_week",
            "install_servers_per_team_hour", "removal_servers_per_team_hour",
            "devices_per_week", "flop_per_h100e_s",
        ):
            value = getattr(self, name)
            _require(math.isfinite(value) and value > 0, f"{name} must be > 0 (got {value})")
        _require(self.hours_per_week <= 168, "hours_per_week must be <= 168")
        for name in ("removal_start_weeks", "device_lead_weeks", "revenue_per_h100e_month"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value >= 0, f"{name} must be >= 0 (got {value})")
        for name in ("offline_fraction", "utilisation", "lowcomm_efficiency"):
            value = getattr(self, name)
            _require(0 <= value <= 1, f"{name} must be in [0, 1] (got {value})")
        _require(self.offline_fraction < 1, "offline_fraction must be < 1")


@dataclass(frozen=True)
class ClusterMilestone:
    """When the clusters of one rollout phase lose interconnect and gain devices."""

    name: str
    cumulative_h100e: float
    interconnect_removed_week: float
    devices_installed_week: float


@dataclass(frozen=True)
class PreparationPlan:
    """Raw figures of the preparation-phase model (weeks, H100e-weeks, FLOP, $)."""

    inputs: PreparationInputs
    online_h100e: float
    removal_rate_h100e_per_week: float
    install_rate_h100e_per_week: float  # team-limited
    supply_rate_h100e_per_week: float  # manufacturing-limited
    removal_end_week: float
    install_start_week: float
    online_verified_week: float  # the buffer period
    all_verified_week: float
    intact_h100e_weeks: float
    bare_h100e_weeks: float
    intact_fleet_weeks: float  # intact / H_on: weeks of the whole online fleet
    bare_fleet_weeks: float
    intact_flop: float
    bare_flop: float
    single_server_flop: float  # one server for the whole buffer
    offline_h100e_weeks: float  # ∫ powered-off H100e dt (verified after the online fleet)
    offline_cost: float  # revenue forgone by powered-off compute until it is verified
    milestones: tuple[ClusterMilestone, ...]


def removed(inputs: PreparationInputs, t: np.ndarray) -> np.ndarray:
    """H100e without interconnect at week t: min(H_on, R_r·(t − t_r)⁺)."""
    online = inputs.h100e_total * (1 - inputs.offline_fraction)
    rate = _rate(inputs, inputs.removal_servers_per_team_hour)
    return np.minimum(online, rate * np.maximum(0.0, t - inputs.removal_start_weeks))


def installed(inputs: PreparationInputs, t: np.ndarray) -> np.ndarray:
    """H100e with a device at week t: min(H, R_i·(t − t_i)⁺, M·h·(t − t_d)⁺)."""
    start = _install_start(inputs)
    team = _rate(inputs, inputs.install_servers_per_team_hour) * np.maximum(0.0, t - start)
    supply = _supply_rate(inputs) * np.maximum(0.0, t - inputs.device_lead_weeks)
    return np.minimum(inputs.h100e_total, np.minimum(team, supply))


def plan(inputs: PreparationInputs) -> PreparationPlan:
    """Evaluate the model of the module docstring."""
    online = inputs.h100e_total * (1 - inputs.offline_fraction)
    r_rm = _rate(inputs, inputs.removal_servers_per_team_hour)
    r_in = _rate(inputs, inputs.install_servers_per_team_hour)
    r_sup = _supply_rate(inputs)
    removal_end = inputs.removal_start_weeks + online / r_rm
    start = _install_start(inputs)
    online_done = _reach_time(inputs, online)
    all_done = _reach_time(inputs, inputs.h100e_total)

    # Every function is piecewise linear; integrate exactly with all kinks in the grid.
    kinks = [
        inputs.removal_start_weeks, removal_end, inputs.device_lead_weeks, start,
        online_done, all_done,
    ]
    if r_in != r_sup:
        kinks.append((r_in * start - r_sup * inputs.device_lead_weeks) / (r_in - r_sup))
    grid = np.unique(
        np.concatenate([np.linspace(0, all_done, 2001), np.clip(kinks, 0, all_done)])
    )
    rm = removed(inputs, grid)
    inst = installed(inputs, grid)
    intact = float(np.trapezoid(online - rm, grid))
    bare = float(np.trapezoid(rm - np.minimum(inst, online), grid))
    offline = inputs.h100e_total - online
    offline_weeks = float(np.trapezoid(offline - np.maximum(0.0, inst - online), grid))

    per_week = inputs.flop_per_h100e_s * inputs.utilisation * SECONDS_PER_WEEK
    milestones = tuple(
        ClusterMilestone(
            name=p.name,
            cumulative_h100e=p.cumulative_h100e,
            interconnect_removed_week=inputs.removal_start_weeks
            + min(p.cumulative_h100e, online) / r_rm,
            devices_installed_week=_reach_time(inputs, min(p.cumulative_h100e, inputs.h100e_total)),
        )
        for p in inputs.phases
    )
    return PreparationPlan(
        inputs=inputs,
        online_h100e=online,
        removal_rate_h100e_per_week=r_rm,
        install_rate_h100e_per_week=r_in,
        supply_rate_h100e_per_week=r_sup,
        removal_end_week=removal_end,
        install_start_week=start,
        online_verified_week=online_done,
        all_verified_week=all_done,
        intact_h100e_weeks=intact,
        bare_h100e_weeks=bare,
        intact_fleet_weeks=intact / online,
        bare_fleet_weeks=bare / online,
        intact_flop=intact * per_week,
        bare_flop=bare * per_week * inputs.lowcomm_efficiency,
        single_server_flop=inputs.h100e_per_server * online_done * per_week,
        offline_h100e_weeks=offline_weeks,
        offline_cost=offline_weeks / WEEKS_PER_MONTH * inputs.revenue_per_h100e_month,
        milestones=milestones,
    )


def _rate(inputs: PreparationInputs, servers_per_team_hour: float) -> float:
    """H100e per week processed by the workforce: teams · hours · k · h."""
    return inputs.teams * inputs.hours_per_week * servers_per_team_hour * inputs.h100e_per_server


def _supply_rate(inputs: PreparationInputs) -> float:
    return inputs.devices_per_week * inputs.h100e_per_server


def _install_start(inputs: PreparationInputs) -> float:
    online = inputs.h100e_total * (1 - inputs.offline_fraction)
    removal_end = inputs.removal_start_weeks + online / _rate(
        inputs, inputs.removal_servers_per_team_hour
    )
    return max(inputs.device_lead_weeks, removal_end)


def _reach_time(inputs: PreparationInputs, h100e: float) -> float:
    """First week at which installed(t) ≥ h100e: the later of the two ramps reaching it."""
    if h100e <= 0:
        return _install_start(inputs)
    team = _install_start(inputs) + h100e / _rate(inputs, inputs.install_servers_per_team_hour)
    supply = inputs.device_lead_weeks + h100e / _supply_rate(inputs)
    return max(team, supply)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValidationError(message)
