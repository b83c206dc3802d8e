"""What makes the console live: the gateways' own status, and server-sent events.

:class:`Feed` runs one loop for all open pages (none while no page is open): every
half second it asks the read-only store whether an alarm was raised, repeated or
acknowledged, and every two seconds it reads each enrolled gateway's ``GET /status``
and re-renders the fleet table. Each change goes to every subscriber as one SSE
event: ``alarm`` (the row, server-rendered, and the open count), ``fleet`` (the
table body) or ``count`` (the open count alone, after an acknowledgement).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp

from ivp.recomputer.console.views import Live
from ivp.recomputer.store import AlarmRow

log = logging.getLogger("ivp.recomputer.console")
ALARM_POLL = 0.5  # seconds between alarm checks (bounds an alarm's way to the page)
FLEET_POLL = 2.0  # seconds between reads of the gateways' own status
PROBE_TIMEOUT = 2.0
QUEUE_MAX = 256  # events a slow page may fall behind before it is dropped (it reconnects)


class GatewayProbe:
    """Reads gateways' public ``GET /status`` (read-only: the console sends nothing else)."""

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None
        self.seen: dict[str, Live] = {}

    async def read(self, urls: Mapping[str, str]) -> dict[str, Live]:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT))
        found = await asyncio.gather(*(self._one(u) for u in urls.values()))
        self.seen = dict(zip(urls, found, strict=True))
        return self.seen

    async def _one(self, url: str) -> Live:
        now = time.time()
        if not url:
            return Live(error="no URL enrolled", time=now)
        assert self.session is not None
        try:
            async with self.session.get(url.rstrip("/") + "/status") as r:
                body = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return Live(error=f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__,
                        time=now)
        if not isinstance(body, dict):
            return Live(error="status is not a JSON object", time=now)
        kind = (body.get("error") or {}).get("type") if r.status != 200 else None
        if kind == "BrickedError":
            return Live(bricked=True, time=now)
        if r.status != 200:
            return Live(error=f"status answered {r.status}", time=now)
        return Live(body=body, time=now)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


class Feed:
    """The one polling loop behind every open page's event stream."""

    def __init__(self, read: Callable[..., Awaitable[Any]], reader: Any,
                 render_alarm: Callable[[AlarmRow], str],
                 render_fleet: Callable[[], Awaitable[str]],
                 probe: GatewayProbe) -> None:
        self._read, self._reader = read, reader
        self._render_alarm, self._render_fleet = render_alarm, render_fleet
        self.probe = probe
        self._subscribers: set[asyncio.Queue[str]] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._marks: tuple[int, float, int] | None = None
        self._fleet = ""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ivp-console-feed")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for q in list(self._subscribers):
            q.put_nowait("")  # ends the stream
        await self.probe.close()

    def subscribe(self) -> asyncio.Queue[str]:
        q: asyncio.Queue[str] = asyncio.Queue(QUEUE_MAX)
        self._subscribers.add(q)
        self._wake.set()
        return q

    def unsubscribe(self, q: asyncio.Queue[str]) -> None:
        self._subscribers.discard(q)

    def _send(self, event: str, data: dict[str, Any], event_id: int | None = None) -> None:
        text = f"event: {event}\n" + (f"id: {event_id}\n" if event_id is not None else "")
        text += f"data: {json.dumps(data)}\n\n"
        for q in list(self._subscribers):
            try:
                q.put_nowait(text)
            except asyncio.QueueFull:  # a page that stopped reading: drop it
                self._subscribers.discard(q)
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
                q.put_nowait("")

    async def _run(self) -> None:
        last_fleet = 0.0
        while True:
            if not self._subscribers:
                self._wake.clear()
                self._marks = None  # a page opened later starts from what it rendered
                await self._wake.wait()
            try:
                await self._alarms()
                if time.monotonic() - last_fleet >= FLEET_POLL:
                    last_fleet = time.monotonic()
                    html = await self._render_fleet()
                    if html != self._fleet:
                        self._fleet = html
                        self._send("fleet", {"html": html})
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the recomputer bricked, the store gone: say so
                self._send("trouble", {"message": f"{type(exc).__name__}: {exc}"[:300]})
                log.warning("console feed: %s", exc)
            await asyncio.sleep(ALARM_POLL)

    async def _alarms(self) -> None:
        marks = await self._read(self._reader.alarm_marks)
        previous, self._marks = self._marks, marks
        if previous is None or marks == previous:
            return
        changed = await self._read(self._reader.alarms_changed, previous[0], previous[1])
        open_count = await self._read(self._reader.open_alarms)
        for a in changed:
            self._send("alarm", {"id": a.id, "html": self._render_alarm(a),
                                 "open": open_count}, event_id=a.id)
        if marks[2] != previous[2] or not changed:
            self._send("count", {"open": open_count})

    async def catch_up(self, after: int, since: float) -> list[str]:
        """Events for what a page that subscribed just now has not shown: alarms raised
        after its ``after`` id or repeated after ``since`` (when it was rendered).

        The feed's marks are taken before this read, so anything later reaches the page
        through the feed (at worst twice: the page replaces a row by its id).
        """
        if self._marks is None:
            self._marks = await self._read(self._reader.alarm_marks)
        alarms = await self._read(self._reader.alarms_changed, after, since)
        open_count = await self._read(self._reader.open_alarms)
        out = []
        for a in alarms:
            data = {"id": a.id, "html": self._render_alarm(a), "open": open_count}
            out.append(f"event: alarm\nid: {a.id}\ndata: {json.dumps(data)}\n\n")
        out.append(f"event: count\ndata: {json.dumps({'open': open_count})}\n\n")
        return out


__all__ = ["Feed", "GatewayProbe"]
