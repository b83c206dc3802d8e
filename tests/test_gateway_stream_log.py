"""A streamed pair's durable progress is linear (issue 14): each chunk's commit writes
one sealed row of what it adds, never the pair so far; recovery rebuilds the cut pair
from the first row and the chunks in order, and refuses a stream whose rows were
tampered with (a gap, an edited or a moved row) without losing anything else."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gateway_rig import Rig, flush, make_rig, run, started
from test_gateway_streaming import serving_rig, stream_body, tokens_of

from ivp.device.soft import SoftDevice
from ivp.errors import StateError
from ivp.gateway.log import PairLog
from ivp.gateway.streaming import ChunkWrite, ClientStream, StreamChunk, cut_pair
from ivp.gateway.upstream import StreamAnswer
from ivp.protocol.chain import genesis
from ivp.protocol.messages import PairRecord, SamplingParams, Tag

TOKEN = 300  # one byte-level token of the tiny model, the same in every chunk


def lockstep(rig: Rig, ids: list[int]) -> asyncio.Semaphore:
    """The server sends the next token only once the client took the last one (release
    the returned semaphore per piece taken): every chunk is exactly one token, and when
    the client holds n tokens the log holds exactly n chunks."""
    go = asyncio.Semaphore(0)

    async def stream(path: str, body: bytes, *, timeout: float = 600.0) -> StreamAnswer:
        tag = json.loads(body)["ivp_tag"]
        answer = StreamAnswer(lambda: None, path)
        answer._head(200)

        def event(choice: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps({"choices": [choice], "ivp_tag": tag}).encode() + \
                b"\n\n"

        async def pump() -> None:
            for i, t in enumerate(ids):
                if i:
                    await go.acquire()
                if answer._ended:
                    return
                answer._push(event({"token_ids": [t]}))
            await go.acquire()
            answer._push(event({"token_ids": [], "finish_reason": "length"}) +
                         b"data: [DONE]\n\n")
            answer._end(None)

        rig.server._pumps.add(task := asyncio.ensure_future(pump()))
        task.add_done_callback(rig.server._pumps.discard)
        return answer

    rig.server.stream = stream  # type: ignore[method-assign]
    return go


def test_a_chunks_commit_writes_the_same_bytes_at_chunk_10_and_chunk_1000(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """1,010 one-token chunks: every chunk's row is as large as the first one's (within
    the few digits of its time stamp), and the stream's first row (prompt, parameters)
    is written once, never again. Before, chunk n rewrote all n tokens."""
    n = 1010
    sizes: dict[int, int] = {}
    heads: set[bytes] = set()

    async def body() -> None:
        rig = await serving_rig(tmp_path, tiny_model_dir, None)
        go = lockstep(rig, [TOKEN] * n)
        progress = rig.log.progress

        def measured(boot_id: str, chunks: list[ChunkWrite]) -> list[None]:
            out = progress(boot_id, chunks)
            for w in chunks:  # the rows this commit wrote (read inside it, same thread)
                sizes[w.index] = rig.log._db.execute(
                    "SELECT length(sealed) FROM stream_chunks WHERE boot_id=? AND seq=? "
                    "AND idx=?", (boot_id, w.seq, w.index)).fetchone()[0]
                heads.add(rig.log._db.execute(
                    "SELECT sealed FROM streams WHERE boot_id=? AND seq=?",
                    (boot_id, w.seq)).fetchone()[0])
            return out

        rig.log.progress = measured  # type: ignore[method-assign]
        reply = await rig.gw.complete("completions", stream_body(max_tokens=n))
        assert reply.chunks is not None
        got = tokens_of(reply.body)
        go.release()
        async for piece in reply.chunks:
            got += tokens_of(piece)
            go.release()
        await reply.after_release()
        assert got == [TOKEN] * n
        await flush(rig)
        [audit] = rig.recomputer.audits
        assert audit.pair.output_token_ids == got and audit.pair.finish_reason == "length"
        await rig.gw.close()

    run(body())
    assert sorted(sizes) == list(range(n))  # one chunk per token, each its own row
    assert abs(sizes[1000] - sizes[10]) <= 8, (sizes[10], sizes[1000])
    assert max(sizes.values()) - min(sizes.values()) <= 8  # the time stamp's digits
    assert len(heads) == 1  # sealed afresh (a new nonce) had it been rewritten


def _snapshot(rig: Rig, to: Path) -> None:
    """What a power kill now leaves on disk: the device and the committed log."""
    shutil.copytree(rig.state_dir / "device", to / "device")
    src, dst = sqlite3.connect(rig.log.path), sqlite3.connect(to / "log.sqlite")
    with dst:
        src.backup(dst)
    src.close()
    dst.close()


def test_a_power_kill_after_hundreds_of_chunks_recovers_exactly_the_released_tokens(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """The disk as a kill -9 leaves it after 300 released one-token chunks of a text
    with multi-byte characters, the device counter advanced one ahead for the next
    chunk: the next start reads the commit as interrupted (alarmed), chains one cut pair
    holding exactly the 300 tokens, its text their decoding, and audits it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.encode("naïve café, 日本 " * 40, add_special_tokens=False)[:330]
    k = 300
    crashed = tmp_path / "after-the-kill"

    async def serve() -> list[int]:
        rig = await serving_rig(tmp_path / "gw", tiny_model_dir, None)
        go = lockstep(rig, ids)
        reply = await rig.gw.complete("completions", stream_body(max_tokens=len(ids)))
        assert reply.chunks is not None
        got, it = tokens_of(reply.body), aiter(reply.chunks)
        while len(got) < k:
            go.release()
            got += tokens_of(await anext(it))
        while rig.log.spare is None:  # as while a server generates: the counter one ahead
            await asyncio.sleep(0.001)
        _snapshot(rig, crashed)  # the log holds exactly the chunks the client holds
        await rig.gw.close()
        return got

    async def restart() -> PairRecord:
        rig = await started(make_rig(crashed, tiny_model_dir, epsilon=1.0))
        await flush(rig)
        [audit] = rig.recomputer.audits
        kinds = [r[0] for r in rig.log._db.execute("SELECT kind FROM alarms")]
        assert rig.log.pair_count() == 0 and kinds == ["commit_interrupted"]
        assert rig.log._db.execute("SELECT COUNT(*) FROM stream_chunks").fetchone()[0] == 0
        await rig.gw.close()
        return audit.pair

    released = run(serve())
    pair = run(restart())
    assert released == ids[:k]
    assert pair.output_token_ids == released and pair.finish_reason == "cut"
    assert pair.output_text == tok.decode(released, skip_special_tokens=True)


