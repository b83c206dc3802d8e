"""The gateway's link to its server (the note's input/output NIC pairs, server side).

A one-method-per-verb interface (:class:`Upstream`) so the gateway core can be driven
by an in-memory server in tests (:mod:`ivp.gateway.testing`) and over HTTP/1.1 on a
loopback port in production: inference requests (small JSON bodies, one per served
pair: the hot path) go over a minimal keep-alive client of their own
(:class:`_Connections`, a third of aiohttp's client cost per request); health checks
and the streamed weights use aiohttp. Every failure to reach the server becomes
:class:`~ivp.errors.TransportError` here, at the boundary. Answers are read up to a
cap: a server cannot exhaust the gateway's memory with an endless answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from ivp.errors import TransportError

MAX_ANSWER = 64 << 20  # bytes read from one server answer at most
MAX_HEAD = 64 << 10  # bytes of one answer's status line and headers at most


class _BadAnswer(Exception):
    """The server's bytes are not an HTTP/1.1 answer this client reads."""


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, keep-alive) of one HTTP/1.1 answer (Content-Length, chunked, or
    delimited by the connection's end), the body capped at MAX_ANSWER bytes."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise _BadAnswer(f"not an HTTP answer: {lines[0][:80]!r}")
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    keep = parts[0] == b"HTTP/1.1" and headers.get(b"connection") != b"close"
    if b"chunked" in headers.get(b"transfer-encoding", b""):
        return status, await _read_chunked(reader), keep
    if b"content-length" in headers:
        size = int(headers[b"content-length"])
        if size > MAX_ANSWER:
            raise TransportError(f"server answer larger than {MAX_ANSWER} bytes: dropped")
        return status, await reader.readexactly(size), keep
    body = await reader.read(MAX_ANSWER + 1)  # until the server closes
    while len(body) <= MAX_ANSWER and (more := await reader.read(MAX_ANSWER + 1 - len(body))):
        body += more
    if len(body) > MAX_ANSWER:
        raise TransportError(f"server answer larger than {MAX_ANSWER} bytes: dropped")
    return status, body, False


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        n = int(line.split(b";", 1)[0].strip(), 16)
        if n == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return b"".join(chunks)
        size += n
        if size > MAX_ANSWER:
            raise TransportError(f"server answer larger than {MAX_ANSWER} bytes: dropped")
        chunks.append(await reader.readexactly(n))
        if await reader.readexactly(2) != b"\r\n":
            raise _BadAnswer("chunk not followed by CRLF")


class _Connections:
    """Keep-alive HTTP/1.1 connections to one loopback server, one request at a time
    each. ``reset`` drops them all (after a power cycle they lead to a dead process);
    a connection in use at a reset is closed when its request ends."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._epoch = 0

    async def _take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()  # the server closed it while idle
        return await asyncio.open_connection(self.host, self.port, limit=MAX_HEAD)

    async def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        epoch = self._epoch
        reader, writer = await self._take()
        keep = False
        try:
            async with asyncio.timeout(timeout):
                writer.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: "
                             b"application/json\r\nContent-Length: %d\r\n\r\n"
                             % (path.encode(), self.host.encode(), self.port, len(body))
                             + body)
                status, data, keep = await _read_answer(reader)
            return status, data
        finally:
            if keep and epoch == self._epoch and len(self._idle) < self.limit:
                self._idle.append((reader, writer))
            else:
                writer.close()

    def reset(self) -> None:
        self._epoch += 1
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()


class Upstream(Protocol):
    """HTTP to the server. ``body`` may be an async stream of chunks (weights).

    Raises:
        TransportError: unreachable, reset, timed out, or an answer over the cap.
    """

    async def get(self, path: str, *, timeout: float = 10.0) -> tuple[int, bytes]: ...

    async def post(self, path: str, body: bytes | AsyncIterable[bytes], *,
                   timeout: float = 600.0) -> tuple[int, bytes]: ...

    async def reset(self) -> None:
        """Forget pooled connections (called after every power cycle)."""


class HttpUpstream:
    """:class:`Upstream` over aiohttp to ``http://host:port``."""

    def __init__(self, base_url: str, *, connections: int = 256) -> None:
        self.base_url = base_url.rstrip("/")
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        where = urlsplit(self.base_url)
        self._fast = _Connections(where.hostname or "127.0.0.1", where.port or 80,
                                  connections) if where.scheme == "http" else None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._connections, force_close=False)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > MAX_ANSWER:
                raise TransportError(f"server answer larger than {MAX_ANSWER} bytes: dropped")
            chunks.append(chunk)
        return b"".join(chunks)

    async def get(self, path: str, *, timeout: float = 10.0) -> tuple[int, bytes]:
        try:
            async with self._client().get(
                self.base_url + path, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                return resp.status, await self._read(resp)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransportError(_unreachable(path, exc)) from None

    async def post(self, path: str, body: bytes | AsyncIterable[bytes], *,
                   timeout: float = 600.0) -> tuple[int, bytes]:
        if isinstance(body, bytes) and self._fast is not None:
            try:
                return await self._fast.post(path, body, timeout)
            except TransportError:
                raise
            except (TimeoutError, OSError, EOFError, asyncio.LimitOverrunError,
                    asyncio.IncompleteReadError, ValueError, _BadAnswer) as exc:
                raise TransportError(_unreachable(path, exc)) from None
        headers = {"Content-Type": "application/json" if isinstance(body, bytes)
                   else "application/octet-stream"}
        try:
            async with self._client().post(
                self.base_url + path, data=body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                return resp.status, await self._read(resp)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransportError(_unreachable(path, exc)) from None

    async def reset(self) -> None:
        """Drop pooled connections (after a power cycle they point at a dead process)."""
        if self._fast is not None:
            self._fast.reset()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def close(self) -> None:
        await self.reset()


def _unreachable(path: str, exc: BaseException) -> str:
    """The error's type only: aiohttp's messages can quote what the server sent (a bad
    status line, a reason phrase), and error texts end up in alarms and in the
    operator's upload answer — both outside the gateway."""
    return f"server unreachable ({path}): {type(exc).__name__}"


__all__ = ["MAX_ANSWER", "HttpUpstream", "Upstream"]
