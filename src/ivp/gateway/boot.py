"""UPLOAD mode of the gateway (SNG property 2): a pure state machine over weight bytes.

The note's secure boot: on every boot the gateway's *volatile bit counter* starts at
zero; the operator streams the whitelisted model's files through the gateway into the
server's RAM; the gateway hashes each file as it passes; a file whose digest does not
match interrupts the upload at that file's end (POWER_KILL); at exactly S bytes
(``manifest.total_size``) with every digest good the counter interrupts into SERVING.

:class:`UploadMode` does no I/O. It takes byte chunks (:meth:`UploadMode.feed`) and
the end of the stream (:meth:`UploadMode.finish`) and returns events:

* :class:`Forward` — bytes to pass on to the server (split at file boundaries, never
  past a bad file's end and never past S);
* :class:`FileVerified` — a file's digest matched;
* :class:`PowerKill` — stop: a digest mismatch (at the end of that file), more bytes
  than S (a long stream) or fewer (a short stream);
* :class:`Complete` — S bytes, every digest good: the caller may enter SERVING.

After a PowerKill or Complete the machine is spent: any further call raises
:class:`~ivp.errors.StateError` (a misuse, distinct from bad data). The small files
(config, tokenizer) are captured as they pass, so the gateway holds the *whitelisted*
tokenizer — digest-checked like every other byte — to tokenise prompts and decode
outputs itself.

The server's side of a boot is judged here too, on its answers' bytes
(:func:`power_on_state`, :func:`boot_answer`, :func:`booted`): a freshly powered
server must hold no model (memoryless), and during UPLOAD it may say only its state.
The shell that does the I/O — the operator's stream, the server's HTTP and power —
is ``boot_shell``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import blake3

from ivp.errors import StateError
from ivp.protocol.messages import FileEntry, Manifest

#: Files of these roles are kept in memory as they pass (the gateway needs the
#: tokenizer and config). Weights are never kept: they only pass through.
CAPTURE_ROLES = frozenset({"config", "tokenizer"})
#: Largest file the gateway captures (Gemma-3's tokenizer.json is ~33 MB).
MAX_CAPTURE = 256 << 20


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> Any: ...

    def hexdigest(self) -> str: ...


def _hasher(entry: FileEntry) -> _Hasher:
    """The file's digest in progress. Weight shards hash with BLAKE3 on every core
    (``max_threads=AUTO``: the same digest, its tree split over threads that release
    the GIL), so the check keeps up with the link rather than with one core."""
    if entry.algo == "sha256":
        return hashlib.sha256()
    if entry.role == "weights":
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    return blake3.blake3()


# --- events ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Forward:
    """Bytes of ``file`` that may go on to the server."""

    file: str
    data: bytes


@dataclass(frozen=True)
class FileVerified:
    """``file`` ended and its digest matched the whitelisted manifest."""

    file: str
    index: int


@dataclass(frozen=True)
class PowerKill:
    """Stop the upload, power-cycle the server, zero the counter.

    ``file`` names the file at fault ("" for a stream that is too long after S);
    ``reason`` is one of "digest", "long", "short".
    """

    reason: str
    file: str
    message: str
    counter: int  # the counter's value when the interrupt fired


@dataclass(frozen=True)
class Complete:
    """S bytes with every digest good: the server may be switched to SERVING."""

    counter: int


Event = Forward | FileVerified | PowerKill | Complete


@dataclass
class UploadMode:
    """The volatile counter and per-file hashing of one upload (one boot attempt).

    Blocks: booting weights that are not whitelisted (a changed shard is caught at its
    own end, before the next shard is accepted), smuggling extra bytes after the model
    (counter interrupts at S), and a truncated model (short stream).

    Args:
        manifest: the *whitelisted* manifest (from the installed whitelist, never
            from the operator).
    """

    manifest: Manifest
    counter: int = 0  # the volatile bit counter (bytes here), zero on every boot
    captured: dict[str, bytes] = field(default_factory=dict)
    verified: list[str] = field(default_factory=list)
    done: Event | None = None
    _index: int = 0
    _pos: int = 0  # bytes of the current file seen
    _hash: _Hasher | None = None
    _buf: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._start_file()

    @property
    def total(self) -> int:
        return self.manifest.total_size

    @property
    def current_file(self) -> FileEntry | None:
        files = self.manifest.files
        return files[self._index] if self._index < len(files) else None

    def _start_file(self) -> None:
        entry = self.current_file
        self._pos = 0
        self._buf = []
        self._hash = _hasher(entry) if entry is not None else None

    def _check_open(self) -> None:
        if self.done is not None:
            raise StateError(
                f"upload already ended ({type(self.done).__name__}); a new upload needs "
                "a fresh power cycle"
            )

    def feed(self, chunk: bytes) -> list[Event]:
        """Take the next bytes of the operator's stream.

        Returns the events they cause, in order. A digest mismatch yields the bad
        file's last Forward and then a PowerKill; nothing of the next file is
        forwarded.

        Raises:
            StateError: the upload already ended (PowerKill or Complete).
        """
        self._check_open()
        events: list[Event] = []
        view = memoryview(chunk)
        while view:
            entry = self.current_file
            if entry is None:  # more bytes than S
                events.append(self._kill("long", "", (
                    f"stream is longer than the manifest's {self.total} bytes: "
                    "extra bytes after the last file refused")))
                return events
            take = min(len(view), entry.size - self._pos)
            # the whole chunk inside one file (the common case): no copy
            part = chunk if take == len(chunk) and isinstance(chunk, bytes) \
                else bytes(view[:take])
            view = view[take:]
            if take:
                assert self._hash is not None
                self._hash.update(part)
                self._pos += take
                self.counter += take
                if entry.role in CAPTURE_ROLES and entry.size <= MAX_CAPTURE:
                    self._buf.append(part)
                events.append(Forward(entry.name, part))
            if self._pos == entry.size:
                event = self._end_file(entry)
                events.append(event)
                if isinstance(event, PowerKill):
                    return events
        # zero-size files at the end of the manifest end as soon as they are reached
        while (entry := self.current_file) is not None and entry.size == 0:
            event = self._end_file(entry)
            events.append(event)
            if isinstance(event, PowerKill):
                return events
        return events

    def _end_file(self, entry: FileEntry) -> Event:
        assert self._hash is not None
        digest = self._hash.hexdigest()
        if digest != entry.digest:
            return self._kill("digest", entry.name, (
                f"file {entry.name!r} ({entry.algo}) does not match the whitelisted manifest "
                f"of {self.manifest.model_id}: digest {digest[:16]}…, expected "
                f"{entry.digest[:16]}…"))
        if entry.role in CAPTURE_ROLES and entry.size <= MAX_CAPTURE:
            self.captured[entry.name] = b"".join(self._buf)
        self.verified.append(entry.name)
        event = FileVerified(entry.name, self._index)
        self._index += 1
        self._start_file()
        return event

    def _kill(self, reason: str, file: str, message: str) -> PowerKill:
        event = PowerKill(reason, file, message, self.counter)
        self.done = event
        self.captured.clear()
        return event

    def finish(self) -> Event:
        """The operator's stream ended.

        Returns:
            Complete at exactly S bytes with every file verified, else PowerKill
            ("short", naming the unfinished file).

        Raises:
            StateError: the upload already ended.
        """
        self._check_open()
        # a manifest whose files are all empty (or empty at its start) still ends cleanly
        while (entry := self.current_file) is not None and entry.size == 0:
            event = self._end_file(entry)
            if isinstance(event, PowerKill):
                return event
        entry = self.current_file
        if entry is not None:
            return self._kill("short", entry.name, (
                f"stream ended after {self.counter} of {self.total} bytes, inside file "
                f"{entry.name!r} ({self._pos} of {entry.size} bytes)"))
        event = Complete(self.counter)
        self.done = event
        return event


# --- the server's answers during a boot -----------------------------------------------
def json_field(body: bytes, key: str) -> Any:
    """``body``'s top-level ``key`` (None: not a JSON object, or no such key)."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj.get(key) if isinstance(obj, dict) else None


