"""The gateway's HTTP shell (aiohttp): routes → :class:`~ivp.gateway.core.Gateway`.

Nothing here decides anything: each handler reads the request (bounded), calls the
core, and writes the answer. Errors are ivp error types, mapped to HTTP statuses in
one place (:data:`STATUS`) and answered as ``{"error": {"message", "type"}}``.

Routes (docs/ARCHITECTURE.md, "Gateway"; docs/GATEWAY.md):

=========================  =====================================================
``POST /upload?model_id``  operator: the model's files in manifest order (raw, or HPKE-
                          encrypted to the device: ``application/vnd.ivp.hpke-upload``)
``POST /v1/completions``   INPUT (from the recomputer), OpenAI completion body
``POST /v1/chat/completions``  INPUT, OpenAI chat body
``POST /control``          a Shutdown or Readmit envelope signed by the recomputer key
``POST /admin``            an inspectors' quorum-signed admin request (relayed)
``POST /whitelist``        a newer quorum-signed whitelist envelope
``POST /tamper``           the emulated tamper mesh firing (only with
                           ``tamper_endpoint``: demos and tests)
``GET /status``            state and counters; ``GET /metrics`` Prometheus;
``GET /alarms``            the gateway's own alarm log
=========================  =====================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from ivp.errors import (
    BrickedError,
    IvpError,
    MisuseError,
    PeerDataError,
    SignatureError,
    StateError,
    TransportError,
    ValidationError,
    error_json,
    error_of,
    http_status,
)
from ivp.gateway.core import Gateway, Reply
from ivp.gateway.errors import (
    BodyTooLargeError,
    ServerProtocolError,
    ShutdownError,
    UnknownModelError,
    UploadRefusedError,
)
from ivp.gateway.proxy import Endpoint
from ivp.gateway.upload import HPKE_UPLOAD
from ivp.gateway.upstream import read_capped
from ivp.protocol.hpke import device_kem_key, open_stream, upload_info
from ivp.web import http_refusal

log = logging.getLogger("ivp.gateway")

#: ivp error type → HTTP status; the first match wins (subclasses before roots).
STATUS: tuple[tuple[type[IvpError], int], ...] = (
    (BrickedError, 403),
    (ShutdownError, 403),
    (UnknownModelError, 404),
    (BodyTooLargeError, 413),
    (UploadRefusedError, 400),
    (ServerProtocolError, 502),
    (SignatureError, 403),
    (StateError, 409),
    (MisuseError, 409),
    (PeerDataError, 400),
    (TransportError, 502),
    (IvpError, 500),
)

MAX_CONTROL_BODY = 64 << 10
MAX_WHITELIST_BODY = 16 << 20
UPLOAD_CHUNK = 1 << 20

GATEWAY_KEY = web.AppKey("gateway", Gateway)


def error_body(exc: IvpError) -> tuple[int, dict[str, Any]]:
    """HTTP status and JSON body for an ivp error."""
    status = http_status(exc, STATUS)
    body = error_of(exc)
    if isinstance(exc, UploadRefusedError):
        body.update(state="power_kill", file=exc.file, reason=exc.reason)
        if exc.reason == "server":
            status = 502
    elif isinstance(exc, BrickedError):
        body["state"] = "bricked"
    elif isinstance(exc, ShutdownError):
        body["state"] = "shutdown"
    return status, body


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except IvpError as exc:
        status, body = error_body(exc)
        if request.path.startswith("/v1/"):
            endpoint = "chat.completions" if "chat" in request.path else "completions"
            request.app[GATEWAY_KEY].metrics.requests.labels(endpoint, str(status)).inc()
        return web.json_response(body, status=status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_refusal(request, exc)
    except RecursionError:  # a parser reached by input nested too deeply: bad input
        return web.json_response(error_json("input nested too deeply", "ValidationError"),
                                 status=400)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return web.json_response(error_json("internal gateway error", "InternalError"),
                                 status=500)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refused past ``limit`` bytes (blocks memory exhaustion).

    Raises:
        BodyTooLargeError: declared or actual size over ``limit``.
    """
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLargeError(f"request body of {request.content_length} bytes is over the "
                                f"{limit}-byte limit")
    return await read_capped(request.content, limit, lambda: BodyTooLargeError(
        f"request body is over the {limit}-byte limit"))


