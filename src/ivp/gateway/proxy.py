"""The serving proxy's pure parts (SNG property 3's framing): client request in, server
request out, and back.

The gateway is the note's "inputter trusted for the delimiter" and the output copier:

* :func:`parse_request` validates a client's OpenAI body strictly. Unknown fields are
  refused (a field we pass on unread could steer the server unseen), and so is every
  parameter sampler spec v1 does not define — logit bias, penalties, n > 1, best_of,
  stop strings, logprobs, echo, suffix — and ``seed``: the gateway draws the seed
  from its TRNG, never the client (a chosen seed would let a colluding client pick
  outputs the server has precomputed).
* :func:`server_request` builds the only body the server sees: token ids (the
  gateway tokenised the prompt with the *whitelisted* tokenizer), the sampler
  parameters, the seed and the tag.
* :func:`parse_server_response` / :func:`parse_server_stream` accept only the token
  ids and the finish reason, and only under the tag the gateway sent (a response
  that pairs with no open tag is dropped and alarmed by the caller).
* :func:`client_response` / :func:`client_stream` re-serialise the answer from the
  token ids alone, so no byte of the server's own formatting (text, spacing, chunk
  boundaries, extra fields) reaches the client: the only channel out is the token
  sequence, which the audit checks.

Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

import msgspec
from msgspec import Meta, Struct

from ivp.errors import ValidationError
from ivp.gateway.errors import ServerProtocolError
from ivp.protocol.encoding import canonical, to_builtins
from ivp.protocol.messages import FinishReason, SamplingParams, Tag, TokenId

Endpoint = Literal["completions", "chat.completions"]

# Parameters the sampler spec does not define: refused with a message naming them.
# Value = the one neutral value that is accepted (None: refused whenever present and
# not null).
_REFUSED: dict[str, tuple[Any, str]] = {
    "logit_bias": ({}, "logit bias is not part of sampler spec v1 (unverifiable)"),
    "presence_penalty": (0, "penalties are not part of sampler spec v1; only 0 is accepted"),
    "frequency_penalty": (0, "penalties are not part of sampler spec v1; only 0 is accepted"),
    "repetition_penalty": (1, "penalties are not part of sampler spec v1; only 1 is accepted"),
    "n": (1, "one choice per request (n > 1 is not supported)"),
    "best_of": (1, "best_of is not supported (one choice per request)"),
    "stop": (None, "stop strings are not part of sampler spec v1 (generation stops at EOS "
                   "or max_tokens)"),
    "logprobs": (None, "logprobs are not returned (only token ids leave the gateway)"),
    "top_logprobs": (None, "logprobs are not returned (only token ids leave the gateway)"),
    "echo": (False, "echo is not supported"),
    "suffix": (None, "suffix (insertion) is not supported"),
    "seed": (None, "clients cannot choose the seed: the gateway draws it from its TRNG"),
    "min_p": (None, "min_p is not part of sampler spec v1"),
    "tools": (None, "tool calling is not supported"),
    "tool_choice": (None, "tool calling is not supported"),
    "functions": (None, "function calling is not supported"),
    "function_call": (None, "function calling is not supported"),
    "response_format": (None, "response_format is not supported"),
    "stream_options": (None, "stream_options is not supported"),
}


class _Params(Struct, forbid_unknown_fields=True, kw_only=True):
    model: Annotated[str, Meta(min_length=1, max_length=200)]
    max_tokens: Annotated[int, Meta(ge=1, le=65536)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] = 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=0, le=2**31 - 1)] = 0
    stream: bool = False
    user: Annotated[str, Meta(max_length=256)] | None = None


class CompletionBody(_Params, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/completions``: ``prompt`` is a string or a list of token ids."""

    prompt: Annotated[str, Meta(max_length=1 << 20)] | Annotated[
        list[TokenId], Meta(min_length=1, max_length=1 << 17)]


