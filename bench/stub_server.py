"""A fast stub of the ivp inference server (docs/ARCHITECTURE.md, "Server").

It speaks the server protocol — ``GET /health``, ``POST /boot/manifest``, ``POST
/boot/stream`` (exactly ``total_size`` bytes, counted and dropped), ``POST
/v1/completions`` and ``/v1/chat/completions`` (token ids, ``finish_reason``, the
echoed ``ivp_tag``) — so a gateway can boot it and serve through it, but it runs no
model: the output tokens are a cheap pure function of (seed, prompt, max_tokens), never
EOS, always ``max_tokens`` of them (``finish_reason: "length"``). It is a single
asyncio protocol with its own minimal HTTP/1.1 parser (keep-alive, Content-Length and
chunked bodies), so that the component under test, not the stub, limits a benchmark.

    python bench/stub_server.py --port 8300 [--ready] [--vocab 640]
        [--token-interval-ms 2] [--chunk-tokens 1]

Streamed answers (``"stream": true``) carry ``--chunk-tokens`` token ids per SSE event;
with ``--token-interval-ms`` the events go out one by one at that interval (chunked
transfer encoding, as a generating server sends them), else all at once.

``--ready`` starts it already booted (for load straight at the stub or through nginx).
Without ``--port`` (as ``make bench`` runs it) it checks itself for two seconds and
prints its request rate as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import zlib
from typing import Any

import msgspec

MAX_HEAD = 64 << 10
MAX_BODY = 4 << 20  # JSON bodies; /boot/stream is counted, never buffered

_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder()


class Stub:
    """Server state: what a real server holds (minus the model)."""

    def __init__(self, vocab: int, ready: bool, interval: float = 0.0,
                 chunk_tokens: int = 1) -> None:
        self.vocab = vocab
        self.interval, self.chunk_tokens = interval, max(1, chunk_tokens)
        self.state = "ready" if ready else "empty"
        self.model_id: str | None = "stub" if ready else None
        self.total_size = 0

    def health(self) -> tuple[int, bytes]:
        return 200, _json.encode({"state": self.state,
                                  "model_id": self.model_id if self.state == "ready" else None})

    def manifest(self, body: bytes) -> tuple[int, bytes]:
        try:
            m = _decode.decode(body)
            self.total_size, model_id = int(m["total_size"]), str(m["model_id"])
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            return _error(400, "bad manifest", "ValidationError")
        self.state, self.model_id = "loading", model_id
        return 200, b'{"state":"loading"}'

    def streamed(self, received: int) -> tuple[int, bytes]:
        if self.state != "loading":
            return _error(409, "POST /boot/manifest first", "StateError")
        if received != self.total_size:
            self.state = "empty"
            return _error(400, f"stream of {received} bytes, manifest says {self.total_size}",
                          "ValidationError")
        self.state = "ready"
        return 200, b'{"state":"ready"}'

    def tokens(self, req: dict[str, Any]) -> list[int]:
        n = int(req.get("max_tokens") or req.get("max_completion_tokens") or 16)
        prompt = req.get("prompt", req.get("messages", ""))
        raw = prompt if isinstance(prompt, str) else repr(prompt)
        x = (int(req.get("seed") or 0) ^ zlib.crc32(raw.encode())) & 0xFFFFFFFF
        span = self.vocab - 3
        out = []
        for _ in range(n):
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF
            out.append(3 + x % span)  # ids 0..2 are <pad>, <s>, </s> (EOS) in the tiny model
        return out

    def complete(self, body: bytes, chat: bool) -> tuple[int, bytes | list[bytes], bytes]:
        if self.state != "ready":
            s, b = _error(503, "no model loaded: this server boots only from weights "
                          "streamed to it by its gateway", "StateError")
            return s, b, b"application/json"
        try:
            req = _decode.decode(body)
            ids = self.tokens(req)
        except (msgspec.DecodeError, TypeError, ValueError, AttributeError):
            s, b = _error(400, "bad request body", "ValidationError")
            return s, b, b"application/json"
        tag, model = req.get("ivp_tag"), req.get("model", self.model_id)
        prompt = req.get("prompt")
        text = " tok" * len(ids)
        choice: dict[str, Any] = {"index": 0, "token_ids": ids, "finish_reason": "length",
                                  "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        prompt_ids = prompt if isinstance(prompt, list) else []
        if req.get("stream"):
            k = self.chunk_tokens
            events = [{"choices": [{"index": 0, "token_ids": ids[i:i + k], "text": " tok" * k,
                                    "finish_reason": None}], "ivp_tag": tag}
                      for i in range(0, len(ids), k)]
            events.append({"choices": [{"index": 0, "token_ids": [], "text": "",
                                        "finish_reason": "length"}], "ivp_tag": tag})
            data = [b"data: " + _json.encode(e) + b"\n\n" for e in events]
            return 200, [*data, b"data: [DONE]\n\n"], b"text/event-stream"
        return 200, _json.encode({
            "id": "cmpl-stub", "object": "chat.completion" if chat else "text_completion",
            "created": 0, "model": model, "choices": [choice],
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids),
                      "total_tokens": len(prompt_ids) + len(ids)},
            "prompt_token_ids": prompt_ids, "seed": req.get("seed"), "ivp_tag": tag,
        }), b"application/json"


def _error(status: int, message: str, type_: str) -> tuple[int, bytes]:
    return status, _json.encode({"error": {"message": message, "type": type_}})


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 409: b"Conflict",
            413: b"Payload Too Large", 503: b"Service Unavailable"}


class _Request:
    __slots__ = ("chunk_left", "chunked", "keep_alive", "length", "method", "parts", "path",
                 "received", "sink", "size", "trailer")

    def __init__(self, method: str, path: str, keep_alive: bool, length: int,
                 chunked: bool) -> None:
        self.method, self.path, self.keep_alive = method, path, keep_alive
        self.length, self.chunked = length, chunked
        self.sink = path == "/boot/stream"  # weights: counted and dropped
        self.parts: list[bytes] = []
        self.size = 0  # body bytes kept
        self.received = 0  # body bytes seen
        self.chunk_left = -1  # chunked: bytes left in the current chunk (-1: read a size)
        self.trailer = False


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are answered in arrival order."""

    def __init__(self, stub: Stub) -> None:
        self.stub = stub
        self.buf = bytearray()
        self.req: _Request | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None and self._step():
            pass

    # --- parsing --------------------------------------------------------------------------
    def _step(self) -> bool:
        """Advance by what the buffer holds; True when another step may progress."""
        if self.req is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self._send(431, b'{"error":{"message":"head too large","type":"HTTP"}}',
                               close=True)
                return False
            head = bytes(self.buf[:end]).decode("latin-1")
            del self.buf[: end + 4]
            self.req = self._head(head)
            if self.req is None:
                return False
        req = self.req
        if req.chunked:
            return self._chunked(req)
        take = min(len(self.buf), req.length - req.received)
        if take:
            self._body(req, self.buf[:take])
            del self.buf[:take]
        if req.received == req.length:
            self._dispatch(req)
            return bool(self.buf)
        return False

    def _head(self, head: str) -> _Request | None:
        lines = head.split("\r\n")
        try:
            method, path, version = lines[0].split(" ", 2)
        except ValueError:
            self._send(400, b'{"error":{"message":"bad request line","type":"HTTP"}}',
                       close=True)
            return None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        conn = headers.get("connection", "").lower()
        keep = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = int(headers.get("content-length", "0") or 0)
        return _Request(method, path.split("?", 1)[0], keep, length, chunked)

    def _body(self, req: _Request, data: bytes | bytearray) -> None:
        req.received += len(data)
        if req.sink:
            return
        req.size += len(data)
        if req.size <= MAX_BODY:
            req.parts.append(bytes(data))

    def _chunked(self, req: _Request) -> bool:
        while True:
            if req.trailer:
                end = self.buf.find(b"\r\n")
                if end < 0:
                    return False
                line = self.buf[:end]
                del self.buf[: end + 2]
                if not line:
                    self._dispatch(req)
                    return bool(self.buf)
                continue
            if req.chunk_left < 0:
                end = self.buf.find(b"\r\n")
                if end < 0:
                    return False
                size = int(bytes(self.buf[:end]).split(b";", 1)[0], 16)
                del self.buf[: end + 2]
                if size == 0:
                    req.trailer = True
                    continue
                req.chunk_left = size
            if req.chunk_left > 0:
                take = min(len(self.buf), req.chunk_left)
                if not take:
                    return False
                self._body(req, self.buf[:take])
                del self.buf[:take]
                req.chunk_left -= take
                if req.chunk_left:
                    return False
            if len(self.buf) < 2:
                return False
            del self.buf[:2]  # CRLF after the chunk's data
            req.chunk_left = -1

    # --- answering --------------------------------------------------------------------------
    def _dispatch(self, req: _Request) -> None:
        self.req = None
        stub = self.stub
        ctype = b"application/json"
        if req.size > MAX_BODY:
            status, body = _error(413, "body too large", "HTTP")
        elif req.method == "GET" and req.path == "/health":
            status, body = stub.health()
        elif req.method == "POST" and req.path == "/v1/completions":
            status, body, ctype = stub.complete(b"".join(req.parts), chat=False)
        elif req.method == "POST" and req.path == "/v1/chat/completions":
            status, body, ctype = stub.complete(b"".join(req.parts), chat=True)
        elif req.method == "POST" and req.path == "/boot/manifest":
            status, body = stub.manifest(b"".join(req.parts))
        elif req.method == "POST" and req.path == "/boot/stream":
            status, body = stub.streamed(req.received)
        else:
            status, body = _error(404, f"no route {req.method} {req.path}", "HTTP")
        if isinstance(body, list):
            if stub.interval > 0:
                self._send_timed(body, close=not req.keep_alive)
                return
            body = b"".join(body)
        self._send(status, body, close=not req.keep_alive, ctype=ctype)

    def _send_timed(self, events: list[bytes], close: bool) -> None:
        """SSE events one by one, ``interval`` apart, as chunks (a generating server)."""
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n%s\r\n"
                             % (b"Connection: close\r\n" if close else b""))
        loop = asyncio.get_running_loop()
        transport = self.transport

        def send(i: int) -> None:
            if transport.is_closing():
                return  # the reader left: stop generating
            if i < len(events):
                transport.write(b"%x\r\n%s\r\n" % (len(events[i]), events[i]))
                loop.call_later(self.stub.interval, send, i + 1)
            else:
                transport.write(b"0\r\n\r\n")
                if close:
                    transport.close()

        loop.call_later(self.stub.interval, send, 0)

    def _send(self, status: int, body: bytes, close: bool = False,
              ctype: bytes = b"application/json") -> None:
        assert self.transport is not None
        head = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n"
                % (status, _REASONS.get(status, b"Error"), ctype, len(body),
                   b"Connection: close\r\n" if close else b""))
        self.transport.write(head + body)
        if close:
            self.transport.close()
            self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int, vocab: int, ready: bool, interval: float = 0.0,
                chunk_tokens: int = 1) -> None:
    loop = asyncio.get_running_loop()
    stub = Stub(vocab, ready, interval, chunk_tokens)
    server = await loop.create_server(lambda: Connection(stub), host, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def self_check(seconds: int = 2) -> dict[str, Any]:
    """Without ``--port`` (as ``make bench`` runs it): start a stub, load it for a moment
    (wrk when installed, else sequential urllib requests) and report its rate."""
    import json
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--port", str(port), "--ready"])
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = json.dumps({"model": "stub", "prompt": "hello", "max_tokens": 16}).encode()
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url.replace("/v1/completions", "/health"), timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        if shutil.which("wrk"):
            with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
                f.write(f'wrk.method = "POST"\nwrk.body = [[{body.decode()}]]\n'
                        'wrk.headers["Content-Type"] = "application/json"\n')
            out = subprocess.run(["wrk", "-t1", "-c8", f"-d{seconds}s", "-s", f.name, url],
                                 capture_output=True, text=True).stdout
            rate = float(out.split("Requests/sec:")[1].split()[0])
            return {"bench": "stub_server", "load": "wrk -t1 -c8", "rps": rate}
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            req = urllib.request.Request(url, data=body,
                                         headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=5).read()
            n += 1
        return {"bench": "stub_server", "load": "urllib, sequential",
                "rps": n / (time.perf_counter() - start)}
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=None,
                        help="serve on this port (without it: a short self-check)")
    parser.add_argument("--vocab", type=int, default=640, help="token ids are < this")
    parser.add_argument("--ready", action="store_true", help="start booted (no upload)")
    parser.add_argument("--quick", action="store_true", help="self-check only (the default)")
    parser.add_argument("--token-interval-ms", type=float, default=0.0,
                        help="streams: ms between SSE events (0: all at once)")
    parser.add_argument("--chunk-tokens", type=int, default=1,
                        help="streams: token ids per SSE event")
    args = parser.parse_args()
    if args.port is None:
        import json

        print(json.dumps(self_check(1 if args.quick else 2), sort_keys=True), flush=True)
        return
    asyncio.run(serve(args.host, args.port, args.vocab, args.ready,
                      args.token_interval_ms / 1000.0, args.chunk_tokens))


if __name__ == "__main__":
    main()
