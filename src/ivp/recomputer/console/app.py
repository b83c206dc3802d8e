"""The inspectors' console: server-rendered pages over the recomputer's state.

Read-only by construction: pages read the service's ``status()``, a read-only SQLite
connection (:mod:`.reader`) and the gateways' public ``/status``; the only POST is the
login form. Every admin action stays a quorum-signed request (``ivp admin``).

Pages: ``/`` fleet, ``/alarms``, ``/audits`` and ``/audits/{id}`` (the audit explorer),
``/health`` (verification health per model), ``/admin`` (the admin log); ``/events`` is
the server-sent event stream the pages listen to (docs/CONSOLE.md).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from ivp.errors import BrickedError, IvpError
from ivp.recomputer.alarms import GATEWAY_PREFIX, KINDS
from ivp.recomputer.console import access, charts, views
from ivp.recomputer.console.live import Feed, GatewayProbe
from ivp.recomputer.console.reader import StoreReader
from ivp.recomputer.store import AlarmRow

log = logging.getLogger("ivp.recomputer.console")
HERE = Path(__file__).parent
STATE: web.AppKey[Console] = web.AppKey("console")
SENSOR_KINDS = frozenset({"power_silent", "traffic_power_off", "rf_burst", "seal_broken",
                          "lone_entry", "badge_anomaly", "sensor_forged", "sensor_gap",
                          "sensor_silent"})
PAGE = 50  # audit records per page of the explorer
FLEET_ALARMS = 8  # latest alarms on the fleet page


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = max(0.0, seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _utc(t: float | None) -> str:
    if t is None:
        return "–"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def alarm_source(a: AlarmRow) -> str:
    if a.kind.startswith(GATEWAY_PREFIX):
        return "gateway (signed)"
    return "sensors" if a.kind in SENSOR_KINDS else "recomputer"


class Console:
    """One console over one running :class:`~ivp.recomputer.service.Recomputer`."""

    def __init__(self, rec: Any, settings: access.ConsoleSettings) -> None:
        self.rec, self.settings = rec, settings
        self.sessions = access.Sessions()
        self._exec = ThreadPoolExecutor(1, thread_name_prefix="ivp-console")
        self.reader = StoreReader(rec.store.path)
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("ivp.recomputer.console", "templates"),
            autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
            trim_blocks=True, lstrip_blocks=True)
        self.env.filters.update(utc=_utc, short=lambda s: (s or "–")[:12],
                                ago=_ago, num=lambda x: "–" if x is None else f"{x:,}")
        self.env.globals.update(kinds=KINDS, alarm_source=alarm_source)
        self.probe = GatewayProbe()
        self.feed = Feed(self.read, self.reader, self.alarm_row, self.fleet_body, self.probe)
        self._tokenizers: dict[str, Any] = {}

    async def read(self, fn: Any, *args: Any) -> Any:
        """Run a read (store query, CPU-heavy view) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)

    async def close(self) -> None:
        await self.feed.close()
        self._exec.shutdown(wait=True)
        self.reader.close()

    # --- rendering --------------------------------------------------------------------------
    def render(self, template: str, **context: Any) -> str:
        return self.env.get_template(template).render(**context)

    def alarm_row(self, a: AlarmRow) -> str:
        return self.render("_alarm_row.html", a=a, now=time.time())

    async def page(self, template: str, title: str, **context: Any) -> web.Response:
        self.rec.check_alive()
        marks = await self.read(self.reader.alarm_marks)
        open_alarms = await self.read(self.reader.open_alarms)
        html = self.render(template, title=title, open_alarms=open_alarms,
                           last_alarm=marks[0], now=time.time(),
                           keyid=self.rec.device.public_key.keyid, mode=self.rec.config.mode,
                           token=self.settings.token is not None, **context)
        return web.Response(text=html, content_type="text/html")

    # --- fleet --------------------------------------------------------------------------------
    async def fleet(self, fresh: bool = False) -> list[dict[str, Any]]:
        status = await self.rec.status()
        stale = not self.probe.seen or time.time() - min(
            (v.time for v in self.probe.seen.values()), default=0) > 3.0
        live = self.probe.seen
        if fresh or stale or set(live) != set(status["gateways"]):
            live = await self.probe.read({g: r.get("url", "") for g, r in
                                          status["gateways"].items()})
        boots = await self.read(self.reader.boots)
        open_by = await self.read(self.reader.open_alarms_by_gateway)
        rules = self.rec.config.rules
        return views.fleet_rows(status, live, boots, open_by, time.time(),
                                rules.checkpoint_period * rules.missing_factor)

    async def fleet_body(self) -> str:
        return self.render("_fleet_rows.html", rows=await self.fleet(fresh=True),
                           now=time.time())

    def tokenizer_decode(self, manifest_digest: str) -> Any:
        """The whitelisted tokenizer of a loaded model as (``ids -> text``, ``id ->
        vocabulary piece``); (None, None): the recomputer holds no copy of that model."""
        from ivp.engine.loading import load_tokenizer

        if manifest_digest not in self._tokenizers:
            source = next((s for s in self.rec.sources if s.digest == manifest_digest), None)
            tok = load_tokenizer(source.files) if source is not None else None
            self._tokenizers[manifest_digest] = tok
        tok = self._tokenizers[manifest_digest]
        if tok is None:
            return None, None
        return (lambda ids: tok.decode(ids, skip_special_tokens=False),
                lambda i: str(tok.convert_ids_to_tokens(i)))

    def deltas(self) -> dict[str, float]:
        wl = self.rec.whitelist.current
        return {m.model_id: (m.noise_bound.delta if m.noise_bound else 0.0)
                for m in (wl.manifests if wl else [])}