def power_on_state(status: int, body: bytes) -> Literal["empty", "holds_model", "not_up"]:
    """What a freshly powered server's ``GET /health`` answer says.

    ``empty``: ready for an upload. ``holds_model``: it claims a model survived the
    power cycle — not a memoryless server, refused (blocks weights persisting across
    a power kill or forced reboot). ``not_up``: ask again.
    """
    state = json_field(body, "state") if status == 200 else None
    if state == "empty":
        return "empty"
    if state in ("loading", "ready"):
        return "holds_model"
    return "not_up"


def boot_answer(body: bytes, expected: str) -> Literal["ok", "error", "outside"]:
    """Judge the server's answer to one UPLOAD step (``expected``: the state it must say).

    ``ok``: exactly ``{"state": expected}``. ``error``: exactly ``{"error": ...}`` (the
    caller power-kills on the HTTP status). ``outside``: anything else — dropped unread
    and alarmed by the caller, since during UPLOAD nothing the server says may leave
    the gateway (blocks upload exfiltration: data added to the boot answers).
    """
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        obj = None
    if isinstance(obj, dict) and set(obj) == {"state"} and obj["state"] == expected:
        return "ok"
    if isinstance(obj, dict) and "error" in obj and set(obj) == {"error"}:
        return "error"
    return "outside"


def booted(status: int, body: bytes) -> bool:
    """Whether the server's answer to the end of the weights says it booted (``ready``);
    any other answer power-kills (blocks serving from a server that did not boot the
    weights it was given)."""
    return status == 200 and json_field(body, "state") == "ready"


__all__ = ["CAPTURE_ROLES", "Complete", "Event", "FileVerified", "Forward", "PowerKill",
           "UploadMode", "boot_answer", "booted", "json_field", "power_on_state"]
