"""DSSE envelopes: the one signed-message format of ivp.

DSSE (Dead Simple Signing Envelope, used by in-toto, TUF and OpenSSF model signing)
signs ``PAE(payloadType, payload)`` so a signature can never be replayed as a
different message type. Signatures are checked over the payload bytes *as received*
(never a re-serialised copy); only then is the payload decoded.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping

import msgspec

from ivp.errors import SignatureError, ValidationError
from ivp.protocol.encoding import canonical, decode
from ivp.protocol.keys import Signer, VerifyKey

# Payload types. A signature over one type never verifies as another.
AUDIT = "application/vnd.ivp.audit+json;v=1"
BOOT = "application/vnd.ivp.boot+json;v=1"
CHECKPOINT = "application/vnd.ivp.checkpoint+json;v=1"
SHUTDOWN = "application/vnd.ivp.shutdown+json;v=1"
WHITELIST = "application/vnd.ivp.whitelist+json;v=1"
ADMIN = "application/vnd.ivp.admin+json;v=1"
SENSOR = "application/vnd.ivp.sensor+json;v=1"
ALARM = "application/vnd.ivp.alarm+json;v=1"  # a gateway's own alarm (GatewayAlarm)
READMIT = "application/vnd.ivp.readmit+json;v=1"  # recomputer -> gateway (Readmit)


class Signature(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    keyid: str
    sig: str  # base64


class Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    payloadType: str
    payload: str  # base64 of the payload bytes
    signatures: list[Signature]

    def payload_bytes(self) -> bytes:
        try:
            return base64.b64decode(self.payload, validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError("envelope payload is not base64") from None

    def to_bytes(self) -> bytes:
        return canonical(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        return decode(data, Envelope)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def sign(payload_type: str, payload: bytes, keys: Iterable[Signer]) -> Envelope:
    """Sign ``payload`` (already canonical bytes) with every key in ``keys``."""
    message = pae(payload_type, payload)
    sigs = [
        Signature(keyid=k.keyid, sig=base64.b64encode(k.sign(message)).decode()) for k in keys
    ]
    return Envelope(payloadType=payload_type, payload=base64.b64encode(payload).decode(),
                    signatures=sigs)


def sign_message(payload_type: str, message: object, key: Signer) -> Envelope:
    return sign(payload_type, canonical(message), [key])


def add_signature(envelope: Envelope, key: Signer) -> Envelope:
    """Countersign (e.g. a second inspector adding to a quorum)."""
    message = pae(envelope.payloadType, envelope.payload_bytes())
    sig = Signature(keyid=key.keyid, sig=base64.b64encode(key.sign(message)).decode())
    kept = [s for s in envelope.signatures if s.keyid != key.keyid]
    return Envelope(envelope.payloadType, envelope.payload, [*kept, sig])


def valid_signers(envelope: Envelope, keys: Mapping[str, VerifyKey]) -> set[str]:
    """Key ids in ``keys`` that validly signed ``envelope``. Never raises on bad sigs."""
    message = pae(envelope.payloadType, envelope.payload_bytes())
    good: set[str] = set()
    for s in envelope.signatures:
        key = keys.get(s.keyid)
        if key is None or s.keyid in good:
            continue
        try:
            key.verify(base64.b64decode(s.sig, validate=True), message)
        except (SignatureError, binascii.Error, ValueError):
            continue
        good.add(s.keyid)
    return good


def open_signed(envelope: Envelope, payload_type: str, key: VerifyKey) -> bytes:
    """Check type and a signature by ``key``; return the payload bytes as received.

    Raises:
        ValidationError: wrong payload type or malformed envelope.
        SignatureError: no valid signature by ``key``.
    """
    if envelope.payloadType != payload_type:
        raise ValidationError(
            f"expected payload type {payload_type!r}, got {envelope.payloadType!r}"
        )
    if not valid_signers(envelope, {key.keyid: key}):
        raise SignatureError(f"no valid signature by key {key.keyid}")
    return envelope.payload_bytes()