# --- handlers ---------------------------------------------------------------------------------
def _console(request: web.Request) -> Console:
    return request.app[STATE]


async def fleet_page(request: web.Request) -> web.Response:
    c = _console(request)
    rows = await c.fleet()
    status_sensors = await c.read(c.reader.enrolled, "sensor")
    latest = await c.read(c.reader.latest_sensor_events)
    sensors = views.sensor_rows(status_sensors, latest, time.time(),
                                c.rec.config.sensor_rules.heartbeat)
    alarms = await c.read(c.reader.alarms, FLEET_ALARMS)
    return await c.page("fleet.html", "Fleet", page="fleet", rows=rows, sensors=sensors,
                        alarms=alarms, feed_limit=FLEET_ALARMS)


async def alarms_page(request: web.Request) -> web.Response:
    c = _console(request)
    alarms = await c.read(c.reader.alarms, 500)
    return await c.page("alarms.html", "Alarms", page="alarms", alarms=alarms, feed_limit=500)


async def audits_page(request: web.Request) -> web.Response:
    c = _console(request)
    q = request.query
    status = q.get("status") or None
    if status not in (None, "passed", "failed", "queued"):
        raise web.HTTPBadRequest(text="status must be passed, failed or queued")
    try:
        before = int(q["before"]) if q.get("before") else None
    except ValueError:
        raise web.HTTPBadRequest(text="before must be an audit id (a number)") from None
    gateway = q.get("gateway") or None
    rows = await c.read(c.reader.audits, gateway, status, PAGE, before)
    gateways = sorted((await c.rec.status())["gateways"])
    return await c.page("audits.html", "Audits", page="audits", rows=rows, deltas=c.deltas(),
                        gateway=gateway or "", status=status or "", gateways=gateways,
                        more=rows[-1].id if len(rows) == PAGE else None)


async def audit_page(request: web.Request) -> web.Response:
    c = _console(request)
    try:
        audit_id = int(request.match_info["id"])
    except ValueError:
        raise web.HTTPBadRequest(text="an audit id is a number") from None
    row = await c.read(c.reader.audit, audit_id)
    if row is None:
        raise web.HTTPNotFound(text=f"no audit record {audit_id} is stored")
    enrolled = (await c.read(c.reader.enrolled, "gateway")).get(row.gateway_id)

    def build() -> dict[str, Any]:
        decode_ids, piece = c.tokenizer_decode(row.manifest_digest)
        verdict = row.verdict or {}
        detail = views.audit_detail(row, enrolled["public_key"] if enrolled else None,
                                    decode_ids, c.deltas().get(str(verdict.get("model_id"))),
                                    piece)
        detail["chart"] = charts.delta_per_position(detail["tokens"], detail["delta"])
        detail["model_loaded"] = decode_ids is not None
        return detail

    detail = await c.read(build)
    return await c.page("audit.html", f"Audit {audit_id}", page="audits", **detail)


async def health_page(request: web.Request) -> web.Response:
    c = _console(request)
    rules = c.rec.config.rules
    passed = await c.read(c.reader.passed_verdicts)
    boots = await c.read(c.reader.boots)

    def build() -> list[dict[str, Any]]:
        models = views.health(passed, boots, c.deltas(), rules.binom_alpha,
                              rules.binom_min_pairs)
        for m in models:
            m["histogram"] = charts.margin_histogram(m["ratios"])
            m["rate_chart"] = charts.audit_rate(m["boots"], rules.binom_alpha,
                                                rules.binom_min_pairs)
        return models

    models = await c.read(build)
    return await c.page("health.html", "Verification health", page="health", models=models,
                        alpha=rules.binom_alpha, min_pairs=rules.binom_min_pairs)


