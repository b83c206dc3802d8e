"""The gateway's HTTP link to its server: the keep-alive inference client and its limits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ivp.errors import TransportError
from ivp.gateway import upstream
from ivp.gateway.upstream import HttpUpstream


async def _serve(app: web.Application) -> tuple[TestServer, HttpUpstream]:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server, HttpUpstream(str(server.make_url("")))


def _app() -> web.Application:
    app = web.Application()

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"got": (await request.read()).decode(),
                                  "peer": request.transport.get_extra_info("peername")[1]})

    async def sse(_request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(_request)
        for i in range(3):
            await resp.write(b"data: %d\n\n" % i)
        await resp.write_eof()
        return resp

    async def big(_request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 4096)

    async def huge_chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(8):
            await resp.write(b"y" * 1024)
        await resp.write_eof()
        return resp

    async def fail(_request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "no", "type": "X"}}, status=503)

    app.add_routes([web.post("/echo", echo), web.post("/sse", sse), web.post("/big", big),
                    web.post("/huge", huge_chunked), web.post("/fail", fail)])
    return app


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())  # type: ignore[arg-type]


def test_json_and_chunked_answers_on_one_kept_alive_connection() -> None:
    async def body() -> None:
        server, up = await _serve(_app())
        try:
            import json

            s1, a1 = await up.post("/echo", b'{"a": 1}')
            s2, a2 = await up.post("/echo", b'{"a": 2}')
            assert (s1, s2) == (200, 200)
            assert json.loads(a1)["got"] == '{"a": 1}'
            assert json.loads(a1)["peer"] == json.loads(a2)["peer"]  # connection reused
            status, stream = await up.post("/sse", b"{}")
            assert status == 200 and stream == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
            assert (await up.post("/fail", b"{}"))[0] == 503
            await up.reset()  # a power cycle: pooled connections are dropped
            _, a3 = await up.post("/echo", b"{}")
            assert json.loads(a3)["peer"] != json.loads(a1)["peer"]
        finally:
            await up.close()
            await server.close()
    run(body)


def test_answers_over_the_cap_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        monkeypatch.setattr(upstream, "MAX_ANSWER", 2048)
        server, up = await _serve(_app())
        try:
            for path in ("/big", "/huge"):
                with pytest.raises(TransportError, match="larger than"):
                    await up.post(path, b"{}")
            assert (await up.post("/echo", b"{}"))[0] == 200  # still usable
        finally:
            await up.close()
            await server.close()
    run(body)


def test_dead_or_silent_servers_become_transport_errors() -> None:
    async def body() -> None:
        server, up = await _serve(_app())
        assert (await up.post("/echo", b"{}"))[0] == 200
        await server.close()  # the pooled connection now leads nowhere
        with pytest.raises(TransportError, match="unreachable"):
            await up.post("/echo", b"{}")

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1 << 16)
            await asyncio.sleep(5)
            writer.close()

        garbage_server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = garbage_server.sockets[0].getsockname()[1]
        quiet = HttpUpstream(f"http://127.0.0.1:{port}")
        with pytest.raises(TransportError, match="unreachable"):
            await quiet.post("/v1/completions", b"{}", timeout=0.3)
        garbage_server.close()
        await quiet.close()
        await up.close()
    run(body)