EVENT_STREAM = "text/event-stream"


class _StreamHead:
    """The head of a streamed answer, sent early (``Gateway.complete``'s ``head``: while
    the server generates, so the client's first token waits for its commit only)."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    async def send(self) -> None:
        self.response = _event_stream(200)
        with contextlib.suppress(ConnectionError, RuntimeError):  # client gone: see _send
            await self.response.prepare(self.request)


def _event_stream(status: int) -> web.StreamResponse:
    resp = web.StreamResponse(status=status, headers={"Cache-Control": "no-cache"})
    resp.content_type = EVENT_STREAM
    return resp


async def _complete(gateway: Gateway, request: web.Request, endpoint: Endpoint
                    ) -> web.StreamResponse:
    body = await read_body(request, gateway.config.max_body)
    head = _StreamHead(request)
    try:
        reply = await gateway.complete(endpoint, body, head.send)
    except Exception as exc:
        if head.response is None:
            raise
        # the head is out (the server broke before its first token): the error event
        # ends the stream, in the OpenAI shape; no pair was logged
        if isinstance(exc, IvpError):
            status, error = error_body(exc)
        else:
            log.exception("unexpected error in a stream after its head was sent")
            status, error = 500, error_json("internal gateway error", "InternalError")
        gateway.metrics.requests.labels(endpoint, str(status)).inc()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await head.response.write(b"data: " + json.dumps(error).encode()
                                      + b"\n\ndata: [DONE]\n\n")
            await head.response.write_eof()
        return head.response
    return await _send(gateway, request, reply, head.response)


async def _send(gateway: Gateway, request: web.Request, reply: Reply,
                started: web.StreamResponse | None = None) -> web.StreamResponse:
    """Write the reply (``started``: a stream whose head is out), then run its
    after-release step (the sampling draw) regardless."""
    resp: web.StreamResponse
    if reply.chunks is None:
        headers = {"Cache-Control": "no-cache"} if reply.content_type == EVENT_STREAM else {}
        resp = web.Response(body=reply.body, status=reply.status, headers=headers,
                            content_type=reply.content_type)
    else:  # a stream: each piece leaves as soon as the datapath hands it over (durable)
        resp = started or _event_stream(reply.status)
    try:
        await resp.prepare(request)  # a no-op for a started stream
        if reply.chunks is not None:
            await resp.write(reply.body)
            async for piece in reply.chunks:
                await resp.write(piece)
        await resp.write_eof()
    except (ConnectionError, RuntimeError) as exc:  # client gone: the pair is logged anyway
        log.info("client left before the response was written: %s", exc)
    finally:
        if reply.after_release is not None:
            # releases here and now (the draw is queued in tag order and shares the next
            # group commit); the connection's next request does not wait for it
            gateway.spawn(reply.after_release()).add_done_callback(_log_draw_failure)
    return resp


def _log_draw_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("sampling draw failed", exc_info=task.exception())


class UploadStreamError(Exception):
    """An encrypted upload that does not open. Not an ``IvpError`` on purpose: the boot
    shell reads it as the operator's stream breaking there, a short stream: POWER_KILL
    (and the alarm upload_broken naming why)."""


async def _decrypted(chunks: AsyncIterator[bytes], key_pair: Any, info: bytes
                     ) -> AsyncIterator[bytes]:
    try:
        async for plaintext in open_stream(chunks, key_pair, info):
            yield plaintext
    except ValidationError as exc:
        raise UploadStreamError(str(exc)) from None


def build_app(gateway: Gateway, *, tamper_endpoint: bool = False) -> web.Application:
    """The aiohttp application of one gateway; starts and stops it with the app.

    ``tamper_endpoint``: serve ``POST /tamper``, which stands for the tamper mesh
    (demos and tests). Off by default: on a real gateway the mesh is hardware, and a
    route that bricks the gateway must not be open to whoever reaches its port.
    """
    app = web.Application(middlewares=[errors_middleware],
                          client_max_size=gateway.config.max_body)
    app[GATEWAY_KEY] = gateway

    def upload_refusal(request: web.Request) -> web.Response | None:
        """What refuses an upload before a byte of it is read (None: nothing does)."""
        model_id = request.query.get("model_id")
        if not model_id:
            return web.json_response(error_json(
                "POST /upload needs ?model_id=<a whitelisted model>", "ValidationError",
                param="model_id"), status=400)
        if gateway.whitelist.manifest(model_id) is None:
            current = gateway.whitelist.current
            listed = sorted(m.model_id for m in current.manifests) if current else []
            exc = UnknownModelError(f"model {model_id!r} is not on the installed whitelist "
                                    f"(whitelisted: {', '.join(listed) or 'none'})")
            return web.json_response(error_body(exc)[1], status=404)
        return None

    async def upload_expect(request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue`` (sent by ``ivp upload``): refuse an unlisted model
        before the operator streams a byte; else let the body come."""
        refusal = upload_refusal(request)
        if refusal is not None:
            return refusal
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise web.HTTPExpectationFailed(text="only Expect: 100-continue is understood")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return None

    async def upload(request: web.Request) -> web.StreamResponse:
        refusal = upload_refusal(request)
        if refusal is not None:
            return refusal
        model_id = request.query["model_id"]
        chunks: AsyncIterator[bytes] = request.content.iter_chunked(UPLOAD_CHUNK)
        if request.content_type == HPKE_UPLOAD:  # encrypted to this device: opened here
            chunks = _decrypted(chunks, device_kem_key(gateway.device), upload_info(model_id))
        result = await gateway.upload(model_id, chunks)
        return web.json_response(result)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await _complete(gateway, request, "completions")

    async def chat(request: web.Request) -> web.StreamResponse:
        return await _complete(gateway, request, "chat.completions")

    async def control(request: web.Request) -> web.StreamResponse:
        return web.json_response(await gateway.control(await read_body(request,
                                                                       MAX_CONTROL_BODY)))

    async def admin(request: web.Request) -> web.StreamResponse:
        body = await read_body(request, MAX_WHITELIST_BODY)  # may carry a whitelist
        return web.json_response(await gateway.admin(body))

    async def whitelist(request: web.Request) -> web.StreamResponse:
        body = await read_body(request, MAX_WHITELIST_BODY)
        return web.json_response(await gateway.install_whitelist(body))

    async def tamper(_request: web.Request) -> web.StreamResponse:
        if not tamper_endpoint:
            raise web.HTTPNotFound()
        return web.json_response(await gateway.tamper())

    async def status(_request: web.Request) -> web.StreamResponse:
        return web.json_response(await gateway.status())

    async def alarms(_request: web.Request) -> web.StreamResponse:
        return web.json_response(await gateway.alarms())

    async def metrics(_request: web.Request) -> web.StreamResponse:
        if not gateway.device.bricked:
            with contextlib.suppress(IvpError):
                await gateway.status()  # refreshes the spool-depth gauge
        return web.Response(body=gateway.metrics.render(),
                            headers={"Content-Type": gateway.metrics.content_type})

    app.add_routes([
        web.post("/upload", upload, expect_handler=upload_expect),
        web.post("/v1/completions", completions),
        web.post("/v1/chat/completions", chat),
        web.post("/control", control),
        web.post("/admin", admin),
        web.post("/whitelist", whitelist),
        web.post("/tamper", tamper),
        web.get("/status", status),
        web.get("/alarms", alarms),
        web.get("/metrics", metrics),
    ])

    async def on_startup(_app: web.Application) -> None:
        await gateway.start()

    async def on_cleanup(_app: web.Application) -> None:
        await gateway.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


__all__ = ["GATEWAY_KEY", "STATUS", "build_app", "error_body", "read_body"]
