"""True streaming through the gateway core, with in-memory peers: each chunk durable
before it leaves, cut streams logged as cut, text re-serialised from token ids."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from test_gateway_rig import MODEL_ID, Rig, flush, make_rig, run, started

from ivp.gateway.log import _CHUNK, _STREAM
from ivp.gateway.release import ReleasePolicy
from ivp.gateway.streaming import StreamChunk, cut_pair
from ivp.protocol.encoding import decode
from ivp.protocol.messages import PairRecord

IDS = [5 + i for i in range(12)]


def sse_answer(ids: list[int], finish: str = "length", bad_at: int | None = None) -> Any:
    """A server answer: one event per token under the request's tag; ``bad_at``: that
    event carries a token outside the vocabulary instead (a protocol violation)."""
    def answer(request: dict[str, Any]) -> tuple[int, bytes]:
        tag = request["ivp_tag"]
        events = [{"choices": [{"token_ids": [9999 if i == bad_at else t],
                                "text": "SERVER-TEXT"}], "ivp_tag": tag}
                  for i, t in enumerate(ids)]
        events.append({"choices": [{"token_ids": [], "finish_reason": finish}], "ivp_tag": tag})
        body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
        return 200, body + b"data: [DONE]\n\n"
    return answer


def events_of(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(e[6:]) for e in raw.decode().split("\n\n") if e and e[6:] != "[DONE]"]


def tokens_of(raw: bytes) -> list[int]:
    return [t for e in events_of(raw) if e.get("choices")
            for t in e["choices"][0]["token_ids"]]


def logged(rig: Rig, seq: int) -> tuple[list[int], str] | None:
    """What another reader of the log file sees for tag ``seq`` (committed data only):
    its open stream's rows (the first, then its chunks), or its chained pair (ids,
    finish reason)."""
    db = sqlite3.connect(rig.log.path)
    try:
        for boot_id, s, sealed in db.execute("SELECT boot_id, seq, sealed FROM streams"):
            if s == seq:
                head = decode(rig.device.unseal(_STREAM, sealed, f"{boot_id}/{s}".encode()),
                              PairRecord)
                chunks = [decode(rig.device.unseal(_CHUNK, c, f"{boot_id}/{s}/{i}".encode()),
                                 StreamChunk)
                          for i, c in db.execute("SELECT idx, sealed FROM stream_chunks WHERE "
                                                 "boot_id=? AND seq=? ORDER BY idx", (boot_id, s))]
                pair = cut_pair(head, chunks)
                return pair.output_token_ids, pair.finish_reason
        for boot_id, pos, sealed in db.execute("SELECT boot_id, pos, sealed FROM pairs"):
            pair = decode(rig.device.unseal("gateway/log/pair", sealed,
                                            f"{boot_id}/{pos}".encode()), PairRecord)
            if pair.tag.seq == seq:
                return pair.output_token_ids, pair.finish_reason
    finally:
        db.close()
    return None


async def serving_rig(tmp_path: Path, tiny_model_dir: Path, answer: Any,
                      event_delay: float = 0.01, **config: Any) -> Rig:
    rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0, **config))
    await rig.upload()
    rig.server.answer, rig.server.event_delay = answer, event_delay
    return rig


def stream_body(max_tokens: int = len(IDS), **extra: Any) -> bytes:
    return json.dumps({"model": MODEL_ID, "prompt": "The quick brown fox",
                       "max_tokens": max_tokens, "stream": True, **extra}).encode()


def test_each_chunk_is_durable_before_it_is_released_and_tokens_leave_as_they_come(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """Every piece the client gets holds only tokens another reader of the log file
    already sees committed; the first piece leaves while the server still generates;
    the whole pair is chained and audited like a plain one."""
    async def body() -> None:
        rig = await serving_rig(tmp_path, tiny_model_dir, sse_answer(IDS))
        reply = await rig.gw.complete("completions", stream_body())
        assert reply.chunks is not None and reply.content_type == "text/event-stream"
        released = tokens_of(reply.body)
        assert released and rig.server.streams_open == 1  # before the server's end
        pieces = 1
        async for piece in reply.chunks:
            found = logged(rig, 0)
            assert found is not None
            got = tokens_of(piece)
            released += got
            assert released == found[0][:len(released)], "released before durable"
            pieces += 1
        assert released == IDS and pieces > 3
        await reply.after_release()
        await flush(rig)
        [audit] = rig.recomputer.audits
        assert audit.pair.output_token_ids == IDS and audit.pair.finish_reason == "length"
        assert audit.chain_pos == 1
        await rig.gw.close()
    run(body())


def test_client_leaving_mid_stream_leaves_a_cut_pair_holding_all_it_got(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await serving_rig(tmp_path, tiny_model_dir, sse_answer(IDS), event_delay=0.02)
        reply = await rig.gw.complete("completions", stream_body())
        assert reply.chunks is not None
        released = tokens_of(reply.body)
        async for piece in reply.chunks:
            released += tokens_of(piece)
            if len(released) >= 3:
                break  # the client hangs up
        await reply.after_release()
        await asyncio.sleep(0.1)
        assert rig.server.streams_open == 0  # the server was told to stop
        await flush(rig)
        [audit] = rig.recomputer.audits
        pair = audit.pair
        assert pair.finish_reason == "cut" and pair.output_token_ids == IDS[:len(
            pair.output_token_ids)]
        assert pair.output_token_ids[:len(released)] == released  # nothing released is missing
        assert len(pair.output_token_ids) < len(IDS)
        # the next request is drawn after it (tag order holds)
        r2 = await rig.gw.complete("completions", stream_body())
        await r2.read()
        await r2.after_release()
        await flush(rig)
        assert [a.pair.tag.seq for a in rig.recomputer.audits] == [0, 1]
        await rig.gw.close()
    run(body())


def test_server_dying_mid_stream_is_alarmed_and_logged_cut(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await serving_rig(tmp_path, tiny_model_dir, sse_answer(IDS))
        rig.server.cut_after = 5
        reply = await rig.gw.complete("completions", stream_body())
        raw = await reply.read()
        await reply.after_release()
        events = events_of(raw)
        assert tokens_of(raw) == IDS[:5]
        assert events[-1]["error"]["code"] == "stream_cut"
        assert [e for e in events if e.get("choices") and
                e["choices"][0]["finish_reason"] == "cut"]
        await flush(rig)
        [audit] = rig.recomputer.audits
        assert audit.pair.finish_reason == "cut" and audit.pair.output_token_ids == IDS[:5]
        kinds = [a["kind"] for a in await rig.gw.alarms()]
        assert "stream_cut" in kinds
        await rig.gw.close()
    run(body())


@pytest.mark.parametrize("event_delay", [0.01, 0.0])
def test_server_stepping_outside_the_protocol_mid_stream_is_cut_before_the_bad_chunk(
        tmp_path: Path, tiny_model_dir: Path, event_delay: float) -> None:
    """Attack: a server that sends a token outside the vocabulary mid-stream. The client
    never gets it, the pair is logged cut right before it, an alarm is raised — also
    when the good tokens and the bad one come in one read (``event_delay`` 0)."""
    async def body() -> None:
        rig = await serving_rig(tmp_path, tiny_model_dir, sse_answer(IDS, bad_at=4),
                                event_delay=event_delay)
        reply = await rig.gw.complete("completions", stream_body())
        raw = await reply.read()
        await reply.after_release()
        assert tokens_of(raw) == IDS[:4] and b"9999" not in raw
        assert b"SERVER-TEXT" not in raw
        await flush(rig)
        [audit] = rig.recomputer.audits
        assert audit.pair.finish_reason == "cut" and audit.pair.output_token_ids == IDS[:4]
        assert "unpaired_output" in [a["kind"] for a in await rig.gw.alarms()]
        await rig.gw.close()
    run(body())


def test_server_power_loss_mid_stream_chains_the_stream_as_it_stood(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """The boot ends while a stream is open: the commit that closes it chains the
    stream's last durable chunk, so every released token is in the chain, and no later
    chunk is released."""
    async def body() -> None:
        rig = await serving_rig(tmp_path, tiny_model_dir, sse_answer(IDS), event_delay=0.03)
        reply = await rig.gw.complete("completions", stream_body())
        assert reply.chunks is not None
        released = tokens_of(reply.body)
        it = aiter(reply.chunks)
        while len(released) < 3:
            released += tokens_of(await anext(it))
        boot_id = rig.gw._boot.boot_id  # type: ignore[union-attr]
        rig.power.crash()
        for _ in range(100):
            if rig.gw._boot is None:
                break
            await asyncio.sleep(0.01)
        rest = b"".join([p async for p in it])
        released += tokens_of(rest)
        found = logged(rig, 0)  # chained, its draw not made yet (it follows release)
        assert found is not None and found[1] == "cut"
        assert found[0] == released, "the chain holds exactly what was released"
        assert b'"error"' in rest
        await reply.after_release()
        await flush(rig)
        [audit] = rig.recomputer.audits
        assert audit.pair.output_token_ids == released and audit.boot_id == boot_id
        c = rig.log.counters(boot_id)
        assert c.closed and c.pairs == 1
        await rig.gw.close()
    run(body())


def test_a_token_that_splits_a_character_releases_its_text_with_the_next(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """The tiny tokenizer is byte-level: 'é' is two tokens. Sent in two chunks, the
    first releases no text (no U+FFFD reaches the client); the second releases 'é'."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model_dir).encode("é", add_special_tokens=False)
    assert len(ids) == 2

    async def body() -> None:
        rig = await serving_rig(tmp_path, tiny_model_dir, sse_answer(ids), event_delay=0.05)
        reply = await rig.gw.complete("completions", stream_body(max_tokens=2))
        raw = await reply.read()
        await reply.after_release()
        texts = [e["choices"][0]["text"] for e in events_of(raw) if e.get("choices")]
        assert texts[:2] == ["", "é"] and "\ufffd" not in "".join(texts)
        await rig.gw.close()
    run(body())


