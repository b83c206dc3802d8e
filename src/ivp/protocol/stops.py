"""Text from token ids, as it grows, and where stop strings end an output.

One definition shared by the gateway (which cuts an output at a client's stop string
and streams text as tokens come) and the recomputer (which checks the cut): both run
:class:`TextStream` over the same token ids with the same whitelisted tokenizer, so
the cut point is a pure function of (token ids, stop strings, tokenizer). A server
never sees the stop strings and has no say in the cut: it can only choose tokens, and
the tokens up to the cut are checked by replay like any others.

The rule (docs/SAMPLER.md, "Stop strings"):

* **Settled text.** After each token the text grows by a *settled* piece: the tokens
  since the previous piece are decoded together with the token that ended it, and the
  piece is the part past that earlier decoding (a decoder that treats the first token
  of a slice specially — e.g. strips a leading space — does so on both sides of the
  difference). A decoding that ends in U+FFFD (a token that stops inside a multi-byte
  character) settles nothing until a later token completes the character.
* **The cut.** The output ends with the first token after which the settled text holds
  one of the stop strings; the text ends just before the earliest such occurrence. At
  the end of an output (EOS or max_tokens) the rest of the decoding settles too, and
  may hold a stop string: then the cut falls on the last token.
* **Release.** Text that a later cut could remove is held back: a suffix of the settled
  text that begins a stop string is released only once it cannot, so no client ever
  receives text that the log does not hold.

Without stop strings a finished output's text is the tokenizer's decoding of all its
ids (as before stop strings existed); :meth:`TextStream.finish` then releases what
brings the streamed text to exactly that decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

#: At most this many stop strings per request (OpenAI's limit), each at most this long.
MAX_STOPS = 4
MAX_STOP_CHARS = 256
REPLACEMENT = "\ufffd"

Decode = Callable[[list[int]], str]


class TextStream:
    """Incremental decoding of one output, cut at the first stop string.

    Args:
        decode: the whitelisted tokenizer's decoding of a list of token ids (special
            tokens skipped), the same function the recomputer uses.
        stops: the client's stop strings (non-empty, no U+FFFD; may be empty).

    Feed tokens with :meth:`push` until it reports a stop (:attr:`stopped_at`) or the
    output ends; then :meth:`finish`. Every call returns the text newly released.
    """

    def __init__(self, decode: Decode, stops: Iterable[str] = ()) -> None:
        self._decode = decode
        self.stops = tuple(stops)
        self.ids: list[int] = []
        self._prefix = 0  # first token of the decoding window
        self._read = 0  # tokens up to here are settled
        self._base = ""  # decode(ids[prefix:read])
        self.settled = ""
        # the decoding of the tokens after the settled text (what a stream cut here
        # adds to it: e.g. a U+FFFD for a character still incomplete); "" when all settled
        self.pending = ""
        self._released = 0  # characters of the text released so far
        self.stopped_at: int | None = None  # tokens in the output, once a stop fired
        self._cut: int | None = None  # where the text ends, once a stop fired
        self.finished = False

    @property
    def text(self) -> str:
        """The output's text so far: settled, and cut before the stop string if one fired."""
        return self.settled if self._cut is None else self.settled[: self._cut]

    @property
    def released(self) -> str:
        return self.settled[: self._released]

    def push(self, token: int) -> str:
        """Add the next token; the text it releases ("" while held back)."""
        if self.stopped_at is not None or self.finished:
            raise ValueError("no token may follow the end of an output")
        self.ids.append(token)
        window = self._decode(self.ids[self._prefix:])
        if len(window) > len(self._base) and not window.endswith(REPLACEMENT):
            self._settle(window[len(self._base):])
            self._prefix, self._read = self._read, len(self.ids)
            self._base = self._decode(self.ids[self._prefix:self._read])
            self.pending = ""
        else:
            self.pending = window[len(self._base):]
        return self._release()

    def push_all(self, tokens: Iterable[int]) -> str:
        """:meth:`push` each token until a stop fires; the text released."""
        out = []
        for token in tokens:
            out.append(self.push(token))
            if self.stopped_at is not None:
                break
        return "".join(out)

    def finish(self, full: str | None = None) -> str:
        """The output ended (EOS, max_tokens, a stop, or a cut stream): settle the rest
        of the decoding, release everything; the text released now.

        ``full``: the tokenizer's decoding of all the ids, when the caller has it (else
        it is computed): without a stop, the text becomes exactly that decoding.
        """
        if not self.finished:
            self.finished = True
            if self.stopped_at is None:
                window = self._decode(self.ids[self._prefix:])
                if len(window) > len(self._base):
                    self._settle(window[len(self._base):])
            if self.stopped_at is None:
                full = self._decode(self.ids) if full is None else full
                if full.startswith(self.released):  # the usual case: streamed == decoded
                    self.settled = full
        return self._release()

    def _settle(self, piece: str) -> None:
        before = len(self.settled)
        self.settled += piece
        if not self.stops:
            return
        # the settled text before this piece held no stop string: a new occurrence
        # ends inside the piece, so it starts at most len(s) - 1 characters before it
        found = [i for s in self.stops
                 if (i := self.settled.find(s, max(0, before - len(s) + 1))) >= 0]
        if found:
            self._cut = min(found)
            self.stopped_at = len(self.ids)

    def _release(self) -> str:
        if self._cut is not None:
            end = self._cut
        elif self.finished:
            end = len(self.settled)
        else:
            end = len(self.settled) - _held(self.settled, self.stops)
        end = max(end, self._released)
        out = self.settled[self._released:end]
        self._released = end
        return out


def _held(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that begins some stop string."""
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return held


def cut_at_stop(token_ids: Sequence[int], stops: Sequence[str],
                decode: Decode) -> tuple[int, str] | None:
    """Where stop strings end a finished output: (tokens kept, text), or None when no
    stop string occurs (the output keeps all its tokens and its full decoding)."""
    if not stops:
        return None
    stream = TextStream(decode, stops)
    stream.push_all(token_ids)
    stream.finish()
    if stream.stopped_at is None:
        return None
    return stream.stopped_at, stream.text


def check_stops(stops: Sequence[str]) -> str:
    """Why ``stops`` cannot be used ("" when it can)."""
    if len(stops) > MAX_STOPS:
        return f"at most {MAX_STOPS} stop strings are allowed (got {len(stops)})"
    for s in stops:
        if not s:
            return "a stop string must not be empty"
        if len(s) > MAX_STOP_CHARS:
            return f"a stop string may be at most {MAX_STOP_CHARS} characters long"
        if REPLACEMENT in s:
            return ("a stop string must not contain U+FFFD (it stands for an incomplete "
                    "character while text is decoded)")
    return ""


__all__ = ["MAX_STOPS", "MAX_STOP_CHARS", "TextStream", "check_stops", "cut_at_stop"]
