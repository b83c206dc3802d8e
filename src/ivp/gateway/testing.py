"""In-memory peers for driving a :class:`~ivp.gateway.core.Gateway` without processes.

Like httpx's MockTransport: :class:`FakeServer` plays the server's HTTP (and its RAM),
:class:`FakePower` its power supply, :class:`FakeRecomputer` the uplink's far end.
Each can be told to misbehave the way an attacker or a fault would, so tests state
one attack each. Used by the gateway's tests and available to other parts' tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field
from typing import Any

from ivp.errors import IvpError, PeerDataError, TransportError, ValidationError
from ivp.gateway.upstream import StreamAnswer
from ivp.protocol.acks import Heartbeat, UplinkAck, UplinkReceipt, payload_digest
from ivp.protocol.encoding import canonical, decode, to_builtins
from ivp.protocol.envelope import (
    ACK,
    ALARM,
    AUDIT,
    BOOT,
    CHECKPOINT,
    CURSOR,
    HEARTBEAT,
    Envelope,
    open_signed,
    sign_message,
)
from ivp.protocol.keys import SigningKey, VerifyKey
from ivp.protocol.messages import (
    AuditRecord,
    BootRecord,
    Checkpoint,
    GatewayAlarm,
    Manifest,
    UplinkCursor,
)

Answer = Callable[[dict[str, Any]], tuple[int, bytes]]


@dataclass
class FakeServer:
    """A server's HTTP surface and volatile memory.

    It generates deterministic token ids from (seed, prompt) — not a model, but a pure
    function like the real one — and echoes the tag. ``answer`` overrides the
    completion answer (to play a cheating or broken server).
    """

    eos: int = 2
    vocab: int = 640
    powered: bool = False
    state: str = "empty"
    manifest: Manifest | None = None
    received: bytearray = field(default_factory=bytearray)
    requests: list[dict[str, Any]] = field(default_factory=list)
    answer: Answer | None = None
    junk_text: str = "SERVER-FORMATTED-TEXT"
    persist_state: bool = False  # a server that keeps its RAM across power cycles (attack)
    stop_reading_at: int | None = None  # stop consuming the weight stream after N bytes
    delay: float = 0.0  # seconds each completion takes (a slow, or signalling, server)
    event_delay: float = 0.0  # seconds between the events of a streamed answer
    cut_after: int | None = None  # a streamed answer dies after this many events
    streams_open: int = 0  # streamed answers still being sent
    _pumps: set[asyncio.Future[None]] = field(default_factory=set)

    # --- power (driven by FakePower) ------------------------------------------------------
    def power(self, on: bool) -> None:
        self.powered = on
        if not self.persist_state:
            self.state, self.manifest = "empty", None
            self.received = bytearray()

    # --- Upstream ---------------------------------------------------------------------------
    async def reset(self) -> None:
        return None

    def _check_power(self, path: str) -> None:
        if not self.powered:
            raise TransportError(f"server unreachable ({path}): connection refused")

    async def get(self, path: str, *, timeout: float = 10.0) -> tuple[int, bytes]:
        self._check_power(path)
        if path == "/health":
            return 200, json.dumps({"state": self.state, "model_id": None}).encode()
        return 404, b"{}"

    async def post(self, path: str, body: bytes | AsyncIterable[bytes], *,
                   timeout: float = 600.0) -> tuple[int, bytes]:
        self._check_power(path)
        if path == "/boot/manifest":
            assert isinstance(body, bytes)
            self.manifest = decode(body, Manifest)
            self.state, self.received = "loading", bytearray()
            return 200, b'{"state":"loading"}'
        if path == "/boot/stream":
            assert not isinstance(body, bytes)
            async for chunk in body:  # type: ignore[union-attr]
                self._check_power(path)
                if self.stop_reading_at is not None and len(self.received) >= \
                        self.stop_reading_at:
                    return 400, b'{"error":{"message":"stopped","type":"ValidationError"}}'
                self.received += chunk
            assert self.manifest is not None
            if len(self.received) != self.manifest.total_size:
                return 400, b'{"error":{"message":"byte count","type":"ValidationError"}}'
            self.state = "ready"
            return 200, b'{"state":"ready"}'
        if path == "/v1/completions":
            assert isinstance(body, bytes)
            request = json.loads(body)
            self.requests.append(request)
            if self.delay:
                if self.delay > timeout:
                    await asyncio.sleep(timeout)
                    raise TransportError(f"server timed out after {timeout:.3f} s")
                await asyncio.sleep(self.delay)
            if self.state != "ready":
                return 503, b'{"error":{"message":"not booted","type":"StateError"}}'
            if self.answer is not None:
                return self.answer(request)
            return 200, self.honest(request)
        return 404, b"{}"

    async def stream(self, path: str, body: bytes, *, timeout: float = 600.0
                     ) -> StreamAnswer:
        """:meth:`post`'s answer as a stream: one piece per SSE event, ``event_delay``
        seconds apart; with ``cut_after`` set, the server dies after that many events."""
        status, raw = await self.post(path, body, timeout=timeout)
        answer = StreamAnswer(lambda: None, path)
        answer._head(status)
        pieces = [p + b"\n\n" for p in raw.split(b"\n\n") if p] or [raw]
        self.streams_open += 1

        async def pump() -> None:
            try:
                for i, piece in enumerate(pieces):
                    if self.cut_after is not None and i >= self.cut_after:
                        answer._end(TransportError(f"server unreachable ({path}): "
                                                   "ConnectionResetError"))
                        return
                    if self.event_delay:
                        await asyncio.sleep(self.event_delay)
                    if answer._ended:  # the gateway hung up: the server stops
                        return
                    answer._push(piece)
                answer._end(None)
            finally:
                self.streams_open -= 1

        self._pumps.add(task := asyncio.ensure_future(pump()))
        task.add_done_callback(self._pumps.discard)
        return answer

    def tokens(self, request: dict[str, Any]) -> tuple[list[int], str]:
        """A pure function of (seed, prompt, max_tokens): stops at EOS when drawn."""
        seed, prompt, n = request["seed"], request["prompt"], request["max_tokens"]
        out: list[int] = []
        x = (seed ^ sum(prompt) * 2654435761) & 0xFFFFFFFF
        for _ in range(n):
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF
            tok = 3 + x % (self.vocab - 3)
            if x % 11 == 0:
                out.append(self.eos)
                return out, "stop"
            out.append(tok)
        return out, "length"

    def honest(self, request: dict[str, Any]) -> bytes:
        ids, finish = self.tokens(request)
        if request.get("stream"):
            events = []
            for tok in ids:
                events.append({"choices": [{"index": 0, "token_ids": [tok], "text": "x",
                                            "finish_reason": None}],
                               "ivp_tag": request["ivp_tag"]})
            events.append({"choices": [{"index": 0, "token_ids": [], "text": "",
                                        "finish_reason": finish}],
                           "ivp_tag": request["ivp_tag"]})
            return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + \
                b"data: [DONE]\n\n"
        return json.dumps({
            "id": "cmpl-x", "object": "text_completion", "model": request["model"],
            "choices": [{"index": 0, "text": self.junk_text, "token_ids": ids,
                         "finish_reason": finish, "logprobs": None}],
            "ivp_tag": request["ivp_tag"], "seed": request["seed"],
            "extra": "a field the gateway must not pass on",
        }).encode()


@dataclass
class FakePower:
    """The server's power supply. ``crash()`` plays an unexpected power loss."""

    server: FakeServer
    cycles: int = 0
    on_count: int = 0
    _callback: Callable[[str], None] | None = None

    @property
    def is_on(self) -> bool:
        return self.server.powered

    async def power_on(self) -> None:
        if not self.server.powered:
            self.on_count += 1
            self.server.power(True)

    async def power_off(self) -> None:
        if self.server.powered:
            self.cycles += 1
        self.server.power(False)

    def on_power_loss(self, callback: Callable[[str], None]) -> None:
        self._callback = callback

    def crash(self) -> None:
        self.server.power(False)
        if self._callback is not None:
            self._callback("server process exited unexpectedly (status -9)")


