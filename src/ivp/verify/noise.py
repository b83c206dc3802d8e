"""What honest noise is, for the verdict: the half-span of the logit differences.

An honest server computes logits z' that differ from the recomputer's z by
e = z' − z. Sampler spec v1 cannot see a common shift of the whole row (top-k ranks,
softmax(z/T) and argmax_i z_i/T + g_i are all unchanged when every z_i moves by the
same c), so the noise that matters is not max_i |e_i| but the **half-span**

    ω(e) = (max_i e_i − min_i e_i) / 2 = min_c max_i |e_i − c|,

and, for unrestricted sampling, only over the tokens that can win at all: the
**decisive window** R_T = {i : z_i ≥ max z − W_T} ∪ {i : z'_i ≥ max z' − W_T} with
W_T = T·(G_MAX − G_MIN) (a token more than W_T below the top cannot beat it whatever
its noise; T = 0: R_0 = {argmax z, argmax z'}). The manifest's δ bounds ω over the
whole row; docs/VERIFICATION.md proves that a server whose ω stays within the tolerance
never fails (``ivp.verify.tolerance``).

This module measures ω per position (:func:`half_span`, :func:`decisive_span`) and keeps
compact per-position records (:class:`NoiseRecords`: the top tokens of the server's row,
their noise and normalisers) from which :func:`false_alarm_rate` computes, for any
temperature and tolerance, the expected false-alarm probability of an honest position
over the seed — exactly, by the exponential-race form of Gumbel-max, not by sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ivp.protocol.sampler import G_MAX, G_MIN

TOP = 64  # tokens kept per position: the server row's top ranks
# Temperatures at which the records keep the server row's log-normaliser.
RECORD_TEMPERATURES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 5.0)


def half_span(diff: np.ndarray) -> np.ndarray:
    """ω per row of ``diff`` (n, V) = z' − z: (max − min)/2, float64 (n,)."""
    d = np.asarray(diff, dtype=np.float64)
    return (d.max(axis=-1) - d.min(axis=-1)) / 2


def decisive_window(z: np.ndarray, z_served: np.ndarray, temperature: float) -> np.ndarray:
    """R_T as a boolean mask over the vocabulary (module doc)."""
    if temperature == 0:
        mask = np.zeros(z.shape[0], dtype=bool)
        mask[int(np.argmax(z))] = mask[int(np.argmax(z_served))] = True
        return mask
    width = temperature * (G_MAX - G_MIN)
    return (z >= z.max() - width) | (z_served >= z_served.max() - width)


def decisive_span(z: np.ndarray, z_served: np.ndarray, temperature: float) -> float:
    """ω over the decisive window R_T of one position."""
    e = np.asarray(z_served, np.float64) - np.asarray(z, np.float64)
    inside = e[decisive_window(z, z_served, temperature)]
    return float(inside.max() - inside.min()) / 2


@dataclass(frozen=True)
class NoiseRecords:
    """Per compared position: the server row's top ``TOP`` tokens and their noise.

    ``served`` (n, TOP) float32 z'_i of the top tokens by z' (descending), ``noise``
    (n, TOP) float32 e_i = z'_i − z_i of the same tokens (computed in float64),
    ``lse`` (n, len(RECORD_TEMPERATURES)) float64 log Σ_i exp(z'_i/T) over the whole row,
    ``span`` (n,) float64 ω over the whole row.
    """

    served: np.ndarray
    noise: np.ndarray
    lse: np.ndarray
    span: np.ndarray

    @property
    def positions(self) -> int:
        return int(self.span.shape[0])

    @staticmethod
    def of(z_served: np.ndarray, z: np.ndarray) -> NoiseRecords:
        """Records of aligned rows (n, V): the server's z' and the replay's z."""
        zs = np.asarray(z_served, dtype=np.float64)
        zr = np.asarray(z, dtype=np.float64)
        top = top_ranks(zs, TOP)
        rows = np.arange(zs.shape[0])[:, None]
        lse = np.stack([_logsumexp(zs / t) for t in RECORD_TEMPERATURES], axis=1)
        return NoiseRecords(zs[rows, top].astype(np.float32),
                            (zs[rows, top] - zr[rows, top]).astype(np.float32),
                            lse, half_span(zs - zr))

    @staticmethod
    def concat(parts: Sequence[NoiseRecords]) -> NoiseRecords:
        if not parts:
            return NoiseRecords(np.zeros((0, TOP), np.float32), np.zeros((0, TOP), np.float32),
                                np.zeros((0, len(RECORD_TEMPERATURES))), np.zeros(0))
        return NoiseRecords(*(np.concatenate([getattr(p, f) for p in parts])
                              for f in ("served", "noise", "lse", "span")))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"served": self.served, "noise": self.noise, "lse": self.lse, "span": self.span}


def top_ranks(z: np.ndarray, k: int) -> np.ndarray:
    """``np.argsort(-z, axis=1, kind="stable")[:, :k]`` (ties by lower id first) without
    sorting whole rows: a partition finds each row's k-th value, and only the tokens at
    or above it are sorted (a vLLM calibration keeps records of 12,288 rows of 262,144
    logits: full sorts were most of its time)."""
    n, v = z.shape
    if v <= k:
        return np.argsort(-z, axis=1, kind="stable")
    kth = -np.partition(-z, k - 1, axis=1)[:, k - 1]  # each row's k-th largest value
    out = np.empty((n, k), dtype=np.int64)
    for r in range(n):
        cand = np.flatnonzero(z[r] >= kth[r])  # ascending ids: a stable sort keeps ties so
        out[r] = cand[np.argsort(-z[r, cand], kind="stable")[:k]]
    return out


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1)
    return m + np.log(np.exp(x - m[..., None]).sum(axis=-1))


