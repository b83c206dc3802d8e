"""Ed25519 keys (``cryptography``) and their stable ids.

A key id is the first 16 bytes of SHA-256 over the raw 32-byte public key, in hex.
Private keys are stored as PEM (PKCS#8); public keys travel as 64 hex characters.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ivp.errors import SignatureError, ValidationError


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:32]


@dataclass(frozen=True)
class VerifyKey:
    """A public key that checks signatures."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise ValidationError("an Ed25519 public key is 32 bytes")

    @classmethod
    def from_hex(cls, text: str) -> VerifyKey:
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise ValidationError(f"public key is not hex: {text[:20]!r}") from None

    @property
    def hex(self) -> str:
        return self.raw.hex()

    @property
    def keyid(self) -> str:
        return key_id(self.raw)

    def verify(self, signature: bytes, data: bytes) -> None:
        """Raises:
        SignatureError: the signature is not by this key over ``data``.
        """
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except InvalidSignature:
            raise SignatureError(f"bad signature for key {self.keyid}") from None


class SigningKey:
    """A private key that signs. Keep it where only its owner can read it."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        raw = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.verify_key = VerifyKey(raw)
        self._keyid = key_id(raw)  # in every signature: hashed once, not per signature

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        """Deterministic key from 32 secret bytes (a device derives its key this way)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise ValidationError(f"{path}: not a PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValidationError(f"{path}: not an Ed25519 key")
        return cls(key)

    def save(self, path: Path) -> None:
        pem = self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Create it owner-only before any byte is written (no window at umask 0o644).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # also when the file existed with wider modes
            f.write(pem)

    @property
    def keyid(self) -> str:
        return self._keyid

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)
