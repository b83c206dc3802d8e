"""Inspector key files at rest, and where their passphrase comes from.

An inspector's private key signs whitelists and admin requests: whoever copies the
file holds a share of the quorum. So ``ivp keys new`` encrypts it under a passphrase
(OpenSSH key format, bcrypt-pbkdf + AES-256-CTR: see :mod:`ivp.protocol.keys`) and
writes plaintext only when told ``--insecure-plaintext``.

The passphrase comes, in this order, from ``ivp keys new --passphrase-file``, the file
named by ``$IVP_KEY_PASSPHRASE_FILE``, ``$IVP_KEY_PASSPHRASE``, or a hidden prompt
when standard input is a terminal. Every command that signs (``ivp whitelist``,
``ivp admin``) loads keys through :func:`load_signing_key`. A key file may instead be a
PKCS#11 reference (``ivp keys new --pkcs11``, :mod:`ivp.whitelist.pkcs11`): the key is
then in an HSM, and the same sources give the token's PIN.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from ivp.errors import ValidationError
from ivp.protocol.keys import Signer, SigningKey

PASSPHRASE_ENV = "IVP_KEY_PASSPHRASE"
PASSPHRASE_FILE_ENV = "IVP_KEY_PASSPHRASE_FILE"
_HOW = (f"set ${PASSPHRASE_FILE_ENV} (a file holding it) or ${PASSPHRASE_ENV}, or run on "
        "a terminal to be asked")


def _read_file(path: Path) -> bytes:
    try:
        text = Path(path).read_bytes().split(b"\n", 1)[0].rstrip(b"\r")
    except OSError as exc:
        raise ValidationError(f"passphrase file {path}: {exc.strerror}") from None
    if not text:
        raise ValidationError(f"passphrase file {path} is empty")
    return text


def passphrase(file: Path | None = None, *, prompt: str, confirm: bool = False) -> bytes | None:
    """The passphrase from the first source that has one; None if there is none.

    Raises:
        ValidationError: an unreadable or empty passphrase file; prompted twice and the
            answers differ; an empty answer.
    """
    if file is not None:
        return _read_file(file)
    if os.environ.get(PASSPHRASE_FILE_ENV):
        return _read_file(Path(os.environ[PASSPHRASE_FILE_ENV]))
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV].encode()
    if not sys.stdin.isatty():
        return None
    first = getpass.getpass(prompt)
    if not first:
        raise ValidationError("an empty passphrase protects nothing")
    if confirm and getpass.getpass("again: ") != first:
        raise ValidationError("the two passphrases differ")
    return first.encode()


def new_key_passphrase(file: Path | None, insecure_plaintext: bool) -> bytes | None:
    """The passphrase to encrypt a new key under; None only with ``insecure_plaintext``.

    Raises:
        ValidationError: no passphrase and no ``insecure_plaintext``.
    """
    if insecure_plaintext:
        if file is not None:
            raise ValidationError("--passphrase-file and --insecure-plaintext contradict")
        return None
    secret = passphrase(file, prompt="passphrase for the new key: ", confirm=True)
    if secret is None:
        raise ValidationError(f"a new key is encrypted at rest: pass --passphrase-file, {_HOW} "
                              "(or, knowingly, --insecure-plaintext)")
    return secret


def load_signing_key(path: Path) -> Signer:
    """Load a private key file, asking for its passphrase if it is encrypted; or, for a
    PKCS#11 reference, log into its token (asking for the PIN the same way).

    Raises:
        ValidationError: not a key file; encrypted and no passphrase available; wrong
            passphrase; a reference whose token, PIN or key does not answer.
    """
    from ivp.whitelist import pkcs11

    path = Path(path)
    try:
        if pkcs11.is_reference(path):
            ref = pkcs11.read_reference(path)
            pin = passphrase(prompt=f"PIN of token {ref.token!r} for {path}: ")
            if pin is None:
                raise ValidationError(f"{path} is a key in PKCS#11 token {ref.token!r}: "
                                      f"its PIN: {_HOW}")
            return pkcs11.Pkcs11Signer(ref, pin)
        encrypted = SigningKey.is_encrypted(path)
    except OSError as exc:
        raise ValidationError(f"{path}: {exc.strerror}") from None
    if not encrypted:
        key = SigningKey.load(path)
        print(f"warning: {path} is not encrypted at rest", file=sys.stderr)
        return key
    secret = passphrase(prompt=f"passphrase for {path}: ")
    if secret is None:
        raise ValidationError(f"{path} is encrypted: {_HOW}")
    return SigningKey.load(path, secret)
