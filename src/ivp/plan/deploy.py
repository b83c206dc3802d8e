"""Deployment cost, timeline and rollout of the note's "Deployment Timeline & Costs".

Every figure is computed from :class:`DeployAssumptions`; nothing is copied from the
note. With the note's assumptions the formulas give:

    servers          S = H / h                      (H H100e in all, h H100e per server)
    team-hours       = S / k                        (k servers installed per team-hour)
    person-hours     = team-hours · m               (m people per team)
    wall clock       = team-hours / teams  [hours]  → / hours-per-week  [weeks]
    manufacturing    = S · device cost
    labour           = person-hours · hourly rate
    total            = manufacturing + labour
    revenue share    = total / monthly revenue

The rollout gives each phase its cumulative H100e; a phase takes
(cumulative_i − cumulative_{i−1}) / install rate, where the install rate is
teams · hours-per-week · k · h H100e per week. docs/PLANNING.md lists where the note's
own tables disagree with these formulas.

Secure boot: a model of B bytes uploaded at r bit/s takes 8·B / r seconds, during
which the server serves nothing; forced reboots every T hours cost a fraction
upload / T of the fleet's serving time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ivp.errors import ValidationError

WEEKS_PER_MONTH = 365.25 / 7 / 12  # ≈ 4.348
HOURS_PER_MONTH = 365.25 * 24 / 12  # ≈ 730.5


@dataclass(frozen=True)
class Phase:
    """One rollout phase: which clusters it covers and the H100e covered once it ends."""

    name: str
    cumulative_h100e: float


#: The note's rollout phases (cluster-size threshold, cumulative H100e), as written.
NOTE_PHASES: tuple[Phase, ...] = (
    Phase(">10M H100e clusters", 50e6),
    Phase(">1M H100e clusters", 100e6),
    Phase(">100K H100e clusters", 100e6),
)


@dataclass(frozen=True)
class DeployAssumptions:
    """The note's assumptions; each is a flag of ``ivp plan deploy``.

    ``global_h100e`` is not stated by the note: its default, 250M, is what "100M
    H100e ≈ 40% of global AI compute" implies. ``offline_fraction`` is the share of
    global compute in clusters that are powered off until verified (the note's
    "1K–100K H100e clusters, ~9%").
    """

    h100e_total: float = 100e6
    h100e_per_server: float = 400.0
    team_size: int = 4
    servers_per_team_hour: float = 1.0
    teams: int = 1000
    hours_per_week: float = 50.0
    device_cost: float = 400.0
    labour_rate: float = 100.0
    monthly_revenue: float = 100e9
    global_h100e: float = 250e6
    offline_fraction: float = 0.09
    phases: tuple[Phase, ...] = field(default=NOTE_PHASES)

    def __post_init__(self) -> None:
        positive = {
            "h100e_total": self.h100e_total,
            "h100e_per_server": self.h100e_per_server,
            "team_size": self.team_size,
            "servers_per_team_hour": self.servers_per_team_hour,
            "teams": self.teams,
            "hours_per_week": self.hours_per_week,
            "monthly_revenue": self.monthly_revenue,
            "global_h100e": self.global_h100e,
        }
        for name, value in positive.items():
            _require(value > 0, f"{name} must be > 0 (got {value})")
        _require(self.hours_per_week <= 168, "hours_per_week must be <= 168")
        _require(self.device_cost >= 0, f"device_cost must be >= 0 (got {self.device_cost})")
        _require(self.labour_rate >= 0, f"labour_rate must be >= 0 (got {self.labour_rate})")
        _require(
            0 <= self.offline_fraction <= 1,
            f"offline_fraction must be in [0, 1] (got {self.offline_fraction})",
        )
        previous = 0.0
        for phase in self.phases:
            _require(
                phase.cumulative_h100e >= previous,
                f"phase {phase.name!r}: cumulative H100e must not decrease "
                f"({phase.cumulative_h100e:g} < {previous:g})",
            )
            previous = phase.cumulative_h100e

    @property
    def install_rate_h100e_per_week(self) -> float:
        """H100e fitted with a gateway per week: teams · hours/week · k · h."""
        return (
            self.teams * self.hours_per_week * self.servers_per_team_hour * self.h100e_per_server
        )


@dataclass(frozen=True)
class CostTable:
    """The "Deployment Timeline & Costs" table, recomputed."""

    servers: float
    team_hours: float
    person_hours: float
    people: int
    wall_clock_hours: float
    wall_clock_weeks: float
    manufacturing_cost: float
    labour_cost: float
    total_cost: float
    revenue_share: float  # total cost / monthly revenue
    share_of_global: float  # h100e_total / global_h100e
    revenue_per_h100e_month: float


@dataclass(frozen=True)
class PhaseRow:
    """One row of the rollout schedule."""

    name: str
    cumulative_h100e: float
    added_h100e: float
    added_servers: float
    weeks: float
    cumulative_weeks: float
    share_of_global: float


@dataclass(frozen=True)
class Rollout:
    """The "Rollout schedule" table, recomputed."""

    rows: tuple[PhaseRow, ...]
    total_weeks: float
    total_months: float
    covered_share: float  # cumulative H100e of the last phase / global
    covered_or_offline_share: float  # covered_share + offline_fraction (capped at 1)
    install_rate_h100e_per_week: float
    total_cost: float  # devices + labour for every server the phases cover


@dataclass(frozen=True)
class UploadPlan:
    """Secure boot: how long a model upload takes and what forced reboots cost."""

    model_bytes: float
    upload_bits_per_s: float
    upload_seconds: float
    reboot_hours: float
    downtime_fraction: float  # upload time / reboot period (0 if no forced reboots)
    revenue_lost_per_month: float


def cost_table(a: DeployAssumptions) -> CostTable:
    """Recompute the note's cost table from its assumptions (formulas in the module doc)."""
    servers = a.h100e_total / a.h100e_per_server
    team_hours = servers / a.servers_per_team_hour
    person_hours = team_hours * a.team_size
    wall_clock_hours = team_hours / a.teams
    manufacturing = servers * a.device_cost
    labour = person_hours * a.labour_rate
    total = manufacturing + labour
    return CostTable(
        servers=servers,
        team_hours=team_hours,
        person_hours=person_hours,
        people=a.teams * a.team_size,
        wall_clock_hours=wall_clock_hours,
        wall_clock_weeks=wall_clock_hours / a.hours_per_week,
        manufacturing_cost=manufacturing,
        labour_cost=labour,
        total_cost=total,
        revenue_share=total / a.monthly_revenue,
        share_of_global=a.h100e_total / a.global_h100e,
        revenue_per_h100e_month=a.monthly_revenue / a.h100e_total,
    )


