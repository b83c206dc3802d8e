"""The one canonical encoding: JSON with sorted keys, no whitespace (msgspec).

Everything that is hashed or signed goes through :func:`canonical`, so two parties
that hold the same message always hold the same bytes. Decoding validates the types
and constraints declared on the message structs and turns every failure into
:class:`~ivp.errors.ValidationError` naming what was wrong.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from ivp.errors import ValidationError

T = TypeVar("T")

_encoder = msgspec.json.Encoder(order="sorted")


def canonical(obj: Any) -> bytes:
    """Canonical bytes of a message (or any JSON-able value)."""
    return _encoder.encode(obj)


def decode(data: bytes | str, type_: type[T]) -> T:
    """Decode and validate ``data`` as ``type_``.

    Raises:
        ValidationError: not JSON, wrong shape, nested too deeply, or a field violates
            its constraint.
    """
    try:
        return msgspec.json.decode(data, type=type_)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ValidationError(f"bad {getattr(type_, '__name__', type_)}: {exc}") from None
    except ValueError as exc:  # raised by __post_init__ checks
        raise ValidationError(f"bad {getattr(type_, '__name__', type_)}: {exc}") from None
    except RecursionError:
        raise ValidationError(f"bad {getattr(type_, '__name__', type_)}: {_DEEP}") from None


_DEEP = "JSON nested too deeply"


def loads(data: bytes | str, what: str = "body") -> Any:
    """Parse untrusted JSON into plain values (dicts, lists, ...).

    Every HTTP body and payload goes through this or :func:`decode`: a value nested
    thousands deep makes a recursive parser raise ``RecursionError``, which would
    otherwise escape as an internal error (HTTP 500) instead of a refusal.

    Raises:
        ValidationError: not JSON, or nested too deeply (``what`` names the input).
    """
    try:
        return msgspec.json.decode(data)
    except (msgspec.DecodeError, ValueError):
        raise ValidationError(f"{what} is not JSON") from None
    except RecursionError:
        raise ValidationError(f"{what}: {_DEEP}") from None


def convert(obj: Any, type_: type[T]) -> T:
    """Validate an already-parsed value (e.g. a dict) as ``type_``.

    Raises:
        ValidationError: wrong shape or a field violates its constraint.
    """
    try:
        return msgspec.convert(obj, type=type_)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ValidationError(f"bad {getattr(type_, '__name__', type_)}: {exc}") from None
    except RecursionError:
        raise ValidationError(f"bad {getattr(type_, '__name__', type_)}: {_DEEP}") from None


def to_builtins(obj: Any) -> Any:
    """Plain dict/list form of a message (for JSON responses and printing)."""
    return msgspec.to_builtins(obj)
