"""A client's INPUT: an OpenAI request body, validated strictly (pure).

The gateway is the note's "inputter trusted for the delimiter": one HTTP request is
one input. :func:`parse_request` accepts what OpenAI's chat and completion endpoints
accept, minus what sampler spec v1 cannot replay:

* Unknown fields are refused (a field passed on unread could steer the server unseen),
  and so is every sampling control outside the spec — logit bias, penalties, n > 1,
  best_of, logprobs, echo, suffix, tools — each with a 400 naming the parameter.
* ``seed`` is refused: the gateway draws every request's seed from its TRNG (a chosen
  seed would let a colluding client pick outputs the server has precomputed).
* ``stop`` strings are accepted: the gateway itself cuts the output at the first one
  (``ivp.protocol.stops``); the server never sees them, and the recomputer checks the
  cut.
* Chat message ``content`` may be a string or a list of text parts (joined with
  newlines, as vLLM does); ``stream_options.include_usage`` asks for the usage chunk.

Errors are written for a person ("messages must be a non-empty list") and carry the
parameter at fault (OpenAI's ``param``) and a ``code``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from ivp.errors import ValidationError
from ivp.protocol.messages import SamplingParams, TokenId
from ivp.protocol.stops import MAX_STOP_CHARS, check_stops

Endpoint = Literal["completions", "chat.completions"]

# Parameters the sampler spec does not define: refused with a message naming them.
# Value = the one neutral value that is accepted (None: refused whenever present and
# not null).
_REFUSED: dict[str, tuple[Any, str]] = {
    "logit_bias": ({}, "logit bias is not part of sampler spec v1, so the recomputer could "
                       "not replay it"),
    "presence_penalty": (0, "penalties are not part of sampler spec v1; only 0 is accepted"),
    "frequency_penalty": (0, "penalties are not part of sampler spec v1; only 0 is accepted"),
    "repetition_penalty": (1, "penalties are not part of sampler spec v1; only 1 is accepted"),
    "n": (1, "n must be 1: each request gets one choice (the gateway logs and audits one "
             "output per input; send several requests instead)"),
    "best_of": (1, "best_of must be 1: each request gets one choice"),
    "logprobs": (None, "logprobs are not returned: only token ids leave the gateway (they "
                       "are in choices[0].token_ids)"),
    "top_logprobs": (None, "logprobs are not returned: only token ids leave the gateway"),
    "echo": (False, "echo is not supported"),
    "suffix": (None, "suffix (insertion) is not supported"),
    "seed": (None, "a client cannot choose the seed: the gateway draws every request's "
                   "seed from its hardware random generator, so that no client can pick "
                   "outputs a server has precomputed (the seed used is logged with the "
                   "pair). Remove 'seed' from the request"),
    "min_p": (None, "min_p is not part of sampler spec v1"),
    "tools": (None, "tool calling is not supported"),
    "tool_choice": (None, "tool calling is not supported"),
    "parallel_tool_calls": (None, "tool calling is not supported"),
    "functions": (None, "function calling is not supported"),
    "function_call": (None, "function calling is not supported"),
    "response_format": (None, "response_format is not supported"),
}
# Literal fields: what they must be, said for a person (by the field's name).
_CHOICES: dict[str, str] = {
    "role": "one of system, user, assistant, developer",
    "type": "'text' (only text parts are supported)",
}


class TextPart(Struct, forbid_unknown_fields=True):
    """One part of a message's ``content`` list: only text parts are accepted."""

    type: Literal["text"]
    text: Annotated[str, Meta(max_length=1 << 20)]


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: bool = False


Stop = Annotated[str, Meta(max_length=MAX_STOP_CHARS)] | Annotated[
    list[Annotated[str, Meta(max_length=MAX_STOP_CHARS)]], Meta(max_length=64)]


class _Params(Struct, forbid_unknown_fields=True, kw_only=True):
    model: Annotated[str, Meta(min_length=1, max_length=200)]
    max_tokens: Annotated[int, Meta(ge=1, le=65536)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] = 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=0, le=2**31 - 1)] = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None


