"""Views of a report's raw figures: per-temperature tables, the ``--json`` summary, the
details the docs render, and the plots.

Two verdict rules are evaluated on the same δ*_t: the **rule** the recomputer applies,
τ(T) = min(δ, T ln(1 + ε_n)/2) (``ivp.verify.tolerance``), and the **flat** rule τ = δ,
for comparison. Nothing here measures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ivp.protocol.messages import SamplingParams
from ivp.verify.bounds import restricted
from ivp.verify.noise import (
    RECORD_TEMPERATURES,
    NoiseRecords,
    false_alarm_rate,
    greedy_false_alarms,
)
from ivp.verify.report import HONEST_TEMPERATURES, AttackFigures, MessageFigures, Report, param_name
from ivp.verify.stats import (
    auc,
    auc_interval,
    clopper_pearson,
    clopper_pearson_upper,
    detection_curve,
    prefix_statistics,
    tokens_for_auc,
)
from ivp.verify.tolerance import CHANNEL_GOAL, channel_epsilon, tolerance
from ivp.verify.traffic import channel_at

SCHEMA = 2  # of the details JSON (docs/img/verification-<model>.json)
AUC_POINTS = (1, 2, 4, 8, 16, 32, 64)
LONG = 64  # the bar for honest messages: at least 64 tokens
NEAR_TIE_WINDOW = 1e-2  # T = 0: the near-tie density is estimated over gaps up to this


def tau(report: Report, params: SamplingParams) -> float:
    """The rule's tolerance for a message with these parameters."""
    return tolerance(report.delta.delta, params.temperature, params.max_tokens, CHANNEL_GOAL)


def _unrestricted(p: SamplingParams) -> bool:
    return not restricted(p, 1 << 30)


def honest_group(report: Report, ms: Sequence[MessageFigures]) -> dict[str, Any]:
    tokens = sum(m.tokens for m in ms)
    fp = sum(not m.passed_at(tau(report, m.params)) for m in ms)
    flat = sum(not m.passed_at(report.delta.delta) for m in ms)
    return {"messages": len(ms), "tokens": tokens,
            "messages_64_plus": sum(m.tokens >= LONG for m in ms),
            "exact_match_rate": sum(m.exact for m in ms) / tokens if tokens else 0.0,
            "exact_mode_failures": sum(m.exact < m.tokens for m in ms),
            "false_positives": fp, "fpr_upper_95": clopper_pearson_upper(fp, len(ms)),
            "false_positives_flat": flat,
            "max_needed_delta": max((m.statistic for m in ms), default=0.0)}


def false_alarm_costs(report: Report, max_tokens: int) -> list[dict[str, Any]]:
    """Expected honest false alarms per temperature from the calibration's records."""
    return false_alarm_table(report.records, report.delta.delta, max_tokens)


def false_alarm_table(rec: NoiseRecords | None, delta: float, max_tokens: int
                      ) -> list[dict[str, Any]]:
    """Per temperature (greedy and every recorded T): the expected probability that an
    honest ``max_tokens``-token message fails at the verdict's τ(T), and at the flat δ."""
    if rec is None or not rec.positions:
        return []
    out = []
    for t in (0.0, *RECORD_TEMPERATURES):
        tol = tolerance(delta, t, max_tokens, CHANNEL_GOAL)
        fa = greedy_false_alarms(rec, tol) if t == 0 else false_alarm_rate(rec, t, tol)
        flat = greedy_false_alarms(rec, delta) if t == 0 else false_alarm_rate(rec, t, delta)
        out.append({"temperature": t, "tolerance": tol, "positions": fa.positions,
                    "flip_rate": fa.flip_rate, "per_position": fa.alarm_rate,
                    "per_message": fa.per_message(max_tokens),
                    "flat_per_message": flat.per_message(max_tokens)})
    return out


