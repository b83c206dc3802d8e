"""Inspector keys in an HSM (``ivp keys new --pkcs11``, ``ivp.whitelist.pkcs11``),
against SoftHSM 2: the key pair is made in the token; what the disk holds is a
reference with no secret; signing needs the token and its PIN; a reference pointed at
another key signs nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ivp.cli import app
from ivp.errors import ValidationError
from ivp.protocol import envelope as env
from ivp.protocol.keys import VerifyKey
from ivp.whitelist.keyfiles import PASSPHRASE_FILE_ENV, load_signing_key

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN, SO_PIN = "4711-pin", "so-pin-0815"


def _missing() -> str | None:
    if shutil.which("softhsm2-util") is None or not os.path.isfile(MODULE):
        return "SoftHSM 2 is not installed (scripts/system-deps.sh installs softhsm2)"
    if importlib.util.find_spec("pkcs11") is None:
        return "python-pkcs11 is not installed (make installs ivp[dev])"
    return None


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """SoftHSM tokens 'us-hsm' and 'other-hsm' of this module's own, made before the
    PKCS#11 library is first loaded in this process (SoftHSM reads its configuration
    once). Skipped where SoftHSM is missing; in CI a missing SoftHSM fails instead."""
    missing = _missing()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    root = tmp_path_factory.mktemp("hsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    before = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    for label in ("us-hsm", "other-hsm"):
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                        "--pin", PIN, "--so-pin", SO_PIN], check=True, capture_output=True)
    pin = root / "pin"
    pin.write_text(PIN + "\n")
    yield pin
    if before is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = before


@pytest.fixture
def hsm(tokens: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The tokens, the PIN named by $IVP_KEY_PASSPHRASE_FILE, a fresh key directory
    (each test names its keys apart: the tokens are shared by the module)."""
    monkeypatch.setenv(PASSPHRASE_FILE_ENV, str(tokens))
    return {"pin": tokens, "out": tmp_path / "keys"}


def _new(out: Path, name: str, token: str = "us-hsm", *extra: str) -> object:
    return CliRunner().invoke(app, ["keys", "new", "--out", str(out), "--name", name,
                                    "--party", "US", "--pkcs11", MODULE, "--token", token,
                                    *extra])


def test_key_made_in_the_token_signs_and_the_disk_holds_no_secret(hsm: dict[str, Path]
                                                                  ) -> None:
    out = hsm["out"]
    result = _new(out, "us-1")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    ref = json.loads((out / "us-1.key").read_text())
    pub = json.loads((out / "us-1.pub.json").read_text())
    assert ref["pkcs11"] == {"module": MODULE, "token": "us-hsm", "label": "us-1"}
    assert ref["public_key"] == pub["public_key"] and set(ref) == {"pkcs11", "public_key"}
    signer = load_signing_key(out / "us-1.key")
    assert signer.keyid == pub["keyid"]
    signed = env.sign(env.ADMIN, b'{"x":1}', [signer])
    assert env.open_signed(signed, env.ADMIN, VerifyKey.from_hex(pub["public_key"])) \
        == b'{"x":1}'
    # the private key is not extractable: nothing the token hands out contains it
    import pkcs11

    token = pkcs11.lib(MODULE).get_token(token_label="us-hsm")
    with token.open() as session:  # the process is logged in (the signer's session)
        priv = session.get_key(pkcs11.ObjectClass.PRIVATE_KEY, label="us-1")
        assert priv[pkcs11.Attribute.SENSITIVE] and not priv[pkcs11.Attribute.EXTRACTABLE]
        with pytest.raises(pkcs11.PKCS11Error):
            priv[pkcs11.Attribute.VALUE]


def test_whitelist_signed_by_an_hsm_key_meets_the_policy(hsm: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """ivp whitelist build with an HSM key for US and a file key for CN: the quorum
    policy counts both."""
    out = hsm["out"]
    assert _new(out, "us-wl").exit_code == 0  # type: ignore[attr-defined]
    runner = CliRunner()
    r = runner.invoke(app, ["keys", "new", "--out", str(out), "--name", "cn-1", "--party",
                            "CN"])
    assert r.exit_code == 0, r.output
    policy = tmp_path / "policy.json"
    r = runner.invoke(app, ["keys", "policy", str(out / "us-wl.pub.json"),
                            str(out / "cn-1.pub.json"), "--threshold", "2", "--out",
                            str(policy)])
    assert r.exit_code == 0, r.output
    from ivp.protocol.encoding import decode
    from ivp.protocol.quorum import QuorumPolicy

    pol = decode(policy.read_bytes(), QuorumPolicy)
    us, cn = load_signing_key(out / "us-wl.key"), load_signing_key(out / "cn-1.key")
    assert pol.check(env.sign(env.WHITELIST, b"{}", [us, cn])).ok
    assert not pol.check(env.sign(env.WHITELIST, b"{}", [cn])).ok  # the HSM key counts


def test_wrong_pin_another_token_or_an_edited_reference_sign_nothing(
        hsm: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = hsm["out"]
    assert _new(out, "us-3a").exit_code == 0  # type: ignore[attr-defined]
    assert _new(out, "us-3b").exit_code == 0  # type: ignore[attr-defined]
    ref = json.loads((out / "us-3a.key").read_text())
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("not-the-pin\n")
    monkeypatch.setenv(PASSPHRASE_FILE_ENV, str(wrong))
    with pytest.raises(ValidationError, match="wrong PIN"):
        load_signing_key(out / "us-3a.key")
    monkeypatch.setenv(PASSPHRASE_FILE_ENV, str(hsm["pin"]))
    # the reference copied to a machine whose token is another one
    moved = dict(ref, pkcs11=dict(ref["pkcs11"], token="other-hsm"))
    (tmp_path / "moved.key").write_text(json.dumps(moved))
    with pytest.raises(ValidationError, match="no single Ed25519 key"):
        load_signing_key(tmp_path / "moved.key")
    # the reference edited to name another key of the token under this label (or the token's key
    # under that label swapped): refused, not signed with the wrong key
    us2 = json.loads((out / "us-3b.key").read_text())
    edited = dict(ref, public_key=us2["public_key"])
    (tmp_path / "edited.key").write_text(json.dumps(edited))
    with pytest.raises(ValidationError, match="not the key this reference names"):
        load_signing_key(tmp_path / "edited.key")


def test_keys_new_pkcs11_refuses_what_it_cannot_do(hsm: dict[str, Path]) -> None:
    out = hsm["out"]
    r = CliRunner().invoke(app, ["keys", "new", "--out", str(out), "--name", "x", "--party",
                                 "US", "--pkcs11", MODULE])
    assert r.exit_code != 0 and "--token" in r.output
    r = _new(out, "y", "us-hsm", "--insecure-plaintext")
    assert r.exit_code != 0 and "contradict" in r.output  # type: ignore[attr-defined]
    r = _new(out, "z", "us-hsm", "--type", "ecdsa-p256")
    assert r.exit_code != 0 and "Ed25519" in r.output  # type: ignore[attr-defined]
    r = _new(out, "w", "no-such-token")
    assert r.exit_code != 0 and "no single PKCS#11 token" in r.output  # type: ignore[attr-defined]
    assert not list(out.glob("*.key"))
