"""Streamed answers' pure parts (SNG property 3 for ``"stream": true``): the server's
SSE stream read as its bytes arrive, and the client's SSE events re-serialised from
token ids. No asyncio, no sockets, no clock.

* :class:`ServerStream` accepts, chunk by chunk, only token ids and one finish reason,
  only under the tag the gateway sent, and only while they fit the request (at most
  ``max_tokens``, inside the vocabulary). Tokens before the tag are refused: nothing
  the server sends is released before it is known to pair with an open tag.
* :class:`ClientStream` writes the client's events: one event per token, with the
  text delta of ``protocol.stops.TextStream`` — a token that ends inside a multi-byte
  character releases no text until a later one completes it, and text that could still
  begin a stop string is held back — so the server's own text, spacing and chunk
  boundaries never reach the client; a stop string ends the output there.
* :class:`StreamChunk` is what one chunk adds to the pair so far, as the log keeps it
  (``log.PairLog.progress``): only what is new, so a stream's durable progress costs
  the log bytes in proportion to its length, not to its length squared;
  :func:`cut_pair` makes the pair that a stream cut after its last durable chunk is
  (the first row's pair plus every chunk, in order).

The shell (``streaming_shell``) commits each chunk's tokens before it releases the
bytes :class:`ClientStream` made of them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from msgspec import Struct

from ivp.errors import ValidationError
from ivp.gateway.errors import ServerProtocolError
from ivp.gateway.inputs import Endpoint
from ivp.gateway.proxy import ModelLimits, ServerOutput, check_output
from ivp.protocol.encoding import to_builtins
from ivp.protocol.messages import FinishReason, PairRecord, SamplingParams, Tag, TokenId
from ivp.protocol.stops import Decode, TextStream

MAX_LINE = 1 << 20  # bytes of one server SSE line at most (one chunk of token ids)

_encode = msgspec.json.Encoder(order="sorted").encode


class _SrvChunkChoice(Struct):
    token_ids: list[TokenId] = []
    finish_reason: FinishReason | None = None


class _SrvChunk(Struct):
    choices: list[_SrvChunkChoice] = []
    ivp_tag: Tag | None = None


_chunk = msgspec.json.Decoder(_SrvChunk)


class ServerStream:
    """The server's SSE stream (``data: {...}`` events, then ``data: [DONE]``), parsed
    as it arrives. Every other field the server sends is discarded here.

    Feed the bytes with :meth:`feed` (the new token ids); :meth:`end` once the stream
    ended. Any refusal is a ``ServerProtocolError``; the tokens before the refused line
    stay good, even in the same read: :meth:`feed` then gives them and holds the
    refusal in ``refused`` (raised by the next :meth:`feed` or :meth:`end`), so where a
    stream is cut does not depend on how its bytes were split into reads.
    """

    def __init__(self, tag: Tag, params: SamplingParams, limits: ModelLimits) -> None:
        self.tag, self.params, self.limits = tag, params, limits
        self.count = 0  # tokens accepted
        self.finish: str | None = None
        self.tagged = self.done = False
        self.refused: ServerProtocolError | None = None
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[int]:
        """The token ids in the complete lines received so far.

        Raises:
            ServerProtocolError: a line that is not an SSE data event, a chunk under
                another tag, tokens before the tag or after the finish reason, two finish
                reasons, data after [DONE], more than ``max_tokens`` tokens, a token
                outside the vocabulary, or a line over ``MAX_LINE`` bytes.
        """
        if self.refused is not None:
            raise self.refused
        buf = self._buf
        buf += data
        out: list[int] = []
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            try:
                out += self._line(bytes(buf[start:end]))
            except ServerProtocolError as exc:
                if not out:
                    raise
                self.refused = exc  # the good ids before it go first
                buf.clear()
                return out
            start = end + 1
        del buf[:start]
        if len(buf) > MAX_LINE:
            raise ServerProtocolError(f"server stream line over {MAX_LINE} bytes")
        return out

    def end(self) -> ServerOutput:
        """The stream ended: its finish reason, checked against its tokens (the ids are
        the caller's; ``token_ids`` is left empty).

        Raises:
            ServerProtocolError: no tag, no finish reason, no ``[DONE]``, or a finish
                reason the count does not give.
        """
        if self.refused is not None:
            raise self.refused
        if self._buf:  # a last line without its newline
            rest, self._buf = bytes(self._buf), bytearray()
            if self._line(rest):
                raise ServerProtocolError("server stream ended inside a chunk of tokens")
        if not self.tagged:
            raise ServerProtocolError("server stream carries no tag: unpaired output")
        if self.finish is None or not self.done:
            raise ServerProtocolError("server stream ended without a finish reason and [DONE]")
        # a count-only check: the ids were checked one chunk at a time
        check_output(ServerOutput([0] * self.count, self.finish), self.params,
                     ModelLimits(2**31))
        return ServerOutput([], self.finish)

    def _line(self, raw: bytes) -> list[int]:
        line = raw.rstrip(b"\r")
        if not line.strip() or line.startswith(b":"):
            return []
        if not line.startswith(b"data:"):
            raise ServerProtocolError(f"server stream line outside the protocol: {line[:60]!r}")
        data = line[5:].strip()
        if self.done:
            raise ServerProtocolError("server sent data after [DONE]")
        if data == b"[DONE]":
            self.done = True
            return []
        try:
            chunk = _chunk.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ServerProtocolError(f"server stream chunk outside the protocol: {exc}") from None
        if chunk.ivp_tag is not None:
            if chunk.ivp_tag != self.tag:
                raise ServerProtocolError("server stream chunk pairs with no open tag")
            self.tagged = True
        if len(chunk.choices) > 1:
            raise ServerProtocolError("server stream chunk has more than one choice")
        ids: list[int] = []
        for c in chunk.choices:
            if c.token_ids:
                if self.finish is not None:
                    raise ServerProtocolError("server sent tokens after the finish reason")
                if not self.tagged:
                    raise ServerProtocolError("server stream sent tokens before its tag: "
                                              "unpaired output")
                ids = list(c.token_ids)
            if c.finish_reason is not None:
                if self.finish is not None:
                    raise ServerProtocolError("server sent two finish reasons")
                self.finish = c.finish_reason
        if self.count + len(ids) > self.params.max_tokens:
            raise ServerProtocolError(f"server returned {self.count + len(ids)} tokens, "
                                      f"max_tokens is {self.params.max_tokens}")
        bad = next((t for t in ids if t >= self.limits.vocab_size), None)
        if bad is not None:
            raise ServerProtocolError(f"server returned token id {bad} outside the vocabulary")
        self.count += len(ids)
        return ids


def parse_server_stream(raw: bytes, tag: Tag, params: SamplingParams,
                        limits: ModelLimits) -> ServerOutput:
    """Token ids and finish reason of a whole server SSE stream (see
    :class:`ServerStream`).

    Raises:
        ServerProtocolError: anything :meth:`ServerStream.feed` or :meth:`ServerStream.end`
            refuses.
    """
    stream = ServerStream(tag, params, limits)
    ids = stream.feed(raw)
    return ServerOutput(ids, stream.end().finish_reason)  # end() raises a held refusal


class ClientStream:
    """The client's SSE events of one streamed answer, built from token ids alone.

    The gateway chooses the chunking (one event per token), so the server's chunk
    boundaries carry nothing out; the text of every event is the settled text of
    ``TextStream`` (the whitelisted tokenizer's decoding). Call :meth:`begin`, then
    :meth:`push` per chunk of tokens, then :meth:`end`; each returns the bytes to
    release once the tokens they carry are durable.
    """

    def __init__(self, endpoint: Endpoint, *, model_id: str, tag: Tag, prompt_len: int,
                 decode: Decode, stops: tuple[str, ...] = (), include_usage: bool = False,
                 created: int | None = None) -> None:
        self.chat = endpoint == "chat.completions"
        self.prompt_len, self.include_usage = prompt_len, include_usage
        self.text = TextStream(decode, stops)
        self._decode = decode
        self._rest: str | None = None  # the text the output's end settles (once ended)
        self._logged = 0  # characters of the settled text the log's chunks hold
        created = int(time.time()) if created is None else created
        rid = ("chatcmpl-" if self.chat else "cmpl-") + \
            f"{tag.gateway_id}-{tag.boot_id[:12]}-{tag.seq}"
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        # keys in sorted order, as canonical JSON has them: "choices" first
        self._tail = b"," + _encode({"created": created, "id": rid, "model": model_id,
                                     "object": obj})[1:] + b"\n\n"
        self._tag = to_builtins(tag)

    @property
    def ids(self) -> list[int]:
        return self.text.ids

    @property
    def stopped(self) -> bool:
        """A stop string ended the output (no token may follow)."""
        return self.text.stopped_at is not None

    def _event(self, choices: list[dict[str, Any]], extra: dict[str, Any] | None = None
               ) -> bytes:
        tail = self._tail if extra is None else \
            b"," + _encode(extra)[1:-1] + self._tail
        return b'data: {"choices":' + _encode(choices) + tail

    def _choice(self, token_ids: list[int], text: str, finish: str | None) -> dict[str, Any]:
        if self.chat:
            delta = {"content": text} if text or finish is None else {}
            return {"delta": delta, "finish_reason": finish, "index": 0,
                    "token_ids": token_ids}
        return {"finish_reason": finish, "index": 0, "logprobs": None, "text": text,
                "token_ids": token_ids}

    def begin(self) -> bytes:
        """The first event: the assistant's role (chat), nothing for completions."""
        if not self.chat:
            return b""
        return self._event([{"delta": {"content": "", "role": "assistant"},
                             "finish_reason": None, "index": 0, "token_ids": []}])

    def push(self, token_ids: list[int]) -> tuple[bytes, int]:
        """Events for the next tokens: (bytes, how many of them the output keeps). A
        stop string ends the output at the token that completes it (``stopped``): the
        tokens after it are dropped, from the events and from the log."""
        events = []
        kept = 0
        for tok in token_ids:
            delta = self.text.push(tok)
            kept += 1
            events.append(self._event([self._choice([tok], delta, None)]))
            if self.text.stopped_at is not None:
                break
        return b"".join(events), kept

    def logged_text(self) -> tuple[str, str]:
        """The text a chunk's log row carries (:class:`StreamChunk`): the text settled
        since the last call, and the decoding of the tokens after it. Cheap: neither
        grows with the stream's length."""
        settled = self.text.settled
        piece, self._logged = settled[self._logged:], len(settled)
        return piece, self.text.pending

    def output_text(self, finish: str) -> str:
        """The text the log keeps: for an ended output, cut before the stop string, else
        the decoding of every id (what the recomputer checks); for "cut" (a stream that
        ended, or may end, here) the decoding of the ids so far."""
        if finish == "cut":
            return self._decode(self.ids)
        if self._rest is None:
            self._rest = self.text.finish()
        return self.text.text

    def end(self, finish: str, error: str | None = None) -> bytes:
        """The last events: the rest of the text (a finished output's text is exactly
        its decoding), the finish chunk with the tag, the usage chunk when asked, then
        [DONE]. ``error`` (a cut stream): an error event before [DONE] instead."""
        if finish != "cut":
            self.output_text(finish)
        events = [self._event([self._choice([], self._rest or "", finish)],
                              {"ivp": {"tag": self._tag}})]
        if self.include_usage:
            n = len(self.ids)
            events.append(self._event([], {"usage": {
                "completion_tokens": n, "prompt_tokens": self.prompt_len,
                "total_tokens": self.prompt_len + n}}))
        if error is not None:
            events.append(b"data: " + _encode({"error": {
                "code": "stream_cut", "message": error, "param": None,
                "type": "server_error"}}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return b"".join(events)


class StreamChunk(Struct, frozen=True, array_like=True):
    """What one durable chunk adds to an open stream's pair (a log row of its own).

    The pair's text is the settled text of every chunk, then the last chunk's ``tail``:
    the decoding of the tokens not settled yet (a token that ends inside a multi-byte
    character decodes to U+FFFD until a later one completes it), which the next chunk
    replaces. So the text of a stream cut after any chunk is the decoding of its ids —
    the text the recomputer checks a cut pair against — whenever the tokenizer decodes
    a window of ids as the whole decoding has it (``protocol.stops``' own premise).
    """

    token_ids: list[TokenId]
    text: str  # settled text added by this chunk
    tail: str  # the decoding of the tokens after the settled text
    t_response: float  # when it was made durable: the cut pair's response time


@dataclass(frozen=True)
class ChunkWrite:
    """One chunk of stream ``seq`` to make durable: chunk ``index`` (0, 1, 2, ...);
    the first also carries ``head``, the pair without output (prompt, parameters, seed,
    tag, request time), kept once for the whole stream."""

    seq: int
    index: int
    chunk: StreamChunk
    head: PairRecord | None = None


def cut_pair(head: PairRecord, chunks: Sequence[StreamChunk]) -> PairRecord:
    """The pair a stream is if it ends after ``chunks`` (all of its chunks, in order):
    finish reason "cut", every chunk's tokens, the text they decode to.

    Raises:
        ValidationError: no token at all, or more than the request's ``max_tokens``.
    """
    ids = list(head.output_token_ids)
    for c in chunks:
        ids += c.token_ids
    if not ids:
        raise ValidationError("the stream holds no token")
    text = head.output_text + "".join(c.text for c in chunks) + \
        (chunks[-1].tail if chunks else "")
    try:
        return msgspec.structs.replace(
            head, output_token_ids=ids, output_text=text, finish_reason="cut",
            t_response=chunks[-1].t_response if chunks else head.t_response)
    except ValueError as exc:  # PairRecord's own checks
        raise ValidationError(f"bad PairRecord: {exc}") from None


def client_stream(endpoint: Endpoint, *, model_id: str, tag: Tag, prompt_len: int,
                  token_ids: list[int], decode: Decode, finish_reason: str,
                  stops: tuple[str, ...] = (), created: int | None = None,
                  include_usage: bool = False) -> bytes:
    """A whole stream at once (a release policy holds it to its fixed time): the same
    events :class:`ClientStream` makes chunk by chunk. ``token_ids``: the output the log
    keeps (already cut at a stop string)."""
    stream = ClientStream(endpoint, model_id=model_id, tag=tag, prompt_len=prompt_len,
                          decode=decode, stops=stops, include_usage=include_usage,
                          created=created)
    body, _ = stream.push(token_ids)
    return stream.begin() + body + stream.end(finish_reason)


__all__ = ["ChunkWrite", "ClientStream", "ServerStream", "StreamChunk", "client_stream",
           "cut_pair", "parse_server_stream"]