async def admin_page(request: web.Request) -> web.Response:
    c = _console(request)
    log = await c.read(c.reader.admin_log)
    relays = await c.read(c.reader.relays_by_admin_seq)
    inspectors = {k.keyid: (k.name, k.party) for k in c.rec.config.policy.keys}
    rows, chain = await c.read(views.admin_rows, log, relays, inspectors)
    return await c.page("admin.html", "Admin log", page="admin", rows=rows, chain=chain,
                        policy=c.rec.config.policy)


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``alarm``, ``fleet``, ``count`` and ``trouble`` (see ``live``)."""
    c = _console(request)
    c.rec.check_alive()
    try:
        after = int(request.query.get("after", "0"))
        after = max(after, int(request.headers.get("Last-Event-ID", "0") or 0))
        since = float(request.query.get("since", "0"))
    except ValueError:
        raise web.HTTPBadRequest(text="after and since must be numbers") from None
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-store"})
    access.secure_headers(resp)
    await resp.prepare(request)
    queue = c.feed.subscribe()
    try:
        await resp.write(b"retry: 2000\n\n")
        for text in await c.feed.catch_up(after, since):
            await resp.write(text.encode())
        while True:
            try:
                text = await asyncio.wait_for(queue.get(), timeout=15)
            except TimeoutError:
                text = ": keep-alive\n\n"
            if not text:
                break
            await resp.write(text.encode())
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        c.feed.unsubscribe(queue)
    return resp


async def login_page(request: web.Request) -> web.Response:
    c = _console(request)
    if request.method == "POST":
        form = await request.post()
        if access.token_matches(c.settings, str(form.get("token", ""))):
            resp = _redirect(access.safe_next(str(form.get("next", "/"))))
            resp.set_cookie(access.COOKIE, c.sessions.new(), httponly=True, samesite="Strict",
                            max_age=access.SESSION_SECONDS, path="/")
            return resp
        await asyncio.sleep(0.5)  # slows guessing; the token is long anyway
        error = "That is not the console token."
    else:
        error = ""
    html = c.render("login.html", title="Log in", error=error,
                    next=access.safe_next(request.query.get("next")))
    return web.Response(text=html, content_type="text/html",
                        status=401 if error else 200)


async def logout(request: web.Request) -> web.Response:
    c = _console(request)
    c.sessions.end(request.cookies.get(access.COOKIE))
    resp = _redirect("/login")
    resp.del_cookie(access.COOKIE, path="/")
    return resp


def _redirect(target: str) -> web.Response:
    return web.Response(status=303, headers={"Location": target})


# --- middleware and app -----------------------------------------------------------------------
@web.middleware
async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """Access checks, then the handler; errors become readable pages."""
    c = _console(request)
    try:
        if not access.host_allowed(request, c.settings):
            raise web.HTTPMisdirectedRequest(
                text="this console answers only requests addressed to its loopback address")
        if not request.path.startswith(access.OPEN_PATHS) and \
                not access.authorised(request, c.settings, c.sessions):
            if request.path == "/events" or "Authorization" in request.headers:
                raise web.HTTPUnauthorized(text="log in first (or send the console token)")
            where = urllib.parse.quote(request.path_qs, safe="/")
            resp: web.StreamResponse = _redirect(f"/login?next={where}")
        else:
            resp = await handler(request)
    except web.HTTPException as exc:
        resp = _error(c, exc.status, exc.reason, exc.text or exc.reason)
    except BrickedError as exc:
        resp = _error(c, 503, "Recomputer bricked", f"{exc}. The console can show nothing "
                      "more: every key of the device is gone.")
    except IvpError as exc:
        resp = _error(c, 503, "Recomputer unavailable", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a console bug must still answer a readable page
        log.exception("console page %s failed", request.path)
        resp = _error(c, 500, "Console error", f"{type(exc).__name__}: {exc}")
    if not resp.prepared:  # an event stream sent its headers already
        access.secure_headers(resp)
    return resp


def _error(c: Console, status: int, title: str, message: str) -> web.Response:
    html = c.render("error.html", title=title, message=message, status=status)
    return web.Response(text=html, content_type="text/html", status=status)


def make_console_app(rec: Any, settings: access.ConsoleSettings) -> web.Application:
    """The console's aiohttp application over a started recomputer ``rec``."""
    app = web.Application(middlewares=[guard], client_max_size=64 * 1024)
    console = Console(rec, settings)
    app[STATE] = console
    app.router.add_get("/", fleet_page)
    app.router.add_get("/alarms", alarms_page)
    app.router.add_get("/audits", audits_page)
    app.router.add_get(r"/audits/{id}", audit_page)
    app.router.add_get("/health", health_page)
    app.router.add_get("/admin", admin_page)
    app.router.add_get("/events", events)
    app.router.add_route("*", "/login", login_page)
    app.router.add_post("/logout", logout)
    app.router.add_static("/static", HERE / "static", append_version=False)

    async def on_startup(app: web.Application) -> None:
        app[STATE].feed.start()

    async def on_shutdown(app: web.Application) -> None:
        await app[STATE].feed.close()  # ends the event streams before cleanup waits on them

    async def on_cleanup(app: web.Application) -> None:
        await app[STATE].close()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


async def start_console(rec: Any, settings: access.ConsoleSettings) -> web.AppRunner:
    """Serve the console beside the recomputer (same process, its own address); the
    caller awaits ``runner.cleanup()`` when it stops."""
    runner = web.AppRunner(make_console_app(rec, settings), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port).start()
    return runner


__all__ = ["Console", "make_console_app", "start_console"]
