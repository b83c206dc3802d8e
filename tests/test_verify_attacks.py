"""Attack generators on the tiny model: each detected; stego-bounded never detected, its
payload decodes, and its capacity is computed (and grows with δ)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ivp.protocol.messages import SamplingParams
from ivp.verify import Policy, covert, score
from ivp.verify import attacks as atk
from ivp.verify.calibrate import calibration_requests, measure
from ivp.verify.prompts import CALIBRATION, EVALUATION, encode_prompts
from ivp.verify.serving import ALL_CONFIGS, Request, ServingConfig, ServingPath
from ivp.verify.structure import structural_problem

T1 = SamplingParams(temperature=1.0, max_tokens=32)
ALWAYS = {"other-weights", "int4", "prompt-tamper", "seed-ignored", "truncate", "stego"}
# The tiny random model's layer-skip draft is never confident (p ≥ 0.9): the speculative
# server then serves the full model's tokens, and there is nothing to detect.
UNCHANGED_ON_TINY = {"speculative"}


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path):
    from ivp.engine.loading import load_from_dir
    from ivp.engine.reference import ReferenceEngine

    model, tok = load_from_dir(tiny_model_dir)
    engine = ReferenceEngine(model, tok)
    path = ServingPath(model, engine.eos_ids, tok.pad_token_id)
    cal = measure(engine, calibration_requests(encode_prompts(tok, CALIBRATION[:2], False),
                                               (T1,)),
                  (ALL_CONFIGS[-1],), (1,))
    return model, tok, engine, path, cal.delta


def _asked(name: str) -> SamplingParams:
    p = atk.attack_params(name)
    return T1 if p is None else SamplingParams(temperature=p.temperature, top_k=p.top_k,
                                               top_p=p.top_p, max_tokens=T1.max_tokens)


def _requests(tok, n: int, params: SamplingParams = T1, base: int = 0) -> list[Request]:
    prompts = encode_prompts(tok, EVALUATION[:n], chat=False)
    return [Request(p, params, 10_000 + base + i) for i, p in enumerate(prompts)]


def _failed(engine, reqs, claims, delta: float) -> list[bool]:
    out = []
    logits = engine.replay_batch([(r.prompt_ids, c[0]) for r, c in zip(reqs, claims, strict=True)])
    for r, (ids, reason), rows in zip(reqs, claims, logits, strict=True):
        j = Policy("tolerant", delta).judge(score(rows, list(ids), r.seed, r.params), r.params)
        problem = structural_problem(ids, reason, r.params.max_tokens, engine.eos_ids)
        out.append(not j.passed or problem is not None)
    return out


def test_honest_serving_path_passes_under_every_source(setup) -> None:
    _model, tok, engine, path, delta = setup
    params = [T1, SamplingParams(temperature=0.0, max_tokens=16),
              SamplingParams(temperature=0.7, top_k=40, top_p=0.9, max_tokens=16)]
    reqs = [Request(r.prompt_ids, params[i % 3], r.seed) for i, r in enumerate(_requests(tok, 8))]
    for config in (ServingConfig(8, 2), ServingConfig(3, 1)):
        served = path.serve(reqs, config)
        assert not any(_failed(engine, reqs, [(s.token_ids, s.finish_reason) for s in served],
                               delta))


@pytest.mark.parametrize("name", atk.ATTACK_NAMES)
def test_each_generator_is_detected_where_it_changed_a_token(setup, name: str) -> None:
    from ivp.verify.report import score_claims

    model, tok, engine, path, delta = setup
    gen = atk.build(name, model, tok, path, tok.eos_token_id)
    reqs = _requests(tok, 8, _asked(name), base=100)
    claims = [(c.token_ids, c.finish_reason) for c in gen.serve(reqs)]
    failed = _failed(engine, reqs, claims, delta)
    honest = path.serve(reqs, atk.SERVE_CONFIG)
    changed = [ids != h.token_ids for (ids, _), h in zip(claims, honest, strict=True)]
    # the report's "changed" (some token is not the replay's choice) is exactly this
    figs = score_claims(engine, reqs, claims, lambda _j: name)
    assert [f.changed for f in figs] == changed, name
    assert not any(f and not c for f, c in zip(failed, changed, strict=True)), name
    if name in UNCHANGED_ON_TINY:
        assert not any(changed)
        return
    assert any(changed) and any(failed), name
    if name in ALWAYS:
        assert all(failed), (name, failed)
    # the truncate claims are well formed: only the margins catch them
    if name == "truncate":
        assert all(structural_problem(i, r, T1.max_tokens, engine.eos_ids) is None
                   for i, r in claims)


def test_speculative_server_with_a_trusted_draft_is_detected(setup) -> None:
    from ivp.verify.sampling_cheats import Speculative, layer_skip_draft

    model, tok, engine, path, delta = setup
    draft = layer_skip_draft(model)
    assert len(draft.model.layers) == max(1, int(len(model.model.layers) * 0.75))
    assert draft.model.layers[0] is model.model.layers[0]  # weights shared, not copied
    assert len(model.model.layers) == model.config.num_hidden_layers  # original intact
    reqs = _requests(tok, 6, base=150)
    gen = Speculative(path, draft, atk.SERVE_CONFIG, confident=0.0)  # always the draft
    claims = [(c.token_ids, c.finish_reason) for c in gen.serve(reqs)]
    assert all(_failed(engine, reqs, claims, delta))


def test_stego_carries_its_payload(setup) -> None:
    _model, tok, _engine, path, _delta = setup
    reqs = _requests(tok, 4, base=200)
    for r, c in zip(reqs, atk.Stego(path).serve(reqs), strict=True):
        assert len(c.token_ids) >= atk.STEGO_BITS
        assert atk.decode_parity(c.token_ids) == atk.payload_bits(r.seed, atk.STEGO_BITS)


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_stego_bounded_is_never_detected_and_decodes(setup, scale: float) -> None:
    _model, tok, engine, path, delta = setup
    delta *= scale  # at 1e4 x δ the channel is wide open and bits do flow
    reqs = _requests(tok, 6, base=300)
    enc = covert.BoundedStego(path, delta)
    encoded = enc.serve(reqs)
    claims = [(e.token_ids, e.finish_reason) for e in encoded]
    assert not any(_failed(engine, reqs, claims, delta))
    for r, e in zip(reqs, encoded, strict=True):
        assert enc.decode(r, e.token_ids) == list(e.bits)
    if scale > 1:
        assert sum(len(e.bits) for e in encoded) > 0


def test_covert_capacity_is_computed_and_grows_with_delta(setup) -> None:
    _model, tok, engine, path, delta = setup
    reqs = _requests(tok, 4, base=400)
    served = path.serve(reqs, ServingConfig(1, 1))
    rows = engine.replay_batch([(r.prompt_ids, s.token_ids)
                                for r, s in zip(reqs, served, strict=True)])
    seeds = [r.seed for r in reqs]
    figs = covert.channel_growth(rows, seeds, T1, (delta, 100 * delta, 0.5))
    slow = [0.0, 0.0, 0.0]  # realised Σ log2 |C_t| straight from accepted_tokens
    for logits, seed in zip(rows, seeds, strict=True):
        for t in range(logits.shape[0]):
            for k, d in enumerate((delta, 100 * delta, 0.5)):
                slow[k] += np.log2(covert.accepted_tokens(logits[t], seed, t, T1, d).shape[0])
    assert [f.realised_bits for f in figs] == pytest.approx(slow)
    assert figs[0].tokens == sum(len(s.token_ids) for s in served)
    assert figs[0].entropy_bits > 0
    bpt = [f.bits_per_token for f in figs]
    assert 0 < bpt[0] < bpt[1] < bpt[2]
    assert figs[0].fraction < 1e-4  # calibrated δ: far below the 0.01% policy bar
    assert figs[2].realised_bits > 0


def test_expected_extra_matches_monte_carlo() -> None:
    """E[|C| − 1] (logistic closed form) against sampling many seeds."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=20)
    delta = 0.2
    p = SamplingParams(temperature=1.0)
    counts = [covert.accepted_tokens(z, seed, 0, p, delta).shape[0] - 1 for seed in range(4000)]
    assert covert.expected_extra(z, 1.0, delta) == pytest.approx(np.mean(counts), rel=0.1)


def test_quantizers_and_finetune_change_the_model(setup) -> None:
    import torch

    model, tok, _engine, _path, _delta = setup
    w = model.model.layers[0].mlp.up_proj.weight
    for bits, group, levels in ((8, 128, 255), (4, 32, 16)):
        q = atk.quantize_rtn(model, bits, group).model.layers[0].mlp.up_proj.weight
        assert not torch.equal(q, w)
        block = q.reshape(q.shape[0], -1, min(group, q.shape[1]))[0, 0]
        assert len(torch.unique(block)) <= levels
    tuned, rel = atk.finetune_step(model, tok(atk.FINETUNE_TEXT)["input_ids"])
    assert 0 < rel < 0.1
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, w)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, w)  # original untouched
