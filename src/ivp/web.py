"""aiohttp glue shared by the server, the gateway and the recomputer.

aiohttp answers some requests itself — no such route (404), a wrong method (405), a
body over the limit (413) — with plain text. :func:`http_refusal` gives those answers
the one error shape of ivp (``ivp.errors.error_json``), in words for a person.

:func:`listen` binds a service's port before the service starts anything, so a port
already in use ends the command with one line and exit status 2 (no traceback, no
half-started service), and "listening" is only ever printed after a bind succeeded.
"""

from __future__ import annotations

import errno
import socket
import sys

from aiohttp import web

from ivp.errors import error_json


def http_refusal(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own 4xx/5xx refusal as a JSON error answer (``Allow`` kept on a 405)."""
    headers = {}
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        body = error_json(f"{request.method} is not allowed on {request.path}: use {allowed}",
                          "HTTPError", code="method_not_allowed")
        headers["Allow"] = ",".join(sorted(exc.allowed_methods))
    elif isinstance(exc, web.HTTPNotFound):
        body = error_json(f"there is no {request.path} here (docs/ARCHITECTURE.md lists "
                          "every route)", "HTTPError", code="not_found")
    elif isinstance(exc, web.HTTPRequestEntityTooLarge):
        body = error_json(f"the request body is too large: {exc.text}", "HTTPError",
                          code="request_too_large")
    else:
        body = error_json(exc.reason, "HTTPError")
    return web.json_response(body, status=exc.status, headers=headers)


def listen(name: str, host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` for service ``name`` (e.g. "gateway").

    On failure prints one line, ``ivp NAME: cannot listen on HOST:PORT: why``, to
    stderr and exits with status 2.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        _quit(name, host, port, f"bad address ({exc.strerror or exc})")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        why = (f"port {port} is already in use (stop what holds it, or choose another "
               "--port)") if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        _quit(name, host, port, why)
    sock.setblocking(False)
    return sock


def bound_port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def _quit(name: str, host: str, port: int, why: str) -> None:
    print(f"ivp {name}: cannot listen on {host}:{port}: {why}", file=sys.stderr, flush=True)
    raise SystemExit(2)


__all__ = ["bound_port", "http_refusal", "listen"]