def _channel(report: Report, ms: Sequence[MessageFigures], temperature: float,
             max_tokens: int) -> dict[str, Any]:
    stats = [m.traffic for m in ms if m.traffic is not None]
    if not stats:
        return {}
    delta = report.delta.delta
    tol = tolerance(delta, temperature, max_tokens, CHANNEL_GOAL)
    ch = channel_at(stats, temperature, tol, max_tokens)
    if temperature == 0:
        gaps = np.concatenate([s.z_gaps[:, 0] for s in stats]) if stats else np.zeros(0)
        wide = int(np.sum(gaps <= NEAR_TIE_WINDOW))
        lo, hi = clopper_pearson(wide, ch.tokens)
        scale = 2 * tol / NEAR_TIE_WINDOW  # near-tie density assumed flat on [0, window]
        flat = channel_at(stats, 0.0, delta, max_tokens)
        return {"bits_per_token": ch.bits_per_token, "interval": list(ch.interval),
                "near_tie_positions": ch.near_tie_positions,
                "positions_upper_95": clopper_pearson_upper(ch.near_tie_positions, ch.tokens),
                "density_estimate": wide / ch.tokens * scale if ch.tokens else 0.0,
                "density_interval": [lo * scale, hi * scale],
                "flat_bits_per_token": flat.bits_per_token,
                "goal_met": hi * scale <= CHANNEL_GOAL}
    eps = channel_epsilon(CHANNEL_GOAL, max_tokens)
    by_delta = []  # (label, δ, fraction, interval), in this order
    for label, d in (("τ(T)", tol), ("δ", delta), ("10 δ", 10 * delta),
                     ("bf16 δ", report.bf16_delta)):
        c = channel_at(stats, temperature, d, max_tokens)
        by_delta.append([label, d, c.fraction, list(c.interval)])
    return {"fraction": ch.fraction, "interval": list(ch.interval),
            "bits_per_token": ch.bits_per_token,
            "entropy_bits_per_token": ch.entropy_bits * ch.messages / max(ch.tokens, 1),
            "realised_bits_per_token": ch.realised_bits * ch.messages / max(ch.tokens, 1),
            "theorem_fraction": eps * math.exp(eps * max_tokens) if tol < delta else None,
            "by_delta": by_delta, "goal_met": ch.interval[1] <= CHANNEL_GOAL}


def by_temperature(report: Report) -> list[dict[str, Any]]:
    """Per temperature of the honest traffic (unrestricted sampling)."""
    n = report.plan.honest_max_tokens
    costs = {c["temperature"]: c for c in false_alarm_costs(report, n)}
    rows = []
    for t in HONEST_TEMPERATURES:
        ms = [m for m in report.honest if m.params.temperature == t and _unrestricted(m.params)]
        if not ms:
            continue
        row = {"temperature": t, "tolerance": tolerance(report.delta.delta, t, n, CHANNEL_GOAL),
               **honest_group(report, ms), "false_alarm_cost": costs.get(t),
               "channel": _channel(report, ms, t, n)}
        rows.append(row)
    return rows


def attack_view(report: Report, a: AttackFigures) -> dict[str, Any]:
    ms = a.messages
    flagged = [not m.passed_at(tau(report, m.params)) for m in ms]
    changed = [m.changed for m in ms]
    n_changed = sum(changed)
    det_changed = sum(f and c for f, c in zip(flagged, changed, strict=True))
    longest = max((m.tokens for m in ms), default=0)
    honest = list(report.honest)
    changed_msgs = [m for m, c in zip(ms, changed, strict=True) if c]
    honest_prefix = prefix_statistics(honest, max(longest, 1))
    attack_prefix = prefix_statistics(ms, max(longest, 1))
    points = {}
    for k in AUC_POINTS:
        if k <= longest:
            a_k, h_k = attack_prefix[:, k - 1], honest_prefix[:, k - 1]
            points[str(k)] = [auc(a_k, h_k), *auc_interval(a_k, h_k)]
    taus = np.array([tau(report, m.params) for m in changed_msgs])
    curve = detection_curve(changed_msgs, taus, longest) if changed_msgs else np.zeros(0)
    return {
        "name": a.name, "help": a.help, "messages": len(ms),
        "tokens": sum(m.tokens for m in ms),
        "mean_tokens": float(np.mean([m.tokens for m in ms])) if ms else 0.0,
        "changed": n_changed, "detected": sum(flagged), "detected_changed": det_changed,
        "detected_unchanged": sum(f and not c for f, c in zip(flagged, changed, strict=True)),
        "detection_rate_changed": det_changed / n_changed if n_changed else None,
        "detection_interval": list(clopper_pearson(det_changed, n_changed)),
        "tokens_for_auc_999": tokens_for_auc(ms, honest),
        "tokens_for_auc_999_changed": tokens_for_auc(changed_msgs, honest),
        "auc_at": points,
        "detected_within": {str(k): float(curve[k - 1]) for k in AUC_POINTS if k <= curve.size},
        "median_statistic": float(np.median([m.statistic for m in ms])) if ms else 0.0,
        "undetected_changed_lengths": sorted(
            m.tokens for m, f, c in zip(ms, flagged, changed, strict=True) if c and not f)[:8],
    }


