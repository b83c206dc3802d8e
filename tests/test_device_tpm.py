"""The TPM 2.0 device (ivp.device.tpm.TpmDevice) against swtpm: keys made inside the
TPM, sealing bound to it, its RNG, and tamper = TPM2_Clear = brick for good."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ivp.device import Device, SoftDevice, open_device
from ivp.device.swtpm import Swtpm
from ivp.device.tpm import TpmDevice
from ivp.errors import BrickedError, MisuseError, PeerDataError, SignatureError, TransportError
from ivp.protocol import envelope as dsse
from ivp.protocol.keys import P256


def _dir_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())


def test_keys_are_made_in_the_tpm_and_stable_across_restarts(tmp_path: Path, swtpm: Swtpm
                                                             ) -> None:
    dev = TpmDevice(tmp_path / "dev", swtpm.tcti)
    key = dev.public_key
    assert key.scheme == P256 and key.hex.startswith("ecdsa-p256:")
    sig = dev.sign(b"m")
    key.verify(sig, b"m")
    with pytest.raises(SignatureError):
        key.verify(sig, b"n")
    derived, sealed = dev.derive_key("log"), dev.seal("log", b"pair", b"row 1")
    dev.close()
    again = TpmDevice(tmp_path / "dev", swtpm.tcti)  # a power cycle
    assert again.public_key == key
    assert again.derive_key("log") == derived
    assert again.unseal("log", sealed, b"row 1") == b"pair"
    # What the state directory holds is no secret: a label and the public key.
    files = sorted(p.name for p in (tmp_path / "dev").iterdir())
    assert files == ["tpm.json"]
    state = json.loads((tmp_path / "dev" / "tpm.json").read_text())
    assert set(state) == {"label", "public_key"} and state["public_key"] == key.hex
    assert derived not in _dir_bytes(tmp_path) and again.derive_key("seal/log") not in (
        _dir_bytes(tmp_path))


def test_signs_through_the_device_interface(tmp_path: Path, swtpm: Swtpm) -> None:
    """The gateway signs through ``device.signer()``: for a TPM that is the TPM itself."""
    dev: Device = TpmDevice(tmp_path / "dev", swtpm.tcti)
    signer = dev.signer()
    assert signer.keyid == dev.public_key.keyid
    env = dsse.sign(dsse.CHECKPOINT, b'{"x":1}', [signer])
    assert dsse.open_signed(env, dsse.CHECKPOINT, dev.public_key) == b'{"x":1}'


def test_a_crashed_process_leaves_no_objects_behind(tmp_path: Path, swtpm: Swtpm) -> None:
    """Without a resource manager a killed process's keys stay loaded in the TPM's few
    object slots; the next power-on flushes them instead of failing for want of room."""
    first = TpmDevice(tmp_path / "dev", swtpm.tcti)
    key = first.public_key
    first._esys.close()  # gone without flushing, as after kill -9
    for _ in range(3):  # each would need two of swtpm's three slots
        again = TpmDevice(tmp_path / "dev", swtpm.tcti)
        assert again.public_key == key
        again._esys.close()


def test_factory_opens_each_kind(tmp_path: Path, swtpm: Swtpm) -> None:
    assert isinstance(open_device("soft", tmp_path / "soft"), SoftDevice)
    assert isinstance(open_device("tpm", tmp_path / "tpm", swtpm.tcti), TpmDevice)
    with pytest.raises(MisuseError, match="unknown device"):
        open_device("hsm", tmp_path / "x")


def test_keys_differ_by_purpose_and_seal_is_authenticated(tmp_path: Path, swtpm: Swtpm
                                                          ) -> None:
    dev = TpmDevice(tmp_path / "dev", swtpm.tcti)
    assert dev.derive_key("log") != dev.derive_key("seal/log")
    assert len(dev.derive_key("x", 64)) == 64
    sealed = dev.seal("log", b"secret pair", aad=b"row 7")
    assert b"secret pair" not in sealed
    for i in (0, 12, len(sealed) - 1):
        bad = bytearray(sealed)
        bad[i] ^= 1
        with pytest.raises(PeerDataError, match="corrupt or not ours"):
            dev.unseal("log", bytes(bad), aad=b"row 7")
    with pytest.raises(PeerDataError):
        dev.unseal("log", sealed, aad=b"row 8")
    with pytest.raises(PeerDataError):  # a software device cannot open it
        SoftDevice(tmp_path / "soft").unseal("log", sealed, aad=b"row 7")


def test_random_comes_from_the_tpm(tmp_path: Path, swtpm: Swtpm) -> None:
    dev = TpmDevice(tmp_path / "dev", swtpm.tcti)
    values = {dev.random_u64() for _ in range(300)}  # more than one buffer refill
    assert len(values) == 300 and all(0 <= v < 2**64 for v in values)
    assert len(dev.random(2000)) == 2000


def test_state_dir_copied_to_another_tpm_is_not_this_device(tmp_path: Path, swtpm: Swtpm
                                                            ) -> None:
    """Cloning a gateway's disk onto another machine does not clone its identity: the
    other TPM makes another key from the same label, and the device refuses."""
    dev = TpmDevice(tmp_path / "dev", swtpm.tcti)
    sealed = dev.seal("log", b"pair")
    dev.close()
    shutil.copytree(tmp_path / "dev", tmp_path / "clone")
    with Swtpm(tmp_path / "other-tpm") as other:
        clone = TpmDevice(tmp_path / "clone", other.tcti)
        assert clone.bricked
        with pytest.raises(BrickedError):
            clone.sign(b"m")
        os.remove(tmp_path / "clone" / "BRICKED")
        os.remove(tmp_path / "clone" / "tpm.json")
        stranger = TpmDevice(tmp_path / "clone", other.tcti)
        assert stranger.public_key != TpmDevice(tmp_path / "dev", swtpm.tcti).public_key
        with pytest.raises(PeerDataError):
            stranger.unseal("log", sealed)


def test_unreachable_tpm_is_a_transport_error(tmp_path: Path, swtpm: Swtpm) -> None:
    port = swtpm.port
    swtpm.stop()
    with pytest.raises(TransportError, match="no TPM"):
        TpmDevice(tmp_path / "dev", f"swtpm:host=127.0.0.1,port={port}")


# --- tamper = brick ------------------------------------------------------------------------
OPS: dict[str, Callable[[TpmDevice], Any]] = {
    "public_key": lambda d: d.public_key,
    "signer": lambda d: d.signer(),
    "sign": lambda d: d.sign(b"m"),
    "derive_key": lambda d: d.derive_key("log"),
    "random": lambda d: d.random(8),
    "random_u64": lambda d: d.random_u64(),
    "seal": lambda d: d.seal("log", b"x"),
    "unseal": lambda d: d.unseal("log", b"\x00" * 40),
}


@pytest.fixture
def tampered(tmp_path: Path, swtpm: Swtpm) -> tuple[TpmDevice, Path, dict[str, Any]]:
    state = tmp_path / "dev"
    dev = TpmDevice(state, swtpm.tcti)
    before = {"public": dev.public_key, "derived": dev.derive_key("log"),
              "sealed": dev.seal("log", b"pair")}
    dev.random(8)  # a buffer of TPM randomness in memory
    dev.tamper()
    return dev, state, before


@pytest.mark.parametrize("op", list(OPS))
def test_tamper_bricks_every_operation(tampered: tuple[TpmDevice, Path, dict[str, Any]],
                                       swtpm: Swtpm, op: str) -> None:
    dev, state, _ = tampered
    assert dev.bricked
    with pytest.raises(BrickedError):
        OPS[op](dev)
    dev.close()
    with pytest.raises(BrickedError):  # still bricked after a restart
        OPS[op](TpmDevice(state, swtpm.tcti))


def test_tamper_clears_the_tpm_for_good(tampered: tuple[TpmDevice, Path, dict[str, Any]],
                                        swtpm: Swtpm) -> None:
    """TPM2_Clear replaced the storage seed: removing the brick marker (the operator's
    move) gives back neither the key nor the sealed data, ever."""
    dev, state, before = tampered
    assert dev._random == b"" and dev._aeads == {} and dev._sign_key is None
    dev.close()
    os.remove(state / "BRICKED")
    restarted = TpmDevice(state, swtpm.tcti)
    assert restarted.bricked  # the TPM makes another key than the one recorded
    restarted.close()
    os.remove(state / "BRICKED")
    os.remove(state / "tpm.json")
    stranger = TpmDevice(state, swtpm.tcti)
    assert not stranger.bricked and stranger.public_key != before["public"]
    assert stranger.derive_key("log") != before["derived"]
    with pytest.raises(PeerDataError):
        stranger.unseal("log", before["sealed"])


def test_tamper_by_another_process_is_noticed(tmp_path: Path, swtpm: Swtpm) -> None:
    import time

    from ivp.device import tpm

    state = tmp_path / "dev"
    dev = TpmDevice(state, swtpm.tcti)
    dev.seal("log", b"warm")
    (state / "BRICKED").write_text("tampered elsewhere\n")
    time.sleep(tpm._RECHECK * 2)
    for op in OPS.values():
        with pytest.raises(BrickedError):
            op(dev)
