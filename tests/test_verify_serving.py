"""The honest serving path: batched, left-padded, threaded generation that agrees with
replay up to floating-point noise — for Llama and for Gemma-3's sliding-window layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ivp.protocol.messages import SamplingParams
from ivp.verify.serving import Request, ServingConfig, ServingPath, torch_threads


def _gemma3_like():
    """A random Gemma-3 text model small enough for a test, with a 6-token sliding window
    so left padding meets the window within a few steps."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=6,
        max_position_embeddings=256, eos_token_id=1, pad_token_id=0, bos_token_id=2,
        layer_types=["sliding_attention"] * 3 + ["full_attention"])
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3.0)  # peaked logits (the head is tied)
    return model


class _Tok:
    eos_token_id = 1
    pad_token_id = 0


def test_gemma3_sliding_window_with_left_padding_matches_replay() -> None:
    from ivp.engine.reference import ReferenceEngine

    model = _gemma3_like()
    engine = ReferenceEngine(model, _Tok())
    path = ServingPath(model, engine.eos_ids, 0)
    rng = np.random.default_rng(0)
    reqs = [Request((2, *map(int, rng.integers(3, 300, size=int(rng.integers(2, 14))))),
                    SamplingParams(temperature=1.0, max_tokens=16), i) for i in range(6)]
    for config in (ServingConfig(1, 1), ServingConfig(6, 1), ServingConfig(4, 2)):
        served = path.serve(reqs, config, keep_logits=True)
        replayed = engine.replay_batch([(r.prompt_ids, s.token_ids)
                                        for r, s in zip(reqs, served, strict=True)])
        for s, ref in zip(served, replayed, strict=True):
            assert s.logits is not None and s.logits.shape == ref.shape
            assert float(np.abs(s.logits - ref).max()) < 1e-4, config


def test_batch_one_serving_equals_reference_generation(tiny_model_dir: Path) -> None:
    from ivp.engine.loading import load_from_dir
    from ivp.engine.reference import ReferenceEngine

    model, tok = load_from_dir(tiny_model_dir)
    engine = ReferenceEngine(model, tok)
    path = ServingPath(model, engine.eos_ids, tok.pad_token_id)
    params = SamplingParams(temperature=0.8, max_tokens=20)
    reqs = [Request(tuple(tok(t)["input_ids"]), params, 77 + i)
            for i, t in enumerate(["Hello", "The capital of France is", "Numbers: 1 2"])]
    for r, s in zip(reqs, path.serve(reqs, ServingConfig(1, 1)), strict=True):
        gen = engine.generate(r.prompt_ids, params, r.seed)
        assert list(s.token_ids) == gen.token_ids and s.finish_reason == gen.finish_reason


def test_threads_are_restored_and_configs_validated() -> None:
    import torch

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError):
        ServingConfig(0, 1)
