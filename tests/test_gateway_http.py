"""The gateway's HTTP shell: routes, the one error shape, status codes, bounded bodies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gateway_rig import COMPLETION, MODEL_ID, Rig, make_rig, run

from ivp.gateway.app import build_app
from ivp.gateway.upload import upload_model


@asynccontextmanager
async def client(rig: Rig) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(build_app(rig.gw))) as c:
        if rig.gw.uplink is not None:
            await rig.gw.uplink.stop()
        yield c


async def _json(resp) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(await resp.read())


def _err(body: dict) -> str:
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]["message"]


def test_status_codes_and_error_shape(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = make_rig(tmp_path, tiny_model_dir)
        async with client(rig) as c:
            st_ = await _json(await c.get("/status"))
            assert {"gateway_id", "state", "model_id", "boot_id", "pairs_served", "audits",
                    "spool_depth"} <= set(st_)
            assert st_["state"] == "upload"
            r = await c.post("/v1/completions", data=COMPLETION)
            assert r.status == 409 and "not SERVING" in _err(await _json(r))
            r = await c.post("/upload?model_id=rogue", data=b"x")
            assert r.status == 404 and "rogue" in _err(await _json(r))
            r = await c.post("/upload", data=b"x")
            assert r.status == 400
            r = await c.post(f"/upload?model_id={MODEL_ID}", data=rig.model.blob)
            answer = await _json(r)
            assert r.status == 200 and answer["state"] == "serving"
            r = await c.post("/v1/completions", data=COMPLETION)
            assert r.status == 200
            body_ = await _json(r)
            assert body_["ivp"]["tag"]["seq"] == 0 and body_["choices"][0]["token_ids"]
            r = await c.post("/v1/completions", data=b'{"model": "tiny", "prompt": "x", '
                                                     b'"seed": 1}')
            assert r.status == 400 and "seed" in _err(await _json(r))
            r = await c.post("/v1/completions", data=b'{"model": "other", "prompt": "x"}')
            assert r.status == 404
            r = await c.post("/v1/chat/completions", data=b"{not json")
            assert r.status == 400 and (await _json(r))["error"]["type"] == "ValidationError"
            r = await c.post("/v1/completions", data=b"x" * (2 << 20))
            assert r.status == 413
            r = await c.post("/control", data=b'{"payloadType": "x"}')
            assert r.status == 400
            r = await c.post("/control", data=rig.shutdown_envelope(key=rig.model.inspector))
            assert r.status == 403 and (await _json(await c.get("/status")))["state"] == "serving"
            metrics = await (await c.get("/metrics")).text()
            assert "ivp_gateway_pairs_total 1.0" in metrics
            assert 'ivp_gateway_state{ivp_gateway_state="serving"} 1.0' in metrics
            assert (await c.get("/alarms")).status == 200
            r = await c.post("/control", data=rig.shutdown_envelope())
            assert r.status == 200 and (await _json(r))["state"] == "shutdown"
            r = await c.post("/v1/completions", data=COMPLETION)
            assert r.status == 403 and (await _json(r))["state"] == "shutdown"
            assert (await _json(await c.get("/status")))["state"] == "shutdown"
    run(body())


def test_bad_upload_answers_power_kill_and_the_operator_reads_it(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = make_rig(tmp_path, tiny_model_dir)
        async with client(rig) as c:
            name = rig.model.manifest.files[7].name
            bad = tmp_path / "bad"
            bad.mkdir()
            files = []
            for f in rig.model.manifest.files:
                data = (tiny_model_dir / f.name).read_bytes()
                if f.name == name:
                    data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
                (bad / f.name).write_bytes(data)
                files.append((bad / f.name, f.size))
            url = str(c.make_url(""))
            answer = await upload_model(url, bad, MODEL_ID, files=files)
            assert answer["http_status"] == 400 and answer["state"] == "power_kill"
            assert answer["file"] == name and name in answer["error"]["message"]
            assert (await _json(await c.get("/status")))["state"] == "upload"
            good = await upload_model(url, tiny_model_dir, MODEL_ID)
            assert good["http_status"] == 200 and good["state"] == "serving"
    run(body())


def test_tamper_route_is_closed_by_default(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Attack: anyone who reaches the gateway's port POSTs /tamper to brick it (a denial
    of service that destroys the device key). Without --allow-tamper-endpoint there is
    no such route, and the device is untouched."""
    async def body() -> None:
        rig = make_rig(tmp_path, tiny_model_dir)
        async with TestClient(TestServer(build_app(rig.gw))) as c:
            r = await c.post("/tamper")
            assert r.status == 404
            assert not rig.device.bricked
            assert (await _json(await c.get("/status")))["state"] == "upload"
    run(body())


