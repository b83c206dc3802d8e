"""UPLOAD mode (SNG property 2) on the pure state machine: bytes in, events out."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivp.errors import StateError
from ivp.gateway.boot import Complete, FileVerified, Forward, PowerKill, UploadMode
from ivp.protocol.messages import FileEntry, Manifest
from ivp.whitelist import make_manifest


def _manifest(files: dict[str, tuple[str, bytes]], algo: str = "blake3") -> Manifest:
    entries = []
    for name, (role, data) in files.items():
        digest = blake3.blake3(data).hexdigest() if algo == "blake3" \
            else hashlib.sha256(data).hexdigest()
        entries.append(FileEntry(name=name, role=role, size=len(data), digest=digest,  # type: ignore[arg-type]
                                 algo=algo))  # type: ignore[arg-type]
    return Manifest(model_id="m", architecture="x", dtype="float32", files=entries,
                    total_size=sum(e.size for e in entries))


FILES = {
    "config.json": ("config", b'{"vocab_size": 10}'),
    "tokenizer.json": ("tokenizer", b'{"tok": true}' * 3),
    "a.safetensors": ("weights", bytes(range(256)) * 5),
    "b.safetensors": ("weights", b"\x07" * 777),
}
BLOB = b"".join(data for _, data in FILES.values())


def _run(machine: UploadMode, data: bytes, chunk: int) -> list[object]:
    events: list[object] = []
    for i in range(0, len(data), chunk):
        events.extend(machine.feed(data[i:i + chunk]))
        if machine.done is not None:
            return events
    events.append(machine.finish())
    return events


def _forwarded(events: list[object]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Forward))


@pytest.mark.parametrize("chunk", [1, 7, 256, 1000, len(BLOB)])
def test_whitelisted_stream_reaches_complete_at_s_bytes(chunk: int) -> None:
    m = _manifest(FILES)
    machine = UploadMode(m)
    events = _run(machine, BLOB, chunk)
    assert isinstance(events[-1], Complete) and events[-1].counter == m.total_size
    assert [e.file for e in events if isinstance(e, FileVerified)] == list(FILES)
    assert _forwarded(events) == BLOB
    # the gateway keeps the small files it needs (tokenizer, config), never the weights
    assert set(machine.captured) == {"config.json", "tokenizer.json"}
    assert machine.captured["tokenizer.json"] == FILES["tokenizer.json"][1]


def test_sha256_manifests_are_accepted() -> None:
    events = _run(UploadMode(_manifest(FILES, "sha256")), BLOB, 100)
    assert isinstance(events[-1], Complete)


@pytest.mark.parametrize("bad", list(FILES))
@pytest.mark.parametrize("chunk", [13, 4096])
def test_one_flipped_byte_power_kills_at_the_end_of_that_file(bad: str, chunk: int) -> None:
    """Attack: a changed shard. POWER_KILL fires at that file's end, not the model's."""
    m = _manifest(FILES)
    names = list(FILES)
    start = sum(len(FILES[n][1]) for n in names[: names.index(bad)])
    end = start + len(FILES[bad][1])
    data = bytearray(BLOB)
    data[start + len(FILES[bad][1]) // 2] ^= 0x01
    machine = UploadMode(m)
    events = _run(machine, bytes(data), chunk)
    kill = events[-1]
    assert isinstance(kill, PowerKill) and kill.reason == "digest" and kill.file == bad
    assert kill.counter == end  # interrupted exactly at the bad file's end
    assert _forwarded(events) == bytes(data[:end])  # not one byte of the next file
    assert bad in kill.message
    assert bad not in machine.verified and machine.captured == {}
    with pytest.raises(StateError):
        machine.feed(b"more")


def test_short_stream_power_kills_naming_the_unfinished_file() -> None:
    machine = UploadMode(_manifest(FILES))
    machine.feed(BLOB[:-5])
    end = machine.finish()
    assert isinstance(end, PowerKill) and end.reason == "short" and end.file == "b.safetensors"
    with pytest.raises(StateError):
        machine.finish()


def test_long_stream_power_kills_and_forwards_nothing_past_s() -> None:
    """Attack: smuggling extra bytes after the model. The counter interrupts at S."""
    m = _manifest(FILES)
    machine = UploadMode(m)
    events = machine.feed(BLOB + b"extra payload")
    assert isinstance(events[-1], PowerKill) and events[-1].reason == "long"
    assert _forwarded(events) == BLOB
    assert machine.counter == m.total_size


def test_feeding_after_complete_is_misuse() -> None:
    machine = UploadMode(_manifest(FILES))
    machine.feed(BLOB)
    assert isinstance(machine.finish(), Complete)
    with pytest.raises(StateError):
        machine.feed(b"x")


def test_empty_files_are_verified_in_place() -> None:
    files = {"config.json": ("config", b"{}"), "empty.safetensors": ("weights", b""),
             "w.safetensors": ("weights", b"abc")}
    events = _run(UploadMode(_manifest(files)), b"{}abc", 1)
    assert [e.file for e in events if isinstance(e, FileVerified)] == list(files)
    assert isinstance(events[-1], Complete)


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(1, len(BLOB) - 1), max_size=8),
       flip=st.one_of(st.none(), st.integers(0, len(BLOB) - 1)),
       truncate=st.integers(0, 3))
def test_any_chunking_and_any_single_flip(cuts: list[int], flip: int | None,
                                          truncate: int) -> None:
    """Whatever the chunk boundaries: a good stream completes, a flipped byte kills at
    its file's end, a truncated one is refused as short."""
    data = bytearray(BLOB)
    if flip is not None:
        data[flip] ^= 0x80
    if truncate:
        data = data[: len(data) - truncate]
    bounds = [0, *sorted(set(cuts)), len(data)]
    machine = UploadMode(_manifest(FILES))
    events: list[object] = []
    for a, b in itertools.pairwise(bounds):
        if machine.done is None and a < b:
            events.extend(machine.feed(bytes(data[a:b])))
    if machine.done is None:
        events.append(machine.finish())
    last = events[-1]
    ends, pos = [], 0
    for _, blob in FILES.values():
        pos += len(blob)
        ends.append(pos)
    if flip is not None and (not truncate or flip < len(data)):
        file_end = next(e for e in ends if flip < e)
        if file_end <= len(data):
            assert isinstance(last, PowerKill) and last.reason == "digest"
            assert last.counter == file_end
            return
    if truncate:
        assert isinstance(last, PowerKill) and last.reason in ("short", "digest")
    else:
        assert isinstance(last, Complete)


def test_real_tiny_model_manifest_boots(tiny_model_dir: Path) -> None:
    m = make_manifest(tiny_model_dir, "tiny")
    blob = b"".join((tiny_model_dir / f.name).read_bytes() for f in m.files)
    machine = UploadMode(m)
    events = _run(machine, blob, 1 << 16)
    assert isinstance(events[-1], Complete)
    assert "tokenizer.json" in machine.captured and "config.json" in machine.captured
    assert not any(n.endswith(".safetensors") for n in machine.captured)
