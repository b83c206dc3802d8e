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
  survives restarts, so an audit record waits as long as the recomputer is away;
* a lost acknowledgement (the recomputer stored a batch, but the gateway crashed or
  the answer never came) must not turn into a resend the recomputer refuses as a
  replay: at start and after every failed batch the uplink first *reconciles* — the
  gateway asks the recomputer's cursor (``GET /uplink/cursor``: what it has stored)
  and drops the spooled records the cursor shows stored (see
  :meth:`Spool.reconcile`). Replay detection at the recomputer stays as strict as it
  was: a record it already holds is still refused and alarmed.

The transport is a small interface (:class:`UplinkTransport`: ``post``, and optionally
``cursor``), so tests use an in-memory recomputer and the CLI an aiohttp one.
:class:`Spool` is the gateway's side: the log's spool, read and trimmed on the log's
thread. This module owns no property of the note by itself: it carries the signed
records that SNG properties 2 and 3 make (BOOT, AUDIT, CHECKPOINT, ALARM) to the SRC.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from ivp.errors import IvpError, TransportError, ValidationError
from ivp.protocol.encoding import decode
from ivp.protocol.envelope import Envelope
from ivp.protocol.messages import Ack, Checkpoint, UplinkCursor

if TYPE_CHECKING:
    from ivp.gateway.log import PairLog
    from ivp.gateway.metrics import GatewayMetrics


class UplinkTransport(Protocol):
    """POST one uplink body, return the answer's bytes.

    Raises:
        TransportError: the recomputer could not be reached, or answered non-200.
    """

    async def post(self, body: bytes) -> bytes: ...


class CursorTransport(UplinkTransport, Protocol):
    """An uplink transport that can also ask the recomputer's cursor.

    Raises (``cursor``):
        TransportError: the recomputer could not be reached, or answered non-200.
    """

    async def cursor(self, gateway_id: str, boot_id: str | None) -> bytes: ...


