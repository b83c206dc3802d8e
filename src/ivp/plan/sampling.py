"""Sampling coverage: what fraction ε of I/O pairs the gateways must send for replay.

Notation (all per fleet):

    R = r · n            requests per second (r per server, n servers)
    f                    fraction of all requests that cheat
    d                    per-message detection power of one replay (verification report)
    q = ε · f · d        probability that one request is a cheating one that is audited
                         and caught

Closed forms (each request is sampled independently with probability ε by the
gateway's TRNG, after the response has left the server):

    P(detect within N requests) = 1 − (1 − q)^N                        (1)
    P(detect within t seconds)  = 1 − (1 − q)^(R·t) = 1 − e^(−λt),
                                  λ = −R · ln(1 − q) ≈ q·R               (2)
    ε for target P within window W (N = R·W):
        ε = (1 − (1 − P)^(1/N)) / (f · d)          feasible iff ε ≤ 1    (3)
    mean time to first detection  1/λ,  median ln 2 / λ                  (4)
    mean cheating messages served before detection  f·R/λ ≈ 1/(ε·d)      (5)
    audit (replay) load  ε · R  per second                               (6)
    recomputer GPUs  ε · R / (g · ρ)                                     (7)

where g is the requests per second one GPU (one H100e) generates and ρ the measured
replay-vs-generation cost ratio (a prefill replay is ρ times cheaper than generating
the output; 16.5 for Gemma-3-270M on this machine's CPU). When every server's rate
is its GPUs' rate (r = h · g, h GPUs per server), (7) is a fraction ε/ρ of the fleet.

Scaling: with a fixed cheating fraction f, (3) makes ε·N — the number of audits per
window — independent of fleet size, so ε falls as 1/n and the recomputer stays the
same absolute size. With a fixed absolute cheating rate X = f·R, q·R = ε·d·X and ε is
independent of n, so the recomputer grows in proportion to the fleet (a constant
fraction ε/ρ of it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ivp.errors import ValidationError

REPLAY_RATIO_GEMMA_270M_CPU = 16.5  # prefill replay vs generation, measured (ANCHORS.md)


@dataclass(frozen=True)
class SamplingInputs:
    """Inputs of the coverage planner; each is a flag of ``ivp plan sampling``.

    ``epsilon`` set: evaluate that ε instead of solving (3) for it.
    """

    rate: float = 400.0  # r: requests/s per server (default: 400 H100e × 1 request/s)
    servers: int = 250_000  # n
    cheat_fraction: float = 1e-7  # f: e.g. 1 server in 1000 cheating on 1 request in 10^4
    detection_power: float = 0.5  # d: placeholder until the verification report supplies it
    target: float = 0.99  # P
    window_s: float = 86_400.0  # W
    epsilon: float | None = None
    replay_ratio: float = REPLAY_RATIO_GEMMA_270M_CPU  # ρ
    gpu_rate: float = 1.0  # g: requests/s one GPU (H100e) generates
    gpus_per_server: float = 400.0  # h (H100e per server)
    revenue_per_gpu_month: float = 1000.0  # the note: $100B / month from 100M H100e

    def __post_init__(self) -> None:
        _positive("rate (requests/s per server)", self.rate)
        if not isinstance(self.servers, int) or isinstance(self.servers, bool):
            raise ValidationError(f"servers must be an integer (got {self.servers!r})")
        _require(self.servers >= 1, f"servers must be >= 1 (got {self.servers})")
        _unit_interval("cheat fraction f", self.cheat_fraction)
        _unit_interval("detection power d", self.detection_power)
        _require(
            0 < self.target < 1, f"target probability P must be in (0, 1) (got {self.target})"
        )
        _positive("window (seconds)", self.window_s)
        if self.epsilon is not None:
            _unit_interval("epsilon", self.epsilon)
        _positive("replay ratio", self.replay_ratio)
        _positive("GPU serving rate", self.gpu_rate)
        _positive("GPUs per server", self.gpus_per_server)
        _require(self.revenue_per_gpu_month >= 0, "revenue per GPU-month must be >= 0")


@dataclass(frozen=True)
class SamplingPlan:
    """Raw figures of one coverage plan (times in seconds)."""

    inputs: SamplingInputs
    fleet_rate: float  # R, requests/s
    window_requests: float  # N = R·W
    cheat_rate: float  # f·R, cheating requests/s
    epsilon: float
    feasible: bool  # the target is reachable with ε ≤ 1
    per_request: float  # q = ε·f·d
    p_within_window: float  # (1) at N = R·W
    detection_rate: float  # λ of (2), detections/s
    mean_time_s: float  # (4)
    median_time_s: float  # (4)
    cheat_messages_before_detection: float  # (5)
    audits_per_s: float  # (6)
    audits_per_server_per_day: float
    recomputer_gpus: float  # (7)
    fleet_gpus: float  # n·h
    recomputer_share: float  # recomputer GPUs / fleet GPUs
    recomputer_cost_per_month: float  # recomputer GPUs × revenue per GPU-month forgone


def p_detect(n_requests: float, q: float) -> float:
    """(1): P(at least one detection in N requests) = 1 − (1 − q)^N, computed stably."""
    if q >= 1:
        return 1.0 if n_requests > 0 else 0.0
    return -math.expm1(n_requests * math.log1p(-q))


def detection_rate(q: float, fleet_rate: float) -> float:
    """λ of (2): −R · ln(1 − q) detections per second (≈ q·R for small q)."""
    if q >= 1:
        return math.inf
    return -fleet_rate * math.log1p(-q)


def cdf_time(t_s: float, q: float, fleet_rate: float) -> float:
    """(2): P(first detection by time t) = 1 − (1 − q)^(R·t)."""
    return p_detect(fleet_rate * t_s, q)


def epsilon_for_target(target: float, n_requests: float, f: float, d: float) -> float:
    """(3): ε = (1 − (1 − P)^(1/N)) / (f·d). May exceed 1 (then the target is out of reach)."""
    q = -math.expm1(math.log1p(-target) / n_requests)
    return q / (f * d)


def plan(inputs: SamplingInputs) -> SamplingPlan:
    """Solve (3) for ε (or take the given ε) and derive (1)–(7)."""
    fleet_rate = inputs.rate * inputs.servers
    n_window = fleet_rate * inputs.window_s
    f, d = inputs.cheat_fraction, inputs.detection_power
    if inputs.epsilon is None:
        eps = epsilon_for_target(inputs.target, n_window, f, d)
        feasible = eps <= 1
        eps = min(eps, 1.0)
    else:
        eps = inputs.epsilon
        feasible = True
    q = eps * f * d
    lam = detection_rate(q, fleet_rate)
    p_window = p_detect(n_window, q)
    if inputs.epsilon is not None:
        feasible = p_window >= inputs.target
    audits = eps * fleet_rate
    gpus = audits / (inputs.gpu_rate * inputs.replay_ratio)
    fleet_gpus = inputs.servers * inputs.gpus_per_server
    return SamplingPlan(
        inputs=inputs,
        fleet_rate=fleet_rate,
        window_requests=n_window,
        cheat_rate=f * fleet_rate,
        epsilon=eps,
        feasible=feasible,
        per_request=q,
        p_within_window=p_window,
        detection_rate=lam,
        mean_time_s=1 / lam,
        median_time_s=math.log(2) / lam,
        cheat_messages_before_detection=f * fleet_rate / lam,
        audits_per_s=audits,
        audits_per_server_per_day=eps * inputs.rate * 86_400,
        recomputer_gpus=gpus,
        fleet_gpus=fleet_gpus,
        recomputer_share=gpus / fleet_gpus,
        recomputer_cost_per_month=gpus * inputs.revenue_per_gpu_month,
    )


def cheat_fraction_from_rate(cheat_rate: float, rate: float, servers: int) -> float:
    """f = X / (r·n) for an attacker who needs X cheating requests per second.

    Raises:
        ValidationError: X not positive, or larger than the fleet's whole request rate.
    """
    _positive("cheat rate (requests/s)", cheat_rate)
    _positive("rate (requests/s per server)", rate)
    _require(servers >= 1, f"servers must be >= 1 (got {servers})")
    f = cheat_rate / (rate * servers)
    _require(f <= 1, f"cheat rate {cheat_rate:g}/s exceeds the fleet's {rate * servers:g}/s")
    return f


def sweep_servers(
    inputs: SamplingInputs, servers: list[int], cheat_rate: float | None = None
) -> list[SamplingPlan]:
    """Plans for several fleet sizes: fixed f, or (``cheat_rate`` given) fixed X = f·R."""
    plans = []
    for n in servers:
        f = inputs.cheat_fraction
        if cheat_rate is not None:
            f = cheat_fraction_from_rate(cheat_rate, inputs.rate, n)
        plans.append(plan(replace(inputs, servers=n, cheat_fraction=f)))
    return plans


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValidationError(message)


def _positive(name: str, value: float) -> None:
    _require(math.isfinite(value) and value > 0, f"{name} must be > 0 (got {value})")


def _unit_interval(name: str, value: float) -> None:
    _require(0 < value <= 1, f"{name} must be in (0, 1] (got {value})")
