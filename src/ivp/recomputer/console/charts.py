"""Hand-written SVG charts (no chart library: three small charts do not need one).

Each function returns SVG markup; every label is escaped. Colours live in the
stylesheet (classes), so the page needs no inline style under its CSP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Any

from ivp.recomputer.console.views import BIG, Token, audit_rate_band

W, H = 760, 230
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 14, 34
PW, PH = W - LEFT - RIGHT, H - TOP - BOTTOM


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1000 or abs(x) < 0.01:
        return f"{x:.1e}"
    return f"{x:.3g}"


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least ``top``."""
    if top <= 0 or not math.isfinite(top):
        return [0.0, 1.0]
    raw = top / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def _frame(title: str, x_label: str, y_label: str, y_ticks: Sequence[float],
           y_top: float, body: list[str]) -> str:
    parts = [f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" '
             f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
             f"<title>{escape(title)}</title>"]
    for t in y_ticks:
        y = TOP + PH - PH * t / y_top
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + PW}" y1="{y:.1f}" '
                     f'y2="{y:.1f}"/><text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" '
                     f'text-anchor="end">{escape(_fmt(t))}</text>')
    parts += body
    parts.append(f'<line class="axis" x1="{LEFT}" x2="{LEFT + PW}" y1="{TOP + PH}" '
                 f'y2="{TOP + PH}"/><line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" '
                 f'y2="{TOP + PH}"/>')
    parts.append(f'<text class="label" x="{LEFT + PW / 2}" y="{H - 4}" '
                 f'text-anchor="middle">{escape(x_label)}</text>')
    parts.append(f'<text class="label" transform="translate(12 {TOP + PH / 2}) rotate(-90)" '
                 f'text-anchor="middle">{escape(y_label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def delta_per_position(tokens: Sequence[Token], delta: float) -> str:
    """Bars of δ*_t per output position against the manifest's δ (a line); failing
    positions in red, bars beyond the top of the chart clipped with a marker."""
    figures = [t.delta_star for t in tokens if t.delta_star is not None]
    if not figures:
        return '<p class="muted">No per-position figures: this record was not replayed.</p>'
    relative = delta > 0
    unit = delta if relative else 1.0
    values = [(t.delta_star or 0.0) / unit for t in tokens]
    finite = [v for v in values if v < BIG / unit]
    top = max(1.5, min(max(finite, default=1.0), 10.0)) if relative else \
        max(max(finite, default=0.0), 1e-12) * 1.1
    ticks = nice_ticks(top)
    top = ticks[-1]
    n = len(tokens)
    bw = PW / n
    body = []
    for t, v in zip(tokens, values, strict=True):
        clipped = v > top
        h = PH * min(v, top) / top
        x = LEFT + t.position * bw
        cls = "bar fail" if t.failed else ("bar near" if relative and v > 0.5 else "bar")
        ds = "none" if t.delta_star is None or t.delta_star >= BIG else _fmt(t.delta_star)
        tip = f"position {t.position}: {t.text!r}, δ* = {ds}"
        if relative and t.delta_star is not None and t.delta_star < BIG:
            tip += f" = {v:.3g} δ"
        body.append(f'<rect class="{cls}" x="{x + bw * 0.1:.2f}" y="{TOP + PH - h:.2f}" '
                    f'width="{max(bw * 0.8, 0.5):.2f}" height="{max(h, 0.0):.2f}" '
                    f'data-position="{t.position}"><title>{escape(tip)}</title></rect>')
        if clipped:
            cx = x + bw / 2
            body.append(f'<path class="clip" d="M{cx - 4:.1f} {TOP + 7} L{cx + 4:.1f} {TOP + 7}'
                        f' L{cx:.1f} {TOP} Z"/>')
    if relative:
        y = TOP + PH - PH / top
        body.append(f'<line class="bound" x1="{LEFT}" x2="{LEFT + PW}" y1="{y:.1f}" '
                    f'y2="{y:.1f}"/><text class="bound-label" x="{LEFT + PW - 4}" '
                    f'y="{y - 4:.1f}" text-anchor="end">δ = {escape(_fmt(delta))}</text>')
    step = max(1, math.ceil(n / 16))
    for p in range(0, n, step):
        body.append(f'<text class="tick" x="{LEFT + (p + 0.5) * bw:.1f}" y="{TOP + PH + 14}" '
                    f'text-anchor="middle">{p}</text>')
    return _frame("δ* per output position", "output position",
                  "δ* / δ" if relative else "δ* (δ = 0)", ticks, top, body)


def margin_histogram(ratios: Sequence[float], bins: int = 20) -> str:
    """Histogram of max δ* / δ over passed audits: how close honest traffic comes to δ."""
    if not ratios:
        return '<p class="muted">No passed audit with per-position figures yet.</p>'
    counts = [0] * bins
    for r in ratios:
        counts[min(bins - 1, max(0, int(r * bins)))] += 1
    ticks = nice_ticks(max(counts))
    top = ticks[-1]
    bw = PW / bins
    body = []
    for i, c in enumerate(counts):
        h = PH * c / top
        body.append(f'<rect class="bar hist" x="{LEFT + i * bw + 1:.1f}" y="{TOP + PH - h:.1f}" '
                    f'width="{bw - 2:.1f}" height="{h:.1f}"><title>max δ*/δ in '
                    f'[{i / bins:.2f}, {(i + 1) / bins:.2f}): {c}</title></rect>')
    for i in range(0, bins + 1, 4):
        body.append(f'<text class="tick" x="{LEFT + i * bw:.1f}" y="{TOP + PH + 14}" '
                    f'text-anchor="middle">{i / bins:.1f}</text>')
    body.append(f'<line class="bound" x1="{LEFT + PW}" x2="{LEFT + PW}" y1="{TOP}" '
                f'y2="{TOP + PH}"/><text class="bound-label" x="{LEFT + PW - 4}" '
                f'y="{TOP + 12}" text-anchor="end">δ</text>')
    return _frame("max δ* over passed audits", "max δ* / δ of one audit (1 = at the bound)",
                  "passed audits", ticks, top, body)


def audit_rate(points: Sequence[dict[str, Any]], alpha: float, min_pairs: int) -> str:
    """Audit records against pairs served, per boot (both as its latest signed checkpoint
    counts them), inside the band of audit counts the implausible-rate alarm accepts
    (drawn for the most common ε of these boots)."""
    if not points:
        return '<p class="muted">No boot has sent a checkpoint yet.</p>'
    eps = max({p["epsilon"] for p in points}, key=lambda e: sum(q["epsilon"] == e
                                                               for q in points))
    n_max = max(max(p["pairs"] for p in points), 1)
    grid = sorted({round(n_max * i / 40) for i in range(41)} | {n_max})
    band = [(n, *audit_rate_band(n, eps, alpha, min_pairs)) for n in grid]
    y_top_raw = max(max(hi for _, _, hi in band), max(p["audits"] for p in points), 1)
    ticks = nice_ticks(y_top_raw)
    top = ticks[-1]
    xt = nice_ticks(n_max)
    x_top = xt[-1]

    def x(n: float) -> float:
        return LEFT + PW * n / x_top

    def y(k: float) -> float:
        return TOP + PH - PH * k / top

    upper = " ".join(f"{x(n):.1f},{y(hi):.1f}" for n, _, hi in band)
    lower = " ".join(f"{x(n):.1f},{y(lo):.1f}" for n, lo, _ in reversed(band))
    body = [f'<polygon class="band" points="{upper} {lower}"><title>audit counts the '
            f'binomial test accepts at ε = {eps:g} (α = {alpha:g})</title></polygon>',
            f'<line class="expected" x1="{x(0):.1f}" y1="{y(0):.1f}" x2="{x(n_max):.1f}" '
            f'y2="{y(eps * n_max):.1f}"/>']
    for p in points:
        cls = "dot" if p["plausible"] else "dot fail"
        tip = (f'{p["gateway_id"]} boot {p["boot_id"][:12]}: {p["audits"]} audits of '
               f'{p["pairs"]} pairs, {p["received"]} received (expected {p["expected"]:.1f} '
               f'at ε = {p["epsilon"]:g}; p = {p["p"]:.2g})')
        body.append(f'<circle class="{cls}" cx="{x(p["pairs"]):.1f}" cy="{y(p["audits"]):.1f}" '
                    f'r="5"><title>{escape(tip)}</title></circle>')
    for t in xt:
        body.append(f'<text class="tick" x="{x(t):.1f}" y="{TOP + PH + 14}" '
                    f'text-anchor="middle">{escape(_fmt(t))}</text>')
    return _frame("audits vs pairs served", "pairs served (latest signed checkpoint)",
                  "audit records (same checkpoint)", ticks, top, body)


__all__ = ["audit_rate", "delta_per_position", "margin_histogram", "nice_ticks"]
