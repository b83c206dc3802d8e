"""Notices: the recomputer's alarms and verdicts, signed, numbered and chained, with
signed heartbeats, for inspectors who watch from outside (``ivp watch``).

Unsigned JSON that inspectors must come and fetch lets an operator suppress an alarm
unseen. A notice is a DSSE envelope signed by the recomputer's device key; notices
are numbered 1, 2, 3 … without gaps, and each names the SHA-256 of the previous
notice's signed payload bytes, so a withheld, reordered or rewritten notice breaks the chain.
A heartbeat, signed fresh each time it is served, names the newest notice (its number
and hash) and the recomputer's clock, so silence itself is detectable: a watcher that
gets no fresh heartbeat within its bound, or a heartbeat whose head it cannot reach
through the chain, raises the alarm on the inspectors' side.

:class:`Watcher` is the inspectors' pure checker: bytes in, verified notices out, a
:class:`~ivp.errors.PeerDataError` on anything that does not add up. It does no I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from ivp.errors import ChainError, ExpiredError, SignatureError, ValidationError
from ivp.protocol import envelope as env
from ivp.protocol.encoding import decode
from ivp.protocol.keys import VerifyKey

NOTICE = "application/vnd.ivp.notice+json;v=1"
HEARTBEAT = "application/vnd.ivp.heartbeat+json;v=1"
GENESIS = "0" * 64  # the "previous hash" of notice 1
Hex256 = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
Seq = Annotated[int, Meta(ge=1, le=2**63 - 1)]


class Notice(Struct, frozen=True, forbid_unknown_fields=True):
    """One alarm or verdict, as the recomputer stored it (``body``)."""

    seq: Seq
    prev: Hex256  # SHA-256 of notice seq-1's signed payload (GENESIS for seq 1)
    kind: Literal["alarm", "verdict"]
    time: float
    body: dict[str, Any]
    v: int = 1


class Heartbeat(Struct, frozen=True, forbid_unknown_fields=True):
    """The recomputer is alive at ``time`` and its newest notice is ``head_seq``."""

    time: float
    head_seq: Annotated[int, Meta(ge=0, le=2**63 - 1)]
    head: Hex256  # SHA-256 of that notice's signed payload (GENESIS when there is none)
    v: int = 1


def notice_hash(payload: bytes) -> str:
    """What the next notice and the heartbeats name: SHA-256 of the signed payload."""
    return hashlib.sha256(payload).hexdigest()


@dataclass
class Watcher:
    """What an inspector has verified of one recomputer's notices.

    Args:
        key: the recomputer's public key (from the inspectors' own records, never from
            the feed).
        max_gap: seconds a heartbeat may be old, by the watcher's clock (also bounds
            the clock difference it tolerates).
    """

    key: VerifyKey
    max_gap: float = 30.0
    seq: int = 0  # the newest notice verified
    head: str = GENESIS
    last_heartbeat: float | None = None  # the watcher's time of the last good heartbeat
    seen: list[Notice] = field(default_factory=list)

    def notice(self, data: bytes) -> Notice:
        """Verify the next notice (envelope bytes as received).

        Raises:
            ValidationError: not a notice envelope.
            SignatureError: not signed by the recomputer's key.
            ChainError: not the next number, or not linked to the previous notice
                (a notice was withheld, reordered or rewritten).
        """
        envelope = env.Envelope.from_bytes(data)
        payload = env.open_signed(envelope, NOTICE, self.key)
        notice = decode(payload, Notice)
        if notice.seq != self.seq + 1:
            raise ChainError(f"notice {notice.seq} follows notice {self.seq}: "
                             f"{'missing' if notice.seq > self.seq + 1 else 'replayed'} "
                             "notice(s)")
        if notice.prev != self.head:
            raise ChainError(f"notice {notice.seq} does not link to notice {self.seq} "
                             "(the feed was rewritten)")
        self.seq, self.head = notice.seq, notice_hash(payload)
        self.seen.append(notice)
        return notice

    def heartbeat(self, data: bytes, now: float) -> Heartbeat:
        """Verify a heartbeat against everything verified so far.

        Raises:
            ValidationError / SignatureError: not a heartbeat signed by the key.
            ExpiredError: older than ``max_gap`` (a replayed or delayed heartbeat), or
                from a clock further ahead than that.
            ChainError: it names a head this watcher's chain contradicts, or one the
                feed did not deliver (notices withheld).
        """
        envelope = env.Envelope.from_bytes(data)
        beat = decode(env.open_signed(envelope, HEARTBEAT, self.key), Heartbeat)
        if abs(now - beat.time) > self.max_gap:
            raise ExpiredError(f"heartbeat from {now - beat.time:.1f} s ago (bound "
                               f"{self.max_gap:g} s): the recomputer is silent or delayed")
        if beat.head_seq < self.seq:
            raise ChainError(f"heartbeat names notice {beat.head_seq}, but notice "
                             f"{self.seq} was already verified (a rolled-back feed)")
        if beat.head_seq == self.seq and beat.head != self.head:
            raise ChainError(f"heartbeat's notice {beat.head_seq} is not the one verified "
                             "(the feed was rewritten)")
        if beat.head_seq > self.seq:
            raise ChainError(f"heartbeat names notice {beat.head_seq}, the feed delivered "
                             f"only up to {self.seq}: notices withheld")
        self.last_heartbeat = now
        return beat

    def silent_for(self, now: float) -> float | None:
        """Seconds since the last good heartbeat (None: none yet)."""
        return None if self.last_heartbeat is None else now - self.last_heartbeat


__all__ = ["GENESIS", "HEARTBEAT", "NOTICE", "Heartbeat", "Notice", "Watcher", "notice_hash"]

# Errors the watcher raises, for callers that handle them together.
WATCH_ERRORS = (ValidationError, SignatureError, ChainError, ExpiredError)
