"""Fleet simulator: many gateways, ε sampling, a finite recomputer, attackers, time.

Time advances in steps of ``step_s`` seconds. In each step, for each trial (an
independent copy of the fleet):

* every serving server receives Poisson(r·L(k)·Δt) requests, with L(k) = 1 + a·sin(2πt/day)
  the diurnal load; a server whose gateway is in UPLOAD (the first ``upload_minutes``
  after each forced reboot) serves nothing;
* each gateway keeps each request for audit with probability ε — an exact binomial
  count Bin(requests, ε) per gateway per step;
* an audited cheating message fails replay with probability d (its detection power);
  an audited message of an honest server raises a false alarm with probability ``fpr``;
* audits join one FIFO queue at the recomputer, which verifies ``capacity`` audits
  per second; a verdict is reached when the backlog ahead of the audit has cleared
  (fluid model: backlog at arrival / capacity; the replay itself is instant at this
  granularity).

Cheating servers, in every step in which they cheat, are simulated one by one: each
gets its own Poisson(r·L·Δt) arrivals and its own Bin(requests, ε) sampling draw, then
Bin(audited, g) of the audited messages cheat and Bin(cheats, d) of those fail replay.
Everything else enters only through the recomputer's load and false alarms, so it is
simulated in aggregate: the sum over gateways of Bin(Poisson(μ_i), ε) counts is
exactly Poisson(ε·Σμ_i), the same distribution as per-gateway draws at a cost
independent of fleet size. That covers the honest servers, the cheating servers in
steps when they do not cheat, the cheating servers of a trial whose first detection is
settled, and attacks that cannot be detected (stego bits within the covert capacity).
A trial stops drawing gateways one by one once its first detection's verdict is in,
so the cost scales as

    trials × cheating gateway-steps until detection (or the horizon)   (per-gateway draws)
  + trials × horizon / Δt                                              (aggregates)

and does not depend on the number of honest servers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ivp.errors import ValidationError
from ivp.plan.sampling import cdf_time, detection_rate

STRATEGIES = ("always", "between-reboots", "after-reboot", "under-load")
DAY_S = 86_400.0
_BUDGET = 1 << 21  # gateway-steps drawn per block (bounds memory to a few tens of MB)
_MAX_BLOCK = 1440


@dataclass(frozen=True)
class Fleet:
    """The defended fleet: servers, traffic, gateway sampling, recomputer, reboots."""

    servers: int = 250_000
    rate: float = 400.0  # mean requests/s per serving server
    diurnal: float = 0.0  # a in L(t) = 1 + a·sin(2πt / 1 day), 0 ≤ a ≤ 1
    epsilon: float = 1e-6  # gateway sampling probability
    detection_power: float = 0.5  # d: P(an audited cheating message fails replay)
    fpr: float = 0.0  # P(an audited honest message fails replay)
    capacity: float = math.inf  # audits/s the recomputer verifies
    reboot_hours: float = 24.0  # forced reboot period; 0 = never
    reboot_sync: bool = False  # all gateways reboot together (else uniformly staggered)
    upload_minutes: float = 0.0  # UPLOAD time after each reboot (serves nothing)

    def __post_init__(self) -> None:
        if not isinstance(self.servers, int) or isinstance(self.servers, bool):
            raise ValidationError(f"servers must be an integer (got {self.servers!r})")
        _require(self.servers >= 1, f"servers must be >= 1 (got {self.servers})")
        _require(_finite(self.rate) and self.rate > 0, f"rate must be > 0 (got {self.rate})")
        _require(
            0 <= self.diurnal <= 1, f"diurnal amplitude must be in [0, 1] (got {self.diurnal})"
        )
        _require(0 < self.epsilon <= 1, f"epsilon must be in (0, 1] (got {self.epsilon})")
        _require(
            0 < self.detection_power <= 1,
            f"detection power d must be in (0, 1] (got {self.detection_power})",
        )
        _require(0 <= self.fpr < 1, f"false-positive rate must be in [0, 1) (got {self.fpr})")
        _require(self.capacity > 0, f"recomputer capacity must be > 0 (got {self.capacity})")
        _require(
            _finite(self.reboot_hours) and self.reboot_hours >= 0,
            f"reboot period must be >= 0 hours (got {self.reboot_hours})",
        )
        _require(
            _finite(self.upload_minutes) and self.upload_minutes >= 0,
            f"upload time must be >= 0 (got {self.upload_minutes})",
        )
        _require(
            self.reboot_hours == 0 or self.upload_minutes < self.reboot_hours * 60,
            "upload time must be shorter than the reboot period",
        )


@dataclass(frozen=True)
class Attack:
    """The attacker: who cheats, how much, when, and how many bits each message hides.

    Strategies (times measured from each gateway's last forced reboot):

    * ``always``: cheat whenever serving (i.i.d.; the closed form's assumption);
    * ``between-reboots``: cheat except the first ``setup_minutes`` after UPLOAD, the
      time needed to re-establish rogue state that each reboot wipes;
    * ``after-reboot``: cheat only in the first ``burst_minutes`` after UPLOAD;
    * ``under-load``: cheat only while the fleet load L(t) ≥ ``load_threshold``,
      when the recomputer is busiest.

    A message that hides ``stego_bits`` ≤ ``covert_capacity`` (the verifier's covert
    capacity bound, bits per message) is indistinguishable from an honest one: such
    an attack is never detected. Otherwise an audited cheating message is caught with
    the fleet's detection power d.
    """

    server_fraction: float = 0.001
    request_fraction: float = 1e-4
    stego_bits: float = 0.0
    covert_capacity: float = 0.0
    strategy: str = "always"
    setup_minutes: float = 60.0
    burst_minutes: float = 60.0
    load_threshold: float = 1.0

    def __post_init__(self) -> None:
        _require(
            0 <= self.server_fraction <= 1,
            f"cheating server fraction must be in [0, 1] (got {self.server_fraction})",
        )
        _require(
            0 <= self.request_fraction <= 1,
            f"cheating request fraction must be in [0, 1] (got {self.request_fraction})",
        )
        _require(self.stego_bits >= 0, f"stego bits must be >= 0 (got {self.stego_bits})")
        _require(self.covert_capacity >= 0, "covert capacity must be >= 0")
        _require(
            self.strategy in STRATEGIES,
            f"unknown strategy {self.strategy!r} (choose from {', '.join(STRATEGIES)})",
        )
        _require(self.setup_minutes >= 0 and self.burst_minutes >= 0, "minutes must be >= 0")
        _require(self.load_threshold > 0, "load threshold must be > 0")

    def power(self, d: float) -> float:
        """Per-message detection power: 0 within the covert capacity, else d."""
        return 0.0 if 0 < self.stego_bits <= self.covert_capacity else d


@dataclass(frozen=True)
class SimConfig:
    """One simulation: fleet, attack, horizon, step, number of trials, seed."""

    fleet: Fleet = field(default_factory=Fleet)
    attack: Attack = field(default_factory=Attack)
    days: float = 30.0
    step_s: float = 60.0
    trials: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        _require(_finite(self.days) and self.days > 0, f"days must be > 0 (got {self.days})")
        _require(_finite(self.step_s) and self.step_s > 0, f"step must be > 0 (got {self.step_s})")
        _require(self.step_s <= self.days * DAY_S, "step must not exceed the horizon")
        _require(self.trials >= 1, f"trials must be >= 1 (got {self.trials})")
        if self.attack.server_fraction > 0:
            _require(
                self.cheating_servers >= 1,
                f"cheating server fraction {self.attack.server_fraction:g} of "
                f"{self.fleet.servers} servers rounds to no server",
            )
        if self.attack.strategy in ("between-reboots", "after-reboot"):
            _require(
                self.fleet.reboot_hours > 0,
                f"strategy {self.attack.strategy!r} needs forced reboots (--reboot-hours > 0)",
            )
        if self.fleet.reboot_hours > 0:
            _require(self.period_steps >= 1, "reboot period is shorter than one step")

    @property
    def steps(self) -> int:
        return math.ceil(self.days * DAY_S / self.step_s)

    @property
    def horizon_s(self) -> float:
        return self.steps * self.step_s

    @property
    def cheating_servers(self) -> int:
        return round(self.attack.server_fraction * self.fleet.servers)

    @property
    def period_steps(self) -> int:
        """Reboot period in steps (1 with no forced reboots: every step alike)."""
        if self.fleet.reboot_hours == 0:
            return 1
        return round(self.fleet.reboot_hours * 3600 / self.step_s)

    def minutes_to_steps(self, minutes: float) -> int:
        return round(minutes * 60 / self.step_s)


@dataclass(frozen=True)
class SimResult:
    """Raw figures per trial (arrays of length ``trials``) and fleet-wide queue figures."""

    config: SimConfig
    detection_s: np.ndarray  # verdict time of the first detection; inf if none
    cheat_messages: np.ndarray  # cheating messages served before that verdict (or horizon)
    false_alarms: np.ndarray  # over the whole horizon
    first_false_alarm_s: np.ndarray  # inf if none
    audits_per_trial: float  # mean audits sent to the recomputer over the horizon
    queue_mean: float  # audits waiting, averaged over steps and trials
    queue_max: float
    backlog_fraction: float  # fraction of steps ending with a backlog
    utilisation: float  # audits verified / (capacity · horizon); 0 with unlimited capacity
    elapsed_s: float

    @property
    def bits(self) -> np.ndarray:
        """Bits exfiltrated before the first detection: stego bits × cheating messages."""
        return self.cheat_messages * self.config.attack.stego_bits


def closed_form(config: SimConfig) -> tuple[float, float]:
    """(q, R) of the sampling planner for this fleet under i.i.d. cheating.

    q = ε·f·d with f = m·g/n (m cheating servers, fraction g of their requests) and
    R = n·r; P(detected by t) = 1 − (1 − q)^(R·t). Strategies, reboot downtime, load
    and a finite recomputer are exactly what this closed form leaves out.
    """
    fl, at = config.fleet, config.attack
    f = config.cheating_servers * at.request_fraction / fl.servers
    return fl.epsilon * f * at.power(fl.detection_power), fl.servers * fl.rate


def closed_form_cdf(config: SimConfig, t_s: np.ndarray) -> np.ndarray:
    """The closed form's P(first detection by t) at each t (seconds)."""
    q, rate = closed_form(config)
    return np.array([cdf_time(float(t), q, rate) for t in np.ravel(t_s)])


def closed_form_quantile(config: SimConfig, p: float) -> float:
    """Time by which the closed form detects with probability p: −ln(1 − p) / λ."""
    q, rate = closed_form(config)
    lam = detection_rate(q, rate)
    return math.inf if lam == 0 else -math.log1p(-p) / lam


def simulate(
    config: SimConfig, progress: Callable[[int, int], None] | None = None
) -> SimResult:
    """Run ``config.trials`` independent copies of the fleet for ``config.days``.

    ``progress(done_steps, total_steps)`` is called after each block of steps.
    """
    started = time.perf_counter()
    fl, at = config.fleet, config.attack
    rng = np.random.default_rng(config.seed)
    trials, total, dt = config.trials, config.steps, config.step_s
    m = config.cheating_servers
    honest = fl.servers - m
    period = config.period_steps
    upload = config.minutes_to_steps(fl.upload_minutes) if fl.reboot_hours else 0

    serve_w, act_w = _windows(config, period, upload)
    if fl.reboot_hours and not fl.reboot_sync:  # staggered: each gateway's phase uniform
        uniform = np.full(period, 1 / period)
        honest_counts = rng.multinomial(honest, uniform, size=trials)
        cheat_counts = rng.multinomial(m, uniform, size=trials)
    else:
        honest_counts = _all_at_phase_zero(honest, trials, period)
        cheat_counts = _all_at_phase_zero(m, trials, period)
    # Gateways per trial and position in the reboot cycle: (trials, period).
    honest_serving = _circular_count(honest_counts, serve_w)
    cheat_serving = _circular_count(cheat_counts, serve_w)
    cheat_active = _circular_count(cheat_counts, act_w)

    g = at.request_fraction
    d_eff = at.power(fl.detection_power)
    detectable = m > 0 and g > 0 and d_eff > 0 and bool(act_w.any())
    per_gateway = np.full(trials, detectable)  # trials whose active cheaters are drawn singly
    t_detect = np.full(trials, math.inf)
    cheat_msgs = np.zeros(trials)
    false_alarms = np.zeros(trials)
    first_fa = np.full(trials, math.inf)
    queue = np.zeros(trials)
    c_step = fl.capacity * dt
    q_sum = q_max = backlog_steps = served = arrived = 0.0

    k = 0
    while k < total:
        idx = np.flatnonzero(per_gateway)
        busiest = int(cheat_active[idx].max()) if idx.size else 0
        block = _MAX_BLOCK if busiest == 0 else max(1, _BUDGET // (idx.size * busiest))
        block = min(block, _MAX_BLOCK, total - k)
        steps = np.arange(k, k + block)
        load = 1 + fl.diurnal * np.sin(2 * math.pi * (steps + 0.5) * dt / DAY_S)
        lam = fl.rate * load * dt  # mean requests per serving gateway per step, (B,)
        if at.strategy == "under-load":
            loaded = (load >= at.load_threshold).astype(np.int64)
        else:
            loaded = np.ones(block, dtype=np.int64)
        pos = steps % period
        active = cheat_active[:, pos] * loaded  # (T, B) cheating gateways cheating now
        idle = cheat_serving[:, pos].copy()  # cheating gateways not drawn one by one
        idle[idx] -= active[idx]

        # Aggregated exactly: Σ_i Bin(Poisson(μ_i), ε) = Poisson(ε·Σ_i μ_i), and the
        # honest audits that fail (probability fpr) split off as an independent Poisson.
        honest_mu = fl.epsilon * lam * honest_serving[:, pos]  # (T, B)
        arrivals = rng.poisson(honest_mu * (1 - fl.fpr) + fl.epsilon * lam * idle)
        fa = rng.poisson(honest_mu * fl.fpr) if fl.fpr > 0 else None
        if fa is not None:
            arrivals += fa
            false_alarms += fa.sum(axis=1)
        arrivals = arrivals.astype(np.float64)
        undetectable = np.flatnonzero(~per_gateway & np.isinf(t_detect))
        if undetectable.size and g > 0:  # never caught: every cheating message counts
            mu = g * lam * active[undetectable]
            cheat_msgs[undetectable] += rng.poisson(mu).sum(axis=1)

        # Active cheating gateways one by one: Poisson arrivals, ε sampling as exact
        # binomial counts, then which audited messages cheat and which fail replay.
        detections = np.zeros((idx.size, block), dtype=np.int64)
        served_cheats = np.zeros((idx.size, block))
        if busiest:
            counts = active[idx].ravel()
            cells = counts.size
            cell = np.repeat(np.arange(cells), counts)  # one entry per active gateway-step
            requests = rng.poisson(np.repeat(np.tile(lam, idx.size), counts))
            sampled = rng.binomial(requests, fl.epsilon)
            arrivals[idx] += np.bincount(cell, sampled, cells).reshape(idx.size, block)
            hit = np.flatnonzero(sampled)
            cheats = rng.binomial(sampled[hit], g)  # audited messages that cheat
            caught = rng.binomial(cheats, d_eff)  # ... and fail replay
            audited_cheats = np.bincount(cell[hit], cheats, cells)
            detections = np.bincount(cell[hit], caught, cells).astype(np.int64)
            detections = detections.reshape(idx.size, block)
            unaudited = np.bincount(cell, requests - sampled, cells).astype(np.int64)
            served_cheats = (audited_cheats + rng.binomial(unaudited, g)).reshape(
                idx.size, block
            )

        # The recomputer's FIFO queue (Lindley recursion, vectorised over the block).
        if math.isfinite(c_step):
            walk = np.cumsum(arrivals - c_step, axis=1)
            q_end = walk - np.minimum(-queue[:, None], np.minimum.accumulate(walk, axis=1))
            q_start = np.concatenate([queue[:, None], q_end[:, :-1]], axis=1)
            served += float((arrivals + q_start - q_end).sum())
            queue = q_end[:, -1].copy()
        else:
            q_end = q_start = np.zeros_like(arrivals)
        arrived += float(arrivals.sum())
        q_sum += float(q_end.sum())
        q_max = max(q_max, float(q_end.max()))
        backlog_steps += float((q_end > 0).sum())

        if idx.size:
            pending = np.isinf(t_detect[idx])
            found = (detections > 0) & pending[:, None]
            rows = np.flatnonzero(found.any(axis=1))
            if rows.size:
                j = found[rows].argmax(axis=1)
                t_detect[idx[rows]] = _verdict_times(
                    rng, k + j, detections[rows, j], q_start[idx[rows], j],
                    arrivals[idx[rows], j], config,
                )
            start_s = steps * dt
            weight = np.clip((t_detect[idx][:, None] - start_s[None, :]) / dt, 0.0, 1.0)
            cheat_msgs[idx] += (served_cheats * weight).sum(axis=1)
            per_gateway[idx] = t_detect[idx] > (k + block) * dt

        if fa is not None:
            found = (fa > 0) & np.isinf(first_fa)[:, None]
            rows = np.flatnonzero(found.any(axis=1))
            if rows.size:
                j = found[rows].argmax(axis=1)
                first_fa[rows] = _verdict_times(
                    rng, k + j, fa[rows, j], q_start[rows, j], arrivals[rows, j], config
                )

        k += block
        if progress is not None:
            progress(k, total)

    horizon = config.horizon_s
    return SimResult(
        config=config,
        detection_s=t_detect,
        cheat_messages=cheat_msgs,
        false_alarms=false_alarms,
        first_false_alarm_s=first_fa,
        audits_per_trial=arrived / trials,
        queue_mean=q_sum / (trials * total),
        queue_max=q_max,
        backlog_fraction=backlog_steps / (trials * total),
        utilisation=served / (fl.capacity * horizon * trials) if math.isfinite(c_step) else 0.0,
        elapsed_s=time.perf_counter() - started,
    )


def summarise(result: SimResult, quantiles: tuple[float, ...] = (0.1, 0.5, 0.9, 0.99)) -> dict:
    """Plain figures for tables and JSON: quantiles (seconds, None beyond the horizon)."""
    cfg = result.config
    horizon = cfg.horizon_s
    det = result.detection_s
    within = det <= horizon
    q, rate = closed_form(cfg)

    def when(values: np.ndarray, p: float) -> float | None:
        """Empirical time quantile; None when it lies beyond the horizon (inf included)."""
        return _none_beyond(_quantile(values, p), horizon)

    return {
        "trials": cfg.trials,
        "cheating_servers": cfg.cheating_servers,
        "horizon_s": horizon,
        "detected_fraction": float(within.mean()),
        "detection_s": {str(p): when(det, p) for p in quantiles},
        "detection_mean_s": float(det[within].mean()) if within.any() else None,
        "closed_form": {
            "per_request": q,
            "fleet_rate": rate,
            "detected_fraction": cdf_time(horizon, q, rate),
            "detection_s": {
                str(p): _none_beyond(closed_form_quantile(cfg, p), horizon) for p in quantiles
            },
        },
        "cheat_messages_mean": float(result.cheat_messages.mean()),
        "bits_before_detection": {
            "mean": float(result.bits.mean()),
            **{str(p): _quantile(result.bits, p) for p in quantiles},
        },
        "false_alarms_mean": float(result.false_alarms.mean()),
        "false_alarms_per_day": float(result.false_alarms.mean() / cfg.days),
        "first_false_alarm_median_s": when(result.first_false_alarm_s, 0.5),
        "audits_per_s": result.audits_per_trial / horizon,
        "capacity_per_s": cfg.fleet.capacity if math.isfinite(cfg.fleet.capacity) else None,
        "queue_mean": result.queue_mean,
        "queue_max": result.queue_max,
        "backlog_fraction": result.backlog_fraction,
        "utilisation": result.utilisation,
        "elapsed_s": result.elapsed_s,
    }


def _verdict_times(
    rng: np.random.Generator,
    step: np.ndarray,
    count: np.ndarray,
    backlog_at_start: np.ndarray,
    arrivals: np.ndarray,
    config: SimConfig,
) -> np.ndarray:
    """Verdict time of the first of ``count`` events that arrive during ``step``.

    The events arrive at uniform times within the step, so the first is at fraction
    u = 1 − U^(1/count) of it (U uniform). In the fluid queue the backlog then is
    max(0, Q_start + u·(arrivals − capacity·Δt)), cleared at ``capacity`` per second.
    """
    dt, capacity = config.step_s, config.fleet.capacity
    u = 1 - rng.random(count.size) ** (1 / count)
    if math.isfinite(capacity):
        backlog = np.maximum(0.0, backlog_at_start + u * (arrivals - capacity * dt))
        wait = backlog / capacity
    else:
        wait = np.zeros(count.size)
    return (step + u) * dt + wait


def _windows(config: SimConfig, period: int, upload: int) -> tuple[np.ndarray, np.ndarray]:
    """Per position in the reboot cycle: is the server serving, is the attacker active."""
    at = config.attack
    pos = np.arange(period)
    serving = pos >= upload
    if at.strategy == "between-reboots":
        active = pos >= upload + config.minutes_to_steps(at.setup_minutes)
    elif at.strategy == "after-reboot":
        active = serving & (pos < upload + config.minutes_to_steps(at.burst_minutes))
    else:  # always, under-load (gated by load per step)
        active = serving.copy()
    return serving, active


def _all_at_phase_zero(count: int, trials: int, period: int) -> np.ndarray:
    """(trials, period) phase counts when every gateway reboots at the same time."""
    counts = np.zeros((trials, period), dtype=np.int64)
    counts[:, 0] = count
    return counts


def _circular_count(counts: np.ndarray, window: np.ndarray) -> np.ndarray:
    """(trials, period): Σ_φ counts[φ]·window[(p − φ) mod period] (circular convolution)."""
    spectrum = np.fft.rfft(counts, axis=1) * np.fft.rfft(window.astype(np.float64))
    out = np.fft.irfft(spectrum, n=counts.shape[1], axis=1)
    return np.rint(out).astype(np.int64)


def _quantile(values: np.ndarray, p: float) -> float:
    """Empirical quantile (inverted CDF: no interpolation, so inf entries are fine)."""
    return float(np.quantile(values, p, method="inverted_cdf"))


def _none_beyond(value: float, horizon: float) -> float | None:
    return value if value <= horizon else None


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValidationError(message)
