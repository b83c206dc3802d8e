"""The serving proxy's pure parts: strict requests, paired answers, re-serialisation."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivp.errors import ValidationError
from ivp.gateway import inputs, proxy
from ivp.gateway.errors import ServerProtocolError
from ivp.gateway.streaming import ClientStream, ServerStream, parse_server_stream
from ivp.protocol.messages import SamplingParams, Tag

TAG = Tag(gateway_id="gw", boot_id="b" * 32, seq=3)
PARAMS = SamplingParams(max_tokens=4)
LIMITS = proxy.ModelLimits(vocab_size=100, max_positions=64)


@pytest.mark.parametrize("field,value", [
    ("logit_bias", {"5": 10}), ("presence_penalty", 0.5), ("frequency_penalty", -1),
    ("repetition_penalty", 1.2), ("n", 2), ("best_of", 3), ("logprobs", True),
    ("logprobs", 5), ("top_logprobs", 2), ("echo", True), ("suffix", "end"), ("seed", 42),
    ("seed", 0), ("min_p", 0.1), ("tools", [{}]), ("response_format", {"type": "json"}),
])
def test_parameters_outside_sampler_spec_are_refused_by_name(field: str, value: object) -> None:
    """Attack: steer sampling with controls the verifier cannot replay (or pick a seed)."""
    body = json.dumps({"model": "m", "prompt": "hi", field: value}).encode()
    with pytest.raises(ValidationError, match=f"unsupported parameter '{field}'"):
        proxy.parse_request("completions", body)


@pytest.mark.parametrize("neutral", [
    {"n": 1}, {"presence_penalty": 0}, {"frequency_penalty": 0.0}, {"stop": None},
    {"stop": []}, {"logprobs": None}, {"echo": False}, {"seed": None}, {"logit_bias": {}},
    {"best_of": 1},
])
def test_neutral_values_of_refused_parameters_are_accepted(neutral: dict) -> None:
    body = json.dumps({"model": "m", "prompt": "hi", **neutral}).encode()
    assert proxy.parse_request("completions", body).params == SamplingParams()


def test_unknown_fields_are_refused_naming_them() -> None:
    with pytest.raises(ValidationError, match="unknown parameter 'mirostat'"):
        proxy.parse_request("completions", b'{"model": "m", "prompt": "x", "mirostat": 2}')
    with pytest.raises(ValidationError, match="unknown parameter 'prompt'"):
        proxy.parse_request("chat.completions", b'{"model": "m", "prompt": "x"}')


def test_completion_and_chat_bodies_parse() -> None:
    r = proxy.parse_request("completions", b'{"model": "m", "prompt": [1, 2], "max_tokens": 5, '
                                           b'"temperature": 0, "top_k": 3, "top_p": 0.5}')
    assert r.prompt == [1, 2] and r.params == SamplingParams(temperature=0.0, top_k=3,
                                                             top_p=0.5, max_tokens=5)
    assert r.input_text == "[1, 2]"
    c = proxy.parse_request("chat.completions", json.dumps({
        "model": "m", "messages": [{"role": "user", "content": "hé"}],
        "max_completion_tokens": 7, "stream": True}).encode())
    assert c.params.max_tokens == 7 and c.stream
    assert json.loads(c.input_text) == [{"content": "hé", "role": "user"}]


def test_batched_prompts_are_refused() -> None:
    with pytest.raises(ValidationError, match="one input per request"):
        proxy.parse_request("completions", b'{"model": "m", "prompt": ["a", "b"]}')


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                 lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c,
                                                                     max_size=6),
                 max_leaves=12).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"model": st.text(max_size=5)}, optional={
        "prompt": st.one_of(st.text(max_size=5), st.lists(st.integers(-5, 2**40), max_size=3)),
        "max_tokens": st.one_of(st.integers(-3, 10**6), st.floats(), st.none()),
        "temperature": st.one_of(st.floats(allow_nan=True), st.integers()),
        "top_k": st.integers(-3, 2**40), "top_p": st.floats(), "stream": st.integers(0, 2),
        "n": st.integers(0, 3), "seed": st.integers(),
    }).map(lambda d: json.dumps(d).encode()),
), st.sampled_from(["completions", "chat.completions"]))
def test_malformed_bodies_get_validation_errors_only(body: bytes, endpoint: str) -> None:
    """Any bytes: either a valid request or a ValidationError, never another exception."""
    try:
        r = proxy.parse_request(endpoint, body)  # type: ignore[arg-type]
    except ValidationError:
        return
    assert r.params.max_tokens >= 1 and 0 <= r.params.temperature <= 100


_FIELD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(),
                          st.text(max_size=5), st.lists(st.integers(-2, 700), max_size=3),
                          st.lists(st.fixed_dictionaries({"role": st.sampled_from(
                              ["user", "system", "tool"]), "content": st.text(max_size=4)}),
                              max_size=2))
_BASE = {"completions": [("model", "m"), ("prompt", "hi")],
         "chat.completions": [("model", "m"), ("messages", [{"role": "user", "content": "x"}])]}
_PLAUSIBLE = {"model": st.text(max_size=4), "prompt": st.text(max_size=4),
              "messages": st.just([{"role": "user", "content": "y", "name": "n"}]),
              "max_tokens": st.integers(-1, 70000), "max_completion_tokens": st.integers(0, 9),
              "temperature": st.floats(-1, 101), "top_p": st.floats(-0.5, 1.5),
              "top_k": st.integers(-1, 5), "stream": st.booleans(), "user": st.text(max_size=3),
              "n": st.integers(0, 2), "seed": st.none(), "stop": st.none(),
              "logprobs": st.booleans(), "mirostat": st.integers()}
_COMMON = ["model", "max_tokens", "temperature", "top_p", "top_k", "stream", "user"]
_FIELD = st.sampled_from(sorted(_PLAUSIBLE) + _COMMON * 2).flatmap(
    lambda k: st.tuples(st.just(k), st.one_of(_PLAUSIBLE[k], _PLAUSIBLE[k], _PLAUSIBLE[k],
                                              _FIELD_VALUES)))


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(["completions", "chat.completions"]), st.lists(_FIELD, max_size=4))
def test_fast_parse_accepts_only_what_the_checked_parse_accepts(
        endpoint: str, extra: list[tuple[str, object]]) -> None:
    """The strict decoder in front of the checked path never widens what is accepted,
    and yields the same request (duplicate keys included: the last one counts)."""
    fields = _BASE[endpoint] + extra
    body = ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in fields)
            + "}").encode()
    try:
        fast = inputs._STRICT[endpoint].decode(body)
    except msgspec.DecodeError:  # refused here: the checked path decides, naming why
        return
    assert inputs._parse_checked(endpoint, body) == fast  # type: ignore[arg-type]


def _srv(ids: list[int], finish: str = "length", tag: Tag = TAG, **extra: object) -> bytes:
    return json.dumps({"choices": [{"token_ids": ids, "finish_reason": finish, "text": "junk"}],
                       "ivp_tag": {"gateway_id": tag.gateway_id, "boot_id": tag.boot_id,
                                   "seq": tag.seq}, **extra}).encode()


def test_server_answer_yields_only_token_ids_and_finish_reason() -> None:
    out = proxy.parse_server_response(_srv([5, 6, 7, 8], extra="x"), TAG, PARAMS, LIMITS)
    assert out == proxy.ServerOutput([5, 6, 7, 8], "length")
    out = proxy.parse_server_response(_srv([5, 2], "stop"), TAG, PARAMS, LIMITS)
    assert out.token_ids == [5, 2]


@pytest.mark.parametrize("raw", [
    _srv([5, 6, 7, 8], tag=Tag(gateway_id="gw", boot_id="b" * 32, seq=4)),  # unpaired
    _srv([5, 6, 7, 8], tag=Tag(gateway_id="gw2", boot_id="b" * 32, seq=3)),
    _srv([5, 6]),  # 'length' before max_tokens
    _srv([5, 6, 7, 8, 9]),  # more than max_tokens
    _srv([], "stop"),  # stop without EOS
    _srv([5, 6, 7, 100]),  # outside the vocabulary
    b'{"choices": [], "ivp_tag": null}', b"<html>", b"",
])
def test_server_answers_outside_the_protocol_are_refused(raw: bytes) -> None:
    with pytest.raises(ServerProtocolError):
        proxy.parse_server_response(raw, TAG, PARAMS, LIMITS)


def _sse(*chunks: dict, done: bool = True) -> bytes:
    out = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    return out + (b"data: [DONE]\n\n" if done else b"")


TAGD = {"gateway_id": "gw", "boot_id": "b" * 32, "seq": 3}


def test_server_stream_is_reassembled() -> None:
    raw = _sse({"choices": [{"token_ids": [5, 6]}], "ivp_tag": TAGD},
               {"choices": [{"token_ids": [7], "finish_reason": "stop"}], "ivp_tag": TAGD})
    assert parse_server_stream(raw, TAG, PARAMS, LIMITS) == proxy.ServerOutput([5, 6, 7],
                                                                                     "stop")


@pytest.mark.parametrize("raw", [
    _sse({"choices": [{"token_ids": [5], "finish_reason": "stop"}]}),  # untagged
    _sse({"choices": [{"token_ids": [5], "finish_reason": "stop"}],
          "ivp_tag": {**TAGD, "seq": 9}}),
    _sse({"choices": [{"token_ids": [5], "finish_reason": "stop"}], "ivp_tag": TAGD},
         done=False),
    _sse({"choices": [{"token_ids": [5], "finish_reason": "stop"}], "ivp_tag": TAGD},
         {"choices": [{"token_ids": [6]}], "ivp_tag": TAGD}),  # tokens after finish
    b"event: x\ndata: {}\n\n",
])
def test_server_streams_outside_the_protocol_are_refused(raw: bytes) -> None:
    with pytest.raises(ServerProtocolError):
        parse_server_stream(raw, TAG, PARAMS, LIMITS)


def test_client_objects_carry_the_tag_and_token_ids() -> None:
    body = json.loads(proxy.client_response("completions", model_id="m", tag=TAG, prompt_len=3,
                                            token_ids=[5, 6], text="ab", finish_reason="length",
                                            created=1))
    assert body["choices"][0] == {"index": 0, "text": "ab", "token_ids": [5, 6],
                                  "finish_reason": "length", "logprobs": None}
    assert body["ivp"]["tag"] == TAGD and body["usage"]["total_tokens"] == 5
    chat = json.loads(proxy.client_response("chat.completions", model_id="m", tag=TAG,
                                            prompt_len=3, token_ids=[5], text="a",
                                            finish_reason="stop", created=1))
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "a"}


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=10), st.lists(st.integers(0, 40), max_size=6))
def test_stream_deltas_concatenate_to_the_full_decoding(text: str, cuts: list[int]) -> None:
    """Byte tokens that split multi-byte characters, in chunks as a server sends them:
    no event carries an incomplete character (U+FFFD), and the texts add up exactly."""
    def decode(t: list[int]) -> str:
        return bytes(t).decode("utf-8", errors="replace")

    ids = list(text.replace("\ufffd", "").encode())
    bounds = sorted({0, len(ids), *(c for c in cuts if c < len(ids))})
    chunks = [ids[a:b] for a, b in itertools.pairwise(bounds)]
    stream = ClientStream("completions", model_id="m", tag=TAG, prompt_len=1, decode=decode)
    raw = stream.begin() + b"".join(stream.push(c)[0] for c in chunks) + stream.end("length")
    events = [json.loads(e[6:]) for e in raw.decode().split("\n\n") if e and e[6:] != "[DONE]"]
    assert [t for e in events for t in e["choices"][0]["token_ids"]] == ids
    texts = [e["choices"][0]["text"] for e in events]
    assert all("\ufffd" not in t for t in texts)  # held back until complete
    assert "".join(texts) == decode(ids)


def test_prompt_limits() -> None:
    r = proxy.parse_request("completions", b'{"model": "m", "prompt": [1, 100]}')
    with pytest.raises(ValidationError, match="outside the vocabulary"):
        proxy.tokenize(r, None, LIMITS)  # type: ignore[arg-type]
    r = proxy.parse_request("completions", b'{"model": "m", "prompt": [1], "max_tokens": 64}')
    with pytest.raises(ValidationError, match="context"):
        proxy.tokenize(r, None, LIMITS)  # type: ignore[arg-type]


def test_whitelisted_tokenizer_ids_match_the_transformers_wrapper(tiny_model_dir: Path) -> None:
    """The serving path's encoder (Rust backend, batch of one) gives the wrapper's ids."""
    from ivp.engine.loading import load_tokenizer

    files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()
             if p.is_file() and not p.name.endswith(".safetensors")}
    wrapper = load_tokenizer(files)
    tok = proxy.HFTokenizer(wrapper)
    rng = random.Random(5)
    pieces = [*"ab XY\t\n.,!?<>/é中😀\u200b", "<s>", "</s>", "  ", "the "]
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        for special in (True, False):
            assert tok._encode(text, special) == \
                wrapper(text, add_special_tokens=special)["input_ids"], text


@given(good=st.integers(1, PARAMS.max_tokens - 1),
       cuts=st.lists(st.integers(0, 10_000), max_size=6))
@settings(max_examples=60, deadline=None)
def test_where_a_bad_line_cuts_a_stream_does_not_depend_on_how_it_was_read(
        good: int, cuts: list[int]) -> None:
    """A stream of good tokens, then a line outside the protocol (a token outside the
    vocabulary), read in pieces split anywhere: the ids given before the refusal are
    the good ones, all of them, however the bytes were split into reads."""
    raw = _sse(*[{"choices": [{"token_ids": [5 + i]}], "ivp_tag": TAGD} for i in range(good)],
               {"choices": [{"token_ids": [LIMITS.vocab_size]}], "ivp_tag": TAGD})
    stream = ServerStream(TAG, PARAMS, LIMITS)
    ids: list[int] = []
    points = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    with pytest.raises(ServerProtocolError):
        for a, b in itertools.pairwise(points):
            ids += stream.feed(raw[a:b])
            if stream.refused is not None:
                stream.feed(b"")  # a held refusal is raised by the next call
        stream.end()
    assert ids == [5 + i for i in range(good)]