# --- the log alone: recovery of tampered stream rows ----------------------------------
BOOT = "boot-1"


def _head(seq: int) -> PairRecord:
    return PairRecord(tag=Tag(gateway_id="gw-1", boot_id=BOOT, seq=seq), model_id="m",
                      endpoint="completions", input="hi", prompt_token_ids=[1, 2],
                      output_token_ids=[], output_text="", finish_reason="cut", seed=7,
                      params=SamplingParams(max_tokens=64), t_request=1.0, t_response=1.0)


chunk_st = st.builds(StreamChunk, st.lists(st.integers(0, 639), min_size=1, max_size=3),
                     st.text(max_size=3), st.text(max_size=2),
                     st.floats(1.0, 2.0, allow_nan=False))
streams_st = st.lists(st.lists(chunk_st, min_size=1, max_size=6), min_size=1, max_size=4)
TAMPER = ["gap", "edit", "swap", "head_edit", "head_missing"]


def _open_log(d: Path, streams: list[list[StreamChunk]]) -> PairLog:
    log = PairLog(d / "log.sqlite", SoftDevice(d / "device"))
    log.begin_boot(BOOT, "m", genesis("gw-1", BOOT), lambda counter, prev: b"boot")
    for i in range(max(len(s) for s in streams)):  # one commit per round, as streams go
        log.progress(BOOT, [ChunkWrite(seq, i, s[i], _head(seq) if i == 0 else None)
                            for seq, s in enumerate(streams) if i < len(s)])
    return log


def _chunk_row(db: sqlite3.Connection, seq: int, idx: int) -> bytes:
    return bytes(db.execute("SELECT sealed FROM stream_chunks WHERE boot_id=? AND seq=? AND "
                            "idx=?", (BOOT, seq, idx)).fetchone()[0])


def _set_chunk_row(db: sqlite3.Connection, seq: int, idx: int, sealed: bytes) -> None:
    db.execute("UPDATE stream_chunks SET sealed=? WHERE boot_id=? AND seq=? AND idx=?",
               (sealed, BOOT, seq, idx))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams=streams_st, data=st.data())
