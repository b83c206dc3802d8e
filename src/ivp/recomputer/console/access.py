"""Who may open the console, and the headers every answer carries.

* Bound to a loopback address (the default), the console answers only requests whose
  ``Host`` names that loopback address: a web page elsewhere cannot read it through
  DNS rebinding.
* Bound to any other address it needs a token (``--console-token-file``): a browser
  logs in once (``/login``: an HttpOnly, SameSite=Strict session cookie), scripts send
  ``Authorization: Bearer <token>``. It refuses to start without one.
* Every answer forbids framing, inline script and caching, and the console never
  renders a secret: no token, no key but public ones.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from aiohttp import web

from ivp.errors import ValidationError

COOKIE = "ivp_console"
MAX_SESSIONS = 1000
SESSION_SECONDS = 12 * 3600
OPEN_PATHS = ("/login", "/static/")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ConsoleSettings:
    """Where the console listens and what it asks of a visitor.

    Raises:
        ValidationError: a non-loopback bind without a token, or a token too short to
            resist guessing.
    """

    host: str = "127.0.0.1"
    port: int = 8001
    token: str | None = None

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < 16:
            raise ValidationError("the console token must be at least 16 characters")
        if not is_loopback(self.host) and self.token is None:
            raise ValidationError(
                f"--console-host {self.host} is not a loopback address: a console reachable "
                "from other machines needs --console-token-file (a file holding the token "
                "inspectors log in with)")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


class Sessions:
    """Logged-in browsers: random session ids, bounded in number and age."""

    def __init__(self) -> None:
        self._ids: OrderedDict[str, float] = OrderedDict()

    def new(self) -> str:
        sid = secrets.token_urlsafe(32)
        self._ids[sid] = time.monotonic()
        while len(self._ids) > MAX_SESSIONS:
            self._ids.popitem(last=False)
        return sid

    def valid(self, sid: str | None) -> bool:
        started = self._ids.get(sid or "")
        return started is not None and time.monotonic() - started < SESSION_SECONDS

    def end(self, sid: str | None) -> None:
        self._ids.pop(sid or "", None)


def token_matches(settings: ConsoleSettings, offered: str) -> bool:
    return settings.token is not None and hmac.compare_digest(
        offered.encode(), settings.token.encode())


def authorised(request: web.Request, settings: ConsoleSettings, sessions: Sessions) -> bool:
    if settings.token is None:
        return True
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer ") and token_matches(settings, auth[7:]):
        return True
    return sessions.valid(request.cookies.get(COOKIE))


def host_allowed(request: web.Request, settings: ConsoleSettings) -> bool:
    """On a loopback bind, the Host header must name a loopback address (DNS rebinding)."""
    if not is_loopback(settings.host):
        return True
    host = request.headers.get("Host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return is_loopback(name)


def secure_headers(response: web.StreamResponse) -> None:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("Cache-Control", "no-store")


def safe_next(target: str | None) -> str:
    """A local path to return to after login (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


__all__ = ["COOKIE", "ConsoleSettings", "Sessions", "authorised", "host_allowed",
           "is_loopback", "safe_next", "secure_headers", "token_matches"]
