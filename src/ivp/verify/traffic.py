"""What honest traffic offers a covert encoder, recorded while it is served.

An honest server samples each token from its own logits row; the covert channel the
verifier leaves open depends on that row's distribution (``ivp.verify.tolerance``):
the probability p_t of the token the sampler chose, the sampling entropy H_t, and how
many tokens score within a small gap of the winner. :class:`TrafficRecorder` is a
``chooser`` for :class:`~ivp.verify.serving.ServingPath` that picks exactly the
spec's token and keeps those figures per position, so the channel at every
temperature and tolerance is computed from the traffic itself (``channel_at``).

The rows are the server's, not the recomputer's replay: the two differ by the honest
noise (ω ≲ 1e-4 in logits), which moves p_t and H_t by a relative e^{±2ω/T} − 1 —
orders of magnitude below the statistical error of the figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import allowed_set, choose, gumbel
from ivp.verify.bounds import restricted
from ivp.verify.serving import Request

GAPS = 8  # runners-up kept per position


@dataclass(frozen=True)
class TrafficStats:
    """Per position of one message (arrays of length n)."""

    entropy: np.ndarray  # (n,) bits: H of softmax(z/T) over A(z) (T = 0: 0)
    chosen_p: np.ndarray  # (n,) probability of the chosen token under that distribution
    z_gaps: np.ndarray  # (n, GAPS) z_max − z of the 2nd…9th ranked tokens
    s_gaps: np.ndarray  # (n, GAPS) s_max − s of the runners-up by s = z/T + g (T > 0)

    @property
    def tokens(self) -> int:
        return int(self.entropy.shape[0])


def position_stats(row: np.ndarray, seed: int, t: int, params: SamplingParams,
                   token: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(H_t bits, p of ``token``, z gaps, s gaps) of one logits row."""
    z = np.asarray(row, dtype=np.float64)
    vocab = z.shape[0]
    top = np.partition(-z, GAPS)[: GAPS + 1] if vocab > GAPS + 1 else -z
    top = np.sort(-top)[::-1]
    z_gaps = np.full(GAPS, np.inf)
    z_gaps[: top.shape[0] - 1] = top[0] - top[1:]
    s_gaps = np.full(GAPS, np.nan)
    if params.temperature == 0:
        return 0.0, 1.0, z_gaps, s_gaps
    members = allowed_set(z, params) if restricted(params, vocab) else np.arange(vocab)
    scaled = z[members] / params.temperature
    logp = scaled - scaled.max()
    logp -= math.log(np.exp(logp).sum())
    p = np.exp(logp)
    entropy = float(-np.sum(p * logp) / math.log(2))
    where = np.searchsorted(members, token)
    chosen = float(p[where]) if where < members.shape[0] and members[where] == token else 0.0
    s = scaled + gumbel(seed, t, vocab)[members]
    if s.shape[0] > 1:
        best = np.partition(-s, min(GAPS, s.shape[0] - 1))[: GAPS + 1]
        best = np.sort(-best)[::-1]
        s_gaps[: best.shape[0] - 1] = best[0] - best[1:]
    return entropy, chosen, z_gaps, s_gaps


class TrafficRecorder:
    """A chooser that picks the spec's token and records :class:`TrafficStats`."""

    def __init__(self) -> None:
        self._rows: dict[Request, list[tuple[float, float, np.ndarray, np.ndarray]]] = {}

    def __call__(self, row: np.ndarray, request: Request, t: int, so_far: list[int]) -> int:
        token = choose(row, request.seed, t, request.params)
        self._rows.setdefault(request, []).append(
            position_stats(row, request.seed, t, request.params, token))
        return token

    def stats(self, request: Request) -> TrafficStats:
        rows = self._rows.get(request, [])
        if not rows:
            return TrafficStats(np.zeros(0), np.zeros(0), np.zeros((0, GAPS)),
                                np.zeros((0, GAPS)))
        h, p, zg, sg = zip(*rows, strict=True)
        return TrafficStats(np.array(h), np.array(p), np.stack(zg), np.stack(sg))


