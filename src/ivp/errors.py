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
    """Root of every error ivp raises on purpose.

    ``param`` names the request field at fault and ``code`` is a stable, machine-readable
    reason (OpenAI's ``param`` and ``code``); both optional, set per class or per raise.
    """

    code: str | None = None
    param: str | None = None

    def __init__(self, *args: object, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(*args)
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code


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

    code = "gateway_shut_down"


class StoreRolledBackError(StateError):
    """The recomputer's store is older than its device counter says (an older copy was
    put back): it takes no trust decision until the inspectors accept the store by
    quorum (admin ``accept_store``; recomputer HTTP 409)."""

    code = "store_rolled_back"


class NoRouteError(StateError):
    """No healthy gateway serves the requested, whitelisted model (recomputer HTTP 503,
    with ``Retry-After``: it may be served again soon)."""

    code = "model_not_served"


class ModelNotFoundError(ValidationError):
    """A request names a model the installed whitelist does not hold (HTTP 404): asking
    again will not help, unlike :class:`NoRouteError`."""

    code = "model_not_found"
    param = "model"


class RateLimitedError(MisuseError):
    """A client exceeded its request rate (recomputer HTTP 429, with ``Retry-After``)."""

    code = "rate_limit_exceeded"

    def __init__(self, *args: object, retry_after: float = 1.0, **kwargs: str | None) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class BrickedError(StateError):
    """The device was tampered with; it is bricked for good and does nothing."""

    code = "device_bricked"


# --- HTTP answers -----------------------------------------------------------------------
def http_status(exc: IvpError, table: Iterable[tuple[type[IvpError], int]],
                default: int = 500) -> int:
    """The status of the first (type, status) of ``table`` that ``exc`` is an instance
    of (so a table lists subclasses before their roots), else ``default``."""
    return next((status for kind, status in table if isinstance(exc, kind)), default)


def error_json(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The one error shape of every ivp HTTP answer, OpenAI's:
    ``{"error": {"message", "type", "param", "code"}}`` (``type``: the ivp error class)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_of(exc: IvpError) -> dict[str, Any]:
    """:func:`error_json` for an ivp error: its text, class name, ``param`` and ``code``."""
    return error_json(str(exc), type(exc).__name__, exc.param, exc.code)