class CompletionBody(_Params, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/completions``: ``prompt`` is a string or a list of token ids."""

    prompt: Annotated[str, Meta(max_length=1 << 20)] | Annotated[
        list[TokenId], Meta(min_length=1, max_length=1 << 17)]


class ChatMessage(Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant", "developer"]
    content: Annotated[str, Meta(max_length=1 << 20)] | Annotated[
        list[TextPart], Meta(max_length=1024)]
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
    stop: tuple[str, ...] = ()  # the gateway cuts the output at the first one
    include_usage: bool = False  # stream_options.include_usage: a final usage chunk

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
            raise ValidationError(f"unsupported parameter {key!r}: {why}", param=key,
                                  code="unsupported_parameter")
        elif key not in allowed:
            raise ValidationError(
                f"unknown parameter {key!r}: the gateway accepts only "
                + ", ".join(sorted(allowed)), param=key, code="unknown_parameter")


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
            raise ValidationError("max_tokens and max_completion_tokens disagree: give one",
                                  param="max_completion_tokens", code="invalid_value")
        max_tokens = parsed.max_completion_tokens
    params = SamplingParams(
        temperature=parsed.temperature, top_k=parsed.top_k, top_p=parsed.top_p,
        max_tokens=max_tokens if max_tokens is not None else 16,
    )
    stop = _stops(parsed.stop)
    include_usage = False
    if parsed.stream_options is not None:
        if not parsed.stream:
            raise ValidationError("stream_options is allowed only with \"stream\": true",
                                  param="stream_options", code="invalid_value")
        include_usage = parsed.stream_options.include_usage
    common = {"max_tokens_given": max_tokens is not None, "stop": stop,
              "include_usage": include_usage}
    if isinstance(parsed, CompletionBody):
        return ClientRequest("completions", parsed.model, params, parsed.stream,
                             prompt=parsed.prompt, **common)
    messages = tuple(
        {"role": m.role, "content": _content(m.content), **({"name": m.name} if m.name else {})}
        for m in parsed.messages  # type: ignore[attr-defined]
    )
    return ClientRequest("chat.completions", parsed.model, params, parsed.stream,
                         messages=messages, **common)


def _content(content: str | list[TextPart]) -> str:
    """A message's text: a list of text parts is joined with newlines (as vLLM does)."""
    return content if isinstance(content, str) else "\n".join(p.text for p in content)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = (() if not stop else (stop,)) if not isinstance(stop, list) else tuple(stop)
    why = check_stops(stops)
    if why:
        raise ValidationError(f"stop: {why}", param="stop", code="invalid_value")
    return stops


def _parse_checked(endpoint: Endpoint, body: bytes) -> _Params:
    """The body as its struct, refusing an unknown or unsupported field by name."""
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise ValidationError("the request body is not valid JSON", code="invalid_json") \
            from None
    if not isinstance(obj, dict):
        raise ValidationError("the request body must be a JSON object",
                              code="invalid_json")
    struct: type[_Params] = CompletionBody if endpoint == "completions" else ChatBody
    _refuse_unsupported(obj, set(struct.__struct_fields__))
    obj = {k: v for k, v in obj.items() if k not in _REFUSED}  # only neutral values got here
    if endpoint == "completions" and isinstance(obj.get("prompt"), list) and obj["prompt"] \
            and not all(isinstance(x, int) for x in obj["prompt"]):
        raise ValidationError("prompt must be a string or one list of token ids "
                              "(batched prompts are not supported: one input per request)",
                              param="prompt", code="invalid_value")
    try:
        return msgspec.convert(obj, type=struct)
    except msgspec.ValidationError as exc:
        message, param, code = explain(exc, _CHOICES)
        raise ValidationError(message, param=param, code=code) from None


# --- errors for people ------------------------------------------------------------------
_TYPES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
          "array": "a list", "object": "an object", "null": "null"}
_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_BOUND = re.compile(r"^Expected `(?P<type>\w+)`(?P<len> of length)? (?P<op>>=|<=|>|<) "
                    r"(?P<n>[-\d.e+]+)$")
_GOT = re.compile(r"^Expected `(?P<want>[^`]+)`, got `(?P<got>[^`]+)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]+)`$")
_ENUM = re.compile(r"^Invalid enum value (?P<value>.+)$")
_OPS = {">=": "at least", "<=": "at most", ">": "above", "<": "below"}


def _number(text: str) -> str:
    return text[:-2] if text.endswith(".0") else text


def _kinds(names: str) -> str:
    words = [_TYPES.get(n.strip(), n.strip()) for n in names.split("|")
             if n.strip() != "null"]
    return " or ".join(words) if words else "null"


def explain(exc: msgspec.ValidationError,
            choices: Mapping[str, str] | None = None) -> tuple[str, str | None, str]:
    """(message, param, code) for a msgspec validation error, written for a person:
    "Expected `array` of length >= 1 - at `$.messages`" becomes "messages must be a
    non-empty list". ``choices``: what a Literal field must be, by the field's name."""
    m = _AT.match(str(exc))
    assert m is not None  # the pattern matches any text
    what, path = m["what"], (m["path"] or "").lstrip(".")
    name = path or "the request body"
    if b := _BOUND.match(what):
        n, op, kind = _number(b["n"]), b["op"], b["type"]
        if b["len"]:
            unit = "items" if kind == "array" else "characters"
            if op == ">=" and n == "1":
                return f"{name} must be a non-empty {'list' if kind == 'array' else 'string'}", \
                    path or None, "invalid_value"
            return f"{name} must have {_OPS[op]} {n} {unit}", path or None, "invalid_value"
        return f"{name} must be {_TYPES.get(kind, kind)} {_OPS[op]} {n}", path or None, \
            "invalid_value"
    if g := _GOT.match(what):
        return (f"{name} must be {_kinds(g['want'])}, not {_TYPES.get(g['got'], g['got'])}",
                path or None, "invalid_type")
    if f := _MISSING.match(what):
        field = f"{path}.{f['field']}" if path else f["field"]
        return f"{field} is required", field, "missing_required_parameter"
    if f := _UNKNOWN.match(what):
        field = f"{path}.{f['field']}" if path else f["field"]
        return f"{field} is not a field this endpoint accepts", field, "unknown_parameter"
    if e := _ENUM.match(what):
        last = re.sub(r"\[\d+\]$", "", path.rsplit(".", 1)[-1])
        allowed = (choices or {}).get(last, "one of the allowed values")
        return f"{name} must be {allowed} (got {e['value']})", path or None, "invalid_value"
    return f"{name}: {what}", path or None, "invalid_value"


__all__ = ["ChatBody", "ClientRequest", "CompletionBody", "Endpoint", "explain",
           "parse_request"]
