"""Inference engines: the reference transformers engine (sampler spec v1 generation and
replay by prefill), in-memory model loading, the tiny test model and the Gemma converter.

Submodules import torch and transformers lazily, so importing ``ivp.engine`` is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ivp.engine.gemma import prepare_gemma
    from ivp.engine.loading import load_from_dir, load_model, load_tokenizer
    from ivp.engine.reference import Generation, ReferenceEngine
    from ivp.engine.tiny import build_tiny_model

_EXPORTS = {
    "Generation": "ivp.engine.reference",
    "ReferenceEngine": "ivp.engine.reference",
    "build_tiny_model": "ivp.engine.tiny",
    "load_from_dir": "ivp.engine.loading",
    "load_model": "ivp.engine.loading",
    "load_tokenizer": "ivp.engine.loading",
    "prepare_gemma": "ivp.engine.gemma",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ivp.engine' has no attribute {name!r}")


__all__ = [
    "Generation", "ReferenceEngine", "build_tiny_model", "load_from_dir", "load_model",
    "load_tokenizer", "prepare_gemma",
]
