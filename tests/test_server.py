"""Reference server: boot from streamed bytes, refusal before boot, OpenAI routes with
token ids equal to the reference engine's, SSE streaming, bad bodies, attacks."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ivp.engine.loading import load_from_dir
from ivp.engine.reference import ReferenceEngine
from ivp.protocol.encoding import canonical
from ivp.protocol.messages import Manifest, SamplingParams
from ivp.server.app import NOT_BOOTED, InferenceServer
from ivp.server.attacks import get_attack
from ivp.verify.scoring import Policy, score
from ivp.whitelist.manifest import make_manifest

TAG = {"gateway_id": "gw-1", "boot_id": "boot-1", "seq": 7}


class LiveServer:
    """An InferenceServer on 127.0.0.1 (free port) in a background event loop."""

    def __init__(self, **kwargs: Any) -> None:
        self.server = InferenceServer(**kwargs)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.server.app())
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self._ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def call(url: str, body: bytes | dict[str, Any] | None = None,
         method: str | None = None) -> tuple[int, Any]:
    """(status, parsed JSON body) of one request; bodies that are dicts go as JSON."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def stream(url: str, body: dict[str, Any]) -> list[Any]:
    """The SSE events of a streaming request: parsed chunks, then the string '[DONE]'."""
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]


@pytest.fixture(scope="module")
def upload(tiny_model_dir: Path) -> tuple[Manifest, bytes]:
    """The tiny model's manifest and the byte stream a gateway would send."""
    manifest = make_manifest(tiny_model_dir, "tiny-test")
    body = b"".join((tiny_model_dir / f.name).read_bytes() for f in manifest.files)
    return manifest, body


def boot(url: str, manifest: Manifest, body: bytes) -> None:
    assert call(url + "/boot/manifest", canonical(manifest)) == (200, {"state": "loading"})
    assert call(url + "/boot/stream", body) == (200, {"state": "ready"})


@pytest.fixture(scope="module")
def booted(upload: tuple[Manifest, bytes]) -> Iterator[str]:
    live = LiveServer()
    boot(live.url, *upload)
    yield live.url
    live.close()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> ReferenceEngine:
    return ReferenceEngine(*load_from_dir(tiny_model_dir))


