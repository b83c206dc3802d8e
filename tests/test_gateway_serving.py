"""SERVING's pure core (SNG property 3) driven directly: values in, values or errors out.

One test per attack or fault, named at the check that stops it; each refusal asserts
the exact error and that the core's state did not change (python-tuf's habit).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from ivp.errors import ChainError, StateError, ValidationError
from ivp.gateway import proxy, serving
from ivp.gateway.errors import UnknownModelError
from ivp.gateway.serving import Draws, Link, ServingBoot
from ivp.protocol import chain
from ivp.protocol.encoding import canonical
from ivp.protocol.messages import FileEntry, Manifest, PairRecord, SamplingParams, Tag

GW, BOOT = "gw-test", "b00t"
PARAMS = SamplingParams(temperature=0.0, max_tokens=4)


class _Tok:
    def encode_prompt(self, text: str) -> list[int]:
        return [1, 2]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return [1, 2]

    def decode(self, token_ids: list[int]) -> str:
        return " ".join(map(str, token_ids))


def _manifest(model_id: str = "tiny") -> Manifest:
    entry = FileEntry(name="w.safetensors", role="weights", size=1, digest="0" * 64,
                      algo="blake3")
    return Manifest(model_id=model_id, architecture="x", dtype="float32", files=[entry],
                    total_size=1)


def _boot(**kw: Any) -> ServingBoot[str]:
    return ServingBoot(GW, BOOT, _manifest(), _Tok(), proxy.ModelLimits(16), 1000.0,
                       **kw)


def _request(model: str = "tiny") -> proxy.ClientRequest:
    return proxy.ClientRequest(endpoint="completions", model=model, params=PARAMS,
                               stream=False, prompt="hello")


def _pair(seq: int, boot_id: str = BOOT) -> PairRecord:
    boot = ServingBoot(GW, boot_id, _manifest(), _Tok(), proxy.ModelLimits(16), 0.0)
    out = proxy.ServerOutput([3, 4], "length")
    return boot.pair(Tag(gateway_id=GW, boot_id=boot_id, seq=seq), _request(), [1, 2], out,
                     "3 4", 42 + seq, 1.0, 2.0)


def _snapshot(boot: ServingBoot[str]) -> dict[str, Any]:
    return copy.deepcopy({k: getattr(boot, k) for k in (
        "next_seq", "pairs", "audits", "open_tags", "next_draw", "settled")})


# --- tags and pair records -----------------------------------------------------------
def test_tags_count_up_from_zero_under_this_gateway_and_boot() -> None:
    boot = _boot()
    tags = [boot.next_tag() for _ in range(3)]
    assert tags == [Tag(gateway_id=GW, boot_id=BOOT, seq=s) for s in range(3)]
    assert boot.unsettled == 3


def test_request_for_another_model_is_refused_before_a_tag_is_used() -> None:
    boot = _boot()
    before = _snapshot(boot)
    with pytest.raises(UnknownModelError) as err:
        boot.check_model(_request("other"))
    assert str(err.value) == "this gateway serves only 'tiny', not 'other'"
    assert _snapshot(boot) == before


def test_pair_record_holds_what_the_audit_replays() -> None:
    boot = _boot()
    tag = boot.next_tag()
    boot.open_tag(tag.seq)
    assert boot.open_tags == {0}
    pair = boot.pair(tag, _request(), [1, 2], proxy.ServerOutput([3, 4], "length"), "3 4",
                     7, 1.5, 2.5)
    boot.close_tag(tag.seq)
    assert boot.open_tags == set()
    assert (pair.tag, pair.model_id, pair.input, pair.prompt_token_ids,
            pair.output_token_ids, pair.output_text, pair.finish_reason, pair.seed,
            pair.params, pair.t_request, pair.t_response) == (
        tag, "tiny", "hello", [1, 2], [3, 4], "3 4", "length", 7, PARAMS, 1.5, 2.5)


# --- the reorder buffer: draws in tag order ------------------------------------------
def test_draws_are_due_only_in_tag_order_when_answers_overtake() -> None:
    """Blocks audit records out of tag order (the recomputer refuses a record whose pair
    precedes the previous record's): a later seq waits for every earlier one."""
    boot = _boot()
    for _ in range(4):
        boot.next_tag()
    links = {s: Link(BOOT, s + 1, f"h{s}", f"h{s + 1}") for s in range(4)}
    assert boot.settle(2, links[2], "w2") == []
    assert boot.settle(1, links[1], "w1") == []
    assert boot.next_draw == 0 and boot.unsettled == 2
    assert boot.settle(0, links[0], "w0") == [(links[0], "w0"), (links[1], "w1"),
                                              (links[2], "w2")]
    assert boot.next_draw == 3 and boot.settled == {} and boot.unsettled == 1
    assert boot.settle(3, links[3], "w3") == [(links[3], "w3")]
    assert boot.unsettled == 0


def test_an_abandoned_tag_settles_with_no_pair_and_unblocks_the_next() -> None:
    boot = _boot()
    boot.next_tag()
    boot.next_tag()
    later = Link(BOOT, 1, "g", "h1")
    assert boot.settle(1, later, "w1") == []
    assert boot.settle(0, None, "w0") == [(None, "w0"), (later, "w1")]


def test_settling_a_tag_twice_is_refused_and_changes_nothing() -> None:
    """A misuse (the shell settles each seq once): a second settle must not draw twice
    for one pair, whether the first is still buffered or already drawn."""
    boot = _boot()
    for _ in range(3):
        boot.next_tag()
    assert boot.settle(0, None, "w0") == [(None, "w0")]
    boot.settle(2, None, "w2")
    before = _snapshot(boot)
    for seq in (0, 2):
        with pytest.raises(StateError) as err:
            boot.settle(seq, None, "again")
        assert str(err.value) == f"tag seq {seq} of boot {BOOT} is not waiting to be settled"
        assert _snapshot(boot) == before


def test_settling_a_tag_never_handed_out_is_refused_and_changes_nothing() -> None:
    boot = _boot()
    boot.next_tag()
    before = _snapshot(boot)
    for seq in (1, 5, -1):
        with pytest.raises(StateError) as err:
            boot.settle(seq, None, "w")
        assert str(err.value) == f"tag seq {seq} of boot {BOOT} is not waiting to be settled"
        assert _snapshot(boot) == before


def test_committed_pairs_and_counted_audits_are_the_boots_counters() -> None:
    boot = _boot()
    boot.committed()
    boot.committed()
    record = serving.audit_record(GW, Link(BOOT, 2, "a", "b"), canonical(_pair(1)), 5)
    boot.counted(record)
    assert (boot.pairs, boot.audits) == (2, 5)


# --- the sampling decision -----------------------------------------------------------
def test_draw_keeps_with_the_epsilon_its_boot_declared() -> None:
    """Blocks a draw under another ε than the BOOT record declared (the recomputer's
    audit-rate test uses the declared one)."""
    draws = Draws(0.25)
    draws.declare("b1", 0.5)
    half = serving.threshold(0.5)
    assert half == 2**63
    assert draws.keep("b1", half - 1) and not draws.keep("b1", half)
    quarter = serving.threshold(0.25)
    assert draws.keep("other", quarter - 1) and not draws.keep("other", quarter)


def test_a_recovered_boot_never_overrides_a_declared_epsilon() -> None:
    draws = Draws(0.25)
    draws.declare("b1", 0.5)
    draws.recovered("b1", 0.1)
    draws.recovered("b2", 0.1)
    assert draws.thresholds == {"b1": serving.threshold(0.5), "b2": serving.threshold(0.1)}


def test_epsilon_one_keeps_every_word() -> None:
    draws = Draws(1.0)
    assert serving.threshold(1.0) == 2**64 and draws.keep("b", 2**64 - 1)


# --- the chain and its records -------------------------------------------------------
def test_pairs_chain_from_the_boots_head_in_commit_order() -> None:
    head = chain.genesis(GW, BOOT)
    pairs = [_pair(1), _pair(0)]  # commit order need not be tag order
    linked = serving.link_pairs(BOOT, head, 0, pairs)
    assert [data for data, _ in linked] == [canonical(p) for p in pairs]
    first, second = (where for _, where in linked)
    assert first == Link(BOOT, 1, head, chain.link(head, pairs[0]))
    assert second == Link(BOOT, 2, first.head, chain.link(first.head, pairs[1]))
    again = serving.link_pairs(BOOT, second.head, 2, [_pair(2)])
    assert again[0][1].pos == 3 and again[0][1].prev == second.head


def test_pair_tagged_for_another_boot_is_not_chained() -> None:
    """Blocks one boot's pair entering another boot's chain: nothing of the batch is
    chained (the log's step then writes nothing)."""
    pairs = [_pair(0), _pair(1, boot_id="elsewhere")]
    before = copy.deepcopy(pairs)
    with pytest.raises(StateError) as err:
        serving.link_pairs(BOOT, chain.genesis(GW, BOOT), 0, pairs)
    assert str(err.value) == "pair tagged for another boot"
    assert pairs == before


def test_pair_altered_on_disk_does_not_open() -> None:
    head = chain.genesis(GW, BOOT)
    (data, where), = serving.link_pairs(BOOT, head, 0, [_pair(0)])
    assert serving.open_link(BOOT, 1, where.prev, where.head, data) == where
    altered = data.replace(b'"seed":42', b'"seed":43')
    assert altered != data
    with pytest.raises(ChainError) as err:
        serving.open_link(BOOT, 1, where.prev, where.head, altered)
    assert str(err.value) == f"pair {BOOT}/1 does not match its chain link"


def test_pair_moved_to_another_chain_position_does_not_open() -> None:
    head = chain.genesis(GW, BOOT)
    (_d1, w1), (d2, _w2) = serving.link_pairs(BOOT, head, 0, [_pair(0), _pair(1)])
    with pytest.raises(ChainError) as err:
        serving.open_link(BOOT, 1, w1.prev, w1.head, d2)
    assert str(err.value) == f"pair {BOOT}/1 does not match its chain link"


def test_audit_record_carries_the_heads_around_its_pair() -> None:
    head = chain.genesis(GW, BOOT)
    (data, where), = serving.link_pairs(BOOT, head, 0, [_pair(0)])
    record = serving.audit_record(GW, where, data, 1)
    assert (record.gateway_id, record.boot_id, record.audit_seq, record.chain_pos,
            record.chain_prev, record.chain_head) == (GW, BOOT, 1, 1, head, where.head)
    assert record.pair == _pair(0)
    assert chain.link(record.chain_prev, record.pair) == record.chain_head


def test_audit_of_a_pair_that_does_not_re_encode_is_refused() -> None:
    """The recomputer re-links the decoded pair: bytes that decode but are not
    canonical would make a record that can never check, so none is made."""
    data = canonical(_pair(0))
    loose = data.replace(b'"seed":', b'"seed": ', 1)
    with pytest.raises(ChainError) as err:
        serving.audit_record(GW, Link(BOOT, 1, "p", "h"), loose, 1)
    assert str(err.value) == f"pair {BOOT}/1 does not re-encode to its bytes"


def test_audit_of_bytes_that_are_not_a_pair_is_refused() -> None:
    with pytest.raises(ValidationError):
        serving.audit_record(GW, Link(BOOT, 1, "p", "h"), b'{"not": "a pair"}', 1)


def test_checkpoint_and_boot_record_state_the_counters_and_the_genesis() -> None:
    cp = serving.checkpoint(GW, BOOT, 12, "head12", 3, 99.0)
    assert (cp.gateway_id, cp.boot_id, cp.pairs_served, cp.chain_head, cp.audits,
            cp.time) == (GW, BOOT, 12, "head12", 3, 99.0)
    record, genesis = serving.boot_record(GW, BOOT, _manifest(), 0.3, 5.0, "http://gw")
    assert genesis == chain.genesis(GW, BOOT)
    assert (record.model_id, record.epsilon, record.time, record.url) == (
        "tiny", 0.3, 5.0, "http://gw")
