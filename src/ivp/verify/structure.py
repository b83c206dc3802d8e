"""Checks on a claimed output that replay cannot see (pure; no model needed).

Replay scores every position of the claimed tokens, but some cheats keep each token
plausible and change the shape of the message instead: tokens after the EOS, a
finish reason the tokens do not give, more tokens than ``max_tokens``, or a text
that is not the decoding of the ids, or an output that does not end exactly where
the client's stop string first appears. A streamed pair cut before its finish
(``finish_reason: "cut"``) is any prefix of a generation: only its text is checked
here, its tokens by replay. The recomputer runs the same checks before
replaying (``recomputer.workers``); the verification report runs them on every
message so that its figures cover the whole rule.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from ivp.protocol.stops import TextStream


def structural_problem(
    output_ids: Sequence[int],
    finish_reason: str,
    max_tokens: int,
    eos_ids: Collection[int],
    *,
    text: str | None = None,
    decode: Callable[[Sequence[int]], str] | None = None,
    stop: Sequence[str] = (),
) -> tuple[int, str] | None:
    """(position, why) of the first structural problem, or None.

    The position is where the problem shows (for the detection-vs-tokens curves):
    the first token after an EOS, the last token for a finish reason that does not
    fit, 0 for an empty output or a text mismatch.

    With ``stop`` strings (and ``decode``) the gateway's cut is re-run
    (``protocol.stops``): the output must end with exactly the token after which the
    decoded text first holds a stop string, with finish reason "stop" and the text cut
    just before it. Blocks a server (or a faulty gateway) using the cut as a channel:
    an output that runs on past the stop string (tokens the client was not meant to
    get) or ends early claiming a stop (a length chosen to carry bits).
    """
    n = len(output_ids)
    if n == 0:
        return 0, "no output tokens (a generation yields at least one)"
    if n > max_tokens:
        return max_tokens, f"{n} tokens exceed max_tokens {max_tokens}"
    inside = next((t for t, tok in enumerate(output_ids[:-1]) if tok in eos_ids), None)
    if inside is not None:
        return inside + 1, f"tokens continue after EOS at position {inside}"
    if stop and decode is not None:
        stream = TextStream(lambda ids: decode(ids), stop)
        stream.push_all(output_ids)
        stream.finish()
        if stream.stopped_at is not None:
            k = stream.stopped_at
            if k < n:
                return k, (f"tokens continue after the stop string that first appears at "
                           f"token {k - 1}")
            if finish_reason != "stop":  # "cut" included: the gateway stops there itself
                return n - 1, (f"finish_reason {finish_reason!r} but the output ends at a "
                               "stop string")
            if text is not None and text != stream.text:
                return 0, "output_text is not the decoded text cut before the stop string"
            return None
    ends_eos = output_ids[-1] in eos_ids
    if finish_reason == "cut":
        # a stream that ended before its finish (client gone, server dead, power cut):
        # any prefix of a generation, each token checked by replay; only its text is
        # checked here (the last token may be an EOS whose finish chunk never came)
        if text is not None and decode is not None and decode(output_ids) != text:
            return 0, "output_text is not the whitelisted tokenizer's decoding of the token ids"
        return None
    if finish_reason == "stop" and not ends_eos:
        return n - 1, ("finish_reason 'stop' but the output does not end with EOS"
                       + (" or at a stop string" if stop else ""))
    if finish_reason == "length" and (ends_eos or n != max_tokens):
        return n - 1, (f"finish_reason 'length' but {n} tokens of max_tokens {max_tokens}"
                       + (" ending with EOS" if ends_eos else ""))
    if finish_reason not in ("stop", "length", "cut"):
        return n - 1, f"unknown finish_reason {finish_reason!r}"
    if text is not None and decode is not None and decode(output_ids) != text:
        return 0, "output_text is not the whitelisted tokenizer's decoding of the token ids"
    return None


__all__ = ["structural_problem"]
