"""Gateway-specific refinements of the ivp error vocabulary (``ivp.errors``).

Each is a subclass of one of the three roots, so a caller that only knows
``ivp.errors`` still tells bad peer data from transport failure from misuse. The
subclasses exist because the gateway answers them differently on the wire
(:data:`ivp.gateway.app.STATUS` maps each to one HTTP status, in one place).
``ShutdownError`` lives in ``ivp.errors`` (the recomputer's tests and tools name it
too) and is re-exported here.
"""

from __future__ import annotations

from ivp.errors import PeerDataError, ShutdownError, ValidationError


class UnknownModelError(ValidationError):
    """A request names a model this gateway does not serve / the whitelist lacks (404)."""

    code = "model_not_found"
    param = "model"


class BodyTooLargeError(ValidationError):
    """A request body is larger than the gateway accepts (413)."""

    code = "request_too_large"


class UploadRefusedError(PeerDataError):
    """The weight stream was refused and the server power-killed (400).

    Attributes:
        reason: "digest" (a file's digest mismatched), "short" or "long" (the stream
            is not exactly S bytes), or "server" (the server failed to boot).
        file: the file at fault ("" when none).
    """

    def __init__(self, message: str, *, reason: str, file: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.file = file


class ServerProtocolError(PeerDataError):
    """The server answered outside the protocol (unpaired tag, bad shape): dropped (502)."""

    code = "server_output_dropped"


__all__ = ["BodyTooLargeError", "ServerProtocolError", "ShutdownError", "UnknownModelError",
           "UploadRefusedError"]
