"""The gateway's link to its server (the note's input/output NIC pairs, server side).

A one-method-per-verb interface (:class:`Upstream`) so the gateway core can be driven
by an in-memory server in tests (:mod:`ivp.gateway.testing`) and over HTTP/1.1 on a
loopback port in production: inference requests (small JSON bodies, one per served
pair: the hot path) go over a minimal keep-alive client of their own
(:class:`_Connections`, a third of aiohttp's client cost per request); health checks
and the streamed weights use aiohttp. A streamed completion is read as it arrives
(:class:`StreamAnswer`): the gateway commits and releases each piece while the server
is still generating. Every failure to reach the server becomes
:class:`~ivp.errors.TransportError` here, at the boundary. Answers are read up to a
cap: a server cannot exhaust the gateway's memory with an endless answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from ivp.errors import TransportError

MAX_ANSWER = 64 << 20  # bytes read from one server answer at most
MAX_HEAD = 64 << 10  # bytes of one answer's status line and headers at most


class _BadAnswer(Exception):
    """The server's bytes are not an HTTP/1.1 answer this client reads."""


class StreamAnswer:
    """A server's answer read as it arrives (a streamed completion): :meth:`status`
    once its head is in, then :meth:`read` until it gives ``b""`` (the end).
    :meth:`close` drops the connection, so the server sees its reader gone and stops."""

    def __init__(self, close: Callable[[], None], path: str = "/v1/completions") -> None:
        self._close = close
        self._path = path
        self._status = 0
        self._pieces: list[bytes] = []
        self._ended = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # fed by the connection (on the event loop)
    def _head(self, status: int) -> None:
        self._status = status
        self._wake()

    def _push(self, piece: bytes) -> None:
        self._pieces.append(piece)
        self._wake()

    def _end(self, error: BaseException | None) -> None:
        if not self._ended:
            self._ended, self._error = True, error
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _raise(self) -> None:
        if self._error is not None:
            exc = self._error
            if isinstance(exc, TransportError):
                raise exc
            raise TransportError(_unreachable(self._path, exc)) from None

    async def status(self) -> int:
        """The answer's HTTP status (waits for its head).

        Raises:
            TransportError: the server failed before its head came.
        """
        while not self._status:
            if self._ended:
                self._raise()
                raise TransportError(_unreachable(self._path, EOFError()))
            await self._wait()
        return self._status

    async def read(self) -> bytes:
        """Every body byte that arrived since the last read (waits for at least one);
        ``b""`` once the answer ended.

        Raises:
            TransportError: the server failed, was reset, or timed out mid-answer.
        """
        while not self._pieces and not self._ended:
            await self._wait()
        if self._pieces:
            out = b"".join(self._pieces) if len(self._pieces) > 1 else self._pieces[0]
            self._pieces = []
            return out
        self._raise()
        return b""

    def close(self) -> None:
        """Drop the connection if the answer is still coming (the server stops)."""
        if not self._ended:
            self._end(TransportError("the answer was abandoned"))
            self._close()


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to the server, one request at a time. Each
    answer (Content-Length, chunked, or delimited by the connection's end; the body
    capped at MAX_ANSWER bytes) is parsed as its bytes arrive: no stream objects and no
    timeout scope per request (they were half of this client's CPU)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._buf = bytearray()
        self._status = 0  # 0: reading the head
        self._keep = False
        self._mode = ""  # "length", "chunked" or "close"
        self._need = 0  # length: body bytes; chunked: bytes of chunk + CRLF, -1: a line
        self._trailers = False
        self._body: list[bytes] = []
        self._size = 0
        self._answer: StreamAnswer | None = None  # a streamed answer: pieces go there

    def ask(self, request: bytes, timeout: float) -> asyncio.Future[tuple[int, bytes, bool]]:
        """Send ``request``; the future gives (status, body, keep-alive) of its answer."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self._status, self._trailers, self._body, self._size = 0, False, [], 0
        self._timer = loop.call_later(timeout, self._fail, TimeoutError())
        self.transport.write(request)
        return waiter

    def ask_streamed(self, request: bytes, timeout: float, answer: StreamAnswer
                     ) -> asyncio.Future[tuple[int, bytes, bool]]:
        """As :meth:`ask`, each piece of the body handed to ``answer`` as it arrives."""
        self._answer = answer
        return self.ask(request, timeout)

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        if self._answer is not None:
            self._answer._end(exc)
            self._answer = None
        self.close()

    def _finish(self, keep: bool) -> None:
        assert self._waiter is not None
        if self._timer is not None:
            self._timer.cancel()
        if self._answer is not None:
            for piece in self._body:  # a Content-Length or close-delimited body: at once
                self._answer._push(piece)
            self._body = []
            self._answer._end(None)
            self._answer = None
        if not self._waiter.done():
            self._waiter.set_result((self._status, b"".join(self._body), keep))
        self._waiter = None

    def _piece(self, piece: bytes) -> None:
        if self._answer is not None:
            self._answer._push(piece)
        else:
            self._body.append(piece)

    # --- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # the server spoke out of turn: never reuse this one
            self.close()
            return
        self._buf += data
        try:
            done = self._parse()
        except Exception as exc:  # any parse failure ends this connection
            self._fail(exc)
            return
        if done:
            leftover = bool(self._buf)  # bytes after the answer: drop the connection
            self._finish(self._keep and not leftover)
            if leftover:
                self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._waiter is None or self._waiter.done():
            return
        if exc is None and self._status and self._mode == "close":
            self._body = [bytes(self._buf)]
            self._finish(False)
        else:
            self._fail(exc or asyncio.IncompleteReadError(bytes(self._buf), None))

    # --- parsing ---------------------------------------------------------------------------
    def _parse(self) -> bool:
        """Consume what has arrived; True once the whole answer is in."""
        buf = self._buf
        if not self._status:
            head = self._take(b"\r\n\r\n", "answer head")
            if head is None:
                return False
            self._head(head)
            if self._answer is not None:
                self._answer._head(self._status)
        if self._mode == "length":
            if len(buf) < self._need:
                return False
            self._body = [bytes(buf[:self._need])]
            del buf[:self._need]
            return True
        if self._mode == "chunked":
            return self._chunks()
        if len(buf) > MAX_ANSWER:
            raise TransportError(f"server answer larger than {MAX_ANSWER} bytes: dropped")
        return False

    def _take(self, end_mark: bytes, what: str) -> bytes | None:
        """The bytes before ``end_mark``, consumed with it; None until it has arrived
        (and an error once more than MAX_HEAD bytes arrived without it)."""
        end = self._buf.find(end_mark)
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                raise _BadAnswer(f"{what} over the limit")
            return None
        out = bytes(self._buf[:end])
        del self._buf[:end + len(end_mark)]
        return out

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise _BadAnswer(f"not an HTTP answer: {lines[0][:80]!r}")
        status = int(parts[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        self._keep = parts[0] == b"HTTP/1.1" and headers.get(b"connection") != b"close"
        if b"chunked" in headers.get(b"transfer-encoding", b""):
            self._mode, self._need = "chunked", -1
        elif b"content-length" in headers:
            size = int(headers[b"content-length"])
            if size > MAX_ANSWER:
                raise TransportError(f"server answer larger than {MAX_ANSWER} bytes: dropped")
            if size < 0:
                raise _BadAnswer("negative Content-Length")
            self._mode, self._need = "length", size
        else:
            self._mode, self._keep = "close", False
        self._status = status

    def _chunks(self) -> bool:
        buf = self._buf
        while True:
            if self._need < 0:  # a chunk-size line, or a trailer line after the last chunk
                line = self._take(b"\r\n", "chunk line")
                if line is None:
                    return False
                if self._trailers:
                    if not line:
                        return True
                    continue
                n = int(line.split(b";", 1)[0].strip(), 16)
                if n < 0:
                    raise _BadAnswer("negative chunk size")
                if n == 0:
                    self._trailers = True
                    continue
                self._size += n
                if self._size > MAX_ANSWER:
                    raise TransportError(f"server answer larger than {MAX_ANSWER} bytes: "
                                         "dropped")
                self._need = n + 2
            if len(buf) < self._need:
                return False
            n = self._need
            if buf[n - 2:n] != b"\r\n":
                raise _BadAnswer("chunk not followed by CRLF")
            self._piece(bytes(buf[:n - 2]))
            del buf[:n]
            self._need = -1


class _Connections:
    """Keep-alive HTTP/1.1 connections to one loopback server, one request at a time
    each. ``reset`` drops them all (after a power cycle they lead to a dead process);
    a connection in use at a reset is closed when its request ends."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        self._idle: list[_Conn] = []
        self._epoch = 0

    async def _take(self) -> _Conn:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Conn, self.host, self.port)
        return conn

    async def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        epoch = self._epoch
        conn = await self._take()
        keep = False
        try:
            status, data, keep = await conn.ask(
                b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (path.encode(), self.host.encode(), self.port,
                                                  len(body)) + body, timeout)
            return status, data
        finally:
            if keep and epoch == self._epoch and len(self._idle) < self.limit \
                    and not conn.closed:
                self._idle.append(conn)
            else:
                conn.close()

    async def stream(self, path: str, body: bytes, timeout: float) -> StreamAnswer:
        """POST ``body``; the answer's pieces as they arrive (see :class:`StreamAnswer`)."""
        epoch = self._epoch
        conn = await self._take()
        answer = StreamAnswer(conn.close)
        done = conn.ask_streamed(
            b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (path.encode(), self.host.encode(), self.port,
                                              len(body)) + body, timeout, answer)

        def settle(fut: asyncio.Future[tuple[int, bytes, bool]]) -> None:
            keep = not fut.cancelled() and fut.exception() is None and fut.result()[2]
            if keep and epoch == self._epoch and len(self._idle) < self.limit \
                    and not conn.closed:
                self._idle.append(conn)
            else:
                conn.close()

        done.add_done_callback(settle)
        return answer

    def reset(self) -> None:
        self._epoch += 1
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class Upstream(Protocol):
    """HTTP to the server. ``body`` may be an async stream of chunks (weights).

    Raises:
        TransportError: unreachable, reset, timed out, or an answer over the cap.
    """

    async def get(self, path: str, *, timeout: float = 10.0) -> tuple[int, bytes]: ...

    async def post(self, path: str, body: bytes | AsyncIterable[bytes], *,
                   timeout: float = 600.0) -> tuple[int, bytes]: ...

    async def stream(self, path: str, body: bytes, *, timeout: float = 600.0
                     ) -> StreamAnswer:
        """POST ``body``; the answer as it arrives (a streamed completion)."""
        ...

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
        return await read_capped(resp.content, MAX_ANSWER, lambda: TransportError(
            f"server answer larger than {MAX_ANSWER} bytes: dropped"))

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

    async def stream(self, path: str, body: bytes, *, timeout: float = 600.0
                     ) -> StreamAnswer:
        if self._fast is None:  # not plain loopback HTTP: aiohttp, pieces as they come
            return self._aiohttp_stream(path, body, timeout)
        try:
            return await self._fast.stream(path, body, timeout)
        except OSError as exc:
            raise TransportError(_unreachable(path, exc)) from None

    def _aiohttp_stream(self, path: str, body: bytes, timeout: float) -> StreamAnswer:
        task: asyncio.Task[None] | None = None
        answer = StreamAnswer(lambda: task.cancel() if task is not None else None, path)

        async def pump() -> None:
            try:
                async with self._client().post(
                    self.base_url + path, data=body,
                    headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=timeout),
                ) as resp:
                    answer._head(resp.status)
                    size = 0
                    async for piece in resp.content.iter_any():
                        size += len(piece)
                        if size > MAX_ANSWER:
                            raise TransportError(f"server answer larger than {MAX_ANSWER} "
                                                 "bytes: dropped")
                        answer._push(piece)
                answer._end(None)
            except (TimeoutError, aiohttp.ClientError, OSError, TransportError) as exc:
                answer._end(exc)

        task = asyncio.ensure_future(pump())
        return answer

    async def reset(self) -> None:
        """Drop pooled connections (after a power cycle they point at a dead process)."""
        if self._fast is not None:
            self._fast.reset()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def close(self) -> None:
        await self.reset()


async def read_capped(stream: aiohttp.StreamReader, limit: int,
                      too_large: Callable[[], Exception]) -> bytes:
    """A body stream (a request's or an answer's) read whole; ``too_large()`` is raised
    as soon as more than ``limit`` bytes arrive, so an endless body costs no memory."""
    chunks, size = [], 0
    async for chunk in stream.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _unreachable(path: str, exc: BaseException) -> str:
    """The error's type only: aiohttp's messages can quote what the server sent (a bad
    status line, a reason phrase), and error texts end up in alarms and in the
    operator's upload answer — both outside the gateway."""
    return f"server unreachable ({path}): {type(exc).__name__}"


__all__ = ["MAX_ANSWER", "HttpUpstream", "StreamAnswer", "Upstream"]
