"""The serving proxy's pure parts (SNG property 3's framing): client request in, server
request out, and back.

The gateway is the note's "inputter trusted for the delimiter" and the output copier:

* :func:`parse_request` (``gateway.inputs``) validates a client's OpenAI body strictly:
  unknown fields and every parameter sampler spec v1 does not define are refused by
  name, and so is ``seed`` (the gateway draws it from its TRNG).
* :func:`server_request` builds the only body the server sees: token ids (the
  gateway tokenised the prompt with the *whitelisted* tokenizer), the sampler
  parameters, the seed and the tag.
* :func:`parse_server_response` (and ``streaming.ServerStream`` for streams) accept
  only the token ids and the finish reason, and only under the tag the gateway sent (a
  response that pairs with no open tag is dropped and alarmed by the caller).
* :func:`finish_output` cuts an output at the client's first stop string
  (``protocol.stops``: the same rule the recomputer checks).
* :func:`client_response` (and ``streaming.ClientStream``) re-serialise the answer
  from the token ids alone, so no byte of the server's own formatting (text, spacing, chunk
  boundaries, extra fields) reaches the client: the only channel out is the token
  sequence, which the audit checks.

Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from msgspec import Struct

from ivp.errors import ValidationError
from ivp.gateway.errors import ServerProtocolError
from ivp.gateway.inputs import (
    ChatBody,
    ClientRequest,
    CompletionBody,
    Endpoint,
    parse_request,
)
from ivp.protocol.encoding import canonical, to_builtins
from ivp.protocol.messages import FinishReason, SamplingParams, Tag, TokenId
from ivp.protocol.stops import cut_at_stop


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
                                  "/v1/completions", param="messages", code="invalid_value")
        try:
            text = self._tok.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
        except Exception as exc:  # jinja raises TemplateError and friends
            raise ValidationError(f"the model's chat template refused the messages: {exc}",
                                  param="messages", code="invalid_value") from None
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
                                  f"({limits.vocab_size} tokens)", param="prompt",
                                  code="invalid_value")
    else:
        ids = tokenizer.encode_prompt(request.prompt or "")
    where = "messages" if request.endpoint == "chat.completions" else "prompt"
    if not ids:
        raise ValidationError(f"the {where} tokenise to nothing" if where == "messages" else
                              "the prompt tokenises to nothing", param=where,
                              code="invalid_value")
    if limits.max_positions is not None \
            and len(ids) + request.params.max_tokens > limits.max_positions:
        raise ValidationError(
            f"the {where} ({len(ids)} tokens) + max_tokens ({request.params.max_tokens}) "
            f"exceed the model's context of {limits.max_positions} tokens: shorten the "
            f"input or lower max_tokens", param=where, code="context_length_exceeded")
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


@dataclass(frozen=True)
class ServerOutput:
    token_ids: list[int]
    finish_reason: str


def check_output(out: ServerOutput, params: SamplingParams, limits: ModelLimits) -> ServerOutput:
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
    return check_output(ServerOutput(list(choice.token_ids), choice.finish_reason),
                         params, limits)


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


def finish_output(out: ServerOutput, stops: tuple[str, ...],
                  decode: Any) -> tuple[ServerOutput, str]:
    """The output the client gets and the log keeps, and its text.

    Without a stop string in it: all the server's tokens and their decoding. With one:
    the tokens up to the one after which the decoded text first holds a stop string,
    the text cut just before it, and finish reason "stop" (the rule of
    ``protocol.stops``, which the recomputer re-runs on the logged pair). The server
    never sees the stop strings; its tokens past the cut leave nothing behind.
    """
    cut = cut_at_stop(out.token_ids, stops, decode)
    if cut is None:
        return out, decode(out.token_ids)
    kept, text = cut
    return ServerOutput(out.token_ids[:kept], "stop"), text


__all__ = ["ChatBody", "ClientRequest", "CompletionBody", "Endpoint", "HFTokenizer",
           "ModelLimits", "ServerOutput", "Tokenizer", "check_output", "client_response",
           "finish_output", "parse_request", "parse_server_response", "server_request",
           "tokenize"]
