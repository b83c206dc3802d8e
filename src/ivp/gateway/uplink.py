"""Store-and-forward uplink to the recomputer (the note's "SRC NIC + sampler").

The spool in :class:`~ivp.gateway.log.PairLog` is durable; this module only moves
envelopes from it to ``<recomputer>/uplink`` and back out of it once acknowledged:

* a batch goes out as ``{"envelopes": [...]}`` built from the stored envelope bytes
  (never re-serialised: the signature covers exactly those bytes);
* the answer must be an :class:`~ivp.protocol.messages.Ack` with one result per
  envelope, in order. ``ok`` → the row is deleted; refused → deleted and alarmed
  (retrying would not help); a garbage answer (not an Ack, wrong length) acknowledges
  nothing and is retried like a transport failure, so a broken or hostile answer can
  never make the gateway drop a record;
* transport failures back off exponentially (with jitter) up to a cap; the spool
  survives restarts, so an audit record waits as long as the recomputer is away.

The transport is a one-method interface (:class:`UplinkTransport`), so tests use an
in-memory recomputer and the CLI an aiohttp one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from ivp.errors import IvpError, TransportError, ValidationError
from ivp.protocol.encoding import decode
from ivp.protocol.messages import Ack


class UplinkTransport(Protocol):
    """POST one uplink body, return the answer's bytes.

    Raises:
        TransportError: the recomputer could not be reached, or answered non-200.
    """

    async def post(self, body: bytes) -> bytes: ...


class HttpUplink:
    """:class:`UplinkTransport` over aiohttp to ``<url>/uplink``."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/") + "/uplink"
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def post(self, body: bytes) -> bytes:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.post(
                self.url, data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                data = await resp.read()
                if resp.status != 200:
                    raise TransportError(
                        f"recomputer answered HTTP {resp.status}: {data[:200]!r}")
                return data
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransportError(f"recomputer unreachable at {self.url}: {exc}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def uplink_body(envelopes: list[bytes]) -> bytes:
    """``{"envelopes":[...]}`` from canonical envelope bytes, without re-encoding them."""
    return b'{"envelopes":[' + b",".join(envelopes) + b"]}"


def parse_ack(raw: bytes, n: int) -> Ack:
    """The recomputer's Ack for a batch of ``n``.

    Raises:
        ValidationError: not an Ack, or not exactly one result per envelope (a
            garbage acknowledgement: nothing is taken as acknowledged).
    """
    ack = decode(raw, Ack)
    if len(ack.results) != n:
        raise ValidationError(f"ack has {len(ack.results)} results for {n} envelopes")
    return ack


@dataclass
class Backoff:
    """Exponential backoff with full jitter: ``uniform(0, min(cap, base * 2**tries))``."""

    base: float = 0.2
    cap: float = 30.0
    tries: int = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * (2 ** min(self.tries, 30)))
        self.tries += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.tries = 0


@dataclass
class UplinkStats:
    sent: int = 0
    acked: int = 0
    refused: int = 0
    failures: int = 0
    garbage: int = 0
    last_error: str = ""


class Uplink:
    """Drains the spool to the recomputer, forever, until stopped.

    Args:
        transport: where batches go.
        fetch: returns the oldest spooled items (runs in the log's thread).
        done: records acknowledged ids and refused (id, reason) pairs.
        alarm: records an alarm (kind, message).
        batch: envelopes per POST.
    """

    def __init__(self, transport: UplinkTransport,
                 fetch: Callable[[int], Awaitable[list[tuple[int, bytes]]]],
                 done: Callable[[list[int], list[tuple[int, str]]], Awaitable[None]],
                 alarm: Callable[[str, str], Awaitable[None]],
                 *, batch: int = 64, backoff: Backoff | None = None,
                 idle_poll: float = 5.0) -> None:
        self.transport = transport
        self._fetch, self._done, self._alarm = fetch, done, alarm
        self.batch = batch
        self.backoff = backoff or Backoff()
        self.idle_poll = idle_poll
        self.stats = UplinkStats()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one batch in flight: never the same record twice
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ivp-uplink")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def flush_once(self) -> int:
        """Send one batch. Returns how many rows left the spool (acked + refused).

        Raises:
            TransportError: the recomputer was unreachable or answered garbage.
        """
        async with self._lock:
            return await self._flush_once()

    async def _flush_once(self) -> int:
        items = await self._fetch(self.batch)
        if not items:
            return 0
        body = uplink_body([env for _, env in items])
        self.stats.sent += len(items)
        raw = await self.transport.post(body)
        try:
            ack = parse_ack(raw, len(items))
        except ValidationError as exc:
            self.stats.garbage += 1
            await self._alarm("uplink_garbage_ack", f"recomputer answered garbage: {exc}")
            raise TransportError(f"garbage acknowledgement: {exc}") from None
        acked = [sid for (sid, _), r in zip(items, ack.results, strict=True) if r.ok]
        refused = [(sid, r.error or "refused") for (sid, _), r in
                   zip(items, ack.results, strict=True) if not r.ok]
        await self._done(acked, refused)
        self.stats.acked += len(acked)
        self.stats.refused += len(refused)
        return len(items)

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # a wake() from now on is seen by the next sleep
            try:
                moved = await self.flush_once()
            except asyncio.CancelledError:
                raise
            except TransportError as exc:
                self.stats.failures += 1
                self.stats.last_error = str(exc)
                await asyncio.sleep(self.backoff.next_delay())  # new records do not cut it
                continue
            except IvpError as exc:  # e.g. the device bricked under us: stop trying
                self.stats.last_error = str(exc)
                await self._sleep(self.idle_poll)
                continue
            self.backoff.reset()
            if moved == 0:
                await self._sleep(self.idle_poll)

    async def _sleep(self, seconds: float) -> None:
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
        # arrives as the wake event fires, and stop() would then wait forever
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()


__all__ = ["Backoff", "HttpUplink", "Uplink", "UplinkStats", "UplinkTransport", "parse_ack",
           "uplink_body"]
