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


ANSWERS = {
    "length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "chunked": b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3;ext=1\r\nhel\r\n2\r\nlo\r\n0\r\nX-Trailer: t\r\n\r\n",
    "close": b"HTTP/1.0 202 Accepted\r\n\r\nhello",
    "extra": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\n",
    "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nx\r\n",
    "bad-crlf": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxyz",
    "not-http": b"SSH-2.0-x\r\n\r\n",
}


def test_answers_arriving_byte_by_byte() -> None:
    """Each framing parses whatever the packet boundaries; a connection that carried
    bytes outside an answer is never reused; garbage is a TransportError."""
    async def body() -> None:
        peers: list[int] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peers.append(writer.get_extra_info("peername")[1])
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                kind = (await reader.readexactly(length)).decode()
                step = len(ANSWERS[kind]) if kind == "extra" else 1  # extra: with the answer
                for i in range(0, len(ANSWERS[kind]), step):
                    writer.write(ANSWERS[kind][i:i + step])
                    await writer.drain()
                    await asyncio.sleep(0)
                if kind in ("close", "not-http", "bad-crlf"):
                    writer.close()
                    return

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        up = HttpUpstream(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        try:
            assert await up.post("/", b"length") == (200, b"hello")
            assert await up.post("/", b"chunked") == (201, b"hello")
            assert len(peers) == 1  # kept alive
            assert await up.post("/", b"close") == (202, b"hello")
            assert await up.post("/", b"extra") == (200, b"hello")
            assert await up.post("/", b"length") == (200, b"hello")
            assert len(peers) == 3  # neither the closed nor the talkative one was reused
            for kind in ("bad-chunk", "bad-crlf", "not-http"):
                with pytest.raises(TransportError, match="unreachable"):
                    await up.post("/", kind.encode())
        finally:
            await up.close()
            server.close()
    run(body)
