"""Inspector keys in an HSM (PKCS#11): the private key is made inside the token and
never leaves it.

``ivp keys new --pkcs11 MODULE --token LABEL`` generates an Ed25519 key pair on the
token (``CKM_EC_EDWARDS_KEY_PAIR_GEN``; the private key ``CKA_SENSITIVE``, not
``CKA_EXTRACTABLE``, a token object) and writes, in place of a private key file, a
*reference* ``NAME.key``: JSON naming the module, the token, the key's label and its
public key. Nothing in it is secret. Every command that signs loads keys through
:func:`ivp.whitelist.keyfiles.load_signing_key`, which turns such a reference into a
:class:`Pkcs11Signer`: it logs into the token with the user PIN (from the same sources
as a passphrase: ``$IVP_KEY_PASSPHRASE_FILE``, ``$IVP_KEY_PASSPHRASE`` or a prompt),
finds the private key by label, checks that the token's public key for that label is
the one the reference names (a reference edited to another key, or a token holding
another key under that label, signs nothing), and signs with ``CKM_EDDSA``.

Built on the maintained ``python-pkcs11`` library (``pip install 'ivp[hsm]'``); tested
against SoftHSM 2 (Debian ``softhsm2``). Ed25519 needs a token with EdDSA (PKCS#11
3.0 mechanisms: SoftHSM ≥ 2.6, most current HSMs).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ivp.errors import MisuseError, ValidationError
from ivp.protocol.keys import VerifyKey

#: the JSON key a reference file is recognised by
REF = "pkcs11"
#: DER of the named curve edwards25519 (OID 1.3.101.112), CKA_EC_PARAMS
_ED25519_PARAMS_OID = "1.3.101.112"


def _lib() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise MisuseError("PKCS#11 keys need the python-pkcs11 package "
                          "(pip install 'ivp[hsm]')") from None
    return pkcs11


@dataclass(frozen=True)
class Reference:
    """What a reference ``NAME.key`` names: where the key lives, and which key it is."""

    module: str  # the PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so
    token: str  # the token's label
    label: str  # the key pair's CKA_LABEL
    public_key: str  # VerifyKey text of the key pair's public half

    def to_bytes(self) -> bytes:
        return json.dumps({REF: {"module": self.module, "token": self.token,
                                 "label": self.label},
                           "public_key": self.public_key}, indent=2).encode() + b"\n"


def is_reference(path: Path) -> bool:
    """Whether ``path`` is a PKCS#11 reference (JSON) rather than a private key file."""
    with open(path, "rb") as f:
        head = f.read(1)
    if head != b"{":
        return False
    try:
        return REF in json.loads(Path(path).read_bytes())
    except ValueError:
        return False


def read_reference(path: Path) -> Reference:
    """Raises: ValidationError: not a well-formed reference."""
    try:
        doc = json.loads(Path(path).read_bytes())
        ref = doc[REF]
        out = Reference(str(ref["module"]), str(ref["token"]), str(ref["label"]),
                        VerifyKey.from_hex(str(doc["public_key"])).hex)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValidationError(f"{path}: not a PKCS#11 key reference: {exc}") from None
    return out


def _public_of(pub: Any) -> VerifyKey:
    """The VerifyKey of a token's Ed25519 public key object (CKA_EC_POINT, DER OCTET
    STRING of the 32-byte point, or the raw point on some tokens)."""
    pk = _lib()
    point = bytes(pub[pk.Attribute.EC_POINT])
    if len(point) == 34 and point[:2] == b"\x04\x20":
        point = point[2:]
    if len(point) != 32:
        raise ValidationError("the token's key is not an Ed25519 key")
    return VerifyKey.from_hex(point.hex())


def _token(module: str, token: str) -> Any:
    pk = _lib()
    if not os.path.isfile(module):
        raise ValidationError(f"PKCS#11 module {module}: no such file")
    try:
        return pk.lib(module).get_token(token_label=token)
    except (pk.NoSuchToken, pk.MultipleTokensReturned):
        raise ValidationError(f"no single PKCS#11 token labelled {token!r} in {module}") from None