def summary(report: Report) -> dict[str, Any]:
    """The ``--json`` object: per-model, per-temperature figures."""
    h = honest_group(report, report.honest)
    temps = by_temperature(report)
    attacks = [attack_view(report, a) for a in report.attacks]
    c = report.covert
    return {
        "model": report.model,
        "delta": report.delta.delta,
        "honest": {k: h[k] for k in ("messages", "tokens", "messages_64_plus",
                                     "exact_match_rate", "false_positives", "fpr_upper_95")},
        "by_temperature": [
            {"temperature": r["temperature"], "tolerance": r["tolerance"],
             "messages": r["messages"], "false_positives": r["false_positives"],
             "fpr_upper_95": r["fpr_upper_95"],
             "false_alarm_per_message": (r["false_alarm_cost"] or {}).get("per_message"),
             "channel_fraction": r["channel"].get("fraction"),
             "channel_fraction_upper": (r["channel"].get("interval") or [None, None])[1]
             if r["temperature"] > 0 else None,
             "bits_per_token": r["channel"].get("bits_per_token"),
             "channel_goal_met": r["channel"].get("goal_met")} for r in temps],
        "attacks": [{k: a[k] for k in ("name", "messages", "changed", "detected",
                                       "detected_changed", "tokens_for_auc_999")}
                    for a in attacks],
        "covert": {"tolerance": c.delta, "encoder_bits": c.encoder_bits,
                   "encoder_detected": c.encoder_detected, "bf16_delta": report.bf16_delta},
    }


def details(report: Report) -> dict[str, Any]:
    """Everything the markdown needs, as JSON-able raw figures (saved beside the plots)."""
    configs: dict[str, list[MessageFigures]] = {}
    params: dict[str, list[MessageFigures]] = {}
    for m in report.honest:
        configs.setdefault(m.source, []).append(m)
        params.setdefault(param_name(m.params), []).append(m)
    d = report.delta
    c = report.covert
    calibrated = {s[0] for s in d.per_source}
    return {
        "schema": SCHEMA,
        "model": report.model, "quick": report.plan.quick, "seconds": round(report.seconds, 1),
        "device": report.device, "channel_goal": CHANNEL_GOAL,
        "honest_max_tokens": report.plan.honest_max_tokens,
        "delta": {"value": d.delta, "origin": d.origin, "method": d.method,
                  "samples": d.samples, "observed": d.observed, "observed_abs": d.observed_abs,
                  "extrapolated": d.extrapolated, "per_source": [list(s) for s in d.per_source]},
        "bf16_delta": report.bf16_delta,
        "honest": honest_group(report, report.honest),
        "honest_by_config": {k: {**honest_group(report, v), "held_out": k not in calibrated}
                             for k, v in configs.items()},
        "honest_by_params": {k: honest_group(report, v) for k, v in params.items()},
        "by_temperature": by_temperature(report),
        "false_alarm_costs": false_alarm_costs(report, report.plan.honest_max_tokens),
        "attacks": [attack_view(report, a) for a in report.attacks],
        "covert": {"tolerance": c.delta, "encoder_bits": c.encoder_bits,
                   "encoder_messages": c.encoder_messages, "encoder_tokens": c.encoder_tokens,
                   "encoder_detected": c.encoder_detected,
                   "wide": {"delta": c.wide_delta, "bits": c.wide_bits, "tokens": c.wide_tokens,
                            "messages": c.wide_messages, "detected": c.wide_detected}},
        "summary": summary(report),
    }


