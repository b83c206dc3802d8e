"""ADMIN_REQUEST: the admin protocol of the SRC (the note's TODO), as a pure core.

An admin request is a DSSE envelope (payload type ``envelope.ADMIN``) of an
:class:`~ivp.protocol.messages.AdminRequest`: one instruction from a closed list, its
arguments, a nonce and an expiry, signed by inspectors. :meth:`AdminCore.decide`
accepts it only if, in this order (each step names the abuse it blocks):

1. the envelope decodes and has the admin payload type (a signature over another
   document type, e.g. a whitelist, can never be replayed as an instruction);
2. the quorum policy holds: at least k valid inspector signatures including every
   required party (one party alone — one government — cannot act);
3. the instruction is on the closed list (no open-ended "run this" power);
4. it has not expired, and its expiry is not further ahead than ``max_validity``
   (an old signed request cannot be held back and used years later);
5. its nonce was never accepted before (a captured request cannot be replayed);
6. its arguments have the instruction's exact shape;
7. it makes sense in the current state (the service's ``check``: the alarm exists,
   the gateway is shut down, the whitelist version goes up, …).

Every request, accepted or refused, is appended to the admin log: entries are
hash-chained (``hash_n = BLAKE3(hash_{n-1} || canonical(entry_n))``), so a deleted or
edited entry breaks every later hash, and the recomputer signs the head on request.
A refused request does not burn its nonce: otherwise anyone who saw a request being
collected could spoil it by submitting it under-signed first.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import blake3
from msgspec import Struct

from ivp.errors import ChainError, ExpiredError, IvpError, QuorumError, ValidationError
from ivp.protocol import envelope as env
from ivp.protocol.encoding import canonical, convert, decode, loads
from ivp.protocol.keys import SigningKey
from ivp.protocol.messages import (
    ADMIN_ARGS,
    ADMIN_MAX_VALIDITY,
    AcceptStoreArgs,
    AckAlarmArgs,
    AdminArgs,
    AdminInstruction,
    AdminRequest,
    EnrolArgs,
    EpsilonArgs,
    ReadmitArgs,
    RebootArgs,
    RotateKeyArgs,
    WhitelistArgs,
)
from ivp.protocol.quorum import QuorumPolicy

INSTRUCTIONS: tuple[str, ...] = get_args(AdminInstruction)
LOG_HEAD = "application/vnd.ivp.admin-log-head+json;v=1"
MAX_VALIDITY = ADMIN_MAX_VALIDITY  # seconds an admin request may be valid for

# The argument shapes are protocol types (the gateways apply relayed instructions too).
_Args = AdminArgs
ARGS: dict[str, type[AdminArgs]] = ADMIN_ARGS
assert set(ARGS) == set(INSTRUCTIONS), "every instruction needs an argument type"


class AdminLogEntry(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One line of the append-only admin log (the envelope itself is kept beside it)."""

    seq: int
    time: float
    accepted: bool
    instruction: str
    reason: str
    signers: list[str]
    parties: list[str]
    nonce: str
    request_digest: str  # BLAKE3 of the request bytes as received
    prev: str  # hash of the previous entry (genesis for the first)


def genesis() -> str:
    return blake3.blake3(b"ivp/admin-log/v1").hexdigest()


def entry_hash(prev: str, entry_bytes: bytes) -> str:
    return blake3.blake3(bytes.fromhex(prev) + entry_bytes).hexdigest()


@dataclass(frozen=True)
class Decision:
    """What :meth:`AdminCore.decide` found. ``error`` None = accepted."""

    request: AdminRequest | None
    args: _Args | None
    error: IvpError | None
    signers: frozenset[str]
    parties: frozenset[str]
    digest: str
    instruction: str = ""
    nonce: str = ""

    @property
    def accepted(self) -> bool:
        return self.error is None

    @property
    def reason(self) -> str:
        if self.error is None:
            return "accepted"
        return f"{type(self.error).__name__}: {self.error}"


class AdminCore:
    """Decides admin requests and keeps the log head and used nonces. Pure state."""

    def __init__(self, policy: QuorumPolicy, max_validity: float = MAX_VALIDITY) -> None:
        self.policy = policy
        self.max_validity = max_validity
        self.nonces: set[str] = set()
        self.seq = 0
        self.head = genesis()

    def restore(self, nonces: Iterable[str], head: tuple[int, str] | None) -> None:
        self.nonces = set(nonces)
        if head is not None:
            self.seq, self.head = head

    def decide(self, data: bytes, now: float,
               check: Callable[[str, Any], None] = lambda i, a: None) -> Decision:
        """Check one request (its bytes as received). Never raises; no state change."""
        digest = blake3.blake3(data).hexdigest()
        signers: frozenset[str] = frozenset()
        parties: frozenset[str] = frozenset()
        instruction = nonce = ""
        try:
            envelope = env.Envelope.from_bytes(data)
            if envelope.payloadType != env.ADMIN:
                raise ValidationError(f"expected payload type {env.ADMIN!r}, got "
                                      f"{envelope.payloadType!r}")
            payload = envelope.payload_bytes()
            instruction, nonce = _peek(payload)  # named in the log even if refused below
            result = self.policy.check(envelope)
            signers, parties = result.signers, result.parties
            if not result:
                raise QuorumError(result.explain())
            if instruction not in INSTRUCTIONS:
                raise ValidationError(f"instruction {instruction!r} is not on the closed list "
                                      f"({', '.join(INSTRUCTIONS)})")
            request = decode(payload, AdminRequest)
            if request.expires <= now:
                raise ExpiredError(f"request expired {now - request.expires:.0f} s ago")
            if request.expires - now > self.max_validity:
                raise ExpiredError(f"request valid for {request.expires - now:.0f} s; at most "
                                   f"{self.max_validity:.0f} s allowed")
            if request.nonce in self.nonces:
                raise ChainError(f"nonce {request.nonce!r} was already used (replayed request)")
            args = convert(request.args, ARGS[request.instruction])
            check(request.instruction, args)
        except IvpError as exc:
            return Decision(None, None, exc, signers, parties, digest, instruction, nonce)
        return Decision(request, args, None, signers, parties, digest, instruction, nonce)

    def next_entry(self, d: Decision, now: float) -> tuple[int, bytes, str]:
        """The log entry for ``d`` (seq, canonical bytes, hash); call :meth:`advance`
        once it is stored."""
        entry = AdminLogEntry(
            seq=self.seq + 1, time=now, accepted=d.accepted, instruction=d.instruction[:64],
            reason=d.reason[:2000], signers=sorted(d.signers),
            parties=sorted(d.parties), nonce=d.nonce[:128], request_digest=d.digest,
            prev=self.head,
        )
        raw = canonical(entry)
        return entry.seq, raw, entry_hash(self.head, raw)

    def advance(self, seq: int, digest: str, d: Decision) -> None:
        self.seq, self.head = seq, digest
        if d.accepted and d.request is not None:
            self.nonces.add(d.request.nonce)