@dataclass
class FakeRecomputer:
    """The recomputer's /uplink: checks each envelope's signature, keeps what it stores,
    and answers as the real one does — an Ack whose ``signed`` part is an
    ``UplinkAck`` signed with ``key`` (the gateway's ``--recomputer-key``).

    ``mode``: "ok" (store everything valid), "down" (transport failure), "garbage"
    (answers bytes that are not an Ack), "short" (the signed Ack leaves out the last
    envelope), "refuse" (refuses everything, keeping it as evidence), "retry" (holds
    nothing: every receipt says retry), "forge" (the operator's answer: ``ok: true``
    for everything, nothing signed — what it stores it stores, but the gateway must
    not believe it), "lose_ack" (stores the batch, then the answer is lost: a
    transport failure after the fact). Like the real one it refuses an audit record or
    alarm it already holds (``replays`` counts them), and answers :meth:`cursor` from
    what it stored, signed.
    """

    gateway_key: VerifyKey | None = None
    mode: str = "ok"
    key: SigningKey | None = None
    gateway_id: str = "gw-test"
    boots: list[BootRecord] = field(default_factory=list)
    audits: list[AuditRecord] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    alarms: list[GatewayAlarm] = field(default_factory=list)
    heartbeats: list[Heartbeat] = field(default_factory=list)
    posts: int = 0
    replays: int = 0

    async def cursor(self, gateway_id: str, boot_id: str | None) -> bytes:
        """``GET /uplink/cursor``: what is stored of ``gateway_id`` (and ``boot_id``)."""
        if self.mode == "down":
            raise TransportError("recomputer unreachable: connection refused")
        seqs = [a.seq for a in self.alarms if a.gateway_id == gateway_id]
        out = UplinkCursor(gateway_id=gateway_id, next_alarm_seq=max(seqs, default=0) + 1)
        if boot_id is not None:
            audits = [a.audit_seq for a in self.audits if a.boot_id == boot_id]
            cps = [c for c in self.checkpoints if c.boot_id == boot_id]
            out = UplinkCursor(gateway_id=gateway_id, next_alarm_seq=out.next_alarm_seq,
                               boot_id=boot_id,
                               boot_known=any(b.boot_id == boot_id for b in self.boots),
                               next_audit_seq=max(audits, default=0) + 1,
                               checkpoint=cps[-1] if cps else None)
        if self.mode == "forge" or self.key is None:
            return canonical(out)
        return canonical(sign_message(CURSOR, out, self.key))

    async def post(self, body: bytes) -> bytes:
        self.posts += 1
        if self.mode == "down":
            raise TransportError("recomputer unreachable: connection refused")
        if self.mode == "garbage":
            return b'{"accepted": [1, 2, 3]}'
        envelopes = json.loads(body)["envelopes"]
        results, receipts = [], []
        for raw in envelopes:
            env = Envelope.from_bytes(json.dumps(raw).encode())
            digest = payload_digest(env.payload_bytes())
            if self.mode in ("refuse", "retry"):
                status = "refused" if self.mode == "refuse" else "retry"
                results.append({"ok": False, "error": "refused by test"})
                receipts.append(self._receipt(env, digest, status, "refused by test"))
                continue
            try:
                self._store(env)
            except PeerDataError as exc:
                results.append({"ok": False, "error": str(exc)})
                receipts.append(self._receipt(env, digest, "refused", str(exc)))
                continue
            results.append({"ok": True, "error": ""})
            receipts.append(self._receipt(env, digest, "stored"))
        if self.mode == "lose_ack":
            raise TransportError("recomputer stored the batch, but its answer was lost")
        if self.mode == "short":
            receipts = receipts[:-1]
        if self.mode == "forge" or self.key is None:
            return json.dumps({"results": [{"ok": True, "error": ""}] * len(envelopes)}
                              ).encode()
        ack = UplinkAck(gateway_id=self.gateway_id, results=receipts, time=time.time())
        signed = to_builtins(sign_message(ACK, ack, self.key))
        return json.dumps({"results": results, "signed": signed}).encode()

    @staticmethod
    def _receipt(env: Envelope, digest: str, status: str, error: str = "") -> UplinkReceipt:
        kind, boot_id, n = "other", None, 0
        with contextlib.suppress(IvpError):
            value = json.loads(env.payload_bytes())
            kind = {AUDIT: "audit", BOOT: "boot", CHECKPOINT: "checkpoint", ALARM: "alarm",
                    HEARTBEAT: "heartbeat"}.get(env.payloadType, "other")
            boot_id = value.get("boot_id")
            n = {"audit": value.get("audit_seq", 0), "checkpoint": value.get("pairs_served", 0),
                 "alarm": value.get("seq", 0)}.get(kind, 0)
        return UplinkReceipt(digest=digest, status=status, kind=kind,  # type: ignore[arg-type]
                             boot_id=boot_id, n=n, error=error[:500])

    def _store(self, env: Envelope) -> None:
        types = {AUDIT: (AuditRecord, self.audits), BOOT: (BootRecord, self.boots),
                 CHECKPOINT: (Checkpoint, self.checkpoints),
                 ALARM: (GatewayAlarm, self.alarms), HEARTBEAT: (Heartbeat, self.heartbeats)}
        if env.payloadType not in types:
            raise ValidationError(f"unknown payload type {env.payloadType}")
        kind, store = types[env.payloadType]
        payload = open_signed(env, env.payloadType, self.gateway_key) if self.gateway_key \
            else env.payload_bytes()
        record: Any = decode(payload, kind)  # type: ignore[arg-type]
        if isinstance(record, AuditRecord) and any(
                (a.boot_id, a.audit_seq) == (record.boot_id, record.audit_seq)
                for a in self.audits):
            self.replays += 1
            raise ValidationError(f"audit record {record.audit_seq} replayed")
        if isinstance(record, GatewayAlarm) and any(a.seq == record.seq for a in self.alarms):
            self.replays += 1
            raise ValidationError(f"gateway alarm {record.seq} replayed")
        store.append(record)  # type: ignore[attr-defined]


__all__ = ["FakePower", "FakeRecomputer", "FakeServer"]
