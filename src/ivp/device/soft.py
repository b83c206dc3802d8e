"""The device interface and its software implementation.

Property 1 of the note, *tamper = brick*: :meth:`SoftDevice.tamper` overwrites and
deletes the UID secret and leaves a brick marker. Every key is derived from that
secret and never stored, so after a tamper nothing sealed by the device can be opened
by anyone, and every operation raises :class:`~ivp.errors.BrickedError` — also after a
restart, because the marker stays and the secret is gone.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ivp.errors import BrickedError, PeerDataError
from ivp.protocol.keys import SigningKey, VerifyKey

_UID = "uid.secret"
_BRICK = "BRICKED"


class Device(Protocol):
    """What ivp needs from secure hardware."""

    @property
    def public_key(self) -> VerifyKey: ...

    def sign(self, data: bytes) -> bytes: ...

    def signing_key(self) -> SigningKey: ...

    def derive_key(self, purpose: str, length: int = 32) -> bytes: ...

    def random(self, n: int) -> bytes: ...

    def random_u64(self) -> int: ...

    def seal(self, purpose: str, plaintext: bytes, aad: bytes = b"") -> bytes: ...

    def unseal(self, purpose: str, sealed: bytes, aad: bytes = b"") -> bytes: ...

    def tamper(self) -> None: ...

    @property
    def bricked(self) -> bool: ...


class SoftDevice:
    """A device whose UID secret is a file in ``state_dir`` (the emulated fuse bank).

    The UID is created on first power-on from the OS CSPRNG and never leaves the
    device: only the public key derived from it is exported.
    """

    def __init__(self, state_dir: Path) -> None:
        self._dir = Path(state_dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._uid: bytes | None = None
        self._signing: SigningKey | None = None
        if not self.bricked:
            uid_path = self._dir / _UID
            if not uid_path.exists():
                tmp = uid_path.with_suffix(".tmp")
                tmp.write_bytes(secrets.token_bytes(32))
                tmp.chmod(0o600)
                os.replace(tmp, uid_path)
            self._uid = uid_path.read_bytes()
            self._signing = SigningKey.from_seed(self.derive_key("identity/ed25519"))

    # --- tamper = brick -----------------------------------------------------------------
    @property
    def bricked(self) -> bool:
        return (self._dir / _BRICK).exists()

    def tamper(self) -> None:
        """The tamper mesh fired: destroy the UID for good. Irreversible."""
        (self._dir / _BRICK).write_text("tamper detected: UID destroyed\n")
        uid_path = self._dir / _UID
        if uid_path.exists():
            size = uid_path.stat().st_size
            with open(uid_path, "r+b") as f:  # overwrite before unlinking
                f.write(secrets.token_bytes(size))
                f.flush()
                os.fsync(f.fileno())
            uid_path.unlink()
        self._uid = None
        self._signing = None

    def _secret(self) -> bytes:
        if self._uid is None or self.bricked:
            self._uid = None
            self._signing = None
            raise BrickedError("device is bricked (tamper detected): it does nothing")
        return self._uid

    # --- keys ---------------------------------------------------------------------------
    def derive_key(self, purpose: str, length: int = 32) -> bytes:
        """A key for one purpose, HKDF-SHA256 from the UID; never stored."""
        return HKDF(
            algorithm=hashes.SHA256(), length=length, salt=b"ivp/device/v1",
            info=purpose.encode(),
        ).derive(self._secret())

    def signing_key(self) -> SigningKey:
        self._secret()
        assert self._signing is not None
        return self._signing

    @property
    def public_key(self) -> VerifyKey:
        return self.signing_key().verify_key

    def sign(self, data: bytes) -> bytes:
        return self.signing_key().sign(data)

    # --- TRNG -------------------------------------------------------------------------------
    def random(self, n: int) -> bytes:
        self._secret()
        return secrets.token_bytes(n)

    def random_u64(self) -> int:
        return int.from_bytes(self.random(8), "little")

    # --- sealed storage --------------------------------------------------------------------
    def seal(self, purpose: str, plaintext: bytes, aad: bytes = b"") -> bytes:
        """AES-256-GCM under a purpose key; output = 12-byte nonce || ciphertext+tag."""
        nonce = self.random(12)
        return nonce + AESGCM(self.derive_key("seal/" + purpose)).encrypt(nonce, plaintext, aad)

    def unseal(self, purpose: str, sealed: bytes, aad: bytes = b"") -> bytes:
        """Raises:
        BrickedError: the device was tampered with.
        PeerDataError: the sealed bytes were altered or sealed by another device.
        """
        key = self.derive_key("seal/" + purpose)
        try:
            return AESGCM(key).decrypt(sealed[:12], sealed[12:], aad)
        except (InvalidTag, ValueError):
            raise PeerDataError(f"sealed {purpose!r} data is corrupt or not ours") from None