@dataclass(frozen=True)
class FalseAlarms:
    """Expected honest false alarms at one (T, tolerance), from noise records."""

    temperature: float
    tolerance: float
    positions: int
    flip_rate: float  # P(honest token ≠ the replay's choice) per position
    alarm_rate: float  # P(honest token not explained at the tolerance) per position (bound)
    worst: float  # largest per-position alarm probability seen

    def per_message(self, tokens: int) -> float:
        """P(at least one false alarm in a message of ``tokens`` positions) ≤ n · rate."""
        return min(1.0, tokens * self.alarm_rate)


def false_alarm_rate(records: NoiseRecords, temperature: float, tolerance: float) -> FalseAlarms:
    """Expected probability over the seed that an honest position fails at ``tolerance``.

    T > 0, unrestricted sampling. The server picks j = argmax z'_i/T + g_i. With the
    exponential race (τ_i = E_i / p'_i, E_i ~ Exp(1), p' = softmax(z'/T)), the chance
    that j wins and a token i scores within κ below it is exactly
    p'_j p'_i (e^κ − 1) / (1 + p'_i (e^κ − 1)). The replay sees s_i − s_j =
    (s'_i − s'_j) + (e_j − e_i)/T, so j fails at tolerance δ_T iff some i has
    s'_j − s'_i < κ_ij = (e_j − e_i − 2δ_T)/T. Summing the exact pair terms over the
    recorded top tokens (a union bound) and bounding pairs that involve the rest by
    2 m_tail (e^{κ_max} − 1), κ_max = 2(ω − δ_T)/T, gives an upper bound; the honest
    flip rate is the same sum at δ_T = 0 over pairs with e_j > e_i.

    T = 0 (greedy) is deterministic per position: see :func:`greedy_false_alarms`.
    """
    if temperature <= 0:
        raise ValueError("false_alarm_rate is for T > 0; use greedy_false_alarms at T = 0")
    column = _recorded(temperature)
    flips = np.zeros(records.positions)
    alarms = np.zeros(records.positions)
    for start in range(0, records.positions, _CHUNK):
        part = slice(start, start + _CHUNK)
        logp = records.served[part].astype(np.float64) / temperature \
            - records.lse[part, column][:, None]
        p = np.exp(logp)  # (c, K) p'_i of the recorded tokens
        e = records.noise[part].astype(np.float64)
        tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
        gap = e[:, :, None] - e[:, None, :]  # [t, j, i] = e_j − e_i
        span = records.span[part]
        for out, tol in ((alarms, tolerance), (flips, 0.0)):
            grow = np.expm1(np.clip((gap - 2 * tol) / temperature, 0.0, None))
            pi = p[:, None, :]
            terms = p[:, :, None] * pi * grow / (1 + pi * grow)  # exact pair terms
            k = np.arange(p.shape[1])
            terms[:, k, k] = 0.0
            reach = np.expm1(np.clip(2 * (span - tol) / temperature, 0.0, None))
            # a probability: past 1 the union bound says nothing more (a flat row at a
            # tiny T sends the tail term to e^{2ω/T})
            out[part] = np.minimum(1.0, terms.sum(axis=(1, 2)) + 2 * tail * reach)
    n = records.positions
    return FalseAlarms(temperature, tolerance, n, float(flips.mean()) if n else 0.0,
                       float(alarms.mean()) if n else 0.0, float(alarms.max(initial=0.0)))


_CHUNK = 512  # positions per vectorised block: (512, 64, 64) float64 pair terms


def _recorded(temperature: float) -> int:
    """The records' column of ``temperature`` (the normaliser over the whole row is
    kept only at RECORD_TEMPERATURES)."""
    grid = np.asarray(RECORD_TEMPERATURES)
    hit = np.flatnonzero(np.isclose(grid, temperature, rtol=1e-9, atol=0))
    if not hit.size:
        raise ValueError(f"T = {temperature:g} is not one of the recorded temperatures "
                         f"{', '.join(f'{t:g}' for t in RECORD_TEMPERATURES)}")
    return int(hit[0])


def greedy_false_alarms(records: NoiseRecords, tolerance: float) -> FalseAlarms:
    """T = 0: the honest token is argmax z'; it fails iff (z_a − z_tok)/2 > tolerance,
    a = argmax z. Both tokens lie in the records (a ranks first by z = z' − e among the
    server's top tokens unless the noise exceeds the recorded gap, which it never does
    at these magnitudes; such a position is counted as an alarm)."""
    z = records.served.astype(np.float64) - records.noise.astype(np.float64)  # replay z, top
    a = np.argmax(z, axis=1)
    rows = np.arange(records.positions)
    need = (z[rows, a] - z[:, 0]) / 2  # column 0 is the server's choice (its top token)
    flips = a != 0
    alarms = need > tolerance
    n = records.positions
    return FalseAlarms(0.0, tolerance, n, float(flips.mean()) if n else 0.0,
                       float(alarms.mean()) if n else 0.0, float(alarms.max(initial=False)))


def near_tie_rate(gaps: np.ndarray, window: float) -> float:
    """Fraction of positions whose top-2 logit gap is at most ``window``."""
    return float(np.mean(np.asarray(gaps) <= window)) if len(gaps) else 0.0


__all__ = [
    "RECORD_TEMPERATURES", "TOP", "FalseAlarms", "NoiseRecords", "decisive_span",
    "decisive_window", "false_alarm_rate", "greedy_false_alarms", "half_span",
    "near_tie_rate",
]