def test_tamper_route_bricks(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = make_rig(tmp_path, tiny_model_dir)
        async with TestClient(TestServer(build_app(rig.gw, tamper_endpoint=True))) as c:
            assert (await c.post(f"/upload?model_id={MODEL_ID}", data=rig.model.blob)).status \
                == 200
            r = await c.post("/tamper")
            assert r.status == 200 and (await _json(r))["state"] == "bricked"
            for path, data in (("/v1/completions", COMPLETION), (f"/upload?model_id={MODEL_ID}",
                                                                 b"x"), ("/control", b"{}")):
                r = await c.post(path, data=data)
                body_ = await _json(r)
                assert r.status == 403 and body_["state"] == "bricked", path
                assert "bricked" in _err(body_)
            assert (await _json(await c.get("/status")))["state"] == "bricked"
            assert (await c.get("/metrics")).status == 200
    run(body())


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_malformed_http_bodies_get_4xx_and_lose_nothing(
        tmp_path: Path, tiny_model_dir: Path, endpoint: str) -> None:
    """Hypothesis throws garbage at a SERVING gateway: always a clear 4xx, never a 5xx,
    and pairs already logged stay logged (chain head unchanged by refusals)."""
    async def body() -> None:
        rig = make_rig(tmp_path, tiny_model_dir, epsilon=1.0)
        async with client(rig) as c:
            await c.post(f"/upload?model_id={MODEL_ID}", data=rig.model.blob)
            assert (await c.post("/v1/completions", data=COMPLETION)).status == 200
            before = await _json(await c.get("/status"))

            @settings(max_examples=40, deadline=None,
                      suppress_health_check=list(HealthCheck))
            @given(st.one_of(
                st.binary(max_size=200),
                st.dictionaries(st.sampled_from(["model", "prompt", "messages", "max_tokens",
                                                 "temperature", "n", "seed", "stop", "x"]),
                                st.one_of(st.integers(), st.text(max_size=4), st.none(),
                                          st.lists(st.integers(), max_size=2)),
                                max_size=5).map(lambda d: json.dumps(d).encode())))
            def probe(data: bytes) -> None:
                statuses.append(data)

            statuses: list[bytes] = []
            probe()
            for data in statuses:
                r = await c.post(endpoint, data=data)
                assert 400 <= r.status < 500 or r.status == 200, (data, r.status)
                if r.status != 200:
                    _err(await _json(r))
            after = await _json(await c.get("/status"))
            assert after["state"] == "serving"
            assert after["pairs_served"] >= before["pairs_served"]
            assert rig.log.totals()[1] == after["pairs_served"]  # every pair kept (ε = 1)
    run(body())


def test_truncated_http_uploads_power_kill_and_the_gateway_recovers(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """Hypothesis: the operator's connection drops at a random byte of the upload."""
    async def body() -> None:
        rig = make_rig(tmp_path, tiny_model_dir)
        async with client(rig) as c:
            blob = rig.model.blob

            @settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
            @given(st.integers(0, len(blob) - 1))
            def cut_points(n: int) -> None:
                cuts.append(n)

            cuts: list[int] = []
            power_kills: list[dict] = []
            cut_points()
            for n in cuts:
                _reader, writer = await asyncio.open_connection(c.host, c.port)
                writer.write(f"POST /upload?model_id={MODEL_ID} HTTP/1.1\r\nHost: x\r\n"
                             f"Content-Length: {len(blob)}\r\n\r\n".encode() + blob[:n])
                await writer.drain()
                writer.close()
                kills = len(power_kills)
                for _ in range(300):
                    power_kills[:] = [a for a in await _json(await c.get("/alarms"))
                                      if a["kind"] == "power_kill"]
                    if len(power_kills) > kills:
                        break
                    await asyncio.sleep(0.01)
                assert len(power_kills) == kills + 1, n
                assert "operator connection lost" in power_kills[0]["message"], n
                for _ in range(300):
                    if (await _json(await c.get("/status")))["state"] == "upload":
                        break
                    await asyncio.sleep(0.01)
                assert (await _json(await c.get("/status")))["state"] == "upload"
            r = await c.post(f"/upload?model_id={MODEL_ID}", data=blob)
            assert r.status == 200
    run(body())


@settings(max_examples=8, deadline=None)
@given(extra=st.integers(-3, 3), declared=st.booleans())
def test_oversize_bodies_get_413(extra: int, declared: bool) -> None:
    """Bodies around the limit: at most the limit is read; past it a clear 413."""
    from ivp.gateway.app import read_body
    from ivp.gateway.errors import BodyTooLargeError

    limit = 1000

    class Content:
        def __init__(self, data: bytes) -> None:
            self.data = data

        async def iter_chunked(self, n: int):  # type: ignore[no-untyped-def]
            for i in range(0, len(self.data), 300):
                yield self.data[i:i + 300]

    class Req:
        def __init__(self, data: bytes) -> None:
            self.content = Content(data)
            self.content_length = len(data) if declared else None

    data = b"x" * (limit + extra)

    async def body() -> None:
        if extra > 0:
            with pytest.raises(BodyTooLargeError):
                await read_body(Req(data), limit)  # type: ignore[arg-type]
        else:
            assert await read_body(Req(data), limit) == data  # type: ignore[arg-type]
    run(body())


def test_nested_json_is_a_400_not_a_500(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Attack: a body nested 100,000 deep made the parser raise RecursionError (an
    HTTP 500 'internal error'); it is bad input, answered as such."""
    async def body() -> None:
        rig = make_rig(tmp_path, tiny_model_dir)
        async with client(rig) as c:
            assert (await c.post(f"/upload?model_id={MODEL_ID}", data=rig.model.blob)).status \
                == 200
            deep = b"[" * 100_000 + b"]" * 100_000
            for path in ("/v1/completions", "/v1/chat/completions", "/control", "/admin"):
                r = await c.post(path, data=deep)
                assert 400 <= r.status < 500, (path, r.status)
                assert _err(await _json(r)), path
            assert (await _json(await c.get("/status")))["state"] == "serving"
    run(body())


def test_upload_of_a_model_the_whitelist_lacks_fails_before_a_byte_is_sent(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """`ivp upload` announces its body (Expect: 100-continue): the gateway refuses an
    unlisted model before a byte of the weights is read from disk or sent."""
    async def body() -> None:
        rig = make_rig(tmp_path, tiny_model_dir)
        async with client(rig) as c:
            sent: list[int] = []
            cycles = rig.power.cycles
            answer = await upload_model(str(c.make_url("")), tiny_model_dir, "rogue-model",
                                        progress=sent.append)
            assert answer["http_status"] == 404 and sent == []
            assert answer["error"]["code"] == "model_not_found"
            assert "'rogue-model' is not on the installed whitelist" in \
                answer["error"]["message"]
            assert rig.server.received == bytearray() and rig.power.cycles == cycles
            answer = await upload_model(str(c.make_url("")), tiny_model_dir, MODEL_ID,
                                        progress=sent.append)
            assert answer["state"] == "serving" and sum(sent) == rig.model.manifest.total_size
    run(body())


def test_a_streams_head_leaves_while_the_server_generates_and_a_break_is_told_in_stream(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """The response head of a stream goes out once the server said 200, before its first
    token (which waits for its commit): the client sees a 200 event stream early. A
    server that then breaks before any token ends that stream with an error event in the
    OpenAI shape (no pair is logged, the break is alarmed)."""
    async def body() -> None:
        rig = make_rig(tmp_path, tiny_model_dir)
        stream = json.dumps({"model": MODEL_ID, "prompt": "The quick brown fox",
                             "max_tokens": 4, "stream": True}).encode()
        async with client(rig) as c:
            r = await c.post(f"/upload?model_id={MODEL_ID}", data=rig.model.blob)
            assert (await _json(r))["state"] == "serving"
            rig.server.event_delay = 0.5  # the server takes its time over each token
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            r = await c.post("/v1/completions", data=stream)
            assert r.status == 200 and r.content_type == "text/event-stream"
            assert loop.time() - t0 < 0.4  # the head came before the first token
            assert b'"token_ids":[' in await r.content.readuntil(b"\n\n")
            assert loop.time() - t0 >= 0.5
            await r.read()
            served = rig.log.totals()[0]
            rig.server.event_delay, rig.server.cut_after = 0.0, 0  # dies before a token
            r = await c.post("/v1/completions", data=stream)
            assert r.status == 200
            events = (await r.read()).decode().split("\n\n")
            assert events[-2:] == ["data: [DONE]", ""]
            [error] = [json.loads(e[6:]) for e in events[:-2]]
            assert _err(error) and error["error"]["type"] == "TransportError"
            assert rig.log.totals()[0] == served  # nothing logged for it
            assert "stream_cut" in [a["kind"] for a in await rig.gw.alarms()]
    run(body())
