"""The reference inference server: boots only from weights its gateway streams to it.

HTTP contract: docs/ARCHITECTURE.md, "Server". The server holds weights in memory
only: ``POST /boot/manifest`` says what is coming, ``POST /boot/stream`` carries the
manifest's files concatenated (exactly ``total_size`` bytes), split here by the
manifest's sizes and loaded from memory by ``ivp.engine.loading``. It never opens a
weights file and refuses inference until that boot has completed.

Inference follows sampler spec v1 and answers with token ids: the gateway
re-serialises the client's response from them. The engine is a backend
(``ivp.server.backends``): the reference engine (``--engine reference``, one request
at a time in worker threads, so the event loop keeps answering ``/health`` and boot
requests) or vLLM (``--engine vllm``, continuous batching; ``ivp.engine.vllm_engine``).

Cheats for demos and tests are switched on by ``--attack NAME`` and fire once
``--attack-trigger FILE`` exists. This module defines only the hook a cheat fills in
(:class:`Attack`); the cheats themselves (``ivp.server.attacks``) depend on the server,
never the server on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web

from ivp.errors import IvpError, StateError, ValidationError, error_json, http_status
from ivp.protocol.encoding import convert, decode, loads, to_builtins
from ivp.protocol.messages import Manifest, SamplingParams, Tag
from ivp.server.backends import Backend, EngineName, load_backend
from ivp.web import bound_port, http_refusal, listen

if TYPE_CHECKING:
    from transformers import PreTrainedModel

NOT_BOOTED = "no model loaded: this server boots only from weights streamed to it by its gateway"
STREAM_CHUNK = 1 << 20
DEFAULT_MAX_TOKENS = {"completions": 16, "chat": 128}
# Accepted request fields. Anything else is refused: the sampler spec defines only these.
_COMMON = {"model", "max_tokens", "temperature", "top_k", "top_p", "seed", "stream",
           "ivp_tag", "user", "n", "stop", "stream_options", "logprobs", "echo"}
_FIELDS = {"completions": _COMMON | {"prompt"},
           "chat": _COMMON | {"messages", "max_completion_tokens"}}
_STATUS = ((ValidationError, 400), (StateError, 503))

Endpoint = Literal["completions", "chat"]
State = Literal["empty", "loading", "ready"]


# --- errors ----------------------------------------------------------------------------------
def error_response(status: int, message: str, type_: str) -> web.Response:
    """The one error shape of ivp: {"error": {"message", "type"}}."""
    return web.json_response(error_json(message, type_), status=status)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn ivp errors and aiohttp's own (404, 405, 413) into JSON error answers."""
    try:
        return await handler(request)
    except IvpError as exc:
        return error_response(http_status(exc, _STATUS), str(exc), type(exc).__name__)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_refusal(request, exc)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except RecursionError:  # a parser reached by input nested too deeply: bad input
        return error_response(400, "input nested too deeply", "ValidationError")
    except Exception as exc:  # a bug: say so in the protocol's shape, log the trace
        import traceback

        traceback.print_exc(file=sys.stderr)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}",
                              "InternalError")


