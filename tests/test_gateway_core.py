"""The gateway core with in-memory peers: one test per attack or property."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gateway_rig import COMPLETION, MODEL_ID, flush, make_rig, run, started

from ivp.errors import (
    BrickedError,
    SignatureError,
    StateError,
    TransportError,
    ValidationError,
)
from ivp.gateway.core import State
from ivp.gateway.errors import (
    ServerProtocolError,
    ShutdownError,
    UnknownModelError,
    UploadRefusedError,
)
from ivp.protocol import chain
from ivp.protocol.encoding import canonical
from ivp.protocol.keys import SigningKey
from ivp.protocol.messages import manifest_digest


# --- secure boot ----------------------------------------------------------------------------
def test_whitelisted_upload_reaches_serving_with_a_signed_boot_record(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        assert rig.gw.state is State.UPLOAD
        result = await rig.upload()
        assert result["state"] == "serving" and rig.gw.state is State.SERVING
        assert result["bytes"] == rig.model.manifest.total_size
        # the server got the *whitelisted* manifest and exactly S bytes
        assert rig.server.manifest == rig.model.manifest
        assert bytes(rig.server.received) == rig.model.blob
        await flush(rig)
        [boot] = rig.recomputer.boots  # signature checked by the fake recomputer
        assert boot.boot_id == result["boot_id"] and boot.gateway_id == "gw-test"
        assert boot.manifest_digest == manifest_digest(rig.model.manifest)
        assert boot.epsilon == 1.0
        await rig.gw.close()
    run(body())


@pytest.mark.parametrize("index", [0, 4, 6, 9])  # config, tokenizer.json, first & last shard
def test_flipped_byte_in_a_file_power_kills_at_its_end(
        tmp_path: Path, tiny_model_dir: Path, index: int) -> None:
    """Attack: upload weights that are not whitelisted. POWER_KILL: server restarted,
    counter zeroed, back to UPLOAD; the server saw nothing past the bad file."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        name = rig.model.manifest.files[index].name
        start, end = rig.model.file_span(name)
        data = bytearray(rig.model.blob)
        data[(start + end) // 2] ^= 0x01
        cycles = rig.power.cycles
        seen: list[int] = []
        original = rig.server.post

        async def spy(path, body, **kw):  # type: ignore[no-untyped-def]
            if path == "/boot/stream":
                async def counting():  # type: ignore[no-untyped-def]
                    n = 0
                    async for c in body:
                        n += len(c)
                        seen.append(n)
                        yield c
                return await original(path, counting(), **kw)
            return await original(path, body, **kw)

        rig.server.post = spy  # type: ignore[method-assign]
        with pytest.raises(UploadRefusedError) as err:
            await rig.upload(bytes(data), chunk=4096)
        assert err.value.reason == "digest" and err.value.file == name
        assert name in str(err.value)
        assert max(seen, default=0) <= end  # nothing of the next file reached the server
        assert rig.power.cycles == cycles + 1  # power-killed (the upload began on a fresh one)
        assert rig.gw.state is State.UPLOAD and rig.server.state == "empty"
        assert rig.server.powered
        # a fresh upload of the right bytes still boots: counter was zeroed
        rig.server.post = original  # type: ignore[method-assign]
        assert (await rig.upload())["state"] == "serving"
        await rig.gw.close()
    run(body())


def test_short_and_long_streams_power_kill(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        with pytest.raises(UploadRefusedError) as err:
            await rig.upload(rig.model.blob[:-1])
        assert err.value.reason == "short"
        with pytest.raises(UploadRefusedError) as err:
            await rig.upload(rig.model.blob + b"\x00" * 10)
        assert err.value.reason == "long"
        assert rig.gw.state is State.UPLOAD
        await rig.gw.close()
    run(body())


def test_model_not_on_the_whitelist_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        cycles = rig.power.cycles
        with pytest.raises(UnknownModelError, match="not on the installed whitelist"):
            await rig.upload(model_id="rogue-model")
        assert rig.power.cycles == cycles and rig.gw.state is State.UPLOAD
        await rig.gw.close()
    run(body())


def test_server_that_keeps_its_memory_across_power_cycles_is_refused(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """Attack: a server with hidden persistent state (not memoryless)."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        await rig.upload()
        rig.server.persist_state = True
        with pytest.raises(ServerProtocolError, match="not memoryless"):
            await rig.upload()
        assert rig.gw.state is not State.SERVING
        await rig.gw.close()
    run(body())


def test_server_that_stops_reading_weights_is_power_killed(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, upload_queue=1))
        rig.server.stop_reading_at = 10_000
        with pytest.raises(UploadRefusedError) as err:
            await rig.upload(chunk=4096)
        assert err.value.reason == "server"
        assert rig.gw.state is State.UPLOAD
        await rig.gw.close()
    run(body())


# --- serving ---------------------------------------------------------------------------------
def test_inference_before_serving_is_refused_and_nothing_reaches_the_server(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        with pytest.raises(StateError, match="UPLOAD mode, not SERVING"):
            await rig.gw.complete("completions", COMPLETION)
        assert rig.server.requests == []
        await rig.gw.close()
    run(body())


def test_response_is_rebuilt_from_token_ids_and_committed_before_release(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """Attack: the server formats its own answer to carry data. Only token ids pass."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        await rig.upload()
        reply = await rig.gw.complete("completions", COMPLETION)
        answer = json.loads(reply.body)
        sent = rig.server.requests[-1]
        ids, finish = rig.server.tokens(sent)
        assert answer["choices"][0]["token_ids"] == ids
        assert answer["choices"][0]["finish_reason"] == finish
        assert rig.server.junk_text not in reply.body.decode()
        assert "extra" not in answer and "seed" not in answer
        assert answer["ivp"]["tag"] == sent["ivp_tag"]
        assert answer["model"] == MODEL_ID and answer["object"] == "text_completion"
        # the server got token ids (whitelisted tokenizer), a TRNG seed, the tag
        assert isinstance(sent["prompt"], list) and sent["prompt"][0] == 1
        assert 0 <= sent["seed"] < 2**64
        # logged durably before release; the draw has not happened yet
        assert rig.log.pair_count() == 1 and rig.log.spool_depth() == 1  # only BOOT
        await reply.after_release()
        assert rig.log.pair_count() == 0 and rig.log.spool_depth() == 2  # BOOT + AUDIT
        await flush(rig)
        [audit] = rig.recomputer.audits
        assert audit.audit_seq == 1 and audit.pair.output_token_ids == ids
        assert audit.pair.output_text == answer["choices"][0]["text"]
        assert audit.pair.seed == sent["seed"]
        await rig.gw.close()
    run(body())


def test_chat_and_streaming_requests_are_tagged_logged_and_audited(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        await rig.upload()
        chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 6}
        r1 = await rig.gw.complete("chat.completions", json.dumps(chat).encode())
        await r1.after_release()
        a1 = json.loads(r1.body)
        assert a1["object"] == "chat.completion"
        assert a1["choices"][0]["message"]["role"] == "assistant"
        stream = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 6, "stream": True}
        r2 = await rig.gw.complete("completions", json.dumps(stream).encode())
        raw = await r2.read()
        await r2.after_release()
        assert r2.content_type == "text/event-stream"
        events = [e[6:] for e in raw.decode().split("\n\n") if e]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        ids = [t for c in chunks for t in c["choices"][0]["token_ids"]]
        assert ids == rig.server.tokens(rig.server.requests[-1])[0]
        assert all(len(c["choices"][0]["token_ids"]) <= 1 for c in chunks)  # our chunking
        assert chunks[-1]["ivp"]["tag"]["seq"] == 1
        assert b"SERVER-FORMATTED" not in raw and b'"x"' not in raw
        await flush(rig)
        assert [a.audit_seq for a in rig.recomputer.audits] == [1, 2]
        assert rig.recomputer.audits[0].pair.endpoint == "chat.completions"
        assert rig.recomputer.audits[1].pair.output_token_ids == ids
        await rig.gw.close()
    run(body())


def test_stop_string_cuts_output_text_and_log_and_the_server_never_sees_it(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """The gateway cuts at the first stop string (tokens, text, log alike); the server
    gets no stop parameter, so it cannot steer or learn the cut."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.encode("Hello world. The end is near, the end.", add_special_tokens=False)

    def answer(request: dict) -> tuple[int, bytes]:
        choice = {"token_ids": ids, "finish_reason": "length"}
        if request.get("stream"):
            events = [{"choices": [choice], "ivp_tag": request["ivp_tag"]}]
            return 200, b"".join(b"data: " + json.dumps(e).encode() + b"\n\n"
                                 for e in events) + b"data: [DONE]\n\n"
        return 200, json.dumps({"choices": [choice], "ivp_tag": request["ivp_tag"]}).encode()

    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        await rig.upload()
        rig.server.answer = answer
        request = {"model": MODEL_ID, "prompt": "x", "max_tokens": len(ids), "stop": [" end"]}
        reply = await rig.gw.complete("completions", json.dumps(request).encode())
        await reply.after_release()
        choice = json.loads(reply.body)["choices"][0]
        assert choice["text"] == "Hello world. The" and choice["finish_reason"] == "stop"
        kept = choice["token_ids"]
        assert kept == ids[:len(kept)] and len(kept) < len(ids)
        assert " end" in tok.decode(kept) and " end" not in tok.decode(kept[:-1])
        assert "stop" not in rig.server.requests[-1]
        stream = {**request, "stream": True, "stream_options": {"include_usage": True}}
        reply = await rig.gw.complete("completions", json.dumps(stream).encode())
        raw = await reply.read()
        await reply.after_release()
        events = [json.loads(e[6:]) for e in raw.decode().split("\n\n")
                  if e and e != "data: [DONE]"]
        assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == \
            "Hello world. The"
        assert events[-2]["choices"][0]["finish_reason"] == "stop"
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == \
            len(kept)
        assert all("usage" not in e for e in events[:-1])
        await flush(rig)
        for audit in rig.recomputer.audits:
            assert audit.pair.stop == [" end"] and audit.pair.output_token_ids == kept
            assert audit.pair.output_text == "Hello world. The"
            assert audit.pair.finish_reason == "stop"
        assert len(rig.recomputer.audits) == 2
        await rig.gw.close()
    run(body())


def test_request_for_another_model_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        await rig.upload()
        with pytest.raises(UnknownModelError, match="serves only 'tiny'"):
            await rig.gw.complete("completions", b'{"model": "gpt-x", "prompt": "hi"}')
        assert rig.server.requests == []
        await rig.gw.close()
    run(body())


@pytest.mark.parametrize("param", ['"seed": 5', '"logit_bias": {"3": 9}', '"n": 2',
                                   '"logprobs": true', '"presence_penalty": 0.1', '"echo": true'])
def test_unsupported_parameters_never_reach_the_server(
        tmp_path: Path, tiny_model_dir: Path, param: str) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        await rig.upload()
        raw = ('{"model": "tiny", "prompt": "hi", ' + param + "}").encode()
        with pytest.raises(ValidationError, match=param.split(":")[0].strip('"')):
            await rig.gw.complete("completions", raw)
        assert rig.server.requests == []
        await rig.gw.close()
    run(body())


@pytest.mark.parametrize("cheat", ["tag", "count", "garbage", "http500", "vocab"])
def test_server_output_outside_the_protocol_is_dropped_and_alarmed(
        tmp_path: Path, tiny_model_dir: Path, cheat: str) -> None:
    """Attack: unpaired output (another tag), or any answer outside the protocol."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        await rig.upload()

        def answer(req):  # type: ignore[no-untyped-def]
            tag = dict(req["ivp_tag"])
            ids = [5] * req["max_tokens"]
            if cheat == "tag":
                tag["seq"] += 7
            if cheat == "count":
                ids = [*ids, 5]
            if cheat == "vocab":
                ids = [10**6] * req["max_tokens"]
            if cheat == "garbage":
                return 200, b"SECRET-BITS-FOR-THE-CLIENT"
            if cheat == "http500":
                return 500, b"SECRET-BITS-FOR-THE-CLIENT"
            return 200, json.dumps({"choices": [{"token_ids": ids, "finish_reason": "length"}],
                                    "ivp_tag": tag}).encode()

        rig.server.answer = answer
        with pytest.raises(ServerProtocolError) as err:
            await rig.gw.complete("completions", COMPLETION)
        assert "SECRET" not in str(err.value) and "dropped" in str(err.value)
        assert rig.log.pair_count() == 0
        [alarm] = rig.log.alarms()
        assert alarm["kind"] == "unpaired_output"
        # the alarm leaves the gateway (GET /alarms, the uplink): none of the answer in it
        assert "SECRET" not in alarm["message"] and "10000" not in alarm["message"]
        await flush(rig)
        assert [a.message for a in rig.recomputer.alarms] == [alarm["message"]]
        await rig.gw.close()
    run(body())


def test_seeds_come_from_the_trng_and_tags_count_up(tmp_path: Path,
                                                    tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=0.5))
        await rig.upload()
        replies = await asyncio.gather(*(rig.gw.complete("completions", COMPLETION)
                                         for _ in range(8)))
        for r in replies:
            await r.after_release()
        seeds = [r["seed"] for r in rig.server.requests]
        assert len(set(seeds)) == 8
        assert sorted(r["ivp_tag"]["seq"] for r in rig.server.requests) == list(range(8))
        status = await rig.gw.status()
        assert status["pairs_served"] == 8
        await rig.gw.close()
    run(body())


def test_a_tampered_row_among_draws_sharing_a_commit_undoes_no_other(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """Draws released together share one savepoint; one whose sealed row was altered on
    disk is refused (alarmed, left in the log) and the others still become audits 1..3."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        await rig.upload()
        replies = await asyncio.gather(*(rig.gw.complete("completions", COMPLETION)
                                         for _ in range(4)))
        db = sqlite3.connect(rig.log.path)
        sealed = db.execute("SELECT sealed FROM pairs WHERE pos=2").fetchone()[0]
        db.execute("UPDATE pairs SET sealed=? WHERE pos=2",
                   (sealed[:-1] + bytes([sealed[-1] ^ 1]),))
        db.commit()
        db.close()
        await asyncio.gather(*(r.after_release() for r in replies))  # one queued run
        status = await rig.gw.status()
        assert rig.log.totals() == (4, 3) and status["pairs_served"] == 4
        assert rig.log.pair_count() == 1  # the altered row stays for recovery
        assert [a["kind"] for a in await rig.gw.alarms()] == ["log_corrupt"]
        await flush(rig)
        assert sorted(a.audit_seq for a in rig.recomputer.audits) == [1, 2, 3]
        assert 2 not in {a.chain_pos for a in rig.recomputer.audits}
        await rig.gw.close()
    run(body())


def test_audit_records_number_without_gaps_and_tie_into_the_chain(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """With ε = 1 every pair is audited: the recomputer can re-link the whole chain."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        boot_id = (await rig.upload())["boot_id"]
        replies = await asyncio.gather(*(rig.gw.complete("completions", COMPLETION)
                                         for _ in range(12)))
        for r in replies:
            await r.after_release()
        cp = await rig.gw.checkpoint()
        await flush(rig)
        audits = sorted(rig.recomputer.audits, key=lambda a: a.chain_prev)
        seqs = sorted(a.audit_seq for a in rig.recomputer.audits)
        assert seqs == list(range(1, 13))
        by_prev = {a.chain_prev: a for a in audits}
        head = chain.genesis("gw-test", boot_id)
        for _ in range(12):
            a = by_prev[head]
            assert chain.link(head, a.pair) == a.chain_head
            head = a.chain_head
        assert cp is not None and cp.chain_head == head and cp.pairs_served == 12
        assert cp.audits == 12 and rig.recomputer.checkpoints[-1] == cp
        await rig.gw.close()
    run(body())


def test_unsampled_pairs_are_deleted_but_the_chain_head_stays(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1e-12))
        boot_id = (await rig.upload())["boot_id"]
        for _ in range(5):
            r = await rig.gw.complete("completions", COMPLETION)
            await r.after_release()
        assert rig.log.pair_count() == 0
        c = rig.log.counters(boot_id)
        assert c.pairs == 5 and c.audits == 0 and c.head != chain.genesis("gw-test", boot_id)
        await rig.gw.close()
    run(body())


def test_epsilon_sampling_rate_is_plausible(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=0.25,
                                     with_uplink=False))
        await rig.upload()
        for _ in range(200):
            r = await rig.gw.complete("completions", COMPLETION)
            await r.after_release()
        audits = rig.log.totals()[1]
        assert 25 <= audits <= 80  # Binomial(200, 0.25): mean 50, sd 6.1
        await rig.gw.close()
    run(body())


# --- control, tamper ----------------------------------------------------------------------------
def test_shutdown_signed_by_the_recomputer_stops_all_traffic_for_good(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        await rig.upload()
        answer = await rig.gw.control(rig.shutdown_envelope())
        assert answer["state"] == "shutdown" and rig.gw.state is State.SHUTDOWN
        assert not rig.server.powered
        with pytest.raises(ShutdownError):
            await rig.gw.complete("completions", COMPLETION)
        with pytest.raises(ShutdownError):
            await rig.upload()
        await rig.gw.close()
        again = await started(make_rig(tmp_path, tiny_model_dir))  # restart: still shut
        assert again.gw.state is State.SHUTDOWN
        assert (await again.gw.status())["reason"] == "audit failed"
        with pytest.raises(ShutdownError):
            await again.upload()
        assert not again.server.powered
        await again.gw.close()
    run(body())


@pytest.mark.parametrize("forgery", ["other-key", "other-gateway", "wrong-type", "garbage"])
def test_forged_shutdown_is_refused_and_state_unchanged(
        tmp_path: Path, tiny_model_dir: Path, forgery: str) -> None:
    """Attack: the operator (or a peer) forges a Shutdown — or tries to un-shut."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        await rig.upload()
        if forgery == "other-key":
            env = rig.shutdown_envelope(key=SigningKey.generate())
            err: type[Exception] = SignatureError
        elif forgery == "other-gateway":
            env = rig.shutdown_envelope(gateway_id="gw-other")
            err = SignatureError
        elif forgery == "wrong-type":
            from ivp.protocol.envelope import CHECKPOINT, Envelope
            good = Envelope.from_bytes(rig.shutdown_envelope())
            env = canonical(Envelope(CHECKPOINT, good.payload, good.signatures))
            err = ValidationError
        else:
            env = b'{"not": "an envelope"}'
            err = ValidationError
        with pytest.raises(err):
            await rig.gw.control(env)
        assert rig.gw.state is State.SERVING
        assert (await rig.gw.complete("completions", COMPLETION)).status == 200
        await rig.gw.close()
    run(body())


def test_tamper_bricks_the_gateway_across_restarts(tmp_path: Path,
                                                   tiny_model_dir: Path) -> None:
    """Property 1: tamper = brick. Keys gone, log unreadable, all requests refused."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0, with_uplink=False))
        await rig.upload()
        r = await rig.gw.complete("completions", COMPLETION)
        await r.after_release()
        assert (await rig.gw.tamper())["state"] == "bricked"
        assert not rig.server.powered
        for call in (lambda: rig.gw.complete("completions", COMPLETION),
                     lambda: rig.upload(), lambda: rig.gw.control(rig.shutdown_envelope())):
            with pytest.raises(BrickedError):
                await call()
        assert (await rig.gw.status())["state"] == "bricked"
        with pytest.raises(BrickedError):
            rig.log.spool_batch()  # the sealed spool cannot be opened by anyone
        await rig.gw.close()
        again = await started(make_rig(tmp_path, tiny_model_dir, with_uplink=False))
        assert again.gw.state is State.BRICKED and not again.server.powered
        with pytest.raises(BrickedError):
            await again.upload()
        await again.gw.close()
        # no key material on disk: the UID is gone and nothing stored holds it
        assert not (tmp_path / "device" / "uid.secret").exists()
    run(body())


def test_log_is_sealed_at_rest(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The operator holds the disk: prompts and outputs are not readable on it."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0, with_uplink=False))
        await rig.upload()
        secret = b'{"model": "tiny", "prompt": "zebra quartz marmalade", "max_tokens": 4}'
        r = await rig.gw.complete("completions", secret)
        await r.after_release()
        r = await rig.gw.complete("completions", secret)  # one pair left undecided
        await rig.gw.close()
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("log.sqlite*"))
        assert b"zebra" not in raw and b"quartz" not in raw
    run(body())


# --- crash recovery, uplink -----------------------------------------------------------------------
def test_restart_decides_undecided_pairs_and_continues_the_audit_sequence(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """A crash between commit and draw: the pair is not lost, numbering stays gap-free."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0, with_uplink=False))
        boot_id = (await rig.upload())["boot_id"]
        r = await rig.gw.complete("completions", COMPLETION)
        await r.after_release()  # audit 1
        await rig.gw.complete("completions", COMPLETION)  # released, then the "crash"
        await rig.gw.close()
        again = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        assert again.gw.state is State.UPLOAD  # volatile counter: fresh upload needed
        await flush(again)
        assert [a.audit_seq for a in again.recomputer.audits] == [1, 2]
        assert {a.boot_id for a in again.recomputer.audits} == {boot_id}
        final = again.recomputer.checkpoints[-1]
        assert final.boot_id == boot_id and final.pairs_served == 2 and final.audits == 2
        assert final.chain_head == again.recomputer.audits[-1].chain_head
        assert again.log.open_boots() == []
        await again.gw.close()
    run(body())


@pytest.mark.parametrize("mode", ["down", "garbage", "forge", "short", "retry"])
def test_uplink_failures_lose_nothing(tmp_path: Path, tiny_model_dir: Path, mode: str) -> None:
    """A recomputer that is away, answers garbage, an operator answering in its name
    (``ok: true`` for everything, unsigned), a signed Ack that leaves a record out, or
    one that says "retry": every record not named held by a signed receipt stays."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        assert rig.gw.uplink is not None
        rig.recomputer.mode = mode
        await rig.upload()
        for _ in range(3):
            r = await rig.gw.complete("completions", COMPLETION)
            await r.after_release()
        if mode in ("short", "retry"):
            await rig.gw.uplink.flush_once()
            assert rig.log.spool_depth() == (1 if mode == "short" else 4)
        else:
            with pytest.raises(TransportError, match=r"unreachable|garbage|unsigned"):
                await rig.gw.uplink.flush_once()
            # + the signed alarm about the forged answer (the recomputer must learn of it)
            assert rig.log.spool_depth() == (5 if mode == "forge" else 4)
        if mode == "forge":  # alarmed once (uplinked), however often it is forged
            with pytest.raises(TransportError):
                await rig.gw.uplink.flush_once()
            kinds = [a["kind"] for a in rig.log.alarms()]
            assert kinds.count("uplink_forged_ack") == 1
            rig.recomputer.audits.clear()  # what the forging operator passed on: not held
        rig.gw.uplink._held.clear()  # no pause before the retry, for the test
        rig.recomputer.mode = "ok"
        rig.recomputer.replays = 0
        await flush(rig)
        assert rig.log.spool_depth() == 0
        assert sorted(a.audit_seq for a in rig.recomputer.audits) == [1, 2, 3]
        await rig.gw.close()
    run(body())


def test_refused_records_leave_the_spool_with_an_alarm(tmp_path: Path,
                                                        tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        assert rig.gw.uplink is not None
        rig.recomputer.mode = "refuse"
        await rig.upload()
        await flush(rig)
        assert rig.log.spool_depth() == 0
        assert rig.log.alarms()[0]["kind"] == "uplink_refused"
        await rig.gw.close()
    run(body())


def test_background_uplink_resumes_after_the_recomputer_returns(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0),
                            background_uplink=True)
        assert rig.gw.uplink is not None
        rig.gw.uplink.backoff.base = rig.gw.uplink.backoff.cap = 0.05
        rig.recomputer.mode = "down"
        await rig.upload()
        r = await rig.gw.complete("completions", COMPLETION)
        await r.after_release()
        await asyncio.sleep(0.2)
        assert rig.gw.uplink.stats.failures >= 1 and rig.log.spool_depth() == 2
        rig.recomputer.mode = "ok"
        for _ in range(100):
            if rig.log.spool_depth() == 0:
                break
            await asyncio.sleep(0.02)
        assert rig.log.spool_depth() == 0 and len(rig.recomputer.audits) == 1
        await rig.gw.close()
    run(body())


# --- power loss, forced reboot, time grid -------------------------------------------------------
def test_server_power_loss_returns_to_upload(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        await rig.upload()
        rig.power.crash()
        await asyncio.sleep(0.05)
        assert rig.gw.state is State.UPLOAD and rig.server.powered
        assert rig.server.state == "empty"
        with pytest.raises(StateError):
            await rig.gw.complete("completions", COMPLETION)
        assert any(a["kind"] == "server_power_loss" for a in rig.log.alarms())
        await rig.gw.close()
    run(body())


def test_forced_reboot_schedule_wipes_the_server(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Attack: a rogue model persisting in memory. The schedule bounds its lifetime."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, reboot_interval=0.3))
        await rig.upload()
        assert rig.gw.state is State.SERVING
        for _ in range(100):
            await asyncio.sleep(0.02)
            if rig.gw.state is State.UPLOAD:
                break
        assert rig.gw.state is State.UPLOAD and rig.server.state == "empty"
        await rig.gw.close()
    run(body())


def test_release_on_a_fixed_time_grid(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, release_grid=0.05))
        await rig.upload()
        loop = asyncio.get_running_loop()
        for _ in range(3):
            await rig.gw.complete("completions", COMPLETION)
            phase = loop.time() % 0.05
            assert phase < 0.01 or phase > 0.049  # released on a grid point
        await rig.gw.close()
    run(body())


def test_newer_whitelist_survives_restart_with_an_older_file(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """Attack: rollback to an older whitelist by restarting with an old file."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        await rig.upload()
        v2 = rig.model.signed_whitelist(2, manifests=[])  # v2 drops the model
        assert (await rig.gw.install_whitelist(v2))["version"] == 2
        assert rig.gw.state is State.UPLOAD  # revoked while served: forced reboot
        with pytest.raises(Exception, match="rollback"):
            await rig.gw.install_whitelist(rig.model.signed_whitelist(1))
        await rig.gw.close()
        again = await started(make_rig(tmp_path, tiny_model_dir))  # file says v1
        assert again.gw.whitelist.current is not None
        assert again.gw.whitelist.current.version == 2
        with pytest.raises(UnknownModelError):
            await again.upload()
        await again.gw.close()
    run(body())


def test_server_chatter_during_upload_is_dropped_and_alarmed(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """Nothing the server says during UPLOAD leaves the gateway."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        original = rig.server.post

        async def chatty(path, body, **kw):  # type: ignore[no-untyped-def]
            status, raw = await original(path, body, **kw)
            if path.startswith("/boot/"):
                obj = json.loads(raw)
                obj["exfil"] = "SECRET-FROM-SERVER"
                raw = json.dumps(obj).encode()
            return status, raw

        rig.server.post = chatty  # type: ignore[method-assign]
        result = await rig.upload()
        assert result["state"] == "serving"
        assert "SECRET" not in json.dumps(result)
        kinds = [a["kind"] for a in rig.log.alarms()]
        assert kinds.count("server_outside_protocol") == 2
        assert "SECRET" not in json.dumps(rig.log.alarms())  # alarms leave the gateway
        await rig.gw.close()
    run(body())


def test_broken_operator_stream_power_kills(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A truncated weight stream (the connection breaks) is a short stream: POWER_KILL."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))

        async def broken():  # type: ignore[no-untyped-def]
            yield rig.model.blob[:50_000]
            raise ConnectionResetError("operator went away")

        with pytest.raises(UploadRefusedError) as err:
            await rig.gw.upload(MODEL_ID, broken())
        assert err.value.reason == "short"
        assert rig.gw.state is State.UPLOAD and rig.server.state == "empty"
        assert "upload_broken" in [a["kind"] for a in rig.log.alarms()]
        assert (await rig.upload())["state"] == "serving"
        await rig.gw.close()
    run(body())


def test_no_key_material_on_disk_after_tamper(tmp_path: Path, tiny_model_dir: Path) -> None:
    """After a tamper nothing in the state directory holds a key or the UID."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0, with_uplink=False))
        await rig.upload()
        r = await rig.gw.complete("completions", COMPLETION)
        await r.after_release()
        secrets_ = [rig.device.derive_key(p) for p in (
            "identity/ed25519", "seal/gateway/log/pair", "seal/gateway/log/spool",
            "seal/gateway/log/meta")]
        uid = (tmp_path / "device" / "uid.secret").read_bytes()
        await rig.gw.tamper()
        await rig.gw.close()
        blobs = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
        for secret in [uid, *secrets_]:
            for blob in blobs:
                assert secret not in blob and secret.hex().encode() not in blob
    run(body())


@settings(max_examples=25, deadline=None)
@given(answer=st.one_of(
    st.binary(max_size=64),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(
                     st.sampled_from(["results", "ok", "error", "accepted"]), c, max_size=3),
                 max_leaves=8).map(lambda v: json.dumps(v).encode())))
def test_garbage_acks_never_drop_a_record(answer: bytes) -> None:
    """Hypothesis: whatever the 'recomputer' answers without the recomputer's key, no
    record leaves the spool (only a signed receipt naming it may delete it)."""
    from ivp.gateway.answers import Spooled, judge_ack
    from ivp.gateway.uplink import Uplink
    from ivp.protocol.keys import SigningKey

    store = {1: Spooled(1, "AUDIT", "b", 1, b'{"payloadType":"x","payload":"","signatures":[]}'),
             2: Spooled(2, "AUDIT", "b", 2, b'{"payloadType":"x","payload":"e30=",'
                                            b'"signatures":[]}')}
    removed: list[int] = []
    key = SigningKey.generate().verify_key

    async def fetch(n: int, skip: frozenset[int] = frozenset()) -> list[Spooled]:
        return [v for k, v in store.items() if k not in skip][:n]

    async def done(acked: list[int], refused: list[tuple[int, str]]) -> None:
        removed.extend(acked)
        removed.extend(i for i, _ in refused)

    async def alarm(kind: str, msg: str) -> None:
        return None

    class Garbage:
        async def post(self, body: bytes) -> bytes:
            return answer

    async def body() -> None:
        up = Uplink(Garbage(), fetch, done, alarm,
                    lambda raw, batch: judge_ack(raw, batch, key, "gw-test"))
        try:
            await up.flush_once()
        except Exception as exc:
            assert type(exc).__name__ == "TransportError"
        assert removed == []
    run(body())


def test_client_leaving_during_the_commit_still_gets_its_pair_drawn(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """A cancelled request whose pair committed is not left undecided in the log."""
    async def body() -> None:
        import time as _time

        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0, with_uplink=False))
        await rig.upload()
        append = rig.log.append

        def slow_append(*a, **kw):  # type: ignore[no-untyped-def]
            _time.sleep(0.2)
            return append(*a, **kw)

        rig.log.append = slow_append  # type: ignore[method-assign]
        task = asyncio.ensure_future(rig.gw.complete("completions", COMPLETION))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.4)
        assert rig.log.pair_count() == 0
        assert rig.log.totals()[1] == 1
        await rig.gw.close()
    run(body())


def test_audit_records_hold_pairs_in_tag_order_when_answers_overtake(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """Responses finish out of order; audit numbering still follows tag order (the
    recomputer refuses a record whose pair precedes the previous record's)."""
    async def body() -> None:
        import random

        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        await rig.upload()
        original = rig.server.post
        rng = random.Random(3)

        async def slow(path, body, **kw):  # type: ignore[no-untyped-def]
            if path == "/v1/completions":
                await asyncio.sleep(rng.uniform(0, 0.05))
            return await original(path, body, **kw)

        rig.server.post = slow  # type: ignore[method-assign]

        async def one() -> None:
            r = await rig.gw.complete("completions", COMPLETION)
            await asyncio.sleep(rng.uniform(0, 0.02))
            await r.after_release()

        await asyncio.gather(*(one() for _ in range(16)))
        await flush(rig)
        audits = sorted(rig.recomputer.audits, key=lambda a: a.audit_seq)
        assert [a.audit_seq for a in audits] == list(range(1, 17))
        assert [a.pair.tag.seq for a in audits] == list(range(16))
        await rig.gw.close()
    run(body())
