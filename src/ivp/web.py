"""aiohttp glue shared by the server, the gateway and the recomputer.

aiohttp answers some requests itself — no such route (404), a wrong method (405), a
body over the limit (413) — with plain text. :func:`http_refusal` gives those answers
the one error shape of ivp (``ivp.errors.error_json``), in words for a person.
"""

from __future__ import annotations

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


__all__ = ["http_refusal"]
