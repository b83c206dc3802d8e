"""One error vocabulary for all of ivp.

Three roots, as in python-tuf: bad data from a peer (``PeerDataError``), a failed
transport (``TransportError``) and misuse by the caller (``MisuseError``, e.g. serving
before boot). Each boundary raises only these types, so a caller can tell "the other
side sent garbage" from "the network is down" from "this is a bug / wrong state".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class IvpError(Exception):
    """Root of every error ivp raises on purpose."""


# --- bad data from a peer -------------------------------------------------------------
class PeerDataError(IvpError):
    """Data received from another party is malformed, unauthentic or inconsistent."""


class ValidationError(PeerDataError):
    """A message does not decode, or a field is out of range."""


class SignatureError(PeerDataError):
    """A signature does not verify, or is by a key we do not know."""


class QuorumError(SignatureError):
    """A signed document lacks the quorum its policy requires."""


class ChainError(PeerDataError):
    """A hash-chain link or an audit sequence number is wrong (gap, replay, fork)."""


class DigestError(PeerDataError):
    """Bytes do not hash to the digest a manifest promised."""


class ExpiredError(PeerDataError):
    """A document is past its expiry, or older than one already accepted (rollback)."""


# --- transport -------------------------------------------------------------------------
class TransportError(IvpError):
    """A peer could not be reached or answered outside the protocol."""


# --- misuse ------------------------------------------------------------------------------
class MisuseError(IvpError):
    """An operation was called in a state that does not allow it."""


class StateError(MisuseError):
    """Illegal state transition, e.g. inference before SERVING or upload after brick."""


class ShutdownError(StateError):
    """The recomputer shut this gateway down: it refuses all traffic until re-admitted
    (gateway HTTP 403)."""


class NoRouteError(StateError):
    """No healthy gateway serves the requested model (recomputer HTTP 503)."""


class RateLimitedError(MisuseError):
    """A client exceeded its request rate (recomputer HTTP 429)."""


class BrickedError(StateError):
    """The device was tampered with; it is bricked for good and does nothing."""


# --- HTTP answers -----------------------------------------------------------------------
def http_status(exc: IvpError, table: Iterable[tuple[type[IvpError], int]],
                default: int = 500) -> int:
    """The status of the first (type, status) of ``table`` that ``exc`` is an instance
    of (so a table lists subclasses before their roots), else ``default``."""
    return next((status for kind, status in table if isinstance(exc, kind)), default)


def error_json(message: str, type_: str) -> dict[str, Any]:
    """The one error shape of every ivp HTTP answer: ``{"error": {"message", "type"}}``."""
    return {"error": {"message": message, "type": type_}}
