"""The pair hash chain and the per-boot audit sequence (ivp.protocol.chain)."""

from __future__ import annotations

from typing import Any

import blake3
import pytest

from ivp.errors import ChainError
from ivp.protocol.chain import AuditSequence, genesis, link
from ivp.protocol.encoding import canonical, decode
from ivp.protocol.messages import PairRecord, SamplingParams, Tag


def pair(seq: int = 1, **kw: Any) -> PairRecord:
    fields: dict[str, Any] = dict(
        tag=Tag(gateway_id="gw-1", boot_id="boot-1", seq=seq), model_id="m",
        endpoint="completions", input="hi", prompt_token_ids=[1, 2], output_token_ids=[3],
        output_text="x", finish_reason="stop", seed=42,
        params=SamplingParams(temperature=1.0), t_request=1.0, t_response=2.0,
    )
    fields.update(kw)
    return PairRecord(**fields)


def test_genesis_formula() -> None:
    want = blake3.blake3(b"ivp/chain/v1\x00gw-1\x00boot-1").hexdigest()
    assert genesis("gw-1", "boot-1") == want
    assert len(want) == 64


def test_genesis_binds_gateway_and_boot() -> None:
    heads = {
        genesis("gw-1", "boot-1"), genesis("gw-2", "boot-1"), genesis("gw-1", "boot-2"),
        genesis("gw-1b", "oot-1"), genesis("gw-", "1boot-1"),  # separator prevents shifts
    }
    assert len(heads) == 5


def test_link_formula() -> None:
    prev = genesis("gw-1", "boot-1")
    p = pair()
    assert link(prev, p) == blake3.blake3(bytes.fromhex(prev) + canonical(p)).hexdigest()


@pytest.mark.parametrize(("field", "value"), [
    ("tag", Tag(gateway_id="gw-1", boot_id="boot-1", seq=2)),
    ("model_id", "m2"),
    ("endpoint", "chat.completions"),
    ("input", "hi!"),
    ("prompt_token_ids", [1, 3]),
    ("output_token_ids", [4]),
    ("output_text", "y"),
    ("finish_reason", "length"),
    ("seed", 43),
    ("params", SamplingParams(temperature=0.5)),
    ("t_request", 1.5),
    ("t_response", 2.5),
])
def test_link_changes_with_any_field(field: str, value: Any) -> None:
    prev = genesis("gw-1", "boot-1")
    assert link(prev, pair(**{field: value})) != link(prev, pair())


def test_link_changes_with_prev_and_order() -> None:
    g = genesis("gw-1", "boot-1")
    a, b = pair(1), pair(2)
    assert link(g, a) != link(genesis("gw-1", "boot-2"), a)
    assert link(link(g, a), b) != link(link(g, b), a)  # reordering is visible
    assert link(link(g, a), b) != link(g, b)  # deleting is visible


def test_link_of_decoded_pair_matches_sender() -> None:
    """The recomputer re-links the pair it decoded: same head as the gateway computed."""
    g = genesis("gw-1", "boot-1")
    p = pair()
    assert link(g, decode(canonical(p), PairRecord)) == link(g, p)


# --- audit sequence ------------------------------------------------------------------------
def snapshot(s: AuditSequence) -> tuple[int, frozenset[int]]:
    return s.next_seq, frozenset(s.seen)


def test_sequence_accepts_1_2_3() -> None:
    s = AuditSequence()
    for n in (1, 2, 3):
        s.check(n)
    assert s.next_seq == 4


def test_gap_raises_and_state_does_not_advance() -> None:
    """Withheld record: 3 never arrives."""
    s = AuditSequence()
    s.check(1)
    s.check(2)
    before = snapshot(s)
    with pytest.raises(ChainError, match=r"gap.*got 4, expected 3.*1 record"):
        s.check(4)
    assert snapshot(s) == before
    s.check(3)  # the withheld one can still arrive, and then 4
    s.check(4)


def test_first_record_must_be_1() -> None:
    s = AuditSequence()
    with pytest.raises(ChainError, match="gap"):
        s.check(2)
    assert snapshot(s) == (1, frozenset())


@pytest.mark.parametrize("seq", [1, 2, 0, -5])
def test_replay_raises_and_state_does_not_advance(seq: int) -> None:
    s = AuditSequence()
    s.check(1)
    s.check(2)
    before = snapshot(s)
    with pytest.raises(ChainError, match="replayed"):
        s.check(seq)
    assert snapshot(s) == before
    s.check(3)
