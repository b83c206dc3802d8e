"""A vLLM worker extension for cheating servers only (``ivp server --attack`` with vLLM).

vLLM runs the model in its own worker process; a cheat that swaps the weights must
reach it there. vLLM's ``worker_extension_cls`` adds methods to every worker, called
through ``AsyncLLM.collective_rpc``. An honest server never loads this class.
"""

from __future__ import annotations

from typing import Any


class CheatExtension:
    """Mixed into vLLM's worker: reload the model's weights from a safetensors path."""

    model_runner: Any  # provided by the vLLM worker this is mixed into

    def ivp_load_weights(self, path: str) -> int:
        """Replace the served weights with those in ``path`` (HF names); tensors loaded."""
        from safetensors.torch import load_file

        weights = load_file(path)
        self.model_runner.model.load_weights(weights=iter(weights.items()))
        return len(weights)


__all__ = ["CheatExtension"]