@dataclass(frozen=True)
class Channel:
    """The covert channel of some honest messages at one temperature and tolerance."""

    temperature: float
    tolerance: float
    messages: int
    tokens: int
    entropy_bits: float  # mean over messages of Σ_t H_t: the sampling channel H(Y)
    bound_bits: float  # log2 of the mean over messages of Π_t (1 + r_t) ≥ E[log2 N]
    theorem_bits: float  # ε e^{ε n} H(Y): the distribution-free bound
    realised_bits: float  # mean over messages of Σ_t log2 |C_t| along the message
    interval: tuple[float, float]  # 95% bootstrap interval: fraction (T > 0), bits/token (0)
    near_tie_positions: int = 0  # T = 0: positions with another token within 2τ

    @property
    def fraction(self) -> float:
        """Covert bits per message over the sampling channel's bits (T > 0)."""
        return self.bound_bits / self.entropy_bits if self.entropy_bits else math.inf

    @property
    def bits_per_token(self) -> float:
        return self.bound_bits * self.messages / self.tokens if self.tokens else 0.0


def channel_at(stats: Sequence[TrafficStats], temperature: float, tolerance: float,
               max_tokens: int, *, resamples: int = 400, seed: int = 0) -> Channel:
    """Channel figures over honest messages served at ``temperature`` (unrestricted).

    T > 0: with ε = e^{2τ/T} − 1 a non-chosen token i is accepted with probability
    p_i (1 − p_i) ε / (1 + p_i ε), so E[N] = E_honest[Π_t (1 + r_t)], r_t =
    (1 − p_t) ε / (1 + p_t ε) (p_t of the sampled token), estimated by the mean over
    these messages; E[log2 N] ≤ log2 E[N] (Jensen). T = 0: the accepted tokens are
    those within 2τ of the top logit; the bits of a message are Σ_t log2 |C_t| (no seed:
    one path), and ``fraction`` is infinite (no sampling entropy; count bits).
    """
    n_msgs = len(stats)
    tokens = sum(s.tokens for s in stats)
    if temperature == 0:
        counts = [1 + np.sum(s.z_gaps <= 2 * tolerance, axis=1) for s in stats]
        bits = np.array([float(np.log2(c).sum()) for c in counts])
        ties = int(sum(int(np.sum(c > 1)) for c in counts))
        mean = float(bits.mean()) if n_msgs else 0.0
        lo, hi = _bootstrap(bits, np.array([s.tokens for s in stats], float), resamples, seed)
        return Channel(0.0, tolerance, n_msgs, tokens, 0.0, mean, math.inf, mean, (lo, hi),
                       ties)
    eps = math.expm1(2 * tolerance / temperature)
    prods = np.array([float(np.prod(1 + (1 - s.chosen_p) * eps / (1 + s.chosen_p * eps)))
                      for s in stats])
    entropy = np.array([float(s.entropy.sum()) for s in stats])
    realised = np.array([float(np.log2(1 + np.sum(s.s_gaps <= 2 * tolerance / temperature,
                                                    axis=1)).sum()) for s in stats])
    mean_prod = float(prods.mean()) if n_msgs else 1.0
    mean_entropy = float(entropy.mean()) if n_msgs else 0.0
    theorem = eps * math.exp(eps * max_tokens) * mean_entropy
    lo, hi = _bootstrap_fraction(prods, entropy, resamples, seed)
    return Channel(temperature, tolerance, n_msgs, tokens, mean_entropy,
                   math.log2(mean_prod), theorem,
                   float(realised.mean()) if n_msgs else 0.0, (lo, hi))


def _bootstrap_fraction(prods: np.ndarray, entropy: np.ndarray, resamples: int,
                        seed: int) -> tuple[float, float]:
    """95% percentile-bootstrap interval of log2(mean Π) / mean H over messages."""
    if prods.size == 0 or not entropy.sum():
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, prods.size, size=(resamples, prods.size))
    fr = np.log2(prods[pick].mean(axis=1)) / np.maximum(entropy[pick].mean(axis=1), 1e-300)
    return float(np.quantile(fr, 0.025)), float(np.quantile(fr, 0.975))


def _bootstrap(values: np.ndarray, weights: np.ndarray, resamples: int,
               seed: int) -> tuple[float, float]:
    if values.size == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, values.size, size=(resamples, values.size))
    means = values[pick].sum(axis=1) / weights[pick].sum(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


__all__ = ["GAPS", "Channel", "TrafficRecorder", "TrafficStats", "channel_at",
           "position_stats"]
