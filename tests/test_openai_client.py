"""OpenAI conformance: the real `openai` package against the live loopback datacenter.

Every request goes client → recomputer → gateway → server as processes on loopback.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from ivp.protocol.encoding import decode
from ivp.protocol.messages import AuditRecord

PROMPT = "The inspectors arrived at the datacenter"


@pytest.fixture
def client(datacenter: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=datacenter.recomputer_url + "/v1", api_key="ivp",
                         max_retries=0)


def test_models_lists_the_whitelisted_models_a_gateway_serves(client, datacenter) -> None:
    assert [m.id for m in client.models.list()] == [datacenter.model_id]
    model = client.models.retrieve(datacenter.model_id)
    assert model.id == datacenter.model_id and model.object == "model"


def test_chat_and_completions_streamed_and_not_sync_and_async(client, datacenter) -> None:
    model = datacenter.model_id
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
        temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage is not None and chat.usage.completion_tokens >= 1
    streamed = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
        temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat.choices[0].message.content  # greedy: the same output
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=8,
                                           temperature=0)
    pieces = client.completions.create(model=model, prompt=PROMPT, max_tokens=8,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == \
        completion.choices[0].text

    async def both() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=datacenter.recomputer_url + "/v1",
                                      api_key="ivp", max_retries=0) as aclient:
            one = await aclient.completions.create(model=model, prompt=PROMPT, max_tokens=8,
                                                   temperature=0)
            stream = await aclient.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
                temperature=0, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream
                            if c.choices])
            return one.choices[0].text, text

    one, text = asyncio.run(both())
    assert one == completion.choices[0].text and text == chat.choices[0].message.content


def test_include_usage_gives_the_usage_chunk(client, datacenter) -> None:
    chunks = list(client.chat.completions.create(
        model=datacenter.model_id, messages=[{"role": "user", "content": PROMPT}],
        max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    tokens = sum(len(c.choices[0].model_extra.get("token_ids", []))
                 for c in chunks[:-1] if c.choices)
    assert chunks[-1].usage.completion_tokens == tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(
        model=datacenter.model_id, messages=[{"role": "user", "content": PROMPT}],
        max_tokens=6, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices


def test_content_as_a_list_of_text_parts(client, datacenter) -> None:
    parts = [{"type": "text", "text": "Tell me about"}, {"type": "text", "text": "the weather"}]
    as_parts = client.chat.completions.create(
        model=datacenter.model_id, messages=[{"role": "user", "content": parts}],
        max_tokens=8, temperature=0)
    joined = client.chat.completions.create(
        model=datacenter.model_id,
        messages=[{"role": "user", "content": "Tell me about\nthe weather"}],
        max_tokens=8, temperature=0)
    assert as_parts.choices[0].message.content == joined.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=datacenter.model_id, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image_url",
                                          "image_url": {"url": "http://x/y.png"}}]}])
    assert "only text parts are supported" in err.value.message


def _audited_stop_pairs(datacenter: Any) -> list[tuple[AuditRecord, bool]]:
    """Every stored audit record with stop strings and whether its verdict passed."""
    path = datacenter.root / "recomputer" / "recomputer.sqlite"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT a.payload, v.passed FROM audits a JOIN verdicts v "
                          "ON v.audit_id = a.id").fetchall()
    records = [(decode(payload, AuditRecord), bool(passed)) for payload, passed in rows]
    return [(r, passed) for r, passed in records if r.pair.stop]


def test_stop_strings_cut_text_and_tokens_and_the_audit_passes(client, datacenter) -> None:
    model = datacenter.model_id
    cut = 0
    for prompt in (PROMPT, "Once upon a time there was a", "List three colours:",
                   "A short poem about silicon:", "Tell me about the weather in",
                   "The gateway logs every request", "The recomputer checks a random sample of",
                   "Explain why interconnect matters for training"):
        whole = client.completions.create(model=model, prompt=prompt, max_tokens=24,
                                          temperature=0)
        text = whole.choices[0].text
        ids = whole.choices[0].model_extra["token_ids"]
        if len(text) < 8:
            continue
        stop = text[len(text) // 2:len(text) // 2 + 2]
        got = client.completions.create(model=model, prompt=prompt, max_tokens=24,
                                        temperature=0, stop=[stop, "\x00never"])
        choice = got.choices[0]
        assert choice.text == text[:text.index(stop)]
        assert choice.finish_reason == "stop"
        kept = choice.model_extra["token_ids"]
        assert kept == ids[:len(kept)] and len(kept) <= len(ids)
        streamed = client.completions.create(model=model, prompt=prompt, max_tokens=24,
                                             temperature=0, stop=stop, stream=True)
        chunks = list(streamed)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        cut += 1
    assert cut >= 4
    datacenter.drain()
    audited = _audited_stop_pairs(datacenter)
    assert audited, "ε = 0.5 over 16 requests: P(no audit) = 2^-16"
    assert all(passed for _, passed in audited), [r.pair for r, ok in audited if not ok]
    from transformers import AutoTokenizer

    from ivp.protocol.stops import cut_at_stop

    tok = AutoTokenizer.from_pretrained(datacenter.model_dir)
    assert any(cut_at_stop(r.pair.output_token_ids, r.pair.stop,
                           lambda ids: tok.decode(ids, skip_special_tokens=True))
               for r, _ in audited)  # some audited pair ends at a stop string


def test_model_not_on_the_whitelist_is_404_model_not_found(client) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    assert err.value.param == "model" and "'gpt-4o' does not exist here" in err.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("kwargs,param,words", [
    ({"n": 2}, "n", "n must be 1"),
    ({"logprobs": True}, "logprobs", "only token ids leave the gateway"),
    ({"seed": 7}, "seed", "gateway draws every request's seed from its hardware random"),
    ({"logit_bias": {"5": 10}}, "logit_bias", "could not replay it"),
    ({"messages": []}, "messages", "messages must be a non-empty list"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be an integer at least 1"),
    ({"temperature": 500}, "temperature", "temperature must be a number at most 100"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role",
     "must be one of system, user, assistant, developer (got 'robot')"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 stop strings"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only with"),
])
def test_unsupported_or_bad_parameters_are_400_naming_the_parameter(
        client, datacenter, kwargs: dict, param: str, words: str) -> None:
    request = {"model": datacenter.model_id, "max_tokens": 4,
               "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**request)
    assert err.value.status_code == 400 and err.value.param == param
    assert words in err.value.message
    body = err.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}


def _http(method: str, url: str, body: bytes | None = None) -> tuple[int, dict, Any]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_every_error_of_the_recomputer_has_the_openai_shape(datacenter) -> None:
    url = datacenter.recomputer_url
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405),
                                 ("POST", "/status", 405), ("POST", "/tamper", 404),
                                 ("POST", "/v1/completions", 400)):
        code, headers, answer = _http(method, url + path, b"{}" if method == "POST" else None)
        assert code == status, (path, answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"}, answer
        assert answer["error"]["message"] and "Expected `" not in answer["error"]["message"]
    code, headers, answer = _http("GET", url + "/v1/completions")
    assert headers.get("Allow") == "POST"
    assert answer["error"]["message"] == "GET is not allowed on /v1/completions: use POST"
