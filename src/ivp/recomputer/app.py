"""The recomputer's HTTP interface (aiohttp): routes only, every decision in the service.

Errors are mapped to HTTP statuses in one place (:func:`status_of`); every error
answer, aiohttp's own 404/405/413 included, is OpenAI's shape ``{"error": {"message",
"type", "param", "code"}}`` (docs/ARCHITECTURE.md), so that OpenAI clients show it.
A model the whitelist lacks is 404 ``model_not_found``; a whitelisted model that no
gateway serves now is 503 with ``Retry-After`` (clients retry that, not the other).
"""

from __future__ import annotations

import collections
import logging
import math
import time
from typing import Any

import aiohttp
from aiohttp import web

from ivp.errors import (
    BrickedError,
    ChainError,
    DigestError,
    ExpiredError,
    IvpError,
    MisuseError,
    ModelNotFoundError,
    PeerDataError,
    SignatureError,
    StateError,
    TransportError,
    ValidationError,
    error_json,
    error_of,
    http_status,
)
from ivp.protocol.encoding import loads, to_builtins
from ivp.protocol.hpke import SEALED_UPLINK
from ivp.recomputer.batch import MAX_BODY as MAX_UPLINK_BODY
from ivp.recomputer.metrics import CONTENT_TYPE
from ivp.recomputer.routing import NoRouteError, RateLimitedError
from ivp.recomputer.service import AdminRefusedError, Recomputer
from ivp.web import http_refusal

log = logging.getLogger("ivp.recomputer.http")
KEY: web.AppKey[Recomputer] = web.AppKey("recomputer", Recomputer)
MAX_BODY = 64 * 1024 * 1024

# Most specific first.
_STATUS: tuple[tuple[type[IvpError], int], ...] = (
    (BrickedError, 403),
    (AdminRefusedError, 403),
    (ModelNotFoundError, 404),
    (NoRouteError, 503),
    (RateLimitedError, 429),
    (StateError, 409),
    (MisuseError, 409),
    (SignatureError, 403),
    (ExpiredError, 403),
    (ChainError, 409),
    (DigestError, 400),
    (ValidationError, 400),
    (PeerDataError, 400),
    (TransportError, 502),
)


def status_of(exc: IvpError) -> int:
    return http_status(exc, _STATUS)


def error_body(exc: IvpError) -> dict[str, Any]:
    cause = exc.cause if isinstance(exc, AdminRefusedError) else exc
    body = error_of(cause)
    if isinstance(exc, AdminRefusedError):
        body.update(accepted=False, log_seq=exc.log_seq)
    return body


def retry_after(exc: IvpError, rec: Recomputer) -> dict[str, str]:
    """``Retry-After`` for answers worth retrying: over the rate (when the bucket has a
    token again), no gateway now (the next health check)."""
    if isinstance(exc, RateLimitedError):
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    if isinstance(exc, NoRouteError):
        return {"Retry-After": str(max(1, math.ceil(rec.config.health_interval)))}
    return {}


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except IvpError as exc:
        status = status_of(exc)
        if status >= 500 and status != 503:
            log.warning("%s %s: %s", request.method, request.path, exc)
        return web.json_response(error_body(exc), status=status,
                                 headers=retry_after(exc, request.app[KEY]))
    except RecursionError:  # a parser reached by input nested too deeply: bad input
        return web.json_response(error_json("input nested too deeply", "ValidationError"),
                                 status=400)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_refusal(request, exc)
    except Exception:  # a bug: answered in the error shape, traced in the log
        log.exception("unexpected error in %s %s", request.method, request.path)
        return web.json_response(error_json("internal recomputer error", "InternalError"),
                                 status=500)


def _json(value: Any, status: int = 200) -> web.Response:
    return web.json_response(to_builtins(value), status=status)


# --- INPUT ------------------------------------------------------------------------------------
def client_key(request: web.Request) -> str:
    """Who a request counts against for rate limits: its network address.

    Never a header the client writes: ivp verifies no client credential, so keying on
    an ``Authorization`` header would give a client a fresh bucket per header value
    (rotating it once let 12 of 12 requests past a limit of 1)."""
    return "addr:" + (request.remote or "?")