def test_release_policy_holds_a_stream_whole_to_its_fixed_time(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """With a release policy, a stream leaves only at the policy's time: all at once,
    never as the server's timing would have it."""
    async def body() -> None:
        rig = await serving_rig(tmp_path, tiny_model_dir, sse_answer(IDS), event_delay=0.0,
                                release=ReleasePolicy(base=0.4))
        t = time.monotonic()
        reply = await rig.gw.complete("completions", stream_body())
        waited = time.monotonic() - t
        assert reply.chunks is None and waited >= 0.39
        assert tokens_of(reply.body) == IDS
        await reply.after_release()
        await rig.gw.close()
    run(body())


def test_open_streams_share_their_chunks_commits_and_plain_requests_are_unchanged(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """Eight streams at once: their chunks go to the log in shared commits (group commit
    across open streams: fewer commits than chunks), every stream is whole and chained;
    a plain request beside them is answered as ever (one JSON object, its pair chained)."""
    async def body() -> None:
        rig = await serving_rig(tmp_path, tiny_model_dir, sse_answer(IDS), event_delay=0.01)
        batches: list[int] = []
        progress = rig.log.progress

        def counted(boot_id: str, pairs: list[Any]) -> list[None]:
            batches.append(len(pairs))
            return progress(boot_id, pairs)

        rig.log.progress = counted  # type: ignore[method-assign]

        async def one() -> list[int]:
            reply = await rig.gw.complete("completions", stream_body())
            raw = await reply.read()
            await reply.after_release()
            return tokens_of(raw)

        async def plain() -> dict[str, Any]:
            reply = await rig.gw.complete("completions", json.dumps(
                {"model": MODEL_ID, "prompt": "The quick brown fox", "max_tokens": 4}).encode())
            assert reply.chunks is None and reply.content_type == "application/json"
            await reply.after_release()
            return json.loads(reply.body)

        streamed, server = sse_answer(IDS), rig.server
        rig.server.answer = lambda r: streamed(r) if r.get("stream") else \
            (200, server.honest(r))
        got = await asyncio.gather(*(one() for _ in range(8)), plain())
        streams, obj = got[:-1], got[-1]
        assert all(len(s) == len(IDS) for s in streams)
        assert obj["object"] == "text_completion" and 1 <= len(obj["choices"][0]["token_ids"]) <= 4
        assert max(batches) > 1 and len(batches) < sum(batches), batches
        await flush(rig)
        assert sorted(a.pair.tag.seq for a in rig.recomputer.audits) == list(range(9))
        assert sum(a.pair.output_token_ids == IDS for a in rig.recomputer.audits) == 8
        await rig.gw.close()
    run(body())


def test_a_stream_cancelled_while_its_first_chunk_is_logged_ends_cut_in_tag_order(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """The request is cancelled (the gateway going away) while its first chunk's commit
    runs: that chunk is durable, so the pair is chained cut and drawn under its own tag,
    before the next request's — never left for a later boot to draw out of tag order."""
    async def body() -> None:
        import threading

        rig = await serving_rig(tmp_path, tiny_model_dir, sse_answer(IDS), event_delay=0.01)
        progress, logging, first = rig.log.progress, threading.Event(), [True]

        def slow(boot_id: str, pairs: list[Any]) -> list[None]:
            if first[0]:
                first[0] = False
                logging.set()
                time.sleep(0.2)  # the first chunk's commit, still running when cancelled
            return progress(boot_id, pairs)

        rig.log.progress = slow  # type: ignore[method-assign]
        task = asyncio.ensure_future(rig.gw.complete("completions", stream_body()))
        while not logging.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        r2 = await rig.gw.complete("completions", stream_body())
        await r2.read()
        await r2.after_release()
        await asyncio.sleep(0.3)  # the cut pair's append and both draws
        await flush(rig)
        audits = rig.recomputer.audits
        assert [a.pair.tag.seq for a in audits] == [0, 1]
        assert audits[0].pair.finish_reason == "cut"
        assert audits[0].pair.output_token_ids == IDS[:len(audits[0].pair.output_token_ids)]
        assert audits[0].pair.output_token_ids and audits[1].pair.output_token_ids == IDS
        await rig.gw.close()
    run(body())