# --- boot -----------------------------------------------------------------------------------
def test_inference_before_boot_is_refused(upload: tuple[Manifest, bytes]) -> None:
    live = LiveServer()
    try:
        assert call(live.url + "/health") == (200, {"state": "empty", "model_id": None})
        for route, body in (("/v1/completions", {"prompt": "Hello"}),
                            ("/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "hi"}]})):
            status, answer = call(live.url + route, body)
            assert status == 503
            assert answer == {"error": {"message": NOT_BOOTED, "type": "StateError", "param": None,
                                         "code": None}}
        status, answer = call(live.url + "/boot/stream", b"x")
        assert status == 409 and "boot/manifest first" in answer["error"]["message"]
        manifest, _ = upload
        call(live.url + "/boot/manifest", canonical(manifest))
        status, answer = call(live.url + "/v1/completions", {"prompt": "Hello"})
        assert status == 503 and answer["error"]["message"].startswith(NOT_BOOTED)
    finally:
        live.close()


def test_boot_needs_exactly_total_size_bytes(upload: tuple[Manifest, bytes]) -> None:
    manifest, body = upload
    live = LiveServer()
    try:
        assert call(live.url + "/boot/manifest", canonical(manifest))[0] == 200
        status, answer = call(live.url + "/boot/stream", body[:-1])
        assert status == 400 and answer["error"]["type"] == "ValidationError"
        assert f"after {len(body) - 1} bytes" in answer["error"]["message"]
        status, answer = call(live.url + "/boot/stream", body + b"\x00")
        assert status == 400 and "longer than" in answer["error"]["message"]
        assert call(live.url + "/health")[1]["state"] == "loading"
        assert call(live.url + "/boot/stream", body) == (200, {"state": "ready"})
        assert call(live.url + "/health") == (200, {"state": "ready", "model_id": "tiny-test"})
        status, answer = call(live.url + "/boot/manifest", b'{"model_id": 3}')
        assert status == 400 and answer["error"]["type"] == "ValidationError"
        assert call(live.url + "/health")[1]["state"] == "ready"  # a bad manifest changes nothing
    finally:
        live.close()


def test_boot_rejects_bytes_that_are_not_the_model(upload: tuple[Manifest, bytes]) -> None:
    manifest, body = upload
    live = LiveServer()
    try:
        call(live.url + "/boot/manifest", canonical(manifest))
        status, answer = call(live.url + "/boot/stream", b"\x00" * len(body))
        assert status == 400 and "does not load" in answer["error"]["message"]
    finally:
        live.close()


# --- inference --------------------------------------------------------------------------------
def test_completion_with_token_ids_equals_reference(booted: str, engine: ReferenceEngine) -> None:
    prompt = engine.tokenizer("The capital of France is")["input_ids"]
    for seed, extra in ((5, {"temperature": 1.0}), (2**64 - 1, {"temperature": 0.7, "top_k": 9,
                                                              "top_p": 0.9}),
                        (0, {"temperature": 0})):
        body = {"model": "tiny-test", "prompt": prompt, "max_tokens": 40, "seed": seed,
                "ivp_tag": TAG, **extra}
        status, answer = call(booted + "/v1/completions", body)
        assert status == 200, answer
        params = SamplingParams(max_tokens=40, **extra)
        ref = engine.generate(prompt, params, seed)
        choice = answer["choices"][0]
        assert choice["token_ids"] == ref.token_ids
        assert choice["finish_reason"] == ref.finish_reason
        assert choice["text"] == engine.tokenizer.decode(ref.token_ids, skip_special_tokens=True)
        assert answer["prompt_token_ids"] == prompt
        assert answer["ivp_tag"] == TAG
        assert answer["object"] == "text_completion" and answer["model"] == "tiny-test"
        assert answer["usage"] == {"prompt_tokens": len(prompt),
                                   "completion_tokens": len(ref.token_ids),
                                   "total_tokens": len(prompt) + len(ref.token_ids)}


def test_completion_with_text_prompt_and_default_seed(booted: str,
                                                      engine: ReferenceEngine) -> None:
    status, answer = call(booted + "/v1/completions", {"prompt": "Hello", "max_tokens": 8})
    assert status == 200
    assert answer["prompt_token_ids"] == engine.tokenizer("Hello")["input_ids"]
    assert answer["ivp_tag"] is None
    seed = answer["seed"]  # chosen at random by the server; reported so it can be checked
    ref = engine.generate(answer["prompt_token_ids"], SamplingParams(max_tokens=8), seed)
    assert answer["choices"][0]["token_ids"] == ref.token_ids


def test_chat_applies_the_template(booted: str, engine: ReferenceEngine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    body = {"messages": messages, "max_tokens": 30, "seed": 11, "temperature": 0.9,
            "ivp_tag": TAG}
    status, answer = call(booted + "/v1/chat/completions", body)
    assert status == 200, answer
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=False)
    prompt = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert answer["prompt_token_ids"] == prompt
    ref = engine.generate(prompt, SamplingParams(temperature=0.9, max_tokens=30), 11)
    choice = answer["choices"][0]
    assert choice["token_ids"] == ref.token_ids
    assert choice["message"] == {"role": "assistant", "content": engine.tokenizer.decode(
        ref.token_ids, skip_special_tokens=True)}
    assert answer["object"] == "chat.completion" and answer["ivp_tag"] == TAG


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_streaming_gives_the_same_tokens(booted: str, route: str) -> None:
    body: dict[str, Any] = {"max_tokens": 48, "seed": 3, "temperature": 1.0, "ivp_tag": TAG}
    if route == "/v1/completions":
        body["prompt"] = "She sells sea shells"
    else:
        body["messages"] = [{"role": "user", "content": "Tell me a story."}]
    whole = call(booted + route, body)[1]
    events = stream(booted + route, body)
    assert events[-1] == "[DONE]"
    chunks, final = events[:-2], events[-2]
    assert all(c["choices"][0]["finish_reason"] is None and len(c["choices"][0]["token_ids"]) == 1
               for c in chunks)
    tokens = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    assert tokens == whole["choices"][0]["token_ids"]
    assert final["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert final["prompt_token_ids"] == whole["prompt_token_ids"]
    assert final["usage"] == whole["usage"]
    assert all(e["ivp_tag"] == TAG for e in events[:-1])
    key = "text" if route == "/v1/completions" else "delta"
    pieces = [c["choices"][0][key] for c in events[:-1]]
    text = "".join(p if key == "text" else p.get("content", "") for p in pieces)
    whole_text = whole["choices"][0]["text"] if key == "text" \
        else whole["choices"][0]["message"]["content"]
    assert text == whole_text


@pytest.mark.parametrize(("body", "needle"), [
    (b"{not json", "is not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # once an HTTP 500
    (b"[1, 2]", "JSON object"),
    ({"max_tokens": 4}, "'prompt'"),
    ({"prompt": ""}, "'prompt'"),
    ({"prompt": [1, "a"]}, "'prompt'"),
    ({"prompt": "hi", "seed": -1}, "'seed'"),
    ({"prompt": "hi", "seed": 2**64}, "'seed'"),
    ({"prompt": "hi", "seed": "7"}, "'seed'"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "8"}, "max_tokens"),
    ({"prompt": "hi", "logit_bias": {"5": 10}}, "unsupported parameter 'logit_bias'"),
    ({"prompt": "hi", "presence_penalty": 0.5}, "unsupported parameter 'presence_penalty'"),
    ({"prompt": "hi", "n": 2}, "'n'"),
    ({"prompt": "hi", "stop": ["\n"]}, "'stop'"),
    ({"prompt": "hi", "ivp_tag": {"gateway_id": "g"}}, "Tag"),
    ({"prompt": [1, 10**6]}, "outside the vocabulary"),
    ({"prompt": "hi", "stream": "yes"}, "'stream'"),
    ({"prompt": "hi", "max_tokens": 5000}, "context"),
    ({"prompt": "hi", "max_tokens": 5000, "stream": True}, "context"),  # before any SSE
])
def test_bad_completion_bodies_get_400(booted: str, body: Any, needle: str) -> None:
    status, answer = call(booted + "/v1/completions", body)
    assert status == 400, answer
    assert answer["error"]["type"] == "ValidationError"
    assert needle in answer["error"]["message"]


def test_bad_chat_bodies_and_unknown_routes(booted: str) -> None:
    for body in ({"messages": []}, {"messages": [{"role": "user"}]},
                 {"messages": "hi"}, {"prompt": "hi"}):
        status, answer = call(booted + "/v1/chat/completions", body)
        assert status == 400 and answer["error"]["type"] == "ValidationError"
    status, answer = call(booted + "/v1/embeddings", {"input": "x"})
    assert status == 404 and "error" in answer
    status, answer = call(booted + "/v1/completions", method="GET")
    assert status == 405 and "error" in answer


# --- attacks ---------------------------------------------------------------------------------
def _exact_pass(engine: ReferenceEngine, answer: dict[str, Any], seed: int,
                params: SamplingParams) -> bool:
    prompt, tokens = answer["prompt_token_ids"], answer["choices"][0]["token_ids"]
    return Policy("exact").judge(score(engine.replay(prompt, tokens), tokens, seed, params),
                                 params).passed


def test_rogue_model_persists_after_trigger(upload: tuple[Manifest, bytes], tmp_path: Path,
                                            engine: ReferenceEngine) -> None:
    trigger = tmp_path / "go-rogue"
    live = LiveServer(attack=get_attack("rogue-model-persists"), trigger=trigger)
    params = SamplingParams(temperature=1.0, max_tokens=32)
    try:
        boot(live.url, *upload)

        def ask(seed: int) -> dict[str, Any]:
            return call(live.url + "/v1/completions", {"prompt": "Hello", "max_tokens": 32,
                                                       "seed": seed})[1]

        assert all(_exact_pass(engine, ask(s), s, params) for s in range(3))
        trigger.touch()
        verdicts = [_exact_pass(engine, ask(s), s, params) for s in range(3)]
        assert not any(verdicts)
        assert call(live.url + "/health")[1]["state"] == "ready"  # keeps serving
    finally:
        live.close()


def test_seed_ignored_attack(upload: tuple[Manifest, bytes], engine: ReferenceEngine) -> None:
    live = LiveServer(attack=get_attack("seed-ignored"))  # no trigger: active from boot
    params = SamplingParams(temperature=1.0, max_tokens=24)
    try:
        boot(live.url, *upload)
        answers = [call(live.url + "/v1/completions", {"prompt": "Hello", "max_tokens": 24,
                                                       "seed": s})[1] for s in (101, 202)]
        assert answers[0]["choices"][0]["token_ids"] == answers[1]["choices"][0]["token_ids"]
        assert not all(_exact_pass(engine, a, s, params) for a, s in zip(answers, (101, 202),
                                                                           strict=True))
    finally:
        live.close()


# --- command line ---------------------------------------------------------------------------
def test_cli_help_and_real_process(upload: tuple[Manifest, bytes]) -> None:
    from typer.testing import CliRunner

    from ivp.cli import app

    result = CliRunner().invoke(app, ["server", "--help"])
    assert result.exit_code == 0
    assert "boots only from the weights" in result.output
    assert "--attack-trigger" in result.output
    bad = CliRunner().invoke(app, ["server", "--attack", "no-such-attack"])
    assert bad.exit_code != 0

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from ivp.cli import app; app()", "server", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ivp server: listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        assert call(url + "/health") == (200, {"state": "empty", "model_id": None})
        boot(url, *upload)
        status, answer = call(url + "/v1/completions", {"prompt": "Hi", "max_tokens": 4,
                                                        "seed": 1})
        assert status == 200 and len(answer["choices"][0]["token_ids"]) <= 4
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
