"""Cheating behaviours of the reference server, for demos and detection tests.

An attack lives only inside the server process: the gateway and the recomputer
learn of it only through audits, as they would of a real cheat. Each attack can
alter the loaded weights in memory (once, when it triggers) and/or the seed the
server samples with. ``ATTACKS`` is the registry that ``ivp server --attack NAME``
picks from; add an entry to add an attack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel

NOISE_FRACTION = 0.02  # rogue-model-persists: noise std relative to each matrix's RMS
NOISE_SEED = 1234  # the rogue weights are reproducible (same cheat on every trigger)
FIXED_SEED = 0  # seed-ignored: the server samples with this instead of the gateway's


@dataclass(frozen=True)
class Attack:
    """One cheat: what it does to the weights and/or to the sampling seed."""

    name: str
    help: str
    alter_model: Callable[[PreTrainedModel], None] | None = None
    alter_seed: Callable[[int], int] | None = None


def _matrices(model: PreTrainedModel):  # -> Iterator[torch.nn.Parameter]
    """Every weight matrix (2-D or more), each tied storage once, in name order."""
    seen: set[int] = set()
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.dim() >= 2 and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            yield p


def add_weight_noise(model: PreTrainedModel, fraction: float = NOISE_FRACTION) -> None:
    """W += N(0, (fraction * rms(W))^2) for every weight matrix, in place (a secretly
    fine-tuned or swapped model that still looks like the whitelisted one)."""
    import torch

    gen = torch.Generator().manual_seed(NOISE_SEED)
    with torch.no_grad():
        for p in _matrices(model):
            rms = p.float().pow(2).mean().sqrt()
            noise = torch.randn(p.shape, generator=gen) * (fraction * rms)
            p.add_(noise.to(device=p.device, dtype=p.dtype))


def quantize_int8(model: PreTrainedModel) -> None:
    """Round every weight matrix to symmetric per-row int8 and back, in place (a
    cheaper model served in place of the whitelisted one)."""
    import torch

    with torch.no_grad():
        for p in _matrices(model):
            scale = p.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0  # (rows, 1)
            p.copy_(torch.round(p / scale).clamp(-127, 127) * scale)


ATTACKS: dict[str, Attack] = {
    a.name: a
    for a in (
        Attack("rogue-model-persists",
               "adds Gaussian noise (2% of each matrix's RMS) to the weights in memory "
               "and keeps serving with them", alter_model=add_weight_noise),
        Attack("int8", "rounds the weights to per-row int8 in memory (a cheaper model)",
               alter_model=quantize_int8),
        Attack("seed-ignored", "samples with a fixed seed instead of the gateway's",
               alter_seed=lambda _seed: FIXED_SEED),
    )
}


def get_attack(name: str) -> Attack:
    """The attack called ``name``; ValidationError listing the known ones otherwise."""
    from ivp.errors import ValidationError

    if name not in ATTACKS:
        raise ValidationError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]


__all__ = ["ATTACKS", "Attack", "add_weight_noise", "get_attack", "quantize_int8"]