class HttpUplink:
    """:class:`UplinkTransport` over aiohttp to ``<url>/uplink``."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/") + "/uplink"
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def post(self, body: bytes) -> bytes:
        return await self._call("POST", self.url, "recomputer", data=body,
                                headers={"Content-Type": "application/json"})

    async def cursor(self, gateway_id: str, boot_id: str | None) -> bytes:
        """``GET <recomputer>/uplink/cursor?gateway_id=&boot_id=``: the raw answer."""
        params = {"gateway_id": gateway_id, **({"boot_id": boot_id} if boot_id else {})}
        return await self._call("GET", self.url + "/cursor", "recomputer cursor",
                                params=params)

    async def _call(self, method: str, url: str, who: str, **kwargs: Any) -> bytes:
        """One request; the answer's bytes if it is a 200, else TransportError."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.request(method, url, **kwargs) as resp:
                data = await resp.read()
                if resp.status != 200:
                    raise TransportError(f"{who} answered HTTP {resp.status}: {data[:200]!r}")
                return data
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransportError(f"recomputer unreachable at {self.url}: {exc}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def uplink_body(envelopes: list[bytes]) -> bytes:
    """``{"envelopes":[...]}`` from canonical envelope bytes, without re-encoding them."""
    return b'{"envelopes":[' + b",".join(envelopes) + b"]}"


def already_stored(kind: str, n: int, envelope: bytes, cursor: UplinkCursor | None) -> bool:
    """Whether the recomputer's ``cursor`` shows a spooled record as stored (pure).

    ``kind``/``n`` are the spool row's: BOOT (n = 0), AUDIT (n = audit_seq),
    CHECKPOINT (n = pairs served) or ALARM (n = the alarm's number). A checkpoint is
    stored when the latest stored checkpoint of its boot is it or a later one: a
    gateway's checkpoints of one boot never go back in pairs, audits or time.
    """
    if cursor is None:
        return False
    if kind == "ALARM":
        return n < cursor.next_alarm_seq
    if not cursor.boot_known:
        return False
    if kind == "BOOT":
        return True
    if kind == "AUDIT":
        return n < cursor.next_audit_seq
    if kind == "CHECKPOINT" and cursor.checkpoint is not None:
        try:
            mine = decode(Envelope.from_bytes(envelope).payload_bytes(), Checkpoint)
        except ValidationError:
            return False
        last = cursor.checkpoint
        return (mine.boot_id == last.boot_id and mine.pairs_served <= last.pairs_served
                and mine.audits <= last.audits and mine.time <= last.time)
    return False


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
    reconciled: int = 0  # records found stored by the cursor (their ack was lost)
    last_error: str = ""


class Uplink:
    """Drains the spool to the recomputer, forever, until stopped.

    Args:
        transport: where batches go.
        fetch: returns the oldest spooled items (runs in the log's thread).
        done: records acknowledged ids and refused (id, reason) pairs.
        alarm: records an alarm (kind, message).
        batch: envelopes per POST.
        reconcile: called before the first batch and before the first batch after a
            failure, with the batch size; returns how many spooled records it found
            already stored (and removed). A TransportError from it is not fatal: the
            batch is sent anyway (a recomputer without a cursor is still served).
    """

    def __init__(self, transport: UplinkTransport,
                 fetch: Callable[[int], Awaitable[list[tuple[int, bytes]]]],
                 done: Callable[[list[int], list[tuple[int, str]]], Awaitable[None]],
                 alarm: Callable[[str, str], Awaitable[None]],
                 *, batch: int = 64, backoff: Backoff | None = None,
                 idle_poll: float = 5.0,
                 reconcile: Callable[[int], Awaitable[int]] | None = None) -> None:
        self.transport = transport
        self._fetch, self._done, self._alarm = fetch, done, alarm
        self._reconcile = reconcile
        self._stale = reconcile is not None  # the last batch's fate is unknown
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
        if self._stale and self._reconcile is not None:
            try:
                self.stats.reconciled += await self._reconcile(self.batch)
            except TransportError as exc:  # no cursor: send anyway, as before
                self.stats.last_error = f"cursor: {exc}"
            self._stale = False
        items = await self._fetch(self.batch)
        if not items:
            return 0
        body = uplink_body([env for _, env in items])
        self.stats.sent += len(items)
        try:
            raw = await self.transport.post(body)
        except TransportError:
            self._stale = True  # the batch may have been stored: ask before resending
            raise
        try:
            ack = parse_ack(raw, len(items))
        except ValidationError as exc:
            self._stale = True
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


class Spool:
    """The gateway's side of the uplink: the log's spool, read and trimmed on the log's
    thread (``call``), and the reconciliation against the recomputer's cursor.

    Args:
        call: runs a log method on the log's thread (``commit.GroupCommit.call``).
        log: the durable log whose spool this drains.
        gateway_id: this gateway (a cursor of another is refused).
        metrics: acked / refused / reconciled counts.
    """

    def __init__(self, call: Callable[..., Awaitable[Any]], log: PairLog, gateway_id: str,
                 metrics: GatewayMetrics) -> None:
        self._call, self.log, self.gateway_id, self.metrics = call, log, gateway_id, metrics

    async def fetch(self, limit: int) -> list[tuple[int, bytes]]:
        items = await self._call(self.log.spool_batch, limit)
        return [(item.id, item.envelope) for item in items]

    async def done(self, acked: list[int], refused: list[tuple[int, str]]) -> None:
        await self._call(self.log.spool_done, acked, refused)
        self.metrics.uplink.labels("acked").inc(len(acked))
        if refused:
            self.metrics.uplink.labels("refused").inc(len(refused))
            self.metrics.alarms.labels("uplink_refused").inc(len(refused))

    async def reconcile(self, transport: object, limit: int) -> int:
        """Drop the spooled records the recomputer already stored (their Ack was lost).

        Only the oldest ``limit`` records can be concerned: the uplink sends the oldest
        first, one batch at a time, so a batch whose fate is unknown (the gateway died,
        the answer never came) is at the head of the spool. For each boot among them
        (and for the gateway's alarms) the recomputer's cursor says what it holds;
        :func:`already_stored` decides per record.

        The cursor is unsigned: a cursor that claims more than the recomputer stored
        (the operator answering in its name) makes the gateway drop records the
        recomputer never got — which the recomputer alarms as a gap (``sequence_gap``,
        ``audit_withheld``, ``gateway_alarm_gap``, ``unknown_boot``), exactly as if the
        operator had dropped them on the wire, which it can do anyway. A cursor that
        claims less only causes the resend this replaces (refused as a replay).

        Raises:
            TransportError: the cursor could not be read, or was not a cursor of this
                gateway (the batch is then sent as it is).
        """
        ask = getattr(transport, "cursor", None)
        if ask is None:
            return 0
        items = await self._call(self.log.spool_batch, limit)
        boots = list(dict.fromkeys(i.boot_id for i in items if i.kind != "ALARM"))
        if not boots and items:
            boots = [""]  # only alarms: the gateway-wide cursor is enough
        cursors: dict[str, UplinkCursor] = {}
        for boot_id in boots:
            try:
                cursor = decode(await ask(self.gateway_id, boot_id or None), UplinkCursor)
            except ValidationError as exc:
                raise TransportError(f"garbage cursor: {exc}") from None
            if cursor.gateway_id != self.gateway_id or (cursor.boot_id or "") != boot_id:
                raise TransportError("cursor of another gateway or boot")
            cursors[boot_id] = cursor
        alarms = next(iter(cursors.values()), None)
        stored = [i.id for i in items if already_stored(
            i.kind, i.n, i.envelope, alarms if i.kind == "ALARM" else cursors.get(i.boot_id))]
        if stored:
            await self._call(self.log.spool_done, stored, [])
            self.metrics.uplink.labels("reconciled").inc(len(stored))
        return len(stored)


__all__ = [
    "Backoff",
    "CursorTransport",
    "HttpUplink",
    "Spool",
    "Uplink",
    "UplinkStats",
    "UplinkTransport",
    "already_stored",
    "parse_ack",
    "uplink_body",
]