def plots(report: Report, out_dir: Path) -> list[Path]:
    """Detection vs tokens (changed messages), δ* distributions, channel and false-alarm
    cost vs temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    tag = report.model
    paths = []

    def save(fig: Any, name: str) -> None:
        p = out_dir / f"{name}-{tag}.png"
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for a in report.attacks:
        ms = [m for m in a.messages if m.changed]
        if ms:
            upto = max(m.tokens for m in ms)
            taus = np.array([tau(report, m.params) for m in ms])
            ax.plot(np.arange(1, upto + 1), detection_curve(ms, taus, upto), label=a.name)
    ax.set_xscale("log")
    ax.set_xlabel("output tokens audited per message")
    ax.set_ylabel("fraction of changed messages detected")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{tag}: detection vs output tokens (messages a cheat changed)")
    ax.legend(fontsize=6, loc="lower right", ncol=2)
    ax.grid(alpha=0.3)
    save(fig, "verify-detection")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    bins = np.logspace(-12, 3, 61)

    def values(ms: Sequence[MessageFigures]) -> np.ndarray:
        v = np.concatenate([m.needed for m in ms]) if ms else np.zeros(0)
        return np.clip(v[np.isfinite(v)], 1e-12, 1e3)

    hv = values(report.honest)
    ax.hist(hv, bins=bins, histtype="step", color="k", linewidth=2,
            label=f"honest ({np.mean(hv <= 1e-12):.2%} exact)")
    for a in report.attacks:
        v = values(a.messages)
        ax.hist(v, bins=bins, histtype="step", label=a.name)
    ax.axvline(report.delta.delta, color="r", linestyle=":", label=f"δ = {report.delta.delta:.2g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("δ*_t: noise bound needed to explain the token (exact tokens at 1e-12)")
    ax.set_ylabel("positions")
    ax.set_title(f"{tag}: per-position δ*, honest vs attack")
    ax.legend(fontsize=6, loc="upper right", ncol=2)
    save(fig, "verify-margins")

    rows = [r for r in by_temperature(report) if r["temperature"] > 0 and r["channel"]]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        t = [r["temperature"] for r in rows]
        for k, label in ((0, "rule τ(T)"), (1, "flat δ")):
            f = [r["channel"]["by_delta"][k][2] for r in rows]
            lo = [r["channel"]["by_delta"][k][3][0] for r in rows]
            hi = [r["channel"]["by_delta"][k][3][1] for r in rows]
            ax.errorbar(t, f, yerr=[np.subtract(f, lo), np.subtract(hi, f)], marker="o",
                        capsize=3, label=label)
        ax.axhline(CHANNEL_GOAL, color="r", linestyle=":", label="goal 0.01%")
        ax.set_yscale("log")
        ax.set_xlabel("temperature T")
        ax.set_ylabel("covert bits / sampling-channel bits")
        ax.set_title(f"{tag}: covert channel vs temperature (95% intervals)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "verify-channel")
    costs = [c for c in false_alarm_costs(report, report.plan.honest_max_tokens)
             if c["temperature"] > 0]
    if costs:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        t = [c["temperature"] for c in costs]
        ax.plot(t, [max(c["per_message"], 1e-16) for c in costs], "o-", label="rule τ(T)")
        ax.plot(t, [max(c["flat_per_message"], 1e-16) for c in costs], "s--", label="flat δ")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("temperature T")
        ax.set_ylabel(f"expected false alarms per {report.plan.honest_max_tokens}-token message")
        ax.set_title(f"{tag}: false-alarm cost from calibration noise (1e-16 = none)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "verify-false-alarms")
    return paths


__all__ = ["SCHEMA", "by_temperature", "details", "false_alarm_costs", "honest_group", "plots",
           "summary", "tau"]
