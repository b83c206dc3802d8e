"""A device whose secrets are held by a TPM 2.0 (``ivp gateway --device tpm``).

Each secret of the :class:`~ivp.device.Device` interface lives in the TPM, bound to
its storage hierarchy's primary seed, which never leaves the chip:

- **signing key**: an ECDSA P-256 primary key (TPMs commonly lack Ed25519), created
  inside the TPM from the seed and this device's label; ``fixedTPM``: the private key
  can be neither read nor duplicated. Only the public key is exported, for enrolment.
  Every signature is made by the TPM (TPM2_Sign over the SHA-256 of the message).
- **derived keys and sealed storage**: a keyed-hash (HMAC-SHA256) primary key, also
  ``fixedTPM``; ``derive_key(purpose)`` is HKDF-Expand of the TPM's HMAC of the purpose,
  so the log's encryption key exists only while this TPM answers. Sealing is AES-256-GCM
  under such a key (per record a TPM round trip would cost the log its throughput).
- **TRNG**: TPM2_GetRandom, read in blocks.
- **tamper = brick**: :meth:`TpmDevice.tamper` clears the TPM (TPM2_Clear): the storage
  seed is replaced, so neither key can ever be made again and no sealed byte can ever
  be opened, by anyone. A restart finds another public key than the one recorded at
  first power-on and stays bricked.

What this does not stop, and docs/TRUST.md says: a root operator on the same host can
*use* the TPM's keys (ask it to sign) while the host runs, since nothing binds them to
a measured boot here; the TPM prevents copying them elsewhere and makes a tamper final.
One TPM per device: a tamper clears the whole TPM.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from ivp.device.soft import seal_with, unseal_with
from ivp.errors import BrickedError, MisuseError, TransportError
from ivp.protocol.keys import P256, VerifyKey, low_s_der

log = logging.getLogger(__name__)

_STATE = "tpm.json"
_BRICK = "BRICKED"
_RECHECK = 0.05  # seconds between checks for a brick marker (as in the soft device)
_RANDOM_BLOCK = 64  # bytes per TPM2_GetRandom (at most the largest digest a TPM has)
_RANDOM_BUFFER = 1024  # bytes kept from the TPM's RNG, refilled when used up
DEFAULT_TCTI = "device:/dev/tpmrm0"  # the kernel's resource manager of a real TPM


def _tpm() -> Any:
    """The tpm2-pytss module, with the TSS's own logging quiet (errors are raised)."""
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    try:
        import tpm2_pytss
    except ImportError:
        raise MisuseError("the TPM device needs tpm2-pytss (and the TSS libraries): run "
                          "`make .venv/.installed` as root, or scripts/system-deps.sh") from None
    return tpm2_pytss


