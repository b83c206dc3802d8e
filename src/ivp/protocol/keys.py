"""Signature keys of two schemes, their stable ids and their files.

ivp signs with **Ed25519** (the default: inspectors, the software device) or **ECDSA
P-256 with SHA-256** (what TPMs commonly have; the TPM device's key). A public key's
text form names its scheme, so every key record (policy, enrolment, ``/identity``)
says which algorithm checks it: 64 hex characters are an Ed25519 key (the original
form, unchanged), ``ecdsa-p256:`` + 66 hex characters a P-256 key (compressed SEC1
point). The scheme always comes from the trusted key record, never from the signed
message, so a signature can never choose its own algorithm.

A key id is the first 16 bytes of SHA-256 over the raw public key (32 bytes Ed25519,
33 bytes P-256), in hex. ECDSA signatures are DER with a low S (the canonical one of
the two valid encodings: a relayed signature cannot be altered into another valid one).

Private key files are OpenSSH private keys (``ssh-keygen -y -f FILE`` reads them),
passphrase-encrypted with bcrypt-pbkdf + AES-256-CTR unless the caller asks for
plaintext explicitly; PEM PKCS#8 files (plain or encrypted) load too.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal, Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from msgspec import Meta

from ivp.errors import SignatureError, ValidationError

Scheme = Literal["ed25519", "ecdsa-p256"]
ED25519: Scheme = "ed25519"
P256: Scheme = "ecdsa-p256"
SCHEMES: tuple[Scheme, ...] = (ED25519, P256)
_P256_PREFIX = P256 + ":"
#: The order n of the P-256 group (FIPS 186-4 D.1.2.3): a low S is at most n // 2.
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
#: The text form of a public key, for message and record fields.
PublicKeyText = Annotated[
    str, Meta(pattern=r"^([0-9a-f]{64}|ecdsa-p256:0[23][0-9a-f]{64})$")]
#: bcrypt-pbkdf rounds of an encrypted key file (ssh-keygen's default is 16).
KDF_ROUNDS = 16


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:32]


def low_s_der(der: bytes) -> bytes:
    """The canonical (low-S) DER form of an ECDSA P-256 signature."""
    r, s = decode_dss_signature(der)
    return encode_dss_signature(r, min(s, P256_ORDER - s))


def _p256_public(raw: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError:
        raise ValidationError("not a point on P-256") from None


@dataclass(frozen=True)
class VerifyKey:
    """A public key that checks signatures: Ed25519 (32 raw bytes) or P-256 (33 bytes,
    compressed SEC1)."""

    raw: bytes
    scheme: Scheme = ED25519

    def __post_init__(self) -> None:
        if self.scheme == ED25519:
            if len(self.raw) != 32:
                raise ValidationError("an Ed25519 public key is 32 bytes")
        elif self.scheme == P256:
            if len(self.raw) != 33 or self.raw[0] not in (2, 3):
                raise ValidationError("a P-256 public key is a 33-byte compressed point")
            self._public  # noqa: B018 -- decodes the point: off the curve is refused here
        else:
            raise ValidationError(f"unknown key scheme {self.scheme!r}: use one of {SCHEMES}")

    @classmethod
    def from_hex(cls, text: str) -> VerifyKey:
        """Parse a key's text form (see the module docstring).

        Raises:
            ValidationError: not the text form of an Ed25519 or P-256 public key.
        """
        scheme: Scheme = ED25519
        body = text
        if text.startswith(_P256_PREFIX):
            scheme, body = P256, text[len(_P256_PREFIX):]
        try:
            key = cls(bytes.fromhex(body), scheme)
        except ValueError:
            raise ValidationError(f"public key is not hex: {text[:20]!r}") from None
        if key.hex != text:  # one text per key: records compare keys as strings
            raise ValidationError(f"public key {text[:20]!r}... is not in lower-case hex")
        return key

    @classmethod
    def from_public(cls, key: Ed25519PublicKey | ec.EllipticCurvePublicKey) -> VerifyKey:
        if isinstance(key, Ed25519PublicKey):
            return cls(key.public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw))
        if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
            return cls(key.public_bytes(serialization.Encoding.X962,
                                        serialization.PublicFormat.CompressedPoint), P256)
        raise ValidationError("only Ed25519 and ECDSA P-256 keys are supported")

    @property
    def hex(self) -> str:
        """The text form that names the scheme (bare hex for Ed25519)."""
        return self.raw.hex() if self.scheme == ED25519 else _P256_PREFIX + self.raw.hex()

    @property
    def keyid(self) -> str:
        return key_id(self.raw)

    @cached_property
    def _public(self) -> Ed25519PublicKey | ec.EllipticCurvePublicKey:
        """The decoded key, once per object (decoding a point costs as much as a check)."""
        if self.scheme == ED25519:
            return Ed25519PublicKey.from_public_bytes(self.raw)
        return _p256_public(self.raw)

    def verify(self, signature: bytes, data: bytes) -> None:
        """Raises:
        SignatureError: the signature is not by this key over ``data`` (for P-256 also:
            not canonical low-S DER).
        """
        try:
            public = self._public
            if isinstance(public, Ed25519PublicKey):
                public.verify(signature, data)
                return
            r, s = decode_dss_signature(signature)
            if s > P256_ORDER // 2 or encode_dss_signature(r, s) != signature:
                raise InvalidSignature  # the malleable twin or a non-canonical DER
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            raise SignatureError(f"bad signature for key {self.keyid}") from None


class Signer(Protocol):
    """Anything that signs under one key: a :class:`SigningKey` in memory, or a device
    whose private key never leaves it (a TPM)."""

    @property
    def verify_key(self) -> VerifyKey: ...

    @property
    def keyid(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


PrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey


class SigningKey:
    """A private key in memory that signs. Keep it where only its owner can read it."""

    def __init__(self, private: PrivateKey) -> None:
        if isinstance(private, ec.EllipticCurvePrivateKey) and (
                private.curve.name != "secp256r1"):
            raise ValidationError(f"ECDSA curve {private.curve.name} is not P-256")
        self._private = private
        self.verify_key = VerifyKey.from_public(private.public_key())
        self._keyid = self.verify_key.keyid  # in every signature: hashed once

    @property
    def scheme(self) -> Scheme:
        return self.verify_key.scheme

    @classmethod
    def generate(cls, scheme: Scheme = ED25519) -> SigningKey:
        if scheme == P256:
            return cls(ec.generate_private_key(ec.SECP256R1()))
        if scheme != ED25519:
            raise ValidationError(f"unknown key scheme {scheme!r}: use one of {SCHEMES}")
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        """Deterministic Ed25519 key from 32 secret bytes (the software device's way)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @staticmethod
    def is_encrypted(path: Path) -> bool:
        """Whether the key file at ``path`` needs a passphrase (no passphrase needed to
        tell)."""
        data = Path(path).read_bytes()
        if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data:
            return True
        try:
            serialization.load_ssh_private_key(data, None)
        except TypeError:
            return True  # "password-protected, but password was not provided"
        except (ValueError, UnsupportedAlgorithm):
            return False
        return False

    @classmethod
    def load(cls, path: Path, passphrase: bytes | None = None) -> SigningKey:
        """Read a private key file (OpenSSH or PEM PKCS#8, encrypted or not).

        Raises:
            ValidationError: not a key file; encrypted and no passphrase given; wrong
                passphrase; or a key of another algorithm.
        """
        path = Path(path)
        data = path.read_bytes()
        loader = (serialization.load_ssh_private_key if b"OPENSSH PRIVATE KEY" in data
                  else serialization.load_pem_private_key)
        try:
            key = loader(data, passphrase)
        except TypeError:  # encrypted without a passphrase, or a passphrase for plaintext
            if passphrase is None:
                raise ValidationError(f"{path}: the key is encrypted: its passphrase is "
                                      "needed") from None
            key = loader(data, None)
        except (ValueError, UnsupportedAlgorithm) as exc:
            if passphrase is not None and cls.is_encrypted(path):
                raise ValidationError(f"{path}: wrong passphrase (or a corrupt key "
                                      "file)") from None
            raise ValidationError(f"{path}: not a private key file ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise ValidationError(f"{path}: not an Ed25519 or ECDSA P-256 key")
        return cls(key)

    def save(self, path: Path, *, passphrase: bytes | None,
             kdf_rounds: int = KDF_ROUNDS) -> None:
        """Write the key owner-only; encrypted under ``passphrase`` (bcrypt-pbkdf with
        ``kdf_rounds``) unless it is None, which writes plaintext: say so at the call."""
        if passphrase is not None and not passphrase:
            raise ValidationError("an empty passphrase protects nothing")
        encryption: serialization.KeySerializationEncryption = (
            serialization.NoEncryption() if passphrase is None else
            serialization.PrivateFormat.OpenSSH.encryption_builder()
            .kdf_rounds(kdf_rounds).build(passphrase))
        data = self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, encryption)
        # Create it owner-only before any byte is written (no window at umask 0o644).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # also when the file existed with wider modes
            f.write(data)

    @property
    def keyid(self) -> str:
        return self._keyid

    def sign(self, data: bytes) -> bytes:
        if isinstance(self._private, Ed25519PrivateKey):
            return self._private.sign(data)
        return low_s_der(self._private.sign(data, ec.ECDSA(hashes.SHA256())))
