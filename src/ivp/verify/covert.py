"""The covert channel that tolerant verification leaves open, and an encoder that uses it.

At generated position t the verifier accepts every token whose δ*_t ≤ δ
(:mod:`ivp.verify.scoring`): the set

    C_t(δ) = {i : position t explained at δ if the server claimed i}.

A server that must never fail an audit can choose only inside C_t, so it hides at
most log2 |C_t| bits there, and Σ_t log2 |C_t| bits in a message (DESIGN.md,
"Covert capacity"). The unconstrained channel it is compared with is the sampling
entropy H_t = −Σ_i p_i log2 p_i of softmax(z/T): what an unverified server could
hide by choosing tokens freely while looking like a sampler.

Expected size of C_t (T > 0, no top-k/top-p). With s_i = z_i/T + g_i and Gumbel g,
D_i = s_i − max_{j≠i} s_j is logistic with location logit(p_i) and scale 1, so the
expected number of tokens other than the winner within ε = 2δ/T of it is

    E[|C_t| − 1] = Σ_i P(−ε ≤ D_i < 0) = Σ_i p_i (1 − p_i) (e^ε − 1) / (1 + p_i (e^ε − 1))

≈ ε (1 − Σ_i p_i²) for small ε.

Capacity of a message. An encoder may steer the whole output, so what it can signal
is log2 N, with N the number of distinct outputs the verifier accepts for this prompt
and seed (a tree: each accepted choice at t opens its own continuation). By Jensen,
E[log2 N] ≤ log2 E[N], and with ε_t = E[|C_t| − 1] per position and positions taken
as independent (off-path positions distributed like the observed ones),
E[N] = Π_t (1 + ε_t), so

    bits ≤ Σ_t log2(1 + ε_t)  ≈ 1.44 Σ_t ε_t.

This holds for ANY encoder, even one that knows the recomputer's logits exactly. The
report now measures the channel from honest traffic per temperature
(``ivp.verify.traffic.channel_at``: E[N] = E_honest[Π_t (1 + r_t)] exactly, no
independence assumption), and the temperature rule of ``ivp.verify.tolerance`` keeps it
below the goal at every T with a proof (docs/VERIFICATION.md, Theorem 2).

:class:`BoundedStego` is the strongest encoder built here: at each position it
computes C_t on its own logits at δ_enc = δ/2 and, where |C_t| ≥ 2, takes
⌊log2 |C_t|⌋ payload bits as the index of its choice. Because the verifier's δ* of
a token exceeds the encoder's by at most the honest noise η = |z_serve − z_replay|_∞
(the sets of :mod:`ivp.verify.bounds` shift by at most η when z does), and the
calibration bounds η ≤ δ/4, every token it emits has δ* ≤ δ/2 + δ/4 < δ: it is never
detected, by construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import allowed_set, gumbel
from ivp.verify.bounds import restricted, row_bounds
from ivp.verify.scoring import _TIE, unrestricted_needed
from ivp.verify.serving import Request, ServingConfig, ServingPath

ENCODER_FRACTION = 0.5  # the encoder works at δ_enc = δ/2 on its own logits


def spec_choice_index(z: np.ndarray, g: np.ndarray | None, params: SamplingParams) -> int:
    if params.temperature == 0:
        return int(np.argmax(z))
    allowed = allowed_set(z, params)
    s = z[allowed] / params.temperature + g[allowed]  # type: ignore[index]
    return int(allowed[int(np.argmax(s))])


def accepted_tokens(row: np.ndarray, seed: int, t: int, params: SamplingParams,
                    delta: float) -> np.ndarray:
    """C_t(δ): every token the verifier would accept at position t (sorted ids).

    Uses the same expressions as :func:`ivp.verify.scoring.score`, so a token in the
    set scores δ*_t ≤ δ on the same logits (ties to the spec's choice count as
    explained only when δ > 0, as there)."""
    z = np.asarray(row, dtype=np.float64)
    g = None if params.temperature == 0 else gumbel(seed, t, z.shape[0])
    a = spec_choice_index(z, g, params)
    if params.temperature > 0 and restricted(params, z.shape[0]):
        ok = np.zeros(z.shape[0], dtype=bool)
        ok[row_bounds(z, g, params).accepted(delta)] = True  # type: ignore[arg-type]
        if delta < _TIE:
            ok[:] = False
    else:
        needed = unrestricted_needed(z, g, params.temperature)
        ok = np.maximum(needed, _TIE) <= delta
    ok[a] = True
    return np.flatnonzero(ok)


def expected_extra(row: np.ndarray, temperature: float, delta: float) -> float:
    """E[|C_t(δ)| − 1] over the seed, for unrestricted sampling at temperature T > 0."""
    z = np.asarray(row, dtype=np.float64) / temperature
    z = z[np.isfinite(z)]
    p = np.exp(z - z.max())
    p /= p.sum()
    e = math.expm1(2 * delta / temperature)
    return float(np.sum(p * (1 - p) * e / (1 + p * e)))


def entropy_bits(row: np.ndarray, temperature: float) -> float:
    """H(softmax(z/T)) in bits: the unconstrained sampling channel at this position."""
    z = np.asarray(row, dtype=np.float64) / temperature
    z = z[np.isfinite(z)]
    logp = z - z.max()
    logp -= math.log(np.exp(logp).sum())
    return float(-np.sum(np.exp(logp) * logp) / math.log(2))


@dataclass(frozen=True)
class ChannelFigures:
    """Covert-channel figures of some messages at one δ (raw sums; ratios derived)."""

    delta: float
    tokens: int
    entropy_bits: float  # Σ_t H_t
    expected_bits: float  # Σ_t log2(1 + E[|C_t| − 1]): bound on any encoder's expected bits
    realised_bits: float  # Σ_t log2 |C_t| along these messages

    @property
    def bits_per_token(self) -> float:
        return self.expected_bits / self.tokens if self.tokens else 0.0

    @property
    def fraction(self) -> float:
        return self.expected_bits / self.entropy_bits if self.entropy_bits else 0.0

    @property
    def realised_per_token(self) -> float:
        return self.realised_bits / self.tokens if self.tokens else 0.0


def channel(rows: Sequence[np.ndarray], seeds: Sequence[int], params: SamplingParams,
            delta: float) -> ChannelFigures:
    """Channel figures over messages: ``rows[m]`` (n_m, V) reference logits of message m
    (the replay of its claimed tokens), ``seeds[m]`` its seed. T > 0; the expectation
    assumes unrestricted sampling (the realised count holds for any parameters)."""
    return channel_growth(rows, seeds, params, (delta,))[0]


def channel_growth(rows: Sequence[np.ndarray], seeds: Sequence[int], params: SamplingParams,
                   deltas: Sequence[float]) -> list[ChannelFigures]:
    """:func:`channel` at several δ over the same messages (one pass over the logits)."""
    tokens = 0
    ent = 0.0
    exp = np.zeros(len(deltas))
    real = np.zeros(len(deltas))
    for logits, seed in zip(rows, seeds, strict=True):
        for t in range(logits.shape[0]):
            row = logits[t]
            tokens += 1
            ent += entropy_bits(row, params.temperature)
            z = np.asarray(row, dtype=np.float64)
            g = gumbel(seed, t, z.shape[0])
            fast = not restricted(params, z.shape[0])
            needed = np.maximum(unrestricted_needed(z, g, params.temperature), _TIE) if fast \
                else None
            for k, d in enumerate(deltas):
                exp[k] += math.log2(1.0 + expected_extra(row, params.temperature, d))
                if needed is not None:  # same rule as accepted_tokens, computed once
                    n_ok = int(np.sum(needed <= d)) + int(needed[spec_choice_index(
                        z, g, params)] > d)
                else:
                    n_ok = accepted_tokens(row, seed, t, params, d).shape[0]
                real[k] += math.log2(n_ok)
    return [ChannelFigures(d, tokens, ent, float(e), float(r))
            for d, e, r in zip(deltas, exp, real, strict=True)]


@dataclass(frozen=True)
class Encoded:
    """One stego-bounded message: the claim and the payload bits it carries."""

    token_ids: tuple[int, ...]
    finish_reason: str
    bits: tuple[int, ...]


class BoundedStego:
    """stego-bounded: hides payload bits choosing only tokens the verifier accepts.

    At each position it computes C_t(δ_enc) on its own logits (δ_enc = δ/2) and, when
    |C_t| ≥ 2, reads b = ⌊log2 |C_t|⌋ payload bits as the index into C_t (sorted ids);
    otherwise it emits the spec's choice. Any payload works; here a PRNG stream.
    """

    name = "stego-bounded"

    def __init__(self, path: ServingPath, delta: float,
                 config: ServingConfig = ServingConfig(1, 1), payload_seed: int = 5) -> None:
        self.path = path
        self.delta = delta
        self.delta_enc = delta * ENCODER_FRACTION
        self.config = config
        self.payload = np.random.default_rng(payload_seed)

    def serve(self, requests: Sequence[Request]) -> list[Encoded]:
        out = []
        for r in requests:
            bits: list[int] = []

            def pick(row: np.ndarray, req: Request, t: int, so_far: list[int],
                     bits: list[int] = bits) -> int:
                cands = accepted_tokens(row, req.seed, t, req.params, self.delta_enc)
                b = math.floor(math.log2(cands.shape[0]))
                if b == 0:  # only the spec's choice is accepted
                    return int(cands[0])
                chunk = [int(x) for x in self.payload.integers(0, 2, size=b)]
                bits.extend(chunk)
                return int(cands[int("".join(map(str, chunk)), 2)])

            (s,) = self.path.serve([r], self.config, chooser=pick)
            out.append(Encoded(s.token_ids, s.finish_reason, tuple(bits)))
        return out

    def decode(self, request: Request, token_ids: Sequence[int]) -> list[int]:
        """The receiver's side: recompute C_t on the same serving path and read each
        claimed token's index back as bits (the receiver knows model, prompt and seed)."""
        bits: list[int] = []
        claimed = list(token_ids)

        def follow(row: np.ndarray, req: Request, t: int, so_far: list[int]) -> int:
            cands = accepted_tokens(row, req.seed, t, req.params, self.delta_enc)
            b = math.floor(math.log2(cands.shape[0]))
            if b:
                index = int(np.searchsorted(cands, claimed[t]))
                bits.extend(int(c) for c in format(index, f"0{b}b"))
            return claimed[t]

        capped = Request(request.prompt_ids, SamplingParams(
            temperature=request.params.temperature, top_k=request.params.top_k,
            top_p=request.params.top_p, max_tokens=len(claimed)), request.seed)
        self.path.serve([capped], self.config, chooser=follow)
        return bits


__all__ = [
    "ENCODER_FRACTION", "BoundedStego", "ChannelFigures", "Encoded", "accepted_tokens",
    "channel", "channel_growth", "entropy_bits", "expected_extra",
]