class TpmDevice:
    """The :class:`~ivp.device.Device` interface filled by a TPM 2.0.

    ``state_dir`` holds no secret: a random label (which makes this device's keys
    distinct from any other user of the TPM) and the public key recorded at first
    power-on. ``tcti`` names the TPM: ``device:/dev/tpmrm0`` (a real TPM) or
    ``swtpm:host=127.0.0.1,port=N`` (the software TPM the tests start).

    Raises:
        TransportError: the TPM does not answer.
    """

    def __init__(self, state_dir: Path, tcti: str = DEFAULT_TCTI) -> None:
        self._dir = Path(state_dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._marker = os.fspath(self._dir / _BRICK)
        self.tcti = tcti
        self._lock = threading.Lock()  # the TSS context is not thread-safe
        self._bricked = False
        self._recheck_at = 0.0
        self._aeads: dict[str, AESGCM] = {}
        self._random = b""
        self._esys: Any = None
        self._sign_key: Any = None
        self._hmac_key: Any = None
        self._public: VerifyKey | None = None
        if os.path.exists(self._marker):
            self._bricked = True
            return
        t = _tpm()
        try:
            self._esys = t.ESAPI(tcti)
        except t.TSS2_Exception as exc:
            raise TransportError(f"no TPM at {tcti!r}: {exc}") from None
        self._flush_stale()
        state = self._load_state()
        self._sign_key, self._public = self._signing_primary(state["label"])
        self._hmac_key = self._hmac_primary(state["label"])
        recorded = state.get("public_key")
        if recorded is None:
            state["public_key"] = self._public.hex
            self._save_state(state)
        elif recorded != self._public.hex:
            # The seed changed: this TPM was cleared (a tamper) or is another TPM.
            log.error("TPM %s does not hold this device's key: bricked", tcti)
            self._mark_bricked()

    # --- set-up ---------------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        path = self._dir / _STATE
        if path.exists():
            return dict(json.loads(path.read_text()))
        return {"label": bytes(self._esys.get_random(16)).hex()}

    def _save_state(self, state: dict[str, Any]) -> None:
        path = self._dir / _STATE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, sort_keys=True) + "\n")
        os.replace(tmp, path)

    def _flush_stale(self) -> None:
        """Flush transient objects an earlier process left (without a resource manager
        they stay loaded and fill the TPM's few object slots)."""
        t = _tpm()
        _, capability = self._esys.get_capability(  # keep it: the list lives inside it
            t.TPM2_CAP.HANDLES, t.TPM2_HC.TRANSIENT_FIRST, 64)
        for handle in list(capability.data.handles):
            try:
                self._esys.flush_context(self._esys.tr_from_tpmpublic(handle))
            except t.TSS2_Exception:
                continue  # not ours to flush (a resource manager hides others' anyway)

    @staticmethod
    def _attributes() -> Any:
        a = _tpm().TPMA_OBJECT
        return (a.SIGN_ENCRYPT | a.FIXEDTPM | a.FIXEDPARENT | a.SENSITIVEDATAORIGIN
                | a.USERWITHAUTH | a.NODA)

    def _signing_primary(self, label: str) -> tuple[Any, VerifyKey]:
        """The ECDSA P-256 key: derived by the TPM from its seed and the template, whose
        ``unique`` field carries this device's label (so it is the same key at every
        power-on, and a different key on any other TPM or after a clear)."""
        t = _tpm()
        template = t.TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256",
                                        objectAttributes=self._attributes())
        template.publicArea.unique.ecc.x = hashlib.sha256(
            b"ivp/identity/" + label.encode()).digest()
        handle, public, *_ = self._esys.create_primary(
            t.TPM2B_SENSITIVE_CREATE(), template, t.ESYS_TR.OWNER)
        point = public.publicArea.unique.ecc
        x, y = bytes(point.x).rjust(32, b"\0"), bytes(point.y).rjust(32, b"\0")
        compressed = bytes([2 + (y[-1] & 1)]) + x
        return handle, VerifyKey(compressed, P256)

    def _hmac_primary(self, label: str) -> Any:
        t = _tpm()
        template = t.TPM2B_PUBLIC.parse("hmac:sha256", objectAttributes=self._attributes())
        template.publicArea.unique.keyedHash = hashlib.sha256(
            b"ivp/derive/" + label.encode()).digest()
        handle, *_ = self._esys.create_primary(
            t.TPM2B_SENSITIVE_CREATE(), template, t.ESYS_TR.OWNER)
        return handle

    # --- tamper = brick -------------------------------------------------------------------
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
        self._bricked = True
        self._aeads = {}
        self._random = b""
        self._sign_key = self._hmac_key = None

    def _mark_bricked(self) -> None:
        self._forget()
        (self._dir / _BRICK).write_text("tamper detected: TPM cleared\n")

    def tamper(self) -> None:
        """The tamper mesh fired: clear the TPM, for good. Irreversible.

        The brick marker and the in-memory state go first, so the device does nothing
        from here on even if the TPM cannot be reached to be cleared (that is logged).
        """
        if self._esys is None:  # bricked before this process started
            self._mark_bricked()
            return
        self._mark_bricked()
        t = _tpm()
        with self._lock:
            try:
                self._esys.clear(t.ESYS_TR.LOCKOUT)  # new storage seed: keys unrecoverable
            except t.TSS2_Exception as exc:
                log.error("tamper: TPM2_Clear failed (%s); the device is bricked in "
                          "software only", exc)

    def _check(self) -> None:
        if self.bricked:
            raise BrickedError("device is bricked (tamper detected): it does nothing")
        if self._esys is None:
            raise MisuseError("the TPM device was closed")

    def _call(self, fn: Any, *args: Any) -> Any:
        """One TPM command under the lock; a dead TPM is a transport error."""
        t = _tpm()
        with self._lock:
            self._check()
            try:
                return fn(*args)
            except t.TSS2_Exception as exc:
                raise TransportError(f"TPM {self.tcti}: {exc}") from None

    # --- keys -----------------------------------------------------------------------------
    @property
    def public_key(self) -> VerifyKey:
        self._check()
        assert self._public is not None
        return self._public

    @property
    def verify_key(self) -> VerifyKey:
        return self.public_key

    @property
    def keyid(self) -> str:
        return self.public_key.keyid

    def signer(self) -> TpmDevice:
        """The device signs for itself: its private key has no other home."""
        self._check()
        return self

    def sign(self, data: bytes) -> bytes:
        """ECDSA P-256 over SHA-256(data), made by the TPM; low-S DER."""
        t = _tpm()
        scheme = t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.ECDSA)
        scheme.details.any.hashAlg = t.TPM2_ALG.SHA256
        ticket = t.TPMT_TK_HASHCHECK(tag=t.TPM2_ST.HASHCHECK, hierarchy=t.TPM2_RH.NULL)
        digest = t.TPM2B_DIGEST(hashlib.sha256(data).digest())
        sig = self._call(lambda: self._esys.sign(self._sign_key, digest, scheme, ticket))
        r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
        return low_s_der(encode_dss_signature(r, s))

    def derive_key(self, purpose: str, length: int = 32) -> bytes:
        """HKDF-Expand of the TPM's HMAC of ``purpose``: only this TPM can make it."""
        t = _tpm()
        prk = self._call(lambda: bytes(self._esys.hmac(
            self._hmac_key, b"ivp/device/v1/" + purpose.encode(), t.TPM2_ALG.SHA256)))
        return HKDFExpand(hashes.SHA256(), length, purpose.encode()).derive(prk)

    # --- TRNG -----------------------------------------------------------------------------
    def random(self, n: int) -> bytes:
        with self._lock:
            self._check()
            t = _tpm()
            while len(self._random) < n:
                try:
                    blocks = [bytes(self._esys.get_random(_RANDOM_BLOCK))
                              for _ in range(max(1, (_RANDOM_BUFFER + n) // _RANDOM_BLOCK))]
                except t.TSS2_Exception as exc:
                    raise TransportError(f"TPM {self.tcti}: {exc}") from None
                self._random += b"".join(blocks)
            out, self._random = self._random[:n], self._random[n:]
            return out

    def random_u64(self) -> int:
        return int.from_bytes(self.random(8), "little")

    # --- sealed storage -------------------------------------------------------------------
    def _aead(self, purpose: str) -> AESGCM:
        aead = self._aeads.get(purpose)
        if aead is None:
            aead = self._aeads[purpose] = AESGCM(self.derive_key("seal/" + purpose))
        self._check()  # after caching: a tamper meanwhile drops the cache again
        return aead

    def seal(self, purpose: str, plaintext: bytes, aad: bytes = b"") -> bytes:
        return seal_with(self._aead(purpose), plaintext, aad)

    def unseal(self, purpose: str, sealed: bytes, aad: bytes = b"") -> bytes:
        """Raises:
        BrickedError: the device was tampered with.
        PeerDataError: the sealed bytes were altered or sealed by another device.
        """
        return unseal_with(self._aead(purpose), purpose, sealed, aad)

    def close(self) -> None:
        """Flush this device's keys from the TPM and drop the connection."""
        if self._esys is None:
            return
        t = _tpm()
        with self._lock:
            for handle in (self._sign_key, self._hmac_key):
                if handle is not None:
                    with contextlib.suppress(t.TSS2_Exception):
                        self._esys.flush_context(handle)
            self._sign_key = self._hmac_key = None
            self._esys.close()
            self._esys = None