# --- request parsing ----------------------------------------------------------------------------
@dataclass(frozen=True)
class InferenceRequest:
    """A validated inference body: prompt (text, ids or messages), params, seed, tag."""

    endpoint: Endpoint
    prompt: str | list[int] | list[dict[str, str]]
    params: SamplingParams
    seed: int
    stream: bool
    tag: Tag | None
    model: str | None


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or ValidationError saying why not."""
    raw = await request.read()
    body = loads(raw, "request body")  # nested too deeply: a ValidationError, not a 500
    if not isinstance(body, dict):
        raise ValidationError("request body must be a JSON object")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse_unsupported(body: dict[str, Any], endpoint: Endpoint) -> None:
    """Parameters outside sampler spec v1 are refused, never silently ignored."""
    unknown = sorted(set(body) - _FIELDS[endpoint])
    if unknown:
        raise ValidationError(f"unsupported parameter {unknown[0]!r}: sampler spec v1 defines "
                              f"only max_tokens, temperature, top_k, top_p and seed")
    if body.get("n", 1) != 1:
        raise ValidationError("unsupported parameter 'n': only n = 1")
    if body.get("stop") not in (None, [], ""):
        raise ValidationError("unsupported parameter 'stop': sampler spec v1 has no stop strings")
    if body.get("logprobs") not in (None, False, 0):
        raise ValidationError("unsupported parameter 'logprobs'")
    if body.get("echo") not in (None, False):
        raise ValidationError("unsupported parameter 'echo'")


def _prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise ValidationError("'prompt' must not be empty")
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return [int(t) for t in prompt]
    raise ValidationError("'prompt' must be a non-empty string or a non-empty list of token ids")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValidationError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) and set(m) <= {"role", "content", "name"}):
            raise ValidationError(f"messages[{i}] must be {{'role': str, 'content': str}}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _seed(body: dict[str, Any]) -> int:
    seed = body.get("seed")
    if seed is None:
        return secrets.randbits(64)
    if not _is_int(seed) or not 0 <= seed < 2**64:
        raise ValidationError("'seed' must be an unsigned 64-bit integer")
    return int(seed)


def _params(body: dict[str, Any], endpoint: Endpoint) -> SamplingParams:
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    fields = {"max_tokens": DEFAULT_MAX_TOKENS[endpoint] if max_tokens is None else max_tokens}
    for key in ("temperature", "top_k", "top_p"):
        if body.get(key) is not None:
            fields[key] = body[key]
    for key, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValidationError(f"'{key}' must be a number")
    return convert(fields, SamplingParams)


def parse_inference(body: dict[str, Any], endpoint: Endpoint) -> InferenceRequest:
    """Validate an OpenAI-shaped body (plus ivp's top_k, seed, ivp_tag)."""
    _refuse_unsupported(body, endpoint)
    prompt = _prompt(body) if endpoint == "completions" else _messages(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ValidationError("'stream' must be true or false")
    tag = convert(body["ivp_tag"], Tag) if body.get("ivp_tag") is not None else None
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ValidationError("'model' must be a string")
    return InferenceRequest(endpoint, prompt, _params(body, endpoint), _seed(body), stream,
                            tag, model)


# --- the server -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attack:
    """One cheat (``ivp.server.attacks``): ``alter_model`` once the trigger fires,
    ``alter_seed`` on every request, ``install`` once at server start."""

    name: str
    help: str
    alter_model: Callable[[PreTrainedModel], None] | None = None
    alter_seed: Callable[[int], int] | None = None
    install: Callable[[], None] | None = None  # at server start (get_attack)


@dataclass
class InferenceServer:
    """State of one server process: what is loaded, and the optional cheat.

    ``engine`` names the backend every boot builds; ``options`` are its settings
    (``ivp.engine.vllm_engine.VllmBackend.start`` for vLLM).
    """

    attack: Attack | None = None
    trigger: Path | None = None
    engine_name: EngineName = "reference"
    options: dict[str, Any] = field(default_factory=dict)
    weights_dir: Path | None = None  # keep shards here (the gateway's RAM-only mount)
    state: State = "empty"
    manifest: Manifest | None = None
    engine: Backend | None = None
    attack_active: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[errors_middleware])
        app.on_cleanup.append(self._unload)
        app.add_routes([
            web.get("/health", self.health),
            web.post("/boot/manifest", self.boot_manifest),
            web.post("/boot/stream", self.boot_stream),
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
        ])
        return app

    @property
    def model_id(self) -> str | None:
        return self.manifest.model_id if self.manifest and self.state == "ready" else None

    # --- boot -----------------------------------------------------------------------------
    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"state": self.state, "model_id": self.model_id})

    async def boot_manifest(self, request: web.Request) -> web.Response:
        """Accept the manifest of the model about to be streamed; drop any loaded one."""
        manifest = decode(await request.read(), Manifest)
        if manifest.engine != self.engine_name:  # a deployment error: say so, boot nothing
            raise ValidationError(f"this server runs the {self.engine_name} engine; the "
                                  f"manifest is for {manifest.profile}")
        async with self.lock:
            old, self.engine, self.manifest, self.attack_active = \
                self.engine, None, manifest, False
            self.state = "loading"
        if old is not None:
            await old.close()  # a running generation finishes with the old model
        return web.json_response({"state": "loading"})

    async def _unload(self, _app: web.Application) -> None:
        """Server shutdown: stop the engine (vLLM's processes with it)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            await engine.close()

    async def boot_stream(self, request: web.Request) -> web.Response:
        """Read exactly total_size bytes, split them into files, load from memory."""
        manifest = self.manifest
        if self.state != "loading" or manifest is None:
            return error_response(409, "POST /boot/manifest first: no boot in progress",
                                  StateError.__name__)
        files: dict[str, Any] = await read_files(request, manifest)
        if self.weights_dir is not None:
            files = await asyncio.to_thread(keep_shards_in, self.weights_dir, files)
        try:
            engine = await load_backend(self.engine_name, files, manifest, self.options)
        except ValidationError as exc:
            raise ValidationError(f"model {manifest.model_id} does not load: {exc}") from None
        finally:
            files.clear()
        async with self.lock:
            superseded = self.manifest is not manifest  # another boot started meanwhile
            if not superseded:
                self.engine, self.state = engine, "ready"
        if superseded:
            await engine.close()
            return error_response(409, "a newer /boot/manifest superseded this stream",
                                  StateError.__name__)
        log(f"booted {manifest.model_id} from {manifest.total_size} streamed bytes")
        return web.json_response({"state": "ready"})

    # --- inference -------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._infer(request, "completions")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._infer(request, "chat")

    async def _infer(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        req = parse_inference(await read_json(request), endpoint)
        engine = self._engine()
        await self._maybe_attack(engine)
        prompt_ids = prompt_token_ids(engine, req)
        seed = self.attack.alter_seed(req.seed) if self.attack_active and self.attack \
            and self.attack.alter_seed else req.seed
        ident = _ident(req.endpoint)
        if req.stream:
            return await self._stream(request, engine, req, prompt_ids, seed, ident)
        tokens = await engine.generate(prompt_ids, req.params, seed, ident)
        return web.json_response(
            completion_body(engine, req, prompt_ids, tokens, engine.finish_reason(tokens),
                            self._model_name(req), ident)
        )

    def _engine(self) -> Backend:
        if self.state != "ready" or self.engine is None:
            suffix = " (a boot is in progress)" if self.state == "loading" else ""
            raise StateError(NOT_BOOTED + suffix)
        return self.engine

    def _model_name(self, req: InferenceRequest) -> str:
        return self.model_id or req.model or "unknown"

    async def _maybe_attack(self, engine: Backend) -> None:
        """Fire the configured attack once its trigger file exists (checked per request)."""
        if self.attack is None or self.attack_active:
            return
        if self.trigger is not None and not self.trigger.exists():
            return
        async with self.lock:
            if self.attack_active:  # another request fired it while we waited
                return
            await engine.fire(self.attack)
            self.attack_active = True
        log(f"attack {self.attack.name} is now active")

    async def _stream(self, request: web.Request, engine: Backend, req: InferenceRequest,
                      prompt_ids: list[int], seed: int, ident: str) -> web.StreamResponse:
        """SSE: one chunk per token (with its id), a final chunk with the finish reason."""
        name = self._model_name(req)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        steps = engine.stream(prompt_ids, req.params, seed, ident)  # validates: may raise
        await resp.prepare(request)
        tokens: list[int] = []
        sent_text = ""
        # closed at once when the reader leaves mid-stream (its gateway cut the stream):
        # the generation stops and gives the engine back to the next request
        async with contextlib.aclosing(steps):
            async for token in steps:
                tokens.append(token)
                delta, sent_text = text_delta(engine, tokens, sent_text, final=False)
                chunk = stream_chunk(req, ident, name, [token], delta, None)
                await resp.write(sse(chunk))
        delta, sent_text = text_delta(engine, tokens, sent_text, final=True)
        final = stream_chunk(req, ident, name, [], delta, engine.finish_reason(tokens))
        final.update(prompt_token_ids=prompt_ids, usage=usage(prompt_ids, tokens), seed=req.seed)
        await resp.write(sse(final))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


# --- boot helpers ----------------------------------------------------------------------
async def read_files(request: web.Request, manifest: Manifest) -> dict[str, bytes]:
    """Split the request body into the manifest's files; exactly total_size bytes.

    Each file is joined into one ``bytes`` as soon as it is complete, so the peak
    memory is the model plus its largest file, not twice the model.
    """
    files: dict[str, bytes] = {}
    entries = iter(manifest.files)
    entry = next(entries)
    parts: list[bytes] = []
    have = received = 0
    while chunk := await request.content.read(STREAM_CHUNK):
        received += len(chunk)
        if received > manifest.total_size:
            raise ValidationError(f"stream longer than the manifest's total_size "
                                  f"{manifest.total_size} bytes")
        while chunk or (entry is not None and have == entry.size):
            if entry is not None and have == entry.size:  # file complete (or empty)
                files[entry.name], parts, have = b"".join(parts), [], 0
                entry = next(entries, None)
                continue
            assert entry is not None  # received <= total_size leaves room in some file
            take = chunk[: entry.size - have]
            parts.append(take)
            have += len(take)
            chunk = chunk[len(take):]
    if received != manifest.total_size:
        raise ValidationError(f"stream ended after {received} bytes; the manifest's total_size "
                              f"is {manifest.total_size}")
    while entry is not None:  # trailing empty files
        files[entry.name], parts = b"".join(parts), []
        entry = next(entries, None)
    return files


def keep_shards_in(directory: Path, files: dict[str, bytes]) -> dict[str, Any]:
    """Write the safetensors shards to ``directory`` (replacing any earlier model's)
    and name them by path: the model then lives in that mount's pages (a RAM-only,
    never-swapped ramfs under ``--isolate``), memory-mapped."""
    for old in directory.glob("*.safetensors"):
        old.unlink()
    out: dict[str, Any] = {}
    for name, data in files.items():
        if name.endswith(".safetensors") and Path(name).name == name:
            path = directory / name
            path.write_bytes(data)
            out[name] = path
        else:
            out[name] = data
    return out



# --- inference helpers -----------------------------------------------------------------
def prompt_token_ids(engine: Backend, req: InferenceRequest) -> list[int]:
    """Token ids of the prompt: as given, tokenised, or the chat template applied."""
    tok = engine.tokenizer
    if req.endpoint == "chat":
        if not tok.chat_template:
            raise ValidationError("this model has no chat template; use /v1/completions")
        text = tok.apply_chat_template(req.prompt, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    elif isinstance(req.prompt, str):
        ids = tok(req.prompt)["input_ids"]
    else:
        ids = list(req.prompt)
    engine.check_ids(ids, "prompt")
    return [int(i) for i in ids]


def decode_text(engine: Backend, token_ids: list[int]) -> str:
    return engine.tokenizer.decode(token_ids, skip_special_tokens=True)


def text_delta(engine: Backend, tokens: list[int], sent: str, final: bool
               ) -> tuple[str, str]:
    """New text since ``sent``; holds back a trailing partial UTF-8 character."""
    text = decode_text(engine, tokens)
    if not final and text.endswith("\ufffd"):
        return "", sent
    if not text.startswith(sent):  # decoding revised earlier text: send nothing more
        return "", sent
    return text[len(sent):], text


def usage(prompt_ids: list[int], tokens: list[int]) -> dict[str, int]:
    return {"prompt_tokens": len(prompt_ids), "completion_tokens": len(tokens),
            "total_tokens": len(prompt_ids) + len(tokens)}


def _ident(endpoint: Endpoint) -> str:
    return ("cmpl-" if endpoint == "completions" else "chatcmpl-") + secrets.token_hex(12)


def completion_body(engine: Backend, req: InferenceRequest, prompt_ids: list[int],
                    tokens: list[int], finish: str, model: str, ident: str = ""
                    ) -> dict[str, Any]:
    """The OpenAI completion / chat.completion object, with ivp's token ids and tag."""
    text = decode_text(engine, tokens)
    choice: dict[str, Any] = {"index": 0, "token_ids": tokens, "finish_reason": finish,
                              "logprobs": None}
    if req.endpoint == "completions":
        choice["text"] = text
    else:
        choice["message"] = {"role": "assistant", "content": text}
    return {
        "id": ident or _ident(req.endpoint),
        "object": "text_completion" if req.endpoint == "completions" else "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_ids, tokens),
        "prompt_token_ids": prompt_ids,
        "seed": req.seed,
        "ivp_tag": to_builtins(req.tag) if req.tag is not None else None,
    }


