"""Stop strings and incremental text (protocol.stops): one rule for gateway and verifier.

Tokens here are single bytes decoded as UTF-8 with replacement, so a token can end
inside a multi-byte character; the rule is checked against a brute-force statement
of it over every prefix of the output.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivp.protocol.stops import TextStream, check_stops, cut_at_stop

FFFD = "\ufffd"


def decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def settled(ids: list[int], j: int) -> str:
    """The settled text after j tokens: the decoding of the longest prefix (up to j)
    whose decoding does not end inside a character."""
    m = next(m for m in range(j, -1, -1) if m == 0 or not decode(ids[:m]).endswith(FFFD))
    return decode(ids[:m])


def brute_cut(ids: list[int], stops: list[str]) -> tuple[int, str] | None:
    """The rule, stated over every prefix: the first token count after which the
    settled text holds a stop string, and the text before its earliest occurrence; at
    the end the whole decoding settles."""
    for j in range(1, len(ids) + 1):
        text = settled(ids, j) if j < len(ids) else decode(ids)
        found = [text.find(s) for s in stops if s in text]
        if found:
            return j, text[:min(found)]
    return None


# bytes of ASCII letters and of 2-, 3- and 4-byte characters, split anywhere
TEXT = st.text(alphabet=st.sampled_from("abc é中😀\n"), max_size=12)
IDS = TEXT.map(lambda t: list(t.encode())) | st.lists(st.integers(0, 255), max_size=16)
STOPS = st.lists(st.text(alphabet=st.sampled_from("abcé中 \n"), min_size=1, max_size=3),
                 max_size=3)


@settings(max_examples=400, deadline=None)
@given(IDS, STOPS)
def test_cut_matches_the_rule_over_every_prefix(ids: list[int], stops: list[str]) -> None:
    assert cut_at_stop(ids, stops, decode) == brute_cut(ids, stops)


@settings(max_examples=400, deadline=None)
@given(IDS, STOPS)
def test_released_text_is_never_cut_away(ids: list[int], stops: list[str]) -> None:
    """Whatever a client received while streaming is part of the final text: nothing
    released is removed by a later stop (text that may begin one is held back)."""
    stream = TextStream(decode, stops)
    released = ""
    for tok in ids:
        released += stream.push(tok)
        assert stream.text.startswith(released)
        if stream.stopped_at is not None:
            break
    released += stream.finish()
    assert released == stream.text
    cut = brute_cut(ids, stops)
    assert stream.text == (decode(ids) if cut is None else cut[1])
    assert stream.stopped_at == (None if cut is None else cut[0])


@settings(max_examples=200, deadline=None)
@given(IDS)
def test_without_stops_the_text_is_the_full_decoding(ids: list[int]) -> None:
    stream = TextStream(decode)
    deltas = [stream.push(t) for t in ids]
    assert "".join(deltas) + stream.finish() == decode(ids)


def test_a_token_that_splits_a_character_releases_nothing_until_it_is_whole() -> None:
    stream = TextStream(decode)
    euro = list("€".encode())  # 3 bytes
    assert [stream.push(b) for b in euro] == ["", "", "€"]


def test_text_that_may_begin_a_stop_is_held_back_then_released() -> None:
    stream = TextStream(decode, ["END"])
    assert stream.push_all(b"abE") == "ab"  # "E" may begin "END"
    assert stream.push_all(b"x") == "Ex"  # it did not
    assert stream.push_all(b"EN") == ""
    assert stream.push_all(b"Dzz") == ""  # the stop: the output ends at "D"
    assert stream.stopped_at == 7 and stream.text == "abEx"
    with pytest.raises(ValueError, match="no token may follow"):
        stream.push(1)


@pytest.mark.parametrize("stops,why", [
    (["a"] * 5, "at most 4"), ([""], "must not be empty"), (["x" * 257], "at most 256"),
    (["a\ufffd"], "U+FFFD"),
])
def test_unusable_stop_strings_are_named(stops: list[str], why: str) -> None:
    assert why in check_stops(stops)