def _peek(payload: bytes) -> tuple[str, str]:
    """Instruction and nonce named by a payload, before full validation (for the log
    and for a clear "not on the closed list" reason)."""
    value = loads(payload, "admin request payload")
    if not isinstance(value, dict):
        raise ValidationError("admin request payload is not a JSON object")
    instr, nonce = value.get("instruction"), value.get("nonce")
    return (instr if isinstance(instr, str) else "", nonce if isinstance(nonce, str) else "")


def verify_log(rows: Sequence[tuple[int, bytes, str]]) -> str:
    """Check an admin log from its first entry; return the head hash.

    Raises:
        ChainError: an entry missing, reordered or edited (its hash or link is wrong).
    """
    head, expect = genesis(), 1
    for seq, raw, digest in rows:
        entry = decode(raw, AdminLogEntry)
        if seq != expect or entry.seq != seq:
            raise ChainError(f"admin log entry {seq}: expected entry {expect}")
        if entry.prev != head:
            raise ChainError(f"admin log entry {seq} does not link to entry {seq - 1}")
        if entry_hash(head, raw) != digest:
            raise ChainError(f"admin log entry {seq} was altered (hash mismatch)")
        head, expect = digest, expect + 1
    return head


# --- building requests (for `ivp admin`) -------------------------------------------------
def build_request(instruction: str, args: dict[str, Any], expires_in: float = 3600.0,
                  now: float | None = None, nonce: str | None = None) -> AdminRequest:
    """A new request with a fresh random nonce.

    Raises:
        ValidationError: unknown instruction or arguments of the wrong shape.
    """
    if instruction not in INSTRUCTIONS:
        raise ValidationError(f"instruction {instruction!r} is not on the closed list "
                              f"({', '.join(INSTRUCTIONS)})")
    convert(args, ARGS[instruction])
    now = time.time() if now is None else now
    return AdminRequest(instruction=instruction, args=args,  # type: ignore[arg-type]
                        nonce=nonce or secrets.token_hex(16), expires=now + expires_in)


def sign_request(request: AdminRequest, keys: Iterable[SigningKey]) -> env.Envelope:
    return env.sign(env.ADMIN, canonical(request), keys)


def read_request(data: bytes, now: float | None = None) -> tuple[env.Envelope, AdminRequest]:
    """A request envelope as `ivp admin send` checks it before sending anything.

    Raises:
        ValidationError: not a DSSE envelope, not an admin request, an instruction off
            the closed list or arguments of the wrong shape, or no signature at all.
        ExpiredError: the request has expired.
    """
    envelope = env.Envelope.from_bytes(data)
    if envelope.payloadType != env.ADMIN:
        raise ValidationError(f"payload type {envelope.payloadType!r} is not an admin "
                              f"request ({env.ADMIN!r})")
    request = decode(envelope.payload_bytes(), AdminRequest)
    if request.instruction not in INSTRUCTIONS:
        raise ValidationError(f"instruction {request.instruction!r} is not on the closed "
                              f"list ({', '.join(INSTRUCTIONS)})")
    convert(request.args, ARGS[request.instruction])
    if not envelope.signatures:
        raise ValidationError("the request is not signed: countersign it with `ivp admin "
                              "sign FILE --key KEY` first")
    if request.expires <= (time.time() if now is None else now):
        raise ExpiredError("the request has expired: build and sign a new one")
    return envelope, request


def countersign(envelope: env.Envelope, keys: Iterable[SigningKey]) -> env.Envelope:
    for k in keys:
        envelope = env.add_signature(envelope, k)
    return envelope


__all__ = [
    "ARGS", "INSTRUCTIONS", "AcceptStoreArgs", "AckAlarmArgs", "AdminCore", "AdminLogEntry",
    "Decision",
    "EnrolArgs", "EpsilonArgs", "ReadmitArgs", "RebootArgs", "RotateKeyArgs", "WhitelistArgs",
    "build_request", "countersign", "read_request", "sign_request", "verify_log",
]
