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
import time
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ivp.errors import BrickedError, PeerDataError
from ivp.protocol.keys import Signer, SigningKey, VerifyKey

_UID = "uid.secret"
_BRICK = "BRICKED"
#: Seconds between checks for a brick marker written by another process (a tamper
#: through this object bricks at once; one stat per key use cost ~6% of the gateway's CPU).
_RECHECK = 0.05


class Device(Protocol):
    """What ivp needs from secure hardware.

    The private key never leaves a hardware device: everything that signs in the
    device's name goes through :meth:`sign` or the :class:`~ivp.protocol.keys.Signer`
    that :meth:`signer` returns (a TPM device returns itself).
    """

    @property
    def public_key(self) -> VerifyKey: ...

    def sign(self, data: bytes) -> bytes: ...

    def signer(self) -> Signer: ...

    def derive_key(self, purpose: str, length: int = 32) -> bytes: ...

    def random(self, n: int) -> bytes: ...

    def random_u64(self) -> int: ...

    def seal(self, purpose: str, plaintext: bytes, aad: bytes = b"") -> bytes: ...

    def unseal(self, purpose: str, sealed: bytes, aad: bytes = b"") -> bytes: ...

    def tamper(self) -> None: ...

    @property
    def bricked(self) -> bool: ...


def seal_with(aead: AESGCM, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM; output = 12-byte random nonce || ciphertext+tag."""
    nonce = os.urandom(12)
    return nonce + aead.encrypt(nonce, plaintext, aad)


def unseal_with(aead: AESGCM, purpose: str, sealed: bytes, aad: bytes) -> bytes:
    """Raises PeerDataError: the sealed bytes were altered or sealed under another key."""
    try:
        return aead.decrypt(sealed[:12], sealed[12:], aad)
    except (InvalidTag, ValueError):
        raise PeerDataError(f"sealed {purpose!r} data is corrupt or not ours") from None


class SoftDevice:
    """A device whose UID secret is a file in ``state_dir`` (the emulated fuse bank).

    **Its secrets are files**: whoever can read ``state_dir`` (the operator, root) can
    copy the UID and sign as this device. It is the development default; the TPM
    device (:class:`~ivp.device.tpm.TpmDevice`) keeps its keys where no file holds them.
    The UID is created on first power-on from the OS CSPRNG; only the public key
    derived from it is exported.
    """

    def __init__(self, state_dir: Path) -> None:
        self._dir = Path(state_dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._marker = os.fspath(self._dir / _BRICK)
        self._bricked = False  # once True, for good (also if the marker is removed)
        self._recheck_at = 0.0
        self._uid: bytes | None = None
        self._signing: SigningKey | None = None
        self._aeads: dict[str, AESGCM] = {}  # per seal purpose; dropped with the UID
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
        if self._bricked:
            return True
        now = time.monotonic()
        if now >= self._recheck_at:  # another process may have tampered
            self._recheck_at = now + _RECHECK
            if os.path.exists(self._marker):
                self._forget()
        return self._bricked

    def _forget(self) -> None:
        """Bricked: drop every secret held in memory."""
        self._bricked = True
        self._uid = None
        self._signing = None
        self._aeads = {}

    def tamper(self) -> None:
        """The tamper mesh fired: destroy the UID for good. Irreversible."""
        self._forget()  # first: no key use from here on, whatever the disk does
        (self._dir / _BRICK).write_text("tamper detected: UID destroyed\n")
        uid_path = self._dir / _UID
        if uid_path.exists():
            size = uid_path.stat().st_size
            with open(uid_path, "r+b") as f:  # overwrite before unlinking
                f.write(secrets.token_bytes(size))
                f.flush()
                os.fsync(f.fileno())
            uid_path.unlink()

    def _secret(self) -> bytes:
        uid = self._uid
        if uid is None or self.bricked:
            self._forget()
            raise BrickedError("device is bricked (tamper detected): it does nothing")
        return uid

    # --- keys ---------------------------------------------------------------------------
    def derive_key(self, purpose: str, length: int = 32) -> bytes:
        """A key for one purpose, HKDF-SHA256 from the UID; never stored on disk."""
        return HKDF(
            algorithm=hashes.SHA256(), length=length, salt=b"ivp/device/v1",
            info=purpose.encode(),
        ).derive(self._secret())

    def _aead(self, purpose: str) -> AESGCM:
        """The seal cipher of ``purpose``, derived once per process (an HKDF per seal
        was a tenth of the gateway's log-thread CPU), held in memory like the UID."""
        aead = self._aeads.get(purpose)
        if aead is None:
            aead = self._aeads[purpose] = AESGCM(self.derive_key("seal/" + purpose))
        self._secret()  # after caching: a tamper meanwhile drops the cache again
        return aead

    def signer(self) -> SigningKey:
        """The Ed25519 key derived from the UID (in memory, like the UID itself)."""
        self._secret()
        assert self._signing is not None
        return self._signing

    @property
    def public_key(self) -> VerifyKey:
        return self.signer().verify_key

    def sign(self, data: bytes) -> bytes:
        return self.signer().sign(data)

    # --- TRNG -------------------------------------------------------------------------------
    def random(self, n: int) -> bytes:
        self._secret()
        return os.urandom(n)  # the OS CSPRNG (what secrets.token_bytes reads)

    def random_u64(self) -> int:
        return int.from_bytes(self.random(8), "little")

    # --- sealed storage --------------------------------------------------------------------
    def seal(self, purpose: str, plaintext: bytes, aad: bytes = b"") -> bytes:
        """AES-256-GCM under a purpose key; output = 12-byte nonce || ciphertext+tag."""
        return seal_with(self._aead(purpose), plaintext, aad)

    def unseal(self, purpose: str, sealed: bytes, aad: bytes = b"") -> bytes:
        """Raises:
        BrickedError: the device was tampered with.
        PeerDataError: the sealed bytes were altered or sealed by another device.
        """
        return unseal_with(self._aead(purpose), purpose, sealed, aad)
