"""Store-and-forward uplink to the recomputer (the note's "SRC NIC + sampler").

The spool in :class:`~ivp.gateway.log.PairLog` is durable; this module only moves
envelopes from it to ``<recomputer>/uplink`` and back out of it once acknowledged:

* a batch goes out as ``{"envelopes": [...]}`` built from the stored envelope bytes
  (never re-serialised: the signature covers exactly those bytes);
* the answer's signed ``UplinkAck`` decides (``answers.judge_ack``): a record leaves
  the spool only on a receipt signed by the recomputer's key that names it and says
  the recomputer holds it (``stored``, or ``refused`` and kept there as evidence,
  which is alarmed here too). A record named ``retry``, or named by no receipt, stays
  and is sent again after a pause of its own; an answer that is not signed by that
  key for this gateway (a forged ``ok: true`` from the operator on the wire) deletes
  nothing and raises ``uplink_forged_ack`` — once, until a genuine answer comes;
* transport failures back off exponentially (with jitter) up to a cap; the spool
  survives restarts, so an audit record waits as long as the recomputer is away;
* a lost acknowledgement (the recomputer stored a batch, but the gateway crashed or
  the answer never came) must not turn into a resend the recomputer refuses as a
  replay: at start and after every failed batch the uplink first *reconciles* — the
  gateway asks the recomputer's cursor (``GET /uplink/cursor``, signed like the Ack)
  and drops the spooled records it shows stored (see :meth:`Spool.reconcile`).

The transport is a small interface (:class:`UplinkTransport`: ``post``, and optionally
``cursor``), so tests use an in-memory recomputer and the CLI an aiohttp one.
:class:`Spool` is the gateway's side: the log's spool, read and trimmed on the log's
thread. This module owns no property of the note by itself: it carries the signed
records that SNG properties 2 and 3 make (BOOT, AUDIT, CHECKPOINT, ALARM, HEARTBEAT)
to the SRC.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from ivp.errors import IvpError, SignatureError, TransportError, ValidationError
from ivp.gateway.answers import AckJudgement, Spooled, already_stored, describe, judge_cursor
from ivp.protocol.keys import VerifyKey
from ivp.protocol.messages import UplinkCursor

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
    """:class:`UplinkTransport` over aiohttp to ``<url>/uplink``.

    With ``seal_to`` (the recomputer's X25519 KEM public key) every body is sealed to
    it (``ivp.protocol.hpke.seal_message``): the records inside stay signed, and only
    the recomputer can read their prompts and outputs.
    """

    def __init__(self, url: str, timeout: float = 30.0, seal_to: bytes | None = None) -> None:
        self.url = url.rstrip("/") + "/uplink"
        self.seal_to = seal_to
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def post(self, body: bytes) -> bytes:
        if self.seal_to is None:
            return await self._call("POST", self.url, "recomputer", data=body,
                                    headers={"Content-Type": "application/json"})
        from ivp.protocol.hpke import SEALED_UPLINK, UPLINK_INFO, seal_message

        return await self._call("POST", self.url, "recomputer",
                                data=seal_message(self.seal_to, UPLINK_INFO, body),
                                headers={"Content-Type": SEALED_UPLINK})

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
    refused: int = 0  # refused by the recomputer and kept there as evidence
    retried: int = 0  # named "retry" (or by no receipt): kept here, sent again
    failures: int = 0
    garbage: int = 0
    forged: int = 0  # answers not signed by the recomputer: nothing deleted
    reconciled: int = 0  # records found stored by the cursor (their ack was lost)
    depth: int = 0  # records left in the spool after the last round
    rounds: int = 0  # rounds that counted ``depth`` (a round begun after a record was
    # spooled counts it: sent, or in ``depth``)
    last_error: str = ""


RETRY_AFTER = (1.0, 60.0)  # a record named "retry" waits this long, doubling, at most

class Uplink:
    """Drains the spool to the recomputer, forever, until stopped.

    Args:
        transport: where batches go.
        fetch: returns the oldest spooled records, skipping the ids given (runs in the
            log's thread).
        done: records ids the recomputer holds, and refused (id, reason) pairs it keeps
            as evidence.
        alarm: records an alarm (kind, message).
        judge: the recomputer's answer for a batch → an ``AckJudgement``
            (``answers.judge_ack`` with the recomputer key and this gateway's id).
        depth: the number of records still spooled (after each round).
        batch: envelopes per POST.
        reconcile: called before the first batch and before the first batch after a
            failure, with the batch size; returns how many spooled records it found
            already stored (and removed). A TransportError from it is not fatal: the
            batch is sent anyway.
    """

    def __init__(self, transport: UplinkTransport,
                 fetch: Callable[[int, frozenset[int]], Awaitable[list[Spooled]]],
                 done: Callable[[list[int], list[tuple[int, str]]], Awaitable[None]],
                 alarm: Callable[[str, str], Awaitable[None]],
                 judge: Callable[[bytes, list[Spooled]], AckJudgement],
                 *, depth: Callable[[], Awaitable[int]] | None = None, batch: int = 64,
                 backoff: Backoff | None = None, idle_poll: float = 5.0,
                 reconcile: Callable[[int], Awaitable[int]] | None = None) -> None:
        self.transport = transport
        self._fetch, self._done, self._alarm, self._judge = fetch, done, alarm, judge
        self._depth = depth
        self._reconcile = reconcile
        self._stale = reconcile is not None  # the last batch's fate is unknown
        self.batch = batch
        self.backoff = backoff or Backoff()
        self.idle_poll = idle_poll
        self.stats = UplinkStats()
        self._held: dict[int, tuple[float, float]] = {}  # id -> (until, next pause)
        self._forged = False  # an unsigned answer was alarmed; until a genuine one
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
            except TransportError as exc:  # no cursor: send anyway
                self.stats.last_error = f"cursor: {exc}"
            self._stale = False
        now = asyncio.get_running_loop().time()
        self._held = {i: h for i, h in self._held.items() if h[0] > now}
        items = await self._fetch(self.batch, frozenset(self._held))
        if not items:
            await self._count_depth()
            return 0
        body = uplink_body([item.envelope for item in items])
        self.stats.sent += len(items)
        try:
            raw = await self.transport.post(body)
        except TransportError:
            self._stale = True  # the batch may have been stored: ask before resending
            raise
        try:
            verdict = self._judge(raw, items)
        except SignatureError as exc:
            self._stale = True
            self.stats.forged += 1
            if not self._forged:  # once per episode: a forged answer would feed itself
                self._forged = True
                await self._alarm("uplink_forged_ack", "an uplink answer not signed by the "
                                  f"recomputer deleted nothing: {describe(exc)}")
            raise TransportError(f"unsigned acknowledgement: {exc}") from None
        except ValidationError as exc:
            self._stale = True
            self.stats.garbage += 1
            await self._alarm("uplink_garbage_ack", f"recomputer answered garbage: {exc}")
            raise TransportError(f"garbage acknowledgement: {exc}") from None
        self._forged = False
        await self._done(verdict.stored, verdict.refused)
        for item_id, _why in verdict.kept:
            pause = self._held.get(item_id, (0.0, RETRY_AFTER[0]))[1]
            self._held[item_id] = (now + pause, min(RETRY_AFTER[1], pause * 2))
        for text in verdict.mismatched:
            await self._alarm("uplink_bad_receipt", text)
        self.stats.acked += len(verdict.stored)
        self.stats.refused += len(verdict.refused)
        self.stats.retried += len(verdict.kept)
        await self._count_depth()
        return len(verdict.stored) + len(verdict.refused)

    async def _count_depth(self) -> None:
        if self._depth is not None:
            self.stats.depth = await self._depth()
        self.stats.rounds += 1

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
                with contextlib.suppress(IvpError):
                    await self._count_depth()  # what waits, as of this (failed) round
                await asyncio.sleep(self.backoff.next_delay())  # new records do not cut it
                continue
            except IvpError as exc:  # e.g. the device bricked under us: stop trying
                self.stats.last_error = str(exc)
                await self._sleep(self.idle_poll)
                continue
            self.backoff.reset()
            if moved == 0:
                await self._sleep(min(self.idle_poll, RETRY_AFTER[0]) if self._held
                                  else self.idle_poll)

    async def _sleep(self, seconds: float) -> None:
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
        # arrives as the wake event fires, and stop() would then wait forever
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()


class Spool:
    """The gateway's side of the uplink: the log's spool, read and trimmed on the log's
    thread (``call``), and the reconciliation against the recomputer's signed cursor.

    Args:
        call: runs a log method on the log's thread (``commit.GroupCommit.call``).
        log: the durable log whose spool this drains.
        gateway_id: this gateway (a cursor of another is refused).
        metrics: acked / refused / reconciled counts.
        recomputer_key: the key the recomputer signs its cursor with (None: no cursor
            is believed).
    """

    def __init__(self, call: Callable[..., Awaitable[Any]], log: PairLog, gateway_id: str,
                 metrics: GatewayMetrics, recomputer_key: VerifyKey | None = None) -> None:
        self._call, self.log, self.gateway_id, self.metrics = call, log, gateway_id, metrics
        self.recomputer_key = recomputer_key

    async def fetch(self, limit: int, skip: frozenset[int] = frozenset()) -> list[Spooled]:
        items = await self._call(self.log.spool_batch, limit, skip)
        return [Spooled(i.id, i.kind, i.boot_id, i.n, i.envelope) for i in items]

    async def depth(self) -> int:
        return int(await self._call(self.log.spool_depth))

    async def done(self, acked: list[int], refused: list[tuple[int, str]]) -> None:
        kinds = await self._call(self.log.spool_kinds, [*acked, *(i for i, _ in refused)])
        await self._call(self.log.spool_done, acked, refused)
        self.metrics.uplink.labels("acked").inc(len(acked))
        # audit records are counted once the recomputer holds them, never at the draw:
        # /metrics must not tell which pair was kept while its record can still be lost
        self.metrics.audits.inc(sum(1 for k in kinds.values() if k == "AUDIT"))
        if refused:
            self.metrics.uplink.labels("refused").inc(len(refused))
            self.metrics.alarms.labels("uplink_refused").inc(len(refused))

    async def reconcile(self, transport: object, limit: int) -> int:
        """Drop the spooled records the recomputer already stored (their Ack was lost).

        Only the oldest ``limit`` records can be concerned: the uplink sends the oldest
        first, one batch at a time, so a batch whose fate is unknown (the gateway died,
        the answer never came) is at the head of the spool. For each boot among them
        (and for the gateway's alarms) the recomputer's signed cursor says what it
        holds; :func:`~ivp.gateway.answers.already_stored` decides per record. An
        unsigned cursor (the operator answering in the recomputer's name) drops
        nothing: the batch is then sent as it is, and a record the recomputer holds
        comes back refused, as a replay, with a signed receipt that it holds it.

        Raises:
            TransportError: the cursor could not be read, or was not a cursor of this
                gateway signed by the recomputer key.
        """
        ask = getattr(transport, "cursor", None)
        if ask is None or self.recomputer_key is None:
            return 0
        items = await self.fetch(limit)
        boots = list(dict.fromkeys(i.boot_id for i in items
                                   if i.kind not in ("ALARM", "HEARTBEAT")))
        if not boots and items:
            boots = [""]  # only alarms: the gateway-wide cursor is enough
        cursors: dict[str, UplinkCursor] = {}
        for boot_id in boots:
            raw = await ask(self.gateway_id, boot_id or None)
            try:
                cursors[boot_id] = judge_cursor(raw, self.recomputer_key, self.gateway_id,
                                                boot_id or None)
            except (ValidationError, SignatureError) as exc:
                raise TransportError(f"cursor not believed: {describe(exc)}") from None
        alarms = next(iter(cursors.values()), None)
        stored = [i.id for i in items if already_stored(
            i, alarms if i.kind == "ALARM" else cursors.get(i.boot_id))]
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
    "uplink_body",
]
