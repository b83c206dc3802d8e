"""Encrypted upload streams (ivp.protocol.hpke): HPKE base mode to a device's X25519
key, framed; every alteration refused with a clear error."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivp.device import SoftDevice
from ivp.errors import ValidationError
from ivp.protocol.hpke import (
    FRAME,
    MAGIC,
    StreamOpener,
    device_kem_key,
    kem_public_hex,
    open_stream,
    seal_stream,
    upload_info,
)

INFO = upload_info("tiny")


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> SoftDevice:
    return SoftDevice(tmp_path_factory.mktemp("dev"))


def _sealed(device: SoftDevice, data: bytes, chunk: int = 70_000, info: bytes = INFO) -> bytes:
    parts = [data[i:i + chunk] for i in range(0, len(data), chunk)] or [b""]
    return b"".join(seal_stream(parts, bytes.fromhex(kem_public_hex(device)), info))


def _open(device: SoftDevice, stream: bytes, step: int = 65_536, info: bytes = INFO) -> bytes:
    opener = StreamOpener(device_kem_key(device), info)
    out = b"".join(b"".join(opener.feed(stream[i:i + step])) for i in range(0, len(stream),
                                                                          step))
    opener.finish()
    return out


def test_round_trip_across_frames(device: SoftDevice) -> None:
    data = os.urandom(2 * FRAME + 12345)
    stream = _sealed(device, data)
    assert stream.startswith(MAGIC) and data[:64] not in stream
    assert len(stream) == len(MAGIC) + 32 + 3 * (4 + 16) + len(data)
    exact = _sealed(device, data[:2 * FRAME])  # whole frames, then an empty last one
    assert len(exact) == len(MAGIC) + 32 + 3 * (4 + 16) + 2 * FRAME
    assert _open(device, stream) == data
    assert _open(device, _sealed(device, b"")) == b""


def test_the_key_is_the_devices_and_stable(device: SoftDevice, tmp_path: Path) -> None:
    assert kem_public_hex(device) == kem_public_hex(SoftDevice(device._dir))
    other = SoftDevice(tmp_path / "other")
    with pytest.raises(ValidationError, match="does not open"):
        _open(other, _sealed(device, b"weights"))


def test_wrong_model_or_use_does_not_open(device: SoftDevice) -> None:
    with pytest.raises(ValidationError, match="does not open"):
        _open(device, _sealed(device, b"weights"), info=upload_info("other-model"))


@pytest.mark.parametrize("where", ["header", "length", "body", "tag"])
def test_altered_byte_is_refused(device: SoftDevice, where: str) -> None:
    stream = bytearray(_sealed(device, os.urandom(5000)))
    index = {"header": 3, "length": len(MAGIC) + 32 + 1, "body": len(MAGIC) + 40,
             "tag": len(stream) - 1}[where]
    stream[index] ^= 0x40
    with pytest.raises(ValidationError, match="encrypted upload"):
        _open(device, bytes(stream))


def test_cut_reordered_or_extended_streams_are_refused(device: SoftDevice) -> None:
    stream = _sealed(device, os.urandom(2 * FRAME + 10))
    head = len(MAGIC) + 32
    frames, rest = [], stream[head:]
    while rest:
        (word,) = struct.unpack(">I", rest[:4])
        size = word & 0x7FFFFFFF
        frames.append(rest[:4 + size])
        rest = rest[4 + size:]
    with pytest.raises(ValidationError, match="cut short"):
        _open(device, stream[:head] + frames[0] + frames[1])  # the last frame dropped
    marked = bytearray(frames[1])
    marked[0] |= 0x80  # passed off as the last frame
    with pytest.raises(ValidationError, match="does not open"):
        _open(device, stream[:head] + frames[0] + bytes(marked))
    with pytest.raises(ValidationError, match="does not open"):
        _open(device, stream[:head] + frames[1] + frames[0] + frames[2])
    with pytest.raises(ValidationError, match="after the last frame"):
        _open(device, stream + b"x")


def test_async_opener_yields_as_it_arrives(device: SoftDevice) -> None:
    data = os.urandom(FRAME + 7)
    stream = _sealed(device, data)

    async def chunks():
        for i in range(0, len(stream), 50_000):
            yield stream[i:i + 50_000]

    async def collect() -> bytes:
        return b"".join([p async for p in open_stream(chunks(), device_kem_key(device), INFO)])

    assert asyncio.run(collect()) == data


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_junk_only_fails_cleanly(junk: bytes) -> None:
    dev = SoftDevice(Path("/tmp") / "ivp-hpke-junk-dev")
    opener = StreamOpener(device_kem_key(dev), INFO)
    try:
        opener.feed(MAGIC + junk)
        opener.finish()
    except ValidationError:
        return
    raise AssertionError("junk opened")
