"""The verification worker: honest pairs pass by replay; each kind of cheat fails."""

from __future__ import annotations

from typing import Any

import pytest
from msgspec.structs import replace
from test_recomputer_support import MODEL_ID, ScriptedGateway

from ivp.protocol.encoding import canonical, decode
from ivp.protocol.messages import AuditRecord, Manifest, PairRecord, Verdict, manifest_digest
from ivp.recomputer.workers import ModelSource, Verifier, VerifyJob
from ivp.whitelist import read_model_files

pytest_plugins = ("test_recomputer_support",)


@pytest.fixture(scope="module", params=["plain head", "bf16 head"])
def verifier(request: pytest.FixtureRequest, tiny_model_dir, tiny_manifest: Manifest
             ) -> Verifier:
    """Every test runs on both replay heads: the tiny vocabulary alone would replay on
    the plain float32 head; ``bf16 head`` forces the bounded head and pruned scoring
    that large vocabularies (Gemma) use."""
    v = Verifier([ModelSource(tiny_manifest, read_model_files(tiny_model_dir, tiny_manifest))])
    if request.param == "bf16 head":
        for _, engine, _ in v._models.values():
            engine.bounded_min_vocab = 0
            assert engine.bounded_head is not None
    return v


def job(gw: ScriptedGateway, pair: PairRecord, audit_id: int = 1) -> VerifyJob:
    record = AuditRecord(gateway_id=gw.gateway_id, boot_id=gw.boot_id, audit_seq=audit_id,
                         chain_prev="0" * 64, chain_head="0" * 64, pair=pair)
    return VerifyJob(audit_id, manifest_digest(gw.manifest), canonical(record))


def verdicts(verifier: Verifier, jobs: list[VerifyJob]) -> list[Verdict]:
    out = verifier.verify(jobs)
    assert all(o.verdict is not None for o in out), out
    return [decode(o.verdict, Verdict) for o in out]  # type: ignore[arg-type]


def test_honest_pairs_pass_in_one_batch(verifier: Verifier, gateway: ScriptedGateway) -> None:
    pairs = [
        gateway.pair("The quick brown fox", temperature=0.0, max_tokens=10),
        gateway.pair("It was the best of times", temperature=1.0, max_tokens=10),
        gateway.pair("Call me Ishmael", temperature=0.8, top_k=40, max_tokens=10),
        gateway.pair("Hello, world!", temperature=0.7, top_p=0.9, max_tokens=10),
    ]
    got = verdicts(verifier, [job(gateway, p, i + 1) for i, p in enumerate(pairs)])
    assert [v.passed for v in got] == [True] * 4, [v.reason for v in got]
    assert [v.audit_seq for v in got] == [1, 2, 3, 4]
    assert all(v.model_id == MODEL_ID and v.mode == "tolerant" and v.failures == 0 for v in got)


def _changed_token(engine: Any, pair: PairRecord, position: int) -> PairRecord:
    out = list(pair.output_token_ids)
    eos = engine.eos_ids
    out[position] = next(t for t in range(3, 600) if t != out[position] and t not in eos)
    return replace(pair, output_token_ids=out,
                   output_text=engine.tokenizer.decode(out, skip_special_tokens=True))


def test_one_changed_token_fails(verifier: Verifier, gateway: ScriptedGateway,
                                 tiny_engine: Any) -> None:
    """Attack: the server emits a token the whitelisted model would not have chosen."""
    pair = gateway.pair("The quick brown fox", temperature=1.0, max_tokens=8, seed=5)
    bad = _changed_token(tiny_engine, pair, min(2, len(pair.output_token_ids) - 2))
    bad = replace(bad, finish_reason=pair.finish_reason)
    [v] = verdicts(verifier, [job(gateway, bad)])
    assert not v.passed and v.failures >= 1
    assert "not explained by the whitelisted model" in v.reason


def test_text_not_matching_token_ids_fails(verifier: Verifier, gateway: ScriptedGateway) -> None:
    """Attack: the server's own text reaches the client beside honest token ids."""
    pair = gateway.pair(max_tokens=6)
    [v] = verdicts(verifier, [job(gateway, replace(pair, output_text=pair.output_text + "!"))])
    assert not v.passed and "output_text is not" in v.reason


def test_pair_naming_another_model_fails(verifier: Verifier, gateway: ScriptedGateway) -> None:
    """Attack: outputs of a substitute model filed under the booted one."""
    pair = gateway.pair(max_tokens=6)
    [v] = verdicts(verifier, [job(gateway, replace(pair, model_id="other-model"))])
    assert not v.passed and "names model 'other-model'" in v.reason