def rollout(a: DeployAssumptions) -> Rollout:
    """Time each phase at the install rate: weeks_i = ΔH100e_i / (teams·hours·k·h)."""
    rate = a.install_rate_h100e_per_week
    rows: list[PhaseRow] = []
    previous = 0.0
    elapsed = 0.0
    for phase in a.phases:
        added = phase.cumulative_h100e - previous
        weeks = added / rate
        elapsed += weeks
        rows.append(
            PhaseRow(
                name=phase.name,
                cumulative_h100e=phase.cumulative_h100e,
                added_h100e=added,
                added_servers=added / a.h100e_per_server,
                weeks=weeks,
                cumulative_weeks=elapsed,
                share_of_global=phase.cumulative_h100e / a.global_h100e,
            )
        )
        previous = phase.cumulative_h100e
    covered = previous / a.global_h100e
    servers = previous / a.h100e_per_server
    cost = servers * a.device_cost + servers / a.servers_per_team_hour * a.team_size * a.labour_rate
    return Rollout(
        rows=tuple(rows),
        total_weeks=elapsed,
        total_months=elapsed / WEEKS_PER_MONTH,
        covered_share=covered,
        covered_or_offline_share=min(1.0, covered + a.offline_fraction),
        install_rate_h100e_per_week=rate,
        total_cost=cost,
    )


def upload_plan(
    model_bytes: float,
    upload_bits_per_s: float,
    reboot_hours: float,
    monthly_revenue: float,
) -> UploadPlan:
    """Upload time t = 8·bytes / rate; downtime fraction t / reboot period.

    The revenue lost to forced reboots is downtime fraction · monthly revenue (servers
    earn nothing while their weights stream in). ``reboot_hours = 0`` means no forced
    reboots (only the initial boot), so no recurring downtime.
    """
    _require(model_bytes > 0, f"model size must be > 0 (got {model_bytes})")
    _require(upload_bits_per_s > 0, f"upload rate must be > 0 (got {upload_bits_per_s})")
    _require(reboot_hours >= 0, f"reboot period must be >= 0 (got {reboot_hours})")
    seconds = 8 * model_bytes / upload_bits_per_s
    fraction = 0.0 if reboot_hours == 0 else min(1.0, seconds / (reboot_hours * 3600))
    return UploadPlan(
        model_bytes=model_bytes,
        upload_bits_per_s=upload_bits_per_s,
        upload_seconds=seconds,
        reboot_hours=reboot_hours,
        downtime_fraction=fraction,
        revenue_lost_per_month=fraction * monthly_revenue,
    )


_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_quantity(text: str) -> float:
    """Parse ``50M``, ``2.5k``, ``1e8`` or ``100000`` into a float.

    Raises:
        ValidationError: the text is not a number with an optional K/M/B/T suffix.
    """
    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKmMbBgGtT]?)\s*", text)
    if not match:
        raise ValidationError(f"not a quantity: {text!r} (use e.g. 50M, 2.5K, 1e8)")
    try:
        value = float(match.group(1))
    except ValueError as exc:
        raise ValidationError(f"not a quantity: {text!r} (use e.g. 50M, 2.5K, 1e8)") from exc
    return value * _SUFFIX[match.group(2).lower()]


def parse_phase(text: str) -> Phase:
    """Parse ``NAME=CUMULATIVE`` (e.g. ``">10M clusters=50M"``) into a :class:`Phase`.

    Raises:
        ValidationError: no ``=``, an empty name, or a bad quantity.
    """
    name, sep, value = text.rpartition("=")
    if not sep or not name.strip():
        raise ValidationError(f"phase must be NAME=CUMULATIVE_H100E, got {text!r}")
    quantity = parse_quantity(value)
    _require(quantity >= 0, f"phase {name!r}: cumulative H100e must be >= 0")
    return Phase(name.strip(), quantity)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValidationError(message)
