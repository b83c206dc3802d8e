"""The gateway's link to its server (the note's input/output NIC pairs, server side).

A one-method-per-verb interface (:class:`Upstream`) so the gateway core can be driven
by an in-memory server in tests (:mod:`ivp.gateway.testing`) and by aiohttp on a
loopback port in production. Every failure to reach the server becomes
:class:`~ivp.errors.TransportError` here, at the boundary. Answers are read up to a
cap: a server cannot exhaust the gateway's memory with an endless answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Protocol

import aiohttp

from ivp.errors import TransportError

MAX_ANSWER = 64 << 20  # bytes read from one server answer at most


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