def test_truncated_output_claiming_stop_fails(verifier: Verifier, gateway: ScriptedGateway,
                                              tiny_engine: Any) -> None:
    """Attack: an honest output cut short (its length carries information)."""
    pair = gateway.pair(max_tokens=8, temperature=0.0)
    out = pair.output_token_ids[:3]
    if out[-1] in tiny_engine.eos_ids:
        out = out[:-1]
    cut = replace(pair, output_token_ids=out, finish_reason="stop",
                  output_text=tiny_engine.tokenizer.decode(out, skip_special_tokens=True))
    [v] = verdicts(verifier, [job(gateway, cut)])
    assert not v.passed and "does not end with EOS" in v.reason
    cut = replace(cut, finish_reason="length")
    [v] = verdicts(verifier, [job(gateway, cut)])
    assert not v.passed and "finish_reason 'length'" in v.reason


def test_tokens_after_eos_fail(verifier: Verifier, gateway: ScriptedGateway,
                               tiny_engine: Any) -> None:
    pair = gateway.pair(max_tokens=6, temperature=0.0)
    eos = min(tiny_engine.eos_ids)
    out = [pair.output_token_ids[0], eos, *pair.output_token_ids[1:4]]
    bad = replace(pair, output_token_ids=out, finish_reason="length",
                  params=replace(pair.params, max_tokens=len(out)),
                  output_text=tiny_engine.tokenizer.decode(out, skip_special_tokens=True))
    [v] = verdicts(verifier, [job(gateway, bad)])
    assert not v.passed and "after EOS" in v.reason


def test_unknown_manifest_is_unverifiable_not_failed(verifier: Verifier,
                                                     gateway: ScriptedGateway) -> None:
    pair = gateway.pair(max_tokens=4)
    j = job(gateway, pair)
    [o] = verifier.verify([VerifyJob(j.audit_id, "ab" * 32, j.payload)])
    assert o.verdict is None and "no whitelisted model" in o.unverifiable


