"""The replay's output head in two precisions: cheap bf16 rows with a proven error
bound, exact float32 logits only where the verdict needs them.

For Gemma-3-270M the output head (262,144 x 640, tied to the embedding) is 60% of a
replay's FLOPs, yet scoring needs exact logits of a handful of tokens per position:
the claimed token and the few that could be the spec's choice (``ivp.verify.pruned``).
So the head runs once in bf16 (3x faster than float32 on this CPU's AVX512-BF16), and
``BoundedLogits.exact`` computes float32 logits for the entries asked for.

The bound. x is the float32 hidden row, w_i the float32 head row, u = 2^-8 (bf16 unit
roundoff), γ_n = n·2^-24 / (1 − n·2^-24) (float32 sums of n terms, any order), H the
hidden size, Σ = Σ_j |x_j||w_ij| ≤ ‖x‖₂‖w_i‖₂ (Cauchy–Schwarz):

* rounding x and w_i to bf16 moves Σ_j x_j w_ij by at most (2u + u²)·Σ;
* the bf16 GEMM sums exact bf16 x bf16 products in float32 (oneDNN, cuBLAS):
  γ_H (1 + u)²·Σ; it then rounds the sum S to bf16: |ẑ − S| ≤ u/(1 − u)·|ẑ|;
* the float32 logit it is compared with carries its own γ_{H+1}·Σ.

So |ẑ_i − z_i| ≤ A‖x‖‖w_i‖ + B|ẑ_i| + ABSOLUTE with A = (2u + u²) + γ_H(1 + u)² +
γ_{H+1} (times ``SAFETY`` for the norms' own rounding) and B = u/(1 − u). A soft cap
c·tanh(z/c) is 1-Lipschitz: the first rounding folds into A, the cap's output is
rounded to bf16 once more (B), and tanh's ulps go into ABSOLUTE. The bound assumes
float32 accumulation, so :meth:`BoundedHead.of` checks it on sample rows at load time
and returns None (callers keep the float32 head) if the kernels break it.

The rows are kept as bf16 bit patterns (int16): for a positive threshold, comparing
patterns as integers orders positive bf16 values exactly, with no conversion pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

BF16_ROUNDOFF = 2.0**-8
ABSOLUTE = 1e-4  # tanh ulps of a soft cap, flushed subnormals: far below any logit gap
SAFETY = 1.1


def _gamma(n: int) -> float:
    return n * 2.0**-24 / (1 - n * 2.0**-24)


def coefficients(hidden: int, capped: bool) -> tuple[float, float]:
    """(A, B) of the bound |ẑ − z| ≤ A‖x‖‖w_i‖ + B|ẑ| + ABSOLUTE (module doc)."""
    u = BF16_ROUNDOFF
    a = (2 * u + u * u) + _gamma(hidden) * (1 + u) ** 2 + _gamma(hidden + 1)
    b = u / (1 - u)
    if capped:  # the GEMM's own bf16 rounding is bounded through |S| ≤ (1 + γ)(1 + u)²Σ
        a += b * (1 + _gamma(hidden)) * (1 + u) ** 2
    return SAFETY * a, b


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (int16), rounding to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.astype(np.uint16).view(np.int16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (int16) -> float64 values."""
    return (bits.astype(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def soft_cap(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """A final-logit soft cap ``cap·tanh(z / cap)`` (Gemma 2); ``z`` itself without one."""
    import torch

    return z if cap is None else torch.tanh(z / cap) * cap


def final_cap(model: PreTrainedModel) -> float | None:
    """The model's final-logit soft cap from its config, if it has one."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return float(cap) if cap else None


class BoundedHead:
    """A bias-free linear output head ``z = cap·tanh(W x / cap)`` (cap optional) in bf16
    with its error bound. Holds a bf16 copy of W (half the float32 head's memory)."""

    def __init__(self, weight: torch.Tensor, cap: float | None) -> None:
        import torch

        self.weight = weight.detach().float()  # (V, H), shared with the model
        self.weight16 = self.weight.to(torch.bfloat16)
        self.cap = cap
        self.row_norm = self.weight.double().norm(dim=1).cpu().numpy()  # (V,) ‖w_i‖₂
        self.row_norm_max = float(self.row_norm.max()) if self.row_norm.size else 0.0
        self.a, self.b = coefficients(int(self.weight.shape[1]), cap is not None)

    @classmethod
    def of(cls, model: PreTrainedModel) -> BoundedHead | None:
        """The model's head, if it is a bias-free linear layer (soft cap allowed) whose
        bf16 kernels keep the bound on sample rows; else None."""
        head = getattr(model, "lm_head", None)
        weight = getattr(head, "weight", None)
        if weight is None or getattr(head, "bias", None) is not None or weight.ndim != 2:
            return None
        bounded = cls(weight, final_cap(model))
        return bounded if bounded.self_check() else None

    def _cap(self, z: torch.Tensor) -> torch.Tensor:
        return soft_cap(z, self.cap)

    def rows(self, hidden: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(N, H) float32 hidden rows -> approx logits as bf16 bit patterns (N, V) int16
        and the rows' norms ‖x_t‖₂ (N,) float64."""
        import torch

        hidden = hidden.float()
        with torch.inference_mode():
            approx = torch.mm(hidden.to(torch.bfloat16), self.weight16.T)
            if self.cap is not None:
                approx = self._cap(approx.float()).to(torch.bfloat16)
            bits = approx.view(torch.int16).cpu().numpy()
        return bits, hidden.double().norm(dim=1).cpu().numpy()

    def exact(self, hidden: torch.Tensor, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Float32 logits of token ``ids[k]`` at hidden row ``rows[k]`` (float64 out)."""
        import torch

        if not len(ids):
            return np.zeros(0)
        with torch.inference_mode():
            r = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(hidden.device)
            i = torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(hidden.device)
            z = (hidden.float()[r] * self.weight[i]).sum(dim=1)
            return self._cap(z).double().cpu().numpy()

    def full(self, hidden: torch.Tensor) -> np.ndarray:
        """(N, V) float32 logits, the plain head (for scoring rules that read whole rows)."""
        import torch

        with torch.inference_mode():
            return self._cap(torch.mm(hidden.float(), self.weight.T)).cpu().numpy()

    def self_check(self, samples: int = 8) -> bool:
        """The bound holds on random rows scaled like real hidden states."""
        import torch

        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn((samples, int(self.weight.shape[1])), generator=gen) * 4.0
        hidden = hidden.to(self.weight.device)
        bits, norm = self.rows(hidden)
        approx = bf16_values(bits)
        bound = (self.a * norm[:, None] * self.row_norm[None, :] + self.b * np.abs(approx)
                 + ABSOLUTE)
        return bool(np.all(np.abs(approx - self.full(hidden)) <= bound))


@dataclass(frozen=True)
class BoundedLogits:
    """The logits rows of one replayed pair, as bf16 approximations ẑ with the bound
    |ẑ_ti − z_ti| ≤ A‖x_t‖‖w_i‖ + B|ẑ_ti| + ABSOLUTE (module doc). ``candidates``,
    ``bounds`` and ``magnitude`` use it; ``exact`` and ``full_rows`` give exact logits."""

    bits: np.ndarray  # (n, V) int16: bf16 patterns of ẑ
    norm: np.ndarray  # (n,) float64: ‖x_t‖₂ of the hidden rows
    hidden: torch.Tensor  # (n, H) float32: the rows the head reads
    head: BoundedHead

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.bits.shape[0]), int(self.bits.shape[1])

    def finite(self) -> bool:
        """No row can hold an infinite or NaN logit (the bound needs finite rows)."""
        return bool(np.isfinite(self.norm).all()
                    and np.isfinite(self.magnitude(np.arange(self.shape[0]))).all())

    def _spread(self, t: np.ndarray | int) -> np.ndarray:
        """The A-term of row(s) t, uniform over the vocabulary (its largest value)."""
        return np.asarray(self.head.a * self.norm[t] * self.head.row_norm_max + ABSOLUTE)

    def candidates(self, t: int, threshold: float) -> np.ndarray:
        """Ascending ids i whose exact logit may reach ``threshold``: a superset of
        {i : z_ti ≥ threshold}."""
        # ẑ + B|ẑ| + spread ≥ threshold; for ẑ > 0 that is ẑ ≥ (threshold − spread)/(1+B).
        level = float(threshold - self._spread(t))
        if level > 0:
            cut = level / (1 + self.head.b)
            bits = bf16_bits(np.array([cut], np.float32))
            if bf16_values(bits)[0] > cut:  # rounded up: still a lower bound? step down
                bits = bits - 1
            return np.flatnonzero(self.bits[t] >= bits[0])
        values = bf16_values(self.bits[t])
        return np.flatnonzero(values + self.head.b * np.abs(values) >= level)

    def approx(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return bf16_values(self.bits[rows, ids])

    def bounds(self, rows: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) bounds of the exact logits at (rows[k], ids[k]), with each
        row's uniform A-term."""
        z = self.approx(rows, ids)
        err = self._spread(rows) + self.head.b * np.abs(z)
        return z - err, z + err

    def argmax(self, t: int) -> int:
        return int(np.argmax(bf16_values(self.bits[t])))

    def magnitude(self, t: np.ndarray | int) -> np.ndarray:
        """An upper bound on |exact logit| over row(s) t: ‖x‖·max‖w_i‖ (Cauchy–Schwarz),
        widened by the float32 error, or the soft cap."""
        bound = self.norm[t] * self.head.row_norm_max * (1 + self.head.a) + ABSOLUTE
        return np.asarray(bound if self.head.cap is None else np.minimum(bound, self.head.cap))

    def exact(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return self.head.exact(self.hidden, rows, ids)

    def full(self) -> np.ndarray:
        return self.head.full(self.hidden)

    def full_rows(self, rows: np.ndarray) -> np.ndarray:
        """Exact float32 rows ``rows`` (k, V)."""
        import torch

        return self.head.full(self.hidden[torch.from_numpy(np.asarray(rows, np.int64))])


__all__ = ["ABSOLUTE", "BoundedHead", "BoundedLogits", "bf16_bits", "bf16_values",
           "coefficients", "final_cap", "soft_cap"]
