"""The operator's middlebox on a gateway's uplink (forging, replaying, withholding).

The operator owns the datacenter's network: every audit record, BOOT record and
checkpoint a gateway sends to the recomputer crosses wires the operator controls.
:class:`UplinkTap` plays that position. A gateway started with ``--recomputer`` set to
the tap's URL sends its ``POST /uplink`` batches here; the tap forwards them to the
real recomputer and hands the answer back, unless the scenario told it otherwise:

* ``drop`` a chosen envelope and lie to the gateway that the recomputer took it (an
  answer of its own, ``ok: true``: the operator holds no recomputer key, so it cannot
  sign it, and the gateway deletes nothing on it);
* ``block`` the whole uplink (answer 503: the gateway keeps its spool and retries; the
  recomputer hears nothing: a silenced gateway);
* keep a copy of everything that passed (:attr:`UplinkTap.seen`), so a scenario can
  replay or alter a genuine envelope and post it itself.

The tap never holds a gateway key: whatever it sends is either a genuine envelope or
something the recomputer can tell is not one.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

Action = Literal["pass", "drop"]
#: (payload type suffix "audit" | "boot" | "checkpoint" | other, decoded payload) -> action
Rule = Callable[[str, dict[str, Any]], Action]


def payload_kind(envelope: dict[str, Any]) -> str:
    """``audit``, ``boot``, ``checkpoint`` (from the DSSE payload type), else the type."""
    ptype = str(envelope.get("payloadType", ""))
    for kind in ("audit", "boot", "checkpoint"):
        if f".{kind}+json" in ptype:
            return kind
    return ptype


def decode_payload(envelope: dict[str, Any]) -> dict[str, Any]:
    """The envelope's payload as JSON (unauthenticated: for choosing what to drop)."""
    try:
        value = json.loads(base64.b64decode(envelope.get("payload", "")))
    except (ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


@dataclass
class Seen:
    """One envelope that crossed the tap, and what happened to it."""

    time: float
    kind: str
    payload: dict[str, Any]
    envelope: dict[str, Any]
    action: str  # "passed" | "dropped" | "blocked"
    ok: bool | None = None  # the recomputer's answer for a passed envelope


@dataclass
class UplinkTap:
    """An HTTP middlebox between gateways and the recomputer's ``/uplink``
    (POST batches; GETs such as ``/uplink/cursor`` pass through unless the wire is cut).

    Args:
        target: returns the recomputer's base URL (read at each request, so the tap
            can be started before the recomputer's port is known).
    """

    target: Callable[[], str]
    blocked: bool = False
    rule: Rule | None = None
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> UplinkTap:
        """Listen on a free loopback port in a daemon thread."""
        tap = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # e.g. the gateway asking GET /uplink/cursor
                self._answer(*tap.handle_get(self.path))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self._answer(*tap.handle(self.rfile.read(length)))

            def _answer(self, status: int, body: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the gateway went away (stopped) before reading its answer

            def log_message(self, *_args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="ivp-uplink-tap")
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        """Give this to a gateway as ``--recomputer``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- the operator's controls --------------------------------------------------------------
    def pass_all(self) -> None:
        """Back to a plain wire: everything passes."""
        with self.lock:
            self.blocked, self.rule = False, None

    def block(self) -> None:
        """Cut the uplink: every batch is answered 503 (the gateway keeps its spool)."""
        with self.lock:
            self.blocked = True

    def set_rule(self, rule: Rule | None) -> None:
        with self.lock:
            self.rule = rule

    def captured(self, kind: str, gateway_id: str | None = None,
                 acked: bool | None = True) -> list[Seen]:
        """Envelopes of ``kind`` that passed (``acked``: and the recomputer took them)."""
        with self.lock:
            return [s for s in self.seen if s.kind == kind and s.action == "passed"
                    and (gateway_id is None or s.payload.get("gateway_id") == gateway_id)
                    and (acked is None or s.ok is acked)]

    # --- the wire -----------------------------------------------------------------------------
    def handle_get(self, path: str) -> tuple[int, bytes]:
        """A GET from a gateway (its uplink cursor): passed on, unless the wire is cut."""
        with self.lock:
            blocked = self.blocked
        if blocked:
            return 503, b'{"error": {"message": "uplink cut", "type": "TransportError"}}'
        req = urllib.request.Request(self.target().rstrip("/") + path, method="GET")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError as e:
            return 502, json.dumps({"error": {"message": str(e),
                                              "type": "TransportError"}}).encode()

    def handle(self, body: bytes) -> tuple[int, bytes]:
        """One ``POST /uplink`` from a gateway: (status, answer body)."""
        try:
            envelopes = json.loads(body)["envelopes"]
            if not isinstance(envelopes, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return self._forward_raw(body)
        now = time.time()
        with self.lock:
            blocked, rule = self.blocked, self.rule
        if blocked:
            self._record([Seen(now, payload_kind(e), decode_payload(e), e, "blocked")
                          for e in envelopes if isinstance(e, dict)])
            return 503, b'{"error": {"message": "uplink cut", "type": "TransportError"}}'
        items = [Seen(now, payload_kind(e), decode_payload(e), e, "passed")
                 for e in envelopes if isinstance(e, dict)]
        if len(items) != len(envelopes):
            return self._forward_raw(body)
        for item in items:
            if rule is not None and rule(item.kind, item.payload) == "drop":
                item.action = "dropped"
        passed = [i for i in items if i.action == "passed"]
        results: list[dict[str, Any]] = []
        answer = b""
        if passed:
            status, answer = self._forward([i.envelope for i in passed])
            if status != 200:
                self._record([Seen(now, i.kind, i.payload, i.envelope, "blocked")
                              for i in items])
                return status, answer
            results = json.loads(answer)["results"]
            for item, result in zip(passed, results, strict=True):
                item.ok = bool(result.get("ok"))
        self._record(items)
        if len(passed) == len(items):  # nothing dropped: the recomputer's answer, as it is
            return 200, answer
        merged, it = [], iter(results)
        for item in items:  # a dropped envelope is reported taken, in the recomputer's
            # name: the operator holds no recomputer key, so this answer is unsigned
            merged.append(next(it) if item.action == "passed" else {"ok": True, "error": ""})
        return 200, json.dumps({"results": merged}).encode()

    def _record(self, items: list[Seen]) -> None:
        with self.lock:
            self.seen.extend(items)

    def _forward(self, envelopes: list[dict[str, Any]]) -> tuple[int, bytes]:
        return self._forward_raw(json.dumps({"envelopes": envelopes}).encode())

    def _forward_raw(self, body: bytes) -> tuple[int, bytes]:
        return post_uplink(self.target(), body)


def post_uplink(recomputer_url: str, body: bytes, timeout: float = 30.0) -> tuple[int, bytes]:
    """POST ``body`` to ``<recomputer>/uplink``: (status, answer bytes); 502 if unreachable."""
    req = urllib.request.Request(recomputer_url.rstrip("/") + "/uplink", data=body,
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return 502, json.dumps({"error": {"message": str(e), "type": "TransportError"}}).encode()


@dataclass
class ControlTap:
    """An HTTP proxy the operator puts in front of a gateway: the URL enrolled for it,
    so everything the recomputer sends the gateway (INPUT, SHUTDOWN, READMIT, relays)
    crosses it. It forwards everything, except the paths :attr:`fake` names, which it
    answers itself with ``200 {"state": "shutdown"}`` (an operator's answer: it holds
    no gateway key) and keeps (:attr:`kept`) instead of delivering.

    Args:
        target: returns the gateway's own URL.
    """

    target: Callable[[], str]
    fake: set[str] = field(default_factory=set)  # e.g. {"/control", "/admin"}
    kept: list[tuple[str, bytes]] = field(default_factory=list)  # (path, body) not delivered
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> ControlTap:
        tap = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer(*tap.forward("GET", self.path, None, self.headers))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with tap.lock:
                    faked = self.path.split("?")[0] in tap.fake
                    if faked:
                        tap.kept.append((self.path, body))
                if faked:
                    self._answer(200, b'{"state": "shutdown"}', "application/json")
                else:
                    self._answer(*tap.forward("POST", self.path, body, self.headers))

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *_args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True,
                         name="ivp-control-tap").start()
        return self

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def forward(self, method: str, path: str, body: bytes | None,
                headers: Any) -> tuple[int, bytes, str]:
        """Pass a request to the gateway: (status, body, content type)."""
        req = urllib.request.Request(self.target().rstrip("/") + path, data=body,
                                     method=method, headers={
                                         "Content-Type": headers.get("Content-Type",
                                                                     "application/json")})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return r.status, r.read(), r.headers.get("Content-Type", "application/json")
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers.get("Content-Type", "application/json")
        except OSError as e:
            return 502, json.dumps({"error": {"message": str(e),
                                              "type": "TransportError"}}).encode(), \
                "application/json"

    def deliver_kept(self) -> list[tuple[int, bytes]]:
        """The operator hands over what it kept, in the order it came (late)."""
        with self.lock:
            kept, self.kept = self.kept, []
        return [self.forward("POST", path, body, {})[:2] for path, body in kept]


__all__ = ["ControlTap", "Seen", "UplinkTap", "decode_payload", "payload_kind",
           "post_uplink"]