def stream_chunk(req: InferenceRequest, ident: str, model: str, token_ids: list[int],
                 text: str, finish: str | None) -> dict[str, Any]:
    """One SSE chunk: the new token ids (and their text), finish_reason on the last."""
    choice: dict[str, Any] = {"index": 0, "token_ids": token_ids, "finish_reason": finish}
    if req.endpoint == "completions":
        choice["text"] = text
    else:
        choice["delta"] = {"content": text} if text or finish else {"content": ""}
    return {
        "id": ident,
        "object": "text_completion" if req.endpoint == "completions"
        else "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "ivp_tag": to_builtins(req.tag) if req.tag is not None else None,
    }


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def log(message: str) -> None:
    """One line on stderr (the gateway, the server's parent, may collect it)."""
    print(f"ivp server: {message}", file=sys.stderr, flush=True)


def make_app(attack: Attack | None = None, trigger: Path | None = None,
             weights_dir: Path | None = None, engine: EngineName = "reference",
             options: dict[str, Any] | None = None) -> web.Application:
    """The aiohttp application of one server (tests use it with aiohttp's test client)."""
    return InferenceServer(attack=attack, trigger=trigger, weights_dir=weights_dir,
                           engine_name=engine, options=dict(options or {})).app()


__all__ = ["NOT_BOOTED", "InferenceServer", "make_app", "parse_inference", "read_files",
           "run_server"]


async def run_server(host: str, port: int, attack: Attack | None = None,
                     trigger: Path | None = None, weights_dir: Path | None = None,
                     engine: EngineName = "reference",
                     options: dict[str, Any] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; print the bound address on stdout once listening."""
    import signal

    sock = listen("server", host, port)
    runner = web.AppRunner(make_app(attack, trigger, weights_dir, engine, options),
                           access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    print(f"ivp server: listening on http://{host}:{bound_port(sock)}", flush=True)
    if attack is not None:
        when = f"once {trigger} exists" if trigger else "from boot"
        log(f"attack {attack.name} armed ({when})")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