class ChatMessage(Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant", "developer"]
    content: Annotated[str, Meta(max_length=1 << 20)]
    name: Annotated[str, Meta(max_length=64)] | None = None


class ChatBody(_Params, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/chat/completions``: text messages, rendered by the whitelisted template."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=1024)]
    max_completion_tokens: Annotated[int, Meta(ge=1, le=65536)] | None = None


@dataclass(frozen=True)
class ClientRequest:
    """A validated client request, before tokenisation."""

    endpoint: Endpoint
    model: str
    params: SamplingParams
    stream: bool
    prompt: str | list[int] | None = None  # completions
    messages: tuple[dict[str, str], ...] = ()  # chat
    max_tokens_given: bool = False

    @property
    def input_text(self) -> str:
        """The client's input as the pair record keeps it (for inspectors)."""
        if self.endpoint == "chat.completions":
            return json.dumps(list(self.messages), ensure_ascii=False, sort_keys=True)
        if isinstance(self.prompt, list):
            return json.dumps(self.prompt)
        return self.prompt or ""


def _refuse_unsupported(obj: dict[str, Any], allowed: set[str]) -> None:
    """Name the first unsupported parameter (blocks unverifiable sampling controls)."""
    for key, value in obj.items():
        if key in _REFUSED:
            neutral, why = _REFUSED[key]
            if value is None or value == neutral or (neutral is None and value in ({}, [], "")):
                continue
            if key == "logprobs" and value is False:
                continue
            raise ValidationError(f"unsupported parameter {key!r}: {why}")
        elif key not in allowed:
            raise ValidationError(
                f"unknown parameter {key!r}: the gateway accepts only "
                + ", ".join(sorted(allowed)))


_STRICT: dict[str, msgspec.json.Decoder[Any]] = {
    "completions": msgspec.json.Decoder(CompletionBody),
    "chat.completions": msgspec.json.Decoder(ChatBody),
}


def parse_request(endpoint: Endpoint, body: bytes) -> ClientRequest:
    """Validate a client's OpenAI body for ``endpoint``.

    Raises:
        ValidationError: not a JSON object, an unknown field, a parameter outside
            sampler spec v1 (named), or a value out of range. Blocks: smuggling
            sampling controls the verifier cannot replay, and client-chosen seeds.
    """
    try:
        # A body of accepted fields only decodes straight into its struct (nothing else
        # passes forbid_unknown_fields); any other body takes the checked path, which
        # names what is wrong or accepts a refused parameter's neutral value.
        parsed: _Params = _STRICT[endpoint].decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError):
        parsed = _parse_checked(endpoint, body)
    max_tokens = parsed.max_tokens
    if isinstance(parsed, ChatBody) and parsed.max_completion_tokens is not None:
        if max_tokens is not None and max_tokens != parsed.max_completion_tokens:
            raise ValidationError("max_tokens and max_completion_tokens disagree")
        max_tokens = parsed.max_completion_tokens
    params = SamplingParams(
        temperature=parsed.temperature, top_k=parsed.top_k, top_p=parsed.top_p,
        max_tokens=max_tokens if max_tokens is not None else 16,
    )
    if isinstance(parsed, CompletionBody):
        return ClientRequest("completions", parsed.model, params, parsed.stream,
                             prompt=parsed.prompt, max_tokens_given=max_tokens is not None)
    messages = tuple(
        {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
        for m in parsed.messages  # type: ignore[attr-defined]
    )
    return ClientRequest("chat.completions", parsed.model, params, parsed.stream,
                         messages=messages, max_tokens_given=max_tokens is not None)


def _parse_checked(endpoint: Endpoint, body: bytes) -> _Params:
    """The body as its struct, refusing an unknown or unsupported field by name."""
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ValidationError(f"request body is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValidationError("request body must be a JSON object")
    struct: type[_Params] = CompletionBody if endpoint == "completions" else ChatBody
    _refuse_unsupported(obj, set(struct.__struct_fields__))
    obj = {k: v for k, v in obj.items() if k not in _REFUSED}  # only neutral values got here
    if endpoint == "completions" and isinstance(obj.get("prompt"), list) and obj["prompt"] \
            and not all(isinstance(x, int) for x in obj["prompt"]):
        raise ValidationError("prompt must be a string or one list of token ids "
                              "(batched prompts are not supported: one input per request)")
    try:
        return msgspec.convert(obj, type=struct)
    except msgspec.ValidationError as exc:
        raise ValidationError(f"bad request: {exc}") from None


# --- tokenizer -------------------------------------------------------------------------
class Tokenizer(Protocol):
    """What the proxy needs from the whitelisted tokenizer."""

    def encode_prompt(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


class HFTokenizer:
    """A ``transformers`` tokenizer (from :func:`ivp.engine.loading.load_tokenizer`).

    Encoding goes straight to its Rust backend (``backend_tokenizer``) when it has one:
    the same ids as the Python wrapper's defaults (no truncation, no padding), at a
    fraction of the wrapper's per-call cost on the serving path.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._fast = getattr(tokenizer, "backend_tokenizer", None)
        # a batch of one without offsets: the same ids as ``encode``, a third less work
        self._batch = getattr(self._fast, "encode_batch_fast", None)

    def _encode(self, text: str, special: bool) -> list[int]:
        if self._batch is not None:
            return list(self._batch([text], add_special_tokens=special)[0].ids)
        if self._fast is not None:
            return list(self._fast.encode(text, add_special_tokens=special).ids)
        return list(self._tok(text, add_special_tokens=special)["input_ids"])

    def encode_prompt(self, text: str) -> list[int]:
        return self._encode(text, True)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self._tok, "chat_template", None):
            raise ValidationError("the whitelisted model has no chat template: use "
                                  "/v1/completions")
        try:
            text = self._tok.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
        except Exception as exc:  # jinja raises TemplateError and friends
            raise ValidationError(f"chat template refused the messages: {exc}") from None
        return self._encode(text, False)

    def decode(self, token_ids: list[int]) -> str:
        # the wrapper, not the backend: its clean-up rules are part of the text the
        # recomputer checks against (a few microseconds, not worth a second path)
        return str(self._tok.decode(token_ids, skip_special_tokens=True))


@dataclass(frozen=True)
class ModelLimits:
    """Bounds from the whitelisted config.json, applied to prompts and outputs."""

    vocab_size: int
    max_positions: int | None = None

    @classmethod
    def from_config(cls, config_json: bytes | None, fallback_vocab: int) -> ModelLimits:
        try:
            config = json.loads(config_json) if config_json else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            config = {}
        if not isinstance(config, dict):
            config = {}
        text = config.get("text_config")
        if not isinstance(text, dict):
            text = {}
        vocab = config.get("vocab_size") or text.get("vocab_size") or fallback_vocab
        pos = config.get("max_position_embeddings") or text.get("max_position_embeddings")
        return cls(int(vocab), int(pos) if pos else None)


def tokenize(request: ClientRequest, tokenizer: Tokenizer, limits: ModelLimits) -> list[int]:
    """The prompt's token ids under the whitelisted tokenizer (and chat template).

    Raises:
        ValidationError: a token id outside the vocabulary, an empty prompt, or a
            prompt that leaves no room for ``max_tokens``.
    """
    if request.endpoint == "chat.completions":
        ids = tokenizer.encode_chat([dict(m) for m in request.messages])
    elif isinstance(request.prompt, list):
        ids = list(request.prompt)
        bad = next((t for t in ids if t >= limits.vocab_size), None)
        if bad is not None:
            raise ValidationError(f"prompt token id {bad} is outside the vocabulary "
                                  f"({limits.vocab_size} tokens)")
    else:
        ids = tokenizer.encode_prompt(request.prompt or "")
    if not ids:
        raise ValidationError("the prompt tokenises to nothing")
    if limits.max_positions is not None \
            and len(ids) + request.params.max_tokens > limits.max_positions:
        raise ValidationError(
            f"prompt ({len(ids)} tokens) + max_tokens ({request.params.max_tokens}) exceeds "
            f"the model's context of {limits.max_positions}")
    return ids


# --- to and from the server -------------------------------------------------------------
def server_request(model_id: str, prompt_ids: list[int], params: SamplingParams, seed: int,
                   tag: Tag, stream: bool) -> bytes:
    """The only body the server sees: token ids, sampler params, the TRNG seed, the tag."""
    body = {
        "model": model_id, "prompt": prompt_ids, "max_tokens": params.max_tokens,
        "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
        "seed": seed, "ivp_tag": to_builtins(tag), "stream": stream,
    }
    return canonical(body)


class _SrvChoice(Struct):
    token_ids: list[TokenId]
    finish_reason: FinishReason


class _SrvCompletion(Struct):
    choices: list[_SrvChoice]
    ivp_tag: Tag


class _SrvChunkChoice(Struct):
    token_ids: list[TokenId] = []
    finish_reason: FinishReason | None = None


class _SrvChunk(Struct):
    choices: list[_SrvChunkChoice] = []
    ivp_tag: Tag | None = None


@dataclass(frozen=True)
class ServerOutput:
    token_ids: list[int]
    finish_reason: str


def _check_output(out: ServerOutput, params: SamplingParams, limits: ModelLimits) -> ServerOutput:
    n = len(out.token_ids)
    if n > params.max_tokens:
        raise ServerProtocolError(f"server returned {n} tokens, max_tokens is {params.max_tokens}")
    if out.finish_reason == "length" and n != params.max_tokens:
        raise ServerProtocolError(f"finish_reason 'length' after {n} of {params.max_tokens} tokens")
    if out.finish_reason == "stop" and n == 0:
        raise ServerProtocolError("finish_reason 'stop' without the EOS token")
    if n and max(out.token_ids) >= limits.vocab_size:
        bad = next(t for t in out.token_ids if t >= limits.vocab_size)
        raise ServerProtocolError(f"server returned token id {bad} outside the vocabulary")
    return out


def parse_server_response(raw: bytes, tag: Tag, params: SamplingParams,
                          limits: ModelLimits) -> ServerOutput:
    """Token ids and finish reason of a plain (non-streamed) server answer.

    Every other field the server sends is discarded here: it never reaches the client.

    Raises:
        ServerProtocolError: not a completion object, not one choice, a tag other
            than ``tag`` (unpaired output), or token ids inconsistent with the params.
    """
    try:
        resp = msgspec.json.decode(raw, type=_SrvCompletion)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ServerProtocolError(f"server answer outside the protocol: {exc}") from None
    if resp.ivp_tag != tag:
        raise ServerProtocolError(
            f"server answer pairs with no open tag: got {to_builtins(resp.ivp_tag)}, "
            f"sent {to_builtins(tag)}")
    if len(resp.choices) != 1:
        raise ServerProtocolError(f"server answer has {len(resp.choices)} choices, not 1")
    choice = resp.choices[0]
    return _check_output(ServerOutput(list(choice.token_ids), choice.finish_reason),
                         params, limits)


def parse_server_stream(raw: bytes, tag: Tag, params: SamplingParams,
                        limits: ModelLimits) -> ServerOutput:
    """Token ids and finish reason of a server's SSE stream (``data: {...}`` events).

    Raises:
        ServerProtocolError: a line that is not an SSE data event, a chunk under another
            tag, no tag at all, no finish reason, tokens after the finish reason, or a
            missing ``[DONE]``.
    """
    ids: list[int] = []
    finish: str | None = None
    tagged = done = False
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ServerProtocolError("server stream is not UTF-8") from None
    for line in text.splitlines():
        if not line.strip() or line.startswith(":"):
            continue
        if not line.startswith("data:"):
            raise ServerProtocolError(f"server stream line outside the protocol: {line[:60]!r}")
        data = line[5:].strip()
        if done:
            raise ServerProtocolError("server sent data after [DONE]")
        if data == "[DONE]":
            done = True
            continue
        try:
            chunk = msgspec.json.decode(data, type=_SrvChunk)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ServerProtocolError(f"server stream chunk outside the protocol: {exc}") from None
        if chunk.ivp_tag is not None:
            if chunk.ivp_tag != tag:
                raise ServerProtocolError("server stream chunk pairs with no open tag")
            tagged = True
        if len(chunk.choices) > 1:
            raise ServerProtocolError("server stream chunk has more than one choice")
        for c in chunk.choices:
            if finish is not None and c.token_ids:
                raise ServerProtocolError("server sent tokens after the finish reason")
            ids.extend(c.token_ids)
            if c.finish_reason is not None:
                if finish is not None:
                    raise ServerProtocolError("server sent two finish reasons")
                finish = c.finish_reason
    if not tagged:
        raise ServerProtocolError("server stream carries no tag: unpaired output")
    if finish is None or not done:
        raise ServerProtocolError("server stream ended without a finish reason and [DONE]")
    return _check_output(ServerOutput(ids, finish), params, limits)


# --- to the client ------------------------------------------------------------------------
def _usage(prompt_len: int, out_len: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_len, "completion_tokens": out_len,
            "total_tokens": prompt_len + out_len}


def client_response(endpoint: Endpoint, *, model_id: str, tag: Tag, prompt_len: int,
                    token_ids: list[int], text: str, finish_reason: str,
                    created: int | None = None) -> bytes:
    """The OpenAI object, built by the gateway from the token ids and their decoding."""
    created = int(time.time()) if created is None else created
    rid = f"{tag.gateway_id}-{tag.boot_id[:12]}-{tag.seq}"
    choice: dict[str, Any] = {"index": 0, "token_ids": token_ids, "finish_reason": finish_reason}
    if endpoint == "chat.completions":
        choice["message"] = {"role": "assistant", "content": text}
        obj = "chat.completion"
        rid = "chatcmpl-" + rid
    else:
        choice["text"] = text
        choice["logprobs"] = None
        obj = "text_completion"
        rid = "cmpl-" + rid
    return canonical({
        "id": rid, "object": obj, "created": created, "model": model_id,
        "choices": [choice], "usage": _usage(prompt_len, len(token_ids)),
        "ivp": {"tag": to_builtins(tag)},
    })


def text_deltas(token_ids: list[int], decode: Any) -> list[str]:
    """Per-token text deltas whose concatenation is ``decode(token_ids)``.

    A token that ends inside a multi-byte character gets "" and its text arrives
    with the token that completes it (held back while the decoding ends in U+FFFD).
    """
    deltas: list[str] = []
    emitted = ""
    for i in range(len(token_ids)):
        text = decode(token_ids[: i + 1])
        if text.endswith("\ufffd") and i + 1 < len(token_ids):
            deltas.append("")
            continue
        if text.startswith(emitted):
            deltas.append(text[len(emitted):])
            emitted = text
        else:  # decoding is not prefix-stable here; deliver the rest at the end
            deltas.append("")
    full = decode(token_ids)
    if deltas and emitted != full:
        deltas[-1] += full[len(emitted):] if full.startswith(emitted) else ""
    return deltas


def client_stream(endpoint: Endpoint, *, model_id: str, tag: Tag, prompt_len: int,
                  token_ids: list[int], text: str, deltas: list[str], finish_reason: str,
                  created: int | None = None) -> bytes:
    """SSE events re-serialised by the gateway: one chunk per token, then [DONE].

    The gateway chooses the chunking (one token per event), so the server's chunk
    boundaries cannot carry information out either.
    """
    created = int(time.time()) if created is None else created
    rid = f"{tag.gateway_id}-{tag.boot_id[:12]}-{tag.seq}"
    chat = endpoint == "chat.completions"
    obj = "chat.completion.chunk" if chat else "text_completion"
    rid = ("chatcmpl-" if chat else "cmpl-") + rid
    events: list[bytes] = []

    def event(choice: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        body = {"id": rid, "object": obj, "created": created, "model": model_id,
                "choices": [choice], **(extra or {})}
        events.append(b"data: " + canonical(body) + b"\n\n")

    if chat:
        event({"index": 0, "delta": {"role": "assistant", "content": ""}, "token_ids": [],
               "finish_reason": None})
    for tok, delta in zip(token_ids, deltas, strict=True):
        piece: dict[str, Any] = {"content": delta} if chat else {}
        choice = {"index": 0, "token_ids": [tok], "finish_reason": None}
        if chat:
            choice["delta"] = piece
        else:
            choice["text"] = delta
            choice["logprobs"] = None
        event(choice)
    last: dict[str, Any] = {"index": 0, "token_ids": [], "finish_reason": finish_reason}
    if chat:
        last["delta"] = {}
    else:
        last["text"] = ""
        last["logprobs"] = None
    event(last, {"usage": _usage(prompt_len, len(token_ids)), "ivp": {"tag": to_builtins(tag)}})
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


__all__ = ["ChatBody", "ClientRequest", "CompletionBody", "Endpoint", "HFTokenizer",
           "ModelLimits", "ServerOutput", "Tokenizer", "client_response", "client_stream",
           "parse_request", "parse_server_response", "parse_server_stream", "server_request",
           "text_deltas", "tokenize"]
