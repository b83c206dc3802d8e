"""Engine: tiny model build, in-memory loading, sampler-spec generation and replay."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from ivp.engine.loading import load_from_dir, load_model, load_tokenizer, read_dir
from ivp.engine.reference import ReferenceEngine, decode_prefill_gap
from ivp.errors import ValidationError
from ivp.protocol.messages import SamplingParams
from ivp.verify.scoring import Policy, score

PROMPTS = ["The capital of France is", "Hello", "Numbers: 1 2 3", "She sells sea shells"]
PARAMS = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=48),
    "t0.8": SamplingParams(temperature=0.8, max_tokens=48),
    "top_k": SamplingParams(temperature=1.0, top_k=5, max_tokens=48),
    "top_p": SamplingParams(temperature=1.2, top_p=0.8, max_tokens=48),
    "both": SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_tokens=48),
}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> ReferenceEngine:
    model, tokenizer = load_from_dir(tiny_model_dir)
    return ReferenceEngine(model, tokenizer)


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


# --- tiny model ---------------------------------------------------------------------------------
def test_tiny_model_is_deterministic_and_sharded(tiny_model_dir: Path, tmp_path: Path) -> None:
    from ivp.engine.tiny import build_tiny_model

    again = build_tiny_model(tmp_path / "again", seed=0)
    assert _digests(again) == _digests(tiny_model_dir)
    shards = [n for n in _digests(again) if n.endswith(".safetensors")]
    assert len(shards) >= 2
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert _digests(other)["tokenizer.json"] == _digests(again)["tokenizer.json"]
    assert {n: d for n, d in _digests(other).items() if n.endswith(".safetensors")} != {
        n: d for n, d in _digests(again).items() if n.endswith(".safetensors")}


def test_tokenizer_round_trips_ascii(engine: ReferenceEngine) -> None:
    tok = engine.tokenizer
    for text in ["Hello, world!", "  two  spaces\nand a newline\t tab ~`{}",
                 "zebra quokka 12345 x=y*3.14;", "The capital of France is Paris."]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat == "<s>user: hi\nassistant:"


# --- loading ---------------------------------------------------------------------------
def test_in_memory_load_matches_from_pretrained(tiny_model_dir: Path,
                                                engine: ReferenceEngine) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([engine.tokenizer("Hello, world! How are you?")["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(ref(ids).logits, engine.model(ids).logits)


def _files(tiny_model_dir: Path) -> dict[str, bytes]:
    return read_dir(tiny_model_dir)


def test_load_model_rejects_bad_weights(tiny_model_dir: Path) -> None:
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    files = _files(tiny_model_dir)
    shard = sorted(n for n in files if n.endswith(".safetensors"))[0]
    tensors = st_load(files[shard])
    name = sorted(tensors)[0]

    missing = dict(files, **{shard: st_save({k: v for k, v in tensors.items() if k != name})})
    with pytest.raises(ValidationError, match="lack"):
        load_model(missing)
    extra = dict(files, **{shard: st_save({**tensors, "rogue.weight": tensors[name].clone()})})
    with pytest.raises(ValidationError, match="does not have"):
        load_model(extra)
    reshaped = dict(files, **{shard: st_save({**tensors, name: tensors[name][:-1].clone()})})
    with pytest.raises(ValidationError, match="shape"):
        load_model(reshaped)
    with pytest.raises(ValidationError, match="safetensors"):
        load_model(dict(files, **{shard: b"\x00" * 64}))
    with pytest.raises(ValidationError, match=r"config\.json"):
        load_model({k: v for k, v in files.items() if k != "config.json"})
    with pytest.raises(ValidationError, match="no \\*\\.safetensors"):
        load_model({k: v for k, v in files.items() if not k.endswith(".safetensors")})
    with pytest.raises(ValidationError, match=r"tokenizer\.json"):
        load_tokenizer({"tokenizer.json": b"{not json"})


# --- generation and replay --------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PARAMS))
def test_honest_generation_replays_exactly(engine: ReferenceEngine, name: str) -> None:
    params = PARAMS[name]
    for seed, text in enumerate(PROMPTS):
        prompt = engine.tokenizer(text)["input_ids"]
        gen = engine.generate(prompt, params, seed=seed * 7919 + 2**63)
        assert 1 <= len(gen.token_ids) <= params.max_tokens
        assert gen.finish_reason == engine.finish_reason(gen.token_ids)
        logits = engine.replay(prompt, gen.token_ids)
        assert logits.shape == (len(gen.token_ids), engine.vocab_size)
        assert logits.dtype == np.float32
        judgement = Policy("exact").judge(score(logits, gen.token_ids, seed * 7919 + 2**63,
                                                params), params)
        assert judgement.passed, judgement.reason


@pytest.mark.parametrize("name", ["greedy", "t0.8", "top_k"])
def test_one_changed_token_fails(engine: ReferenceEngine, name: str) -> None:
    params, seed = PARAMS[name], 42
    prompt = engine.tokenizer(PROMPTS[0])["input_ids"]
    tokens = engine.generate(prompt, params, seed).token_ids
    pos = len(tokens) // 2
    forged = list(tokens)
    forged[pos] = (tokens[pos] + 1) % engine.vocab_size
    judgement = Policy("exact").judge(score(engine.replay(prompt, forged), forged, seed, params),
                                      params)
    assert not judgement.passed
    assert f"position {pos}" in judgement.reason


def test_both_finish_reasons_occur(engine: ReferenceEngine) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=64)
    prompt = engine.tokenizer(PROMPTS[1])["input_ids"]
    gens = [engine.generate(prompt, params, seed) for seed in range(12)]
    reasons = {g.finish_reason for g in gens}
    assert reasons == {"stop", "length"}
    for g in gens:
        assert (g.token_ids[-1] in engine.eos_ids) == (g.finish_reason == "stop")
        assert g.finish_reason == "stop" or len(g.token_ids) == 64
        assert all(t not in engine.eos_ids for t in g.token_ids[:-1])


def test_seed_matters_and_is_reproducible(engine: ReferenceEngine) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=32)
    prompt = engine.tokenizer(PROMPTS[2])["input_ids"]
    a = engine.generate(prompt, params, 1).token_ids
    assert engine.generate(prompt, params, 1).token_ids == a
    assert engine.generate(prompt, params, 2).token_ids != a


def test_stream_equals_generate(engine: ReferenceEngine) -> None:
    for name in ("greedy", "both"):
        prompt = engine.tokenizer(PROMPTS[3])["input_ids"]
        streamed = list(engine.generate_stream(prompt, PARAMS[name], 99))
        assert streamed == engine.generate(prompt, PARAMS[name], 99).token_ids


def test_replay_batch_equals_replay(engine: ReferenceEngine) -> None:
    pairs = []
    for i, text in enumerate(PROMPTS):
        prompt = engine.tokenizer(text)["input_ids"]
        pairs.append((prompt, engine.generate(prompt, PARAMS["t0.8"], i).token_ids))
    pairs.append((pairs[0][0], pairs[0][1][:1]))  # a one-token output
    pairs.append((pairs[1][0], []))  # nothing to replay
    batched = engine.replay_batch(pairs)
    assert len(batched) == len(pairs)
    for (prompt, output), logits in zip(pairs, batched, strict=True):
        single = engine.replay(prompt, output)
        assert logits.shape == single.shape == (len(output), engine.vocab_size)
        if len(output):
            assert float(np.max(np.abs(logits - single))) < 1e-5


def test_decode_and_prefill_logits_agree(engine: ReferenceEngine) -> None:
    prompt = engine.tokenizer(PROMPTS[0])["input_ids"]
    gap = decode_prefill_gap(engine, prompt, SamplingParams(temperature=1.0, max_tokens=64), 3)
    print(f"max |logits_decode - logits_prefill| on the tiny model: {gap:.3g}")
    assert gap < 1e-4


def test_bad_prompts_are_refused(engine: ReferenceEngine) -> None:
    params = SamplingParams(max_tokens=4)
    with pytest.raises(ValidationError, match="at least one token"):
        engine.generate([], params, 0)
    with pytest.raises(ValidationError, match="outside the vocabulary"):
        engine.generate([1, engine.vocab_size], params, 0)
    with pytest.raises(ValidationError, match="context"):
        engine.generate([1] * 10, SamplingParams(max_tokens=65536), 0)
    with pytest.raises(ValidationError, match="outside the vocabulary"):
        engine.replay([1, 2], [-1])


# --- Gemma (real model; slow, opt-in) -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("IVP_GEMMA_TESTS") != "1",
                    reason="set IVP_GEMMA_TESTS=1 to convert and run the real Gemma-3-270M")
def test_gemma_converts_loads_from_memory_and_replays() -> None:
    from ivp.engine.gemma import MARKER, prepare_gemma

    path = prepare_gemma()
    info = json.loads((path / MARKER).read_text())
    assert sum(n.endswith(".safetensors") for n in info["files"]) >= 2
    engine = ReferenceEngine(*load_from_dir(path))
    assert {1, 106} <= engine.eos_ids  # <eos>, <end_of_turn>
    chat = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    prompt = engine.tokenizer("Q: What is the capital of France?\nA:")["input_ids"]
    assert prompt[0] == 2  # <bos>
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    gen = engine.generate(prompt, greedy, 0)
    assert "Paris" in engine.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
    sampled = SamplingParams(temperature=1.0, top_k=64, top_p=0.95, max_tokens=24)
    for params, seed in ((greedy, 0), (sampled, 2**64 - 1)):
        tokens = engine.generate(prompt, params, seed).token_ids
        verdict = Policy("exact").judge(score(engine.replay(prompt, tokens), tokens, seed,
                                              params), params)
        assert verdict.passed, verdict.reason