def _stopped(gateway: ScriptedGateway, engine: Any) -> tuple[PairRecord, PairRecord, str]:
    """An honest sampled output, and the same output as the gateway cuts it at a stop
    string taken from the middle of its text (with the stop string used)."""
    from ivp.protocol.stops import cut_at_stop

    def decode(ids: list[int]) -> str:
        return engine.tokenizer.decode(ids, skip_special_tokens=True)

    for seed in range(50):
        full = gateway.pair("Once upon a time", temperature=1.0, max_tokens=24, seed=seed)
        text = full.output_text
        if len(text) < 12:
            continue
        stop = text[len(text) // 2:len(text) // 2 + 2]
        cut = cut_at_stop(full.output_token_ids, [stop], decode)
        if cut is not None and 2 <= cut[0] < len(full.output_token_ids):
            kept, cut_text = cut
            return full, replace(full, output_token_ids=full.output_token_ids[:kept],
                                 output_text=cut_text, finish_reason="stop",
                                 stop=[stop]), stop
    raise AssertionError("no output long enough to cut")


def test_output_cut_at_a_stop_string_passes(verifier: Verifier, gateway: ScriptedGateway,
                                            tiny_engine: Any) -> None:
    full, cut, stop = _stopped(gateway, tiny_engine)
    assert stop in tiny_engine.tokenizer.decode(cut.output_token_ids, skip_special_tokens=True)
    assert stop not in cut.output_text and full.output_text.startswith(cut.output_text)
    [v] = verdicts(verifier, [job(gateway, cut)])
    assert v.passed, v.reason


def test_output_running_on_past_the_stop_string_fails(verifier: Verifier,
                                                      gateway: ScriptedGateway,
                                                      tiny_engine: Any) -> None:
    """Attack: tokens past the client's stop string (text the client was not meant to
    get, or bits hidden after the cut), each token still honest."""
    full, cut, _ = _stopped(gateway, tiny_engine)
    k = len(cut.output_token_ids)
    longer = replace(cut, output_token_ids=full.output_token_ids[:k + 1])
    [v] = verdicts(verifier, [job(gateway, longer)])
    assert not v.passed
    assert v.reason == f"tokens continue after the stop string that first appears at token {k - 1}"


def test_output_cut_before_the_stop_string_fails(verifier: Verifier, gateway: ScriptedGateway,
                                                 tiny_engine: Any) -> None:
    """Attack: an honest output ended early, claiming a stop string that is not there
    yet (its length would carry bits)."""
    _, cut, _ = _stopped(gateway, tiny_engine)
    early = cut.output_token_ids[:-1]
    bad = replace(cut, output_token_ids=early, output_text=tiny_engine.tokenizer.decode(
        early, skip_special_tokens=True))
    [v] = verdicts(verifier, [job(gateway, bad)])
    assert not v.passed
    assert v.reason == ("finish_reason 'stop' but the output does not end with EOS or at a "
                        "stop string")


def test_stop_cut_with_text_not_cut_or_length_claimed_fails(verifier: Verifier,
                                                           gateway: ScriptedGateway,
                                                           tiny_engine: Any) -> None:
    _, cut, _ = _stopped(gateway, tiny_engine)
    whole = tiny_engine.tokenizer.decode(cut.output_token_ids, skip_special_tokens=True)
    [v] = verdicts(verifier, [job(gateway, replace(cut, output_text=whole))])
    assert not v.passed
    assert v.reason == "output_text is not the decoded text cut before the stop string"
    [v] = verdicts(verifier, [job(gateway, replace(cut, finish_reason="length"))])
    assert not v.passed and v.reason == ("finish_reason 'length' but the output ends at a "
                                         "stop string")


def test_stream_cut_short_passes_with_its_decoded_text(
        verifier: Verifier, gateway: ScriptedGateway, tiny_engine: Any) -> None:
    """A stream cut mid-way (client gone, server dead, power cut) is an honest prefix:
    every token replayed, any length; its text must still be the ids' decoding."""
    full = gateway.pair("It was the best of times", temperature=1.0, max_tokens=16, seed=3)
    ids = full.output_token_ids[:7]
    cut = replace(full, output_token_ids=ids, finish_reason="cut",
                  output_text=tiny_engine.tokenizer.decode(ids, skip_special_tokens=True))
    [v] = verdicts(verifier, [job(gateway, cut)])
    assert v.passed, v.reason
    [v] = verdicts(verifier, [job(gateway, replace(cut, output_text=full.output_text))])
    assert not v.passed
    assert v.reason == ("output_text is not the whitelisted tokenizer's decoding of the "
                        "token ids")
    # a cut prefix whose tokens were not the generation's still fails replay
    forged = replace(cut, output_token_ids=[*ids[:-1], (ids[-1] + 1) % 640])
    forged = replace(forged, output_text=tiny_engine.tokenizer.decode(
        forged.output_token_ids, skip_special_tokens=True))
    [v] = verdicts(verifier, [job(gateway, forged)])
    assert not v.passed


def test_cut_stream_that_reached_its_stop_string_fails(verifier: Verifier,
                                                       gateway: ScriptedGateway,
                                                       tiny_engine: Any) -> None:
    """Attack: tokens past the stop string filed as a cut stream (the gateway ends a
    stream at its stop string itself: a 'cut' pair never reaches one)."""
    full, cut, _ = _stopped(gateway, tiny_engine)
    k = len(cut.output_token_ids)
    at = replace(cut, finish_reason="cut")
    [v] = verdicts(verifier, [job(gateway, at)])
    assert not v.passed
    assert v.reason == "finish_reason 'cut' but the output ends at a stop string"
    longer = replace(cut, output_token_ids=full.output_token_ids[:k + 1], finish_reason="cut")
    [v] = verdicts(verifier, [job(gateway, longer)])
    assert not v.passed
    assert v.reason == f"tokens continue after the stop string that first appears at token {k - 1}"


def test_stop_rule_knocked_out_lets_the_run_on_cheat_pass(
        verifier: Verifier, gateway: ScriptedGateway, tiny_engine: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Knock-out: with the verifier ignoring the pair's stop strings, tokens smuggled past
    the stop string as a cut stream pass replay (each of them is honest): the stop rule
    is the defence."""
    from ivp.recomputer import workers

    full, cut, _ = _stopped(gateway, tiny_engine)
    ids = full.output_token_ids[:len(cut.output_token_ids) + 1]
    longer = replace(cut, output_token_ids=ids, finish_reason="cut",
                     output_text=tiny_engine.tokenizer.decode(ids, skip_special_tokens=True))
    [v] = verdicts(verifier, [job(gateway, longer)])
    assert not v.passed
    original = workers.structural_problem
    monkeypatch.setattr(workers, "structural_problem",
                        lambda *a, **kw: original(*a, **{**kw, "stop": ()}))
    [v] = verdicts(verifier, [job(gateway, longer)])
    assert v.passed, v.reason
