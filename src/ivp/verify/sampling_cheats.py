"""Held-out cheats on the sampler: the whitelisted weights, but not sampler spec v1.

=================  ==================================================================
name               what the server does
=================  ==================================================================
speculative        where a cheap draft (the first 3/4 of the decoder layers, the same
                   head: a layer-skip draft) is confident — its top token has
                   probability ≥ 0.9 — it emits the draft's spec choice; elsewhere the
                   full model's (speculation with no verification step)
temperature-0.9    samples at 0.9 T (0.99 T) when asked for T (the gateway's seed
temperature-0.99   kept): a slightly sharper distribution
top-p-ignored      asked for top_p = 0.9, samples from the whole vocabulary
top-k-ignored      asked for top_k = 40, samples from the whole vocabulary
=================  ==================================================================

Each changes a token only at some positions (a temperature of 0.99 almost never; an
ignored top-k only where the winner of the whole vocabulary ranks below 40), so the
report counts, per message, whether anything changed before judging detection.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from msgspec.structs import replace

from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import choose
from ivp.verify.serving import Request, ServingConfig, ServingPath

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ivp.verify.attacks import Claim

CONFIDENT = 0.9  # the speculative server trusts its draft above this top probability
TOP_P_ASKED = SamplingParams(temperature=1.0, top_p=0.9)
TOP_K_ASKED = SamplingParams(temperature=1.0, top_k=40)


def layer_skip_draft(model: PreTrainedModel, keep: float = 0.75) -> PreTrainedModel:
    """The model with only its first ``keep`` of decoder layers (at least one), sharing
    the weights: a self-speculative draft. The final norm and head read the last kept
    layer's output."""
    import torch

    inner = model.model
    layers = inner.layers
    k = max(1, int(len(layers) * keep))
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = k
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[:k])
    draft_inner = copy.copy(inner)
    draft_inner._modules = dict(inner._modules)
    draft_inner.layers = torch.nn.ModuleList(list(layers)[:k])
    draft_inner.config = config
    draft = copy.copy(model)
    draft._modules = dict(model._modules)
    draft.model = draft_inner
    draft.config = config
    return draft.eval()


class _Sampler:
    """Base for cheats that change only the choice: an honest path, another chooser."""

    name = ""
    help = ""
    request_params: SamplingParams | None = None  # what the report asks this server for

    def __init__(self, path: ServingPath, config: ServingConfig) -> None:
        self.path = path
        self.config = config

    def pick(self, row: np.ndarray, request: Request, t: int, so_far: list[int]) -> int:
        raise NotImplementedError

    def serve(self, requests: Sequence[Request]) -> list[Claim]:
        from ivp.verify.attacks import Claim

        return [Claim(s.token_ids, s.finish_reason)
                for s in self.path.serve(requests, self.config, chooser=self.pick)]


class TemperatureCheat(_Sampler):
    def __init__(self, path: ServingPath, factor: float, config: ServingConfig) -> None:
        super().__init__(path, config)
        self.factor = factor
        self.name = f"temperature-{factor:g}"
        self.help = f"samples at {factor:g} T when asked for T (same seed)"

    def pick(self, row: np.ndarray, request: Request, t: int, so_far: list[int]) -> int:
        p = request.params
        return choose(row, request.seed, t, replace(p, temperature=p.temperature * self.factor))


class FilterIgnored(_Sampler):
    """Asked for top-p (or top-k) sampling, samples from the whole vocabulary."""

    def __init__(self, path: ServingPath, which: str, config: ServingConfig) -> None:
        super().__init__(path, config)
        self.name = f"{which}-ignored"
        self.request_params = TOP_P_ASKED if which == "top-p" else TOP_K_ASKED
        asked = (f"top_p = {TOP_P_ASKED.top_p:g}" if which == "top-p"
                 else f"top_k = {TOP_K_ASKED.top_k}")
        self.help = f"asked for {asked}, samples from the whole vocabulary"

    def pick(self, row: np.ndarray, request: Request, t: int, so_far: list[int]) -> int:
        p = request.params
        return choose(row, request.seed, t, replace(p, top_k=0, top_p=1.0))


class Speculative(_Sampler):
    """Emits the draft's spec choice where the draft is confident, else the model's."""

    name = "speculative"

    def __init__(self, path: ServingPath, draft: PreTrainedModel, config: ServingConfig,
                 confident: float = CONFIDENT) -> None:
        super().__init__(path, config)
        self.draft = draft
        self.confident = confident
        layers = len(draft.model.layers)
        self.help = (f"a layer-skip draft ({layers} of {len(path.model.model.layers)} layers) "
                     f"decides where its top token has p ≥ {confident:g}")
        self._state: dict[Request, tuple[Any, int]] = {}

    def _draft_row(self, request: Request, so_far: list[int]) -> np.ndarray:
        """The draft's next-token row, fed incrementally with its own KV cache."""
        import torch

        cache, fed = self._state.get(request, (None, 0))  # fed: output tokens already in
        new = list(request.prompt_ids) if cache is None else list(so_far[fed:])
        device = next(self.draft.parameters()).device
        with torch.inference_mode():
            out = self.draft(input_ids=torch.tensor([new], dtype=torch.long, device=device),
                             cache=cache, use_cache=True, logits_to_keep=1)
        self._state[request] = (out.cache, len(so_far))
        return out.logits[0, -1].float().cpu().numpy()

    def pick(self, row: np.ndarray, request: Request, t: int, so_far: list[int]) -> int:
        draft = self._draft_row(request, so_far)
        p = request.params
        z = draft.astype(np.float64) / (p.temperature if p.temperature > 0 else 1.0)
        top = float(1.0 / np.exp(z - z.max()).sum())  # softmax probability of its top token
        use = draft if top >= self.confident else row
        return choose(use, request.seed, t, p)

    def serve(self, requests: Sequence[Request]) -> list[Claim]:
        self._state.clear()
        try:
            return super().serve(requests)
        finally:
            self._state.clear()


SAMPLING_CHEATS = ("speculative", "temperature-0.9", "temperature-0.99", "top-p-ignored",
                   "top-k-ignored")


def build_sampling_cheat(name: str, model: PreTrainedModel, path: ServingPath,
                         config: ServingConfig) -> _Sampler:
    if name == "speculative":
        return Speculative(path, layer_skip_draft(model), config)
    if name.startswith("temperature-"):
        return TemperatureCheat(path, float(name.split("-", 1)[1]), config)
    if name in ("top-p-ignored", "top-k-ignored"):
        return FilterIgnored(path, name.rsplit("-", 1)[0], config)
    raise ValueError(f"unknown sampling cheat {name!r}")


__all__ = ["CONFIDENT", "SAMPLING_CHEATS", "FilterIgnored", "Speculative", "TemperatureCheat",
           "build_sampling_cheat", "layer_skip_draft"]