#: one logged-in session per (module, token) and process: PKCS#11 login state belongs to
#: the application, so a second login fails and any session's logout ends all of them;
#: kept with the SHA-256 of the PIN it was opened with (a later, different PIN is wrong)
_SESSIONS: dict[tuple[str, str], tuple[Any, bytes]] = {}


def _session(module: str, token: str, pin: bytes) -> Any:
    """The process's logged-in read-write session on ``token``.

    Raises:
        ValidationError: no such module or token; a wrong PIN.
    """
    pk = _lib()
    digest = hashlib.sha256(pin).digest()
    cached = _SESSIONS.get((module, token))
    if cached is not None:
        if not hmac.compare_digest(cached[1], digest):
            raise ValidationError(f"wrong PIN for token {token!r}")
        return cached[0]
    tok = _token(module, token)
    try:
        session = tok.open(user_pin=pin.decode(), rw=True)
    except pk.PinIncorrect:
        raise ValidationError(f"wrong PIN for token {token!r}") from None
    except pk.PKCS11Error as exc:
        raise ValidationError(f"token {token!r}: {type(exc).__name__} {exc}") from None
    _SESSIONS[(module, token)] = (session, digest)
    return session


def generate(module: str, token: str, label: str, pin: bytes) -> VerifyKey:
    """Make an Ed25519 key pair labelled ``label`` inside the token; its public key.

    Raises:
        ValidationError: no such module or token, a wrong PIN, a label already used,
            or a token without EdDSA.
    """
    pk = _lib()
    from pkcs11.util.ec import encode_named_curve_parameters

    session = _session(module, token, pin)
    if list(session.get_objects({pk.Attribute.LABEL: label})):
        raise ValidationError(f"token {token!r} already holds a key labelled {label!r}")
    try:
        params = session.create_domain_parameters(
            pk.KeyType.EC_EDWARDS,
            {pk.Attribute.EC_PARAMS: encode_named_curve_parameters(_ED25519_PARAMS_OID)},
            local=True)
        pub, _priv = params.generate_keypair(
            store=True, label=label,
            private_template={pk.Attribute.SENSITIVE: True, pk.Attribute.EXTRACTABLE: False})
        return _public_of(pub)
    except pk.PKCS11Error as exc:
        raise ValidationError(f"token {token!r}: {type(exc).__name__} {exc}") from None


class Pkcs11Signer:
    """A :class:`~ivp.protocol.keys.Signer` whose private key is in a PKCS#11 token.

    Raises (at construction):
        ValidationError: no such module, token or key; a wrong PIN; the token's key
            under that label is not the one the reference names.
    """

    def __init__(self, ref: Reference, pin: bytes) -> None:
        pk = _lib()
        self.ref = ref
        self._session = _session(ref.module, ref.token, pin)
        try:
            pub = self._session.get_key(pk.ObjectClass.PUBLIC_KEY, pk.KeyType.EC_EDWARDS,
                                        label=ref.label)
            self._priv = self._session.get_key(pk.ObjectClass.PRIVATE_KEY,
                                               pk.KeyType.EC_EDWARDS, label=ref.label)
        except (pk.NoSuchKey, pk.MultipleObjectsReturned):
            raise ValidationError(f"token {ref.token!r} holds no single Ed25519 key "
                                  f"labelled {ref.label!r}") from None
        self._public = _public_of(pub)
        if self._public.hex != ref.public_key:
            raise ValidationError(f"token {ref.token!r}: the key labelled {ref.label!r} is "
                                  "not the key this reference names")

    @property
    def verify_key(self) -> VerifyKey:
        return self._public

    @property
    def keyid(self) -> str:
        return self._public.keyid

    def sign(self, data: bytes) -> bytes:
        """Ed25519 (CKM_EDDSA, pure) over ``data``, made by the token."""
        pk = _lib()
        return bytes(self._priv.sign(data, mechanism=pk.Mechanism.EDDSA))


__all__ = ["REF", "Pkcs11Signer", "Reference", "generate", "is_reference", "read_reference"]