def test_recovery_refuses_a_stream_with_a_gap_an_edited_or_a_moved_row_and_keeps_the_rest(
        streams: list[list[StreamChunk]], data: st.DataObject) -> None:
    """Every other stream is chained exactly as its rows say; the tampered one is
    refused with one alarm naming it and why, and nothing of it is chained short."""
    bad = data.draw(st.integers(0, len(streams) - 1), label="stream")
    chunks = streams[bad]
    kinds = TAMPER if len(chunks) >= 2 else ["edit", "head_edit", "head_missing"]
    kind = data.draw(st.sampled_from(kinds), label="tamper")
    with tempfile.TemporaryDirectory() as tmp:
        log = _open_log(Path(tmp), streams)
        db, key = log._db, (BOOT, bad)
        if kind == "gap":
            i = data.draw(st.integers(0, len(chunks) - 2), label="chunk")
            db.execute("DELETE FROM stream_chunks WHERE boot_id=? AND seq=? AND idx=?",
                       (*key, i))
            why = f"chunk {i} is missing"
        elif kind == "edit":  # one bit of the sealed bytes flipped
            i = data.draw(st.integers(0, len(chunks) - 1), label="chunk")
            sealed = bytearray(_chunk_row(db, bad, i))
            sealed[data.draw(st.integers(0, len(sealed) - 1), label="byte")] ^= 1
            _set_chunk_row(db, bad, i, bytes(sealed))
            why = (f"chunk {i} does not open: sealed 'gateway/log/stream-chunk' data is "
                   "corrupt or not ours")
        elif kind == "swap":  # two chunks' rows in each other's place
            i, j = sorted(data.draw(st.lists(st.integers(0, len(chunks) - 1), min_size=2,
                                             max_size=2, unique=True), label="chunks"))
            a, b = _chunk_row(db, bad, i), _chunk_row(db, bad, j)
            _set_chunk_row(db, bad, i, b)
            _set_chunk_row(db, bad, j, a)
            why = (f"chunk {i} does not open: sealed 'gateway/log/stream-chunk' data is "
                   "corrupt or not ours")
        elif kind == "head_edit":
            db.execute("UPDATE streams SET sealed = zeroblob(length(sealed)) "
                       "WHERE boot_id=? AND seq=?", key)
            why = "sealed 'gateway/log/stream' data is corrupt or not ours"
        else:
            db.execute("DELETE FROM streams WHERE boot_id=? AND seq=?", key)
            why = "its first row is missing"
        spool = db.execute("SELECT id, kind FROM spool ORDER BY id").fetchall()

        links = log.cut_streams()

        good = [seq for seq in range(len(streams)) if seq != bad]
        assert list(links.get(BOOT, {})) == good
        for pos, seq in enumerate(good, 1):  # chained in tag order, exactly as logged
            found = log.read_pair(BOOT, pos)
            assert found is not None
            assert found[1] == cut_pair(_head(seq), streams[seq])
        assert log.counters(BOOT).pairs == len(good) and log.pair_count() == len(good)
        assert [(a["kind"], a["message"]) for a in log.alarms()] == [
            ("log_corrupt", f"stream {BOOT}/{bad}: {why}")]
        for table in ("streams", "stream_chunks"):  # nothing left to chain later
            assert db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0
        assert db.execute("SELECT id, kind FROM spool ORDER BY id").fetchall() == spool
        log.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 639), min_size=1, max_size=40), data=st.data())
def test_the_chunks_text_is_the_decoding_of_the_ids_after_every_chunk(
        tiny_model_dir: Path, ids: list[int], data: st.DataObject) -> None:
    """Any token ids (byte tokens that split or break UTF-8 characters, special tokens)
    in any chunking: the pair a stream cut after any chunk is, rebuilt from the rows,
    has the text the recomputer checks a cut pair against — the decoding of its ids."""
    tok = _tokenizer(tiny_model_dir)

    def decode(x: list[int]) -> str:
        return str(tok.decode(x, skip_special_tokens=True))

    client = ClientStream("completions", model_id="m", tag=_head(0).tag, prompt_len=2,
                          decode=decode)
    chunks, at = [], 0
    while at < len(ids):
        n = data.draw(st.integers(1, 4), label="chunk size")
        client.push(ids[at:at + n])
        text, tail = client.logged_text()
        chunks.append(StreamChunk(ids[at:at + n], text, tail, 1.5))
        at += n
        pair = cut_pair(_head(0), chunks)
        assert pair.output_token_ids == ids[:at]
        assert pair.output_text == decode(ids[:at])


_TOKENIZERS: dict[Path, Any] = {}


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    if model_dir not in _TOKENIZERS:
        _TOKENIZERS[model_dir] = AutoTokenizer.from_pretrained(model_dir)
    return _TOKENIZERS[model_dir]


def test_a_chunk_out_of_place_is_refused_at_write_and_writes_nothing(tmp_path: Path) -> None:
    """A chunk is logged only right after its stream's last one: a repeat, a chunk past
    a gap or one of a stream already chained is a StateError (the group commit's step
    is undone alone), and the log is as it was."""
    c = StreamChunk([5], "a", "", 1.5)
    log = _open_log(tmp_path, [[c, c]])
    rows = log._db.execute("SELECT * FROM stream_chunks ORDER BY idx").fetchall()
    for write, why in [
            (ChunkWrite(0, 0, c, _head(0)), f"stream {BOOT}/0: chunk 0 is logged already"),
            (ChunkWrite(0, 1, c), f"stream {BOOT}/0: chunk 1 is logged already"),
            (ChunkWrite(0, 3, c), f"stream {BOOT}/0 has no chunk 2: chunk 3 dropped")]:
        with pytest.raises(StateError) as err:
            log.progress(BOOT, [write])
        assert str(err.value) == why
        assert log._db.execute("SELECT * FROM stream_chunks ORDER BY idx").fetchall() == rows
    log.append(BOOT, [cut_pair(_head(0), [c, c])], (0,))  # the stream ends
    with pytest.raises(StateError, match="has no chunk 1: chunk 2 dropped"):
        log.progress(BOOT, [ChunkWrite(0, 2, c)])
    assert log._db.execute("SELECT COUNT(*) FROM stream_chunks").fetchone()[0] == 0
    log.close()
