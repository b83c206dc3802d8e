"""The emulated secure device (ivp.device.SoftDevice): UID-derived keys, sealing, brick."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from ivp.device import Device, SoftDevice
from ivp.errors import BrickedError, PeerDataError, SignatureError


def test_keys_are_deterministic_across_restarts(tmp_path: Path) -> None:
    a = SoftDevice(tmp_path / "dev")
    b = SoftDevice(tmp_path / "dev")  # power cycle: same UID, same keys
    assert a.public_key == b.public_key
    assert a.derive_key("log") == b.derive_key("log")
    assert a.sign(b"m") == b.sign(b"m")
    b.public_key.verify(a.sign(b"m"), b"m")


def test_keys_differ_by_purpose_and_device(tmp_path: Path) -> None:
    a = SoftDevice(tmp_path / "a")
    b = SoftDevice(tmp_path / "b")
    assert a.public_key != b.public_key
    assert a.derive_key("log") != b.derive_key("log")
    assert a.derive_key("log") != a.derive_key("seal/log")
    assert len(a.derive_key("x", 64)) == 64
    with pytest.raises(SignatureError):
        b.public_key.verify(a.sign(b"m"), b"m")


def test_uid_file_is_private(tmp_path: Path) -> None:
    dev = SoftDevice(tmp_path / "dev")
    files = list((tmp_path / "dev").iterdir())
    assert [f.name for f in files] == ["uid.secret"]
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert len(files[0].read_bytes()) == 32
    assert not dev.bricked


def test_random(tmp_path: Path) -> None:
    dev = SoftDevice(tmp_path / "dev")
    assert len(dev.random(16)) == 16
    assert dev.random(16) != dev.random(16)
    values = {dev.random_u64() for _ in range(50)}
    assert len(values) == 50 and all(0 <= v < 2**64 for v in values)


def test_satisfies_device_protocol(tmp_path: Path) -> None:
    dev: Device = SoftDevice(tmp_path / "dev")  # type-checks against the interface
    assert dev.public_key.raw == dev.signer().verify_key.raw


# --- sealed storage ------------------------------------------------------------------------
def test_seal_unseal(tmp_path: Path) -> None:
    dev = SoftDevice(tmp_path / "dev")
    sealed = dev.seal("log", b"secret pair", aad=b"row 7")
    assert b"secret pair" not in sealed
    assert len(sealed) == 12 + len(b"secret pair") + 16
    assert dev.unseal("log", sealed, aad=b"row 7") == b"secret pair"
    assert dev.seal("log", b"x") != dev.seal("log", b"x")  # fresh nonce each time
    assert SoftDevice(tmp_path / "dev").unseal("log", sealed, aad=b"row 7") == b"secret pair"
    assert dev.unseal("log", dev.seal("log", b"")) == b""


def test_unseal_of_tampered_bytes(tmp_path: Path) -> None:
    """The operator holds the disk: any change to sealed bytes is detected."""
    dev = SoftDevice(tmp_path / "dev")
    sealed = dev.seal("log", b"secret pair", aad=b"row 7")
    for i in (0, 11, 12, len(sealed) - 1):
        bad = bytearray(sealed)
        bad[i] ^= 0x01
        with pytest.raises(PeerDataError, match="corrupt or not ours"):
            dev.unseal("log", bytes(bad), aad=b"row 7")
    for bad_bytes in (sealed[:-1], sealed[:20], sealed[:12], sealed[:5], b""):
        with pytest.raises(PeerDataError):
            dev.unseal("log", bad_bytes, aad=b"row 7")
    with pytest.raises(PeerDataError):
        dev.unseal("log", sealed, aad=b"row 8")  # moved to another row
    with pytest.raises(PeerDataError):
        dev.unseal("other", sealed, aad=b"row 7")  # another purpose's key
    with pytest.raises(PeerDataError):
        SoftDevice(tmp_path / "other").unseal("log", sealed, aad=b"row 7")  # other device


# --- tamper = brick ------------------------------------------------------------------------
OPS: dict[str, Callable[[SoftDevice], Any]] = {
    "public_key": lambda d: d.public_key,
    "signer": lambda d: d.signer(),
    "sign": lambda d: d.sign(b"m"),
    "derive_key": lambda d: d.derive_key("log"),
    "random": lambda d: d.random(8),
    "random_u64": lambda d: d.random_u64(),
    "seal": lambda d: d.seal("log", b"x"),
    "unseal": lambda d: d.unseal("log", b"\x00" * 40),
}


def _dir_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())


@pytest.fixture
def bricked(tmp_path: Path) -> tuple[SoftDevice, Path, dict[str, bytes]]:
    state = tmp_path / "dev"
    dev = SoftDevice(state)
    secrets = {
        "uid": (state / "uid.secret").read_bytes(),
        "identity seed": dev.derive_key("identity/ed25519"),
        "identity private": dev.signer()._private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption()),
        "log key": dev.derive_key("log"),
        "seal key": dev.derive_key("seal/log"),
    }
    secrets["sealed"] = dev.seal("log", b"pair")  # not a secret, kept for the unseal check
    dev.tamper()
    return dev, state, secrets


@pytest.mark.parametrize("op", list(OPS))
def test_tamper_bricks_every_operation(
    bricked: tuple[SoftDevice, Path, dict[str, bytes]], op: str
) -> None:
    dev, state, _ = bricked
    assert dev.bricked
    with pytest.raises(BrickedError):
        OPS[op](dev)
    with pytest.raises(BrickedError):  # still bricked after a restart
        OPS[op](SoftDevice(state))


def test_bricked_device_cannot_open_old_sealed_data(
    bricked: tuple[SoftDevice, Path, dict[str, bytes]]
) -> None:
    dev, state, secrets = bricked
    with pytest.raises(BrickedError):
        dev.unseal("log", secrets["sealed"])
    with pytest.raises(BrickedError):
        SoftDevice(state).unseal("log", secrets["sealed"])


def test_no_secret_recoverable_from_state_dir(
    bricked: tuple[SoftDevice, Path, dict[str, bytes]]
) -> None:
    dev, state, secrets = bricked
    SoftDevice(state)  # a restart must not recreate anything either
    assert not (state / "uid.secret").exists()
    assert not list(state.glob("*.tmp"))
    everything = _dir_bytes(state)
    for name, value in secrets.items():
        if name != "sealed":
            assert value not in everything, f"{name} recoverable from the state dir"
    assert dev._uid is None and dev._signing is None  # and none held in memory


def test_tamper_is_idempotent(bricked: tuple[SoftDevice, Path, dict[str, bytes]]) -> None:
    dev, state, _ = bricked
    dev.tamper()
    SoftDevice(state).tamper()
    assert SoftDevice(state).bricked


def test_removing_brick_marker_gives_a_stranger(
    bricked: tuple[SoftDevice, Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """An operator who deletes the marker gets a new device with a new identity, which
    the recomputer never enrolled, and the old sealed log stays unreadable."""
    _, state, secrets = bricked
    os.remove(state / "BRICKED")
    reborn = SoftDevice(state)
    assert not reborn.bricked
    assert reborn.derive_key("identity/ed25519") != secrets["identity seed"]
    with pytest.raises(PeerDataError):
        reborn.unseal("log", secrets["sealed"])


def test_tamper_by_another_process_is_noticed(tmp_path: Path) -> None:
    """The in-memory view of the brick marker is refreshed within a bounded delay."""
    from ivp.device import soft

    state = tmp_path / "dev"
    dev = SoftDevice(state)
    dev.seal("log", b"warm")  # a purpose key cached in memory
    SoftDevice(state).tamper()  # the same device dir, tampered through another object
    time.sleep(soft._RECHECK * 2)
    assert dev.bricked
    for op in OPS.values():
        with pytest.raises(BrickedError):
            op(dev)
    assert dev._uid is None and dev._signing is None and not dev._aeads