async def _input(request: web.Request, endpoint: str) -> web.StreamResponse:
    rec = request.app[KEY]
    rec.check_alive()
    body = await request.read()
    try:
        parsed = loads(body, "the request body")
    except ValidationError as exc:  # not JSON, or nested too deeply
        raise ValidationError(str(exc), code="invalid_json") from None
    if not isinstance(parsed, dict):
        raise ValidationError("the request body must be a JSON object", code="invalid_json")
    model = parsed.get("model")
    if not isinstance(model, str) or not model:
        raise ValidationError("model is required: the id of a whitelisted model (GET "
                              "/v1/models lists those served)", param="model",
                              code="missing_required_parameter")
    client = client_key(request)
    tried: set[str] = set()
    while True:
        route = rec.route(model, client, frozenset(tried))
        rec.router.begin(route)
        ok = False
        try:
            url = route.url.rstrip("/") + "/v1/" + endpoint
            async with rec.session.post(
                url, data=body, headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=rec.config.forward_timeout),
            ) as resp:
                rec.metrics.input_total.labels(model, str(resp.status)).inc()
                ok = resp.status == 200
                if resp.content_type == "text/event-stream":
                    # passed on as it comes; a client that leaves closes the gateway's
                    # stream too (leaving this block drops the connection to it)
                    out = web.StreamResponse(status=resp.status, headers={
                        "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
                    await out.prepare(request)
                    try:
                        async for chunk in resp.content.iter_any():
                            await out.write(chunk)
                        await out.write_eof()
                    except (ConnectionError, RuntimeError):
                        log.info("client left a stream from %s", route.gateway_id)
                    return out
                data = await resp.read()
                return web.Response(status=resp.status, body=data,
                                    content_type=resp.content_type or "application/json")
        except aiohttp.ClientConnectorError as exc:
            # Nothing reached the gateway: safe to try another one.
            rec.router.mark(route.gateway_id, False, f"connect failed: {exc}"[:200])
            tried.add(route.gateway_id)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TransportError(f"gateway {route.gateway_id} failed: {exc}") from None
        finally:
            rec.served(route, ok)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _input(request, "completions")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _input(request, "chat/completions")


def _model_object(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "ivp"}


async def models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the whitelisted models a healthy gateway serves now."""
    rec = request.app[KEY]
    rec.check_alive()
    now = int(time.time())
    return _json({"object": "list",
                  "data": [_model_object(m, now) for m in rec.served_models()]})


async def model(request: web.Request) -> web.Response:
    """``GET /v1/models/{id}``: the model if served now; else 404 (not whitelisted) or
    503 (whitelisted, not served now)."""
    rec = request.app[KEY]
    model_id = request.match_info["model"]
    rec.check_alive()
    if model_id not in rec.served_models():
        rec.route(model_id, client_key(request))  # raises the reason (404 or 503)
    return _json(_model_object(model_id, int(time.time())))


# --- gateways and inspectors ---------------------------------------------------------------------
async def uplink(request: web.Request) -> web.Response:
    rec = request.app[KEY]
    if (request.content_length or 0) > MAX_UPLINK_BODY:  # refused unread
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_UPLINK_BODY,
                                            actual_size=request.content_length or 0)
    async with rec.admission():  # read only in turn: junk waits unread
        return _json(await rec.uplink(await _read_capped(request, MAX_UPLINK_BODY),
                                      sealed=request.content_type == SEALED_UPLINK))


async def _read_capped(request: web.Request, cap: int) -> bytes:
    """The body, refusing it (HTTP 413) as soon as it passes ``cap`` bytes (a chunked
    body has no length to check first)."""
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > cap:
            raise web.HTTPRequestEntityTooLarge(max_size=cap, actual_size=size)
        chunks.append(chunk)
    return b"".join(chunks)


async def uplink_cursor(request: web.Request) -> web.Response:
    rec = request.app[KEY]
    gateway_id = request.query.get("gateway_id")
    if not gateway_id:
        raise ValidationError("GET /uplink/cursor needs ?gateway_id= (and optionally boot_id=)")
    return _json(await rec.signed_cursor(gateway_id, request.query.get("boot_id") or None))


async def admin(request: web.Request) -> web.Response:
    rec = request.app[KEY]
    return _json(await rec.handle_admin(await request.read()))


async def admin_log(request: web.Request) -> web.Response:
    rec = request.app[KEY]
    rec.check_alive()
    return _json(await rec.admin_log())


async def sensors(request: web.Request) -> web.Response:
    rec = request.app[KEY]
    return _json(await rec.sensor_events(await request.read()))


async def tamper(request: web.Request) -> web.Response:
    rec = request.app[KEY]
    if not rec.config.tamper_endpoint:
        raise web.HTTPNotFound()
    rec.tamper()
    return _json({"state": "bricked"})


# --- views ----------------------------------------------------------------------------------------
async def identity(request: web.Request) -> web.Response:
    rec = request.app[KEY]
    rec.check_alive()
    return _json(rec.identity())


async def status(request: web.Request) -> web.Response:
    return _json(await request.app[KEY].status())


async def verdicts(request: web.Request) -> web.Response:
    rec = request.app[KEY]
    return _json(await rec.verdicts(request.query.get("gateway_id")))


async def alarms(request: web.Request) -> web.Response:
    return _json(await request.app[KEY].alarms())


async def notices(request: web.Request) -> web.Response:
    """The signed notice feed: ?after=N (the last notice the caller verified), ?wait=S
    (long poll, at most 60 s)."""
    try:
        after = int(request.query.get("after", "0"))
        wait = float(request.query.get("wait", "0"))
    except ValueError:
        raise ValidationError("GET /notices: ?after= is a notice number, ?wait= seconds"
                              ) from None
    if after < 0 or not 0 <= wait <= 60:
        raise ValidationError("GET /notices: after >= 0 and 0 <= wait <= 60")
    return _json(await request.app[KEY].notice_feed(after, wait))


async def metrics(request: web.Request) -> web.Response:
    rec = request.app[KEY]
    rec.check_alive()
    open_alarms = collections.Counter(a["kind"] for a in await rec.alarms(open_only=True))
    data = rec.metrics.render(rec.queue_depth(), [g.state for g in rec.ingest.gateways.values()],
                              open_alarms=open_alarms)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE})


def make_app(rec: Recomputer) -> web.Application:
    """The aiohttp application; starting it starts the recomputer, cleanup closes it."""
    app = web.Application(middlewares=[errors], client_max_size=MAX_BODY)
    app[KEY] = rec
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/uplink", uplink)
    app.router.add_get("/uplink/cursor", uplink_cursor)
    app.router.add_post("/admin", admin)
    app.router.add_get("/admin/log", admin_log)
    app.router.add_post("/sensors", sensors)
    app.router.add_post("/tamper", tamper)
    app.router.add_get("/identity", identity)
    app.router.add_get("/status", status)
    app.router.add_get("/verdicts", verdicts)
    app.router.add_get("/alarms", alarms)
    app.router.add_get("/notices", notices)
    app.router.add_get("/metrics", metrics)

    async def on_startup(app: web.Application) -> None:
        await app[KEY].start()

    async def on_cleanup(app: web.Application) -> None:
        await app[KEY].close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
