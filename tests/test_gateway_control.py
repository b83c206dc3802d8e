"""The gateway's control plane with in-memory peers: relayed admin requests, Readmit,
uplinked alarms and the uplink cursor. One test per attack: exact error, state unchanged."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from test_gateway_rig import COMPLETION, Rig, flush, make_rig, run, started

from ivp.errors import (
    ChainError,
    ExpiredError,
    QuorumError,
    SignatureError,
    TransportError,
    ValidationError,
)
from ivp.gateway.control import RelayGapError
from ivp.gateway.core import State
from ivp.gateway.errors import ShutdownError
from ivp.protocol.acks import ControlReceipt, Relay, digest_of
from ivp.protocol.encoding import canonical, convert, decode, to_builtins
from ivp.protocol.envelope import (
    ADMIN,
    READMIT,
    RECEIPT,
    RELAY,
    SHUTDOWN,
    Envelope,
    open_signed,
    sign,
)
from ivp.protocol.keys import SigningKey
from ivp.protocol.messages import AdminRequest, Readmit, Shutdown


def request(rig: Rig, instruction: str, args: dict[str, Any], *, ttl: float = 300.0,
            nonce: str | None = None, keys: list[SigningKey] | None = None) -> bytes:
    """An inspectors' admin request (quorum: one US key), as they sign it."""
    req = AdminRequest(instruction=instruction, args=args,  # type: ignore[arg-type]
                       nonce=nonce or secrets.token_hex(16), expires=time.time() + ttl)
    return sign(ADMIN, canonical(req), keys if keys is not None else
                [rig.model.inspector]).to_bytes()


def wrap(rig: Rig, data: bytes, seq: int | None = None,
         key: SigningKey | None = None) -> bytes:
    """``data`` as the recomputer relays it: the next numbered Relay, signed by it."""
    relay = Relay(gateway_id="gw-test",
                  relay_seq=rig.gw._settings.relay_seq + 1 if seq is None else seq,
                  admin_seq=7, instruction="set_epsilon", request=Envelope.from_bytes(data))
    return sign(RELAY, canonical(relay), [key or rig.recomputer_key]).to_bytes()


def relayed(rig: Rig, instruction: str, args: dict[str, Any], **kw: Any) -> bytes:
    """An inspectors' admin request as the recomputer relays it (the next relay)."""
    return wrap(rig, request(rig, instruction, args, **kw))


def receipt_of(rig: Rig, answer: dict[str, Any], data: bytes) -> ControlReceipt:
    """The gateway's signed receipt in ``answer``, checked as the recomputer does."""
    envelope = convert(answer["receipt"], Envelope)
    receipt = decode(open_signed(envelope, RECEIPT, rig.device.public_key), ControlReceipt)
    assert receipt.gateway_id == "gw-test" and receipt.digest == digest_of(data)
    return receipt


def readmit(rig: Rig, shutdown_nonce: str = "0123456789abcdef0123", *,
            key: SigningKey | None = None, gateway_id: str = "gw-test") -> bytes:
    msg = Readmit(gateway_id=gateway_id, shutdown_nonce=shutdown_nonce, reason="inspected",
                  time=time.time(), nonce=secrets.token_hex(16))
    return sign(READMIT, canonical(msg), [key or rig.recomputer_key]).to_bytes()


async def serve_one(rig: Rig) -> None:
    r = await rig.gw.complete("completions", COMPLETION)
    if r.after_release is not None:
        await r.after_release()


# --- relayed admin requests: ε, reboot schedule, whitelist ---------------------------------------
def test_relayed_epsilon_applies_from_the_next_boot_and_survives_restart(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """ε set by the inspectors: the running boot keeps the ε its BOOT declared (the
    recomputer's audit-rate test uses that one); the next BOOT declares the new one; a
    restart with another --epsilon does not undo it."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        await rig.upload()
        data = relayed(rig, "set_epsilon", {"epsilon": 0.25})
        answer = await rig.gw.admin(data)
        assert receipt_of(rig, answer, data).outcome == "applied"
        del answer["receipt"]
        assert answer == {"applied": True, "instruction": "set_epsilon", "epsilon": 0.25,
                          "model_id": None, "effective": "next boot", "relay_seq": 1}
        await serve_one(rig)  # still drawn at ε = 1 (this boot declared 1)
        assert rig.log.totals()[1] == 1
        await rig.upload()
        await flush(rig)
        assert [b.epsilon for b in rig.recomputer.boots] == [1.0, 0.25]
        assert (await rig.gw.status())["epsilon"] == 0.25
        await rig.gw.close()
        again = await started(make_rig(tmp_path, tiny_model_dir, epsilon=0.9))
        await again.upload()
        await flush(again)
        assert again.recomputer.boots[-1].epsilon == 0.25
        await again.gw.close()
    run(body())


def test_relayed_epsilon_per_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        await rig.gw.admin(relayed(rig, "set_epsilon", {"epsilon": 0.5}))
        await rig.gw.admin(relayed(rig, "set_epsilon", {"epsilon": 0.125, "model_id": "tiny"}))
        await rig.upload()
        await flush(rig)
        assert rig.recomputer.boots[-1].epsilon == 0.125
        await rig.gw.close()
    run(body())


def test_relayed_reboot_schedule_applies_at_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A boot already older than the new schedule is rebooted within a second."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        await rig.upload()
        await asyncio.sleep(0.3)
        answer = await rig.gw.admin(relayed(rig, "reboot_schedule", {"interval_s": 0.2}))
        assert answer["effective"] == "now" and rig.gw.config.reboot_interval == 0.2
        for _ in range(150):
            if rig.gw.state is State.UPLOAD:
                break
            await asyncio.sleep(0.02)
        assert rig.gw.state is State.UPLOAD and rig.server.state == "empty"
        await rig.gw.close()
        again = await started(make_rig(tmp_path, tiny_model_dir, reboot_interval=0))
        assert again.gw.config.reboot_interval == 0.2  # persisted over the CLI flag
        await again.gw.close()
    run(body())


def test_relayed_whitelist_installs_and_a_retried_relay_changes_nothing(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        v2 = to_builtins(Envelope.from_bytes(rig.model.signed_whitelist(2)))
        request = relayed(rig, "whitelist_update", {"whitelist": v2})
        answer = await rig.gw.admin(request)
        assert answer["applied"] is True and answer["version"] == 2
        assert rig.gw.whitelist.current is not None and rig.gw.whitelist.current.version == 2
        again = await rig.gw.admin(request)  # the recomputer resending (lost answer)
        assert again["applied"] is False and "handled already" in again["reason"]
        assert receipt_of(rig, again, request).outcome == "duplicate"
        # another request carrying a stale version: answered, nothing changes
        stale = await rig.gw.admin(relayed(rig, "whitelist_update", {"whitelist": v2}))
        assert stale["applied"] is False and stale["version"] == 2
        await rig.gw.close()
    run(body())


@pytest.mark.parametrize("attack", ["no-quorum", "other-type", "expired", "too-long",
                                    "not-relayed", "nonce-reused", "bad-args"])
def test_forged_or_stale_relayed_request_is_refused_and_nothing_changes(
        tmp_path: Path, tiny_model_dir: Path, attack: str) -> None:
    """Attack: the recomputer (or the operator posing as it) changes a gateway's ε or
    schedule without the inspectors, or replays/holds back a request."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        args = {"epsilon": 0.01}
        err: type[Exception]
        if attack == "no-quorum":
            data, err, match = relayed(rig, "set_epsilon", args, keys=[SigningKey.generate()]), \
                QuorumError, "0 valid signature"
        elif attack == "other-type":
            good = Envelope.from_bytes(request(rig, "set_epsilon", args))
            data = wrap(rig, canonical(Envelope(SHUTDOWN, good.payload, good.signatures)))
            err, match = ValidationError, "expected payload type"
        elif attack == "expired":
            data, err, match = relayed(rig, "set_epsilon", args, ttl=-1), ExpiredError, \
                "expired"
        elif attack == "too-long":
            data, err, match = relayed(rig, "set_epsilon", args, ttl=30 * 86400), \
                ExpiredError, "at most"
        elif attack == "not-relayed":
            data, err, match = relayed(rig, "readmit_gateway", {"gateway_id": "gw-test"}), \
                ValidationError, "not one a gateway applies"
        elif attack == "nonce-reused":
            nonce = secrets.token_hex(16)
            await rig.gw.admin(relayed(rig, "set_epsilon", {"epsilon": 0.5}, nonce=nonce))
            data, err, match = relayed(rig, "set_epsilon", args, nonce=nonce), ChainError, \
                "already used"
        else:
            data, err, match = relayed(rig, "set_epsilon", {"epsilon": 7}), ValidationError, \
                "EpsilonArgs"
        before = rig.gw._settings
        answer = await rig.gw.admin(data)  # refused: answered with a signed receipt
        receipt = receipt_of(rig, answer, data)
        assert answer["applied"] is False and receipt.outcome == "refused"
        assert receipt.detail.startswith(err.__name__) and match in receipt.detail
        # nothing changed but the relay's number, used up (the next relay may follow)
        assert msgspec.structs.replace(rig.gw._settings, relay_seq=before.relay_seq) == before
        assert rig.gw._settings.relay_seq == before.relay_seq + 1
        await rig.upload()
        await flush(rig)
        assert rig.recomputer.boots[-1].epsilon == (0.5 if attack == "nonce-reused" else 1.0)
        await rig.gw.close()
    run(body())


def test_relays_apply_in_order_and_an_old_one_after_a_newer_is_refused(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """Attack: the operator holds back an old set_epsilon (ε = 0.01) and delivers it
    after the newer one (ε = 0.2): the gateway once applied it and audited at a tenth of
    the agreed rate. Relays are numbered by the recomputer; an older number is refused
    and changes nothing, a number ahead of the next waits (409)."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        old = relayed(rig, "set_epsilon", {"epsilon": 0.01})  # relay 1, held back
        new = wrap(rig, request(rig, "set_epsilon", {"epsilon": 0.2}), seq=2)
        with pytest.raises(RelayGapError, match="relay 2 before relay 1"):
            await rig.gw.admin(new)  # 2 cannot overtake 1
        assert rig.gw._settings.epsilon is None
        assert (await rig.gw.admin(old))["applied"] is True
        assert (await rig.gw.admin(new))["applied"] is True
        replayed = await rig.gw.admin(old)  # the old one delivered again, after the new
        assert replayed["applied"] is False and receipt_of(rig, replayed, old).outcome == \
            "duplicate"
        assert rig.gw._settings.epsilon == 0.2 and rig.gw._settings.relay_seq == 2
        await rig.gw.close()
    run(body())


@pytest.mark.parametrize("attack", ["bare-request", "operator-key", "other-gateway"])
def test_relays_only_from_the_recomputer_for_this_gateway(
        tmp_path: Path, tiny_model_dir: Path, attack: str) -> None:
    """Attack: the operator delivers the inspectors' requests itself (bare, or in a
    relay of its own making, or meant for another gateway), in an order it chooses."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        bare = request(rig, "set_epsilon", {"epsilon": 0.01})
        if attack == "bare-request":
            data, err, match = bare, ValidationError, "inside a numbered Relay"
        elif attack == "operator-key":
            data, err, match = wrap(rig, bare, key=SigningKey.generate()), SignatureError, \
                "no valid signature"
        else:
            relay = Relay(gateway_id="gw-other", relay_seq=1, admin_seq=1,
                          instruction="set_epsilon", request=Envelope.from_bytes(bare))
            data = sign(RELAY, canonical(relay), [rig.recomputer_key]).to_bytes()
            err, match = SignatureError, "for gateway 'gw-other'"
        before = rig.gw._settings
        with pytest.raises(err, match=match):
            await rig.gw.admin(data)
        assert rig.gw._settings == before
        await rig.gw.close()
    run(body())


# --- re-admission ---------------------------------------------------------------------------------
def test_readmit_lifts_the_shutdown_it_names_then_a_fresh_upload_serves(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        await rig.upload()
        shutdown = rig.shutdown_envelope()
        nonce = decode(Envelope.from_bytes(shutdown).payload_bytes(), Shutdown).nonce
        await rig.gw.control(shutdown)
        assert rig.gw.state is State.SHUTDOWN and not rig.server.powered
        message = readmit(rig, nonce)
        answer = await rig.gw.control(message)
        assert receipt_of(rig, answer, message).outcome == "applied"
        del answer["receipt"]
        assert answer == {"state": "upload", "readmitted": True}
        assert rig.server.powered and rig.server.state == "empty"
        assert (await rig.gw.control(message))["readmitted"] is False  # resent: no change
        result = await rig.upload()  # a fresh upload: a new BOOT, never the old boot
        assert result["state"] == "serving"
        assert (await rig.gw.complete("completions", COMPLETION)).status == 200
        await rig.gw.close()
        again = await started(make_rig(tmp_path, tiny_model_dir))  # lifted for good
        assert again.gw.state is State.UPLOAD
        await again.gw.close()
    run(body())


@pytest.mark.parametrize("forgery", ["other-key", "other-gateway", "other-shutdown",
                                     "old-readmit", "wrong-type"])
def test_forged_readmit_is_refused_and_the_gateway_stays_shut(
        tmp_path: Path, tiny_model_dir: Path, forgery: str) -> None:
    """Attack: the operator lifts a shutdown itself — with its own key, a readmit for
    another gateway, or an old readmit captured after an earlier re-admission."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        first = rig.shutdown_envelope()
        nonce = decode(Envelope.from_bytes(first).payload_bytes(), Shutdown).nonce
        err: type[Exception] = SignatureError
        if forgery == "other-key":
            data, match = readmit(rig, nonce, key=SigningKey.generate()), "no valid signature"
        elif forgery == "other-gateway":
            data, match = readmit(rig, nonce, gateway_id="gw-other"), "for gateway 'gw-other'"
        elif forgery == "other-shutdown":
            data, err, match = readmit(rig, "f" * 32), ChainError, "shutdown in force"
        elif forgery == "old-readmit":
            await rig.gw.control(first)
            data = readmit(rig, nonce)
            await rig.gw.control(data)  # the genuine re-admission ...
            msg = Shutdown(gateway_id="gw-test", reason="failed again", time=time.time(),
                           nonce="feedfacefeedface0001")
            first = sign(SHUTDOWN, canonical(msg), [rig.recomputer_key]).to_bytes()
            err, match = ChainError, "shutdown in force"  # ... replayed after a new one
        else:
            good = Envelope.from_bytes(readmit(rig, nonce))
            data = canonical(Envelope(ADMIN, good.payload, good.signatures))
            err, match = ValidationError, "expected payload type"
        await rig.gw.control(first)
        with pytest.raises(err, match=match):
            await rig.gw.control(data)
        assert rig.gw.state is State.SHUTDOWN and not rig.server.powered
        with pytest.raises(ShutdownError):
            await rig.upload()
        await rig.gw.close()
    run(body())


def test_replayed_shutdown_after_readmission_is_refused(tmp_path: Path,
                                                        tiny_model_dir: Path) -> None:
    """Attack: the operator replays the lifted Shutdown to shut the gateway again,
    behind the recomputer's back (which then sees it serving)."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        shutdown = rig.shutdown_envelope()
        nonce = decode(Envelope.from_bytes(shutdown).payload_bytes(), Shutdown).nonce
        await rig.gw.control(shutdown)
        await rig.gw.control(readmit(rig, nonce))
        await rig.upload()
        with pytest.raises(ChainError, match="already lifted"):
            await rig.gw.control(shutdown)
        assert rig.gw.state is State.SERVING
        await rig.gw.close()
    run(body())


def test_readmit_of_a_gateway_never_shut_down_still_ends_its_boot(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """The Shutdown never arrived: the Readmit still means 'a fresh upload first'."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        await rig.upload()
        assert (await rig.gw.control(readmit(rig)))["state"] == "upload"
        assert rig.gw.state is State.UPLOAD and rig.server.state == "empty"
        await rig.gw.close()
    run(body())


# --- alarms go to the recomputer ------------------------------------------------------------------
def test_local_alarms_are_signed_numbered_and_uplinked(tmp_path: Path,
                                                       tiny_model_dir: Path) -> None:
    """Upload exfiltration, unpaired output, power kill: each reaches the recomputer as a
    signed GatewayAlarm numbered without gaps (also across a restart)."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        with pytest.raises(Exception, match="POWER_KILL"):
            await rig.upload(rig.model.blob[:-1])
        await rig.upload()
        rig.server.answer = lambda req: (200, b'{"choices": [], "exfil": "SECRET"}')
        with pytest.raises(Exception, match="outside the protocol"):
            await rig.gw.complete("completions", COMPLETION)
        await flush(rig)  # the fake recomputer checks every signature
        kinds = [(a.seq, a.kind) for a in rig.recomputer.alarms]
        assert kinds == [(1, "power_kill"), (2, "unpaired_output")]
        assert all("SECRET" not in a.message for a in rig.recomputer.alarms)
        boot_id = rig.recomputer.boots[-1].boot_id
        assert rig.recomputer.alarms[1].boot_id == boot_id
        assert rig.recomputer.alarms[0].boot_id is None  # before any boot
        await rig.gw.close()
        again = await started(make_rig(tmp_path, tiny_model_dir))
        await again.gw.alarm("server_state", "test")
        await flush(again)
        assert [a.seq for a in again.recomputer.alarms] == [3]
        await again.gw.close()
    run(body())


def test_alarms_about_the_uplink_stay_local(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A refused alarm must not raise another one to send (no feedback loop)."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        rig.recomputer.mode = "refuse"
        await rig.gw.alarm("server_state", "test")
        for _ in range(3):
            await flush(rig)
        assert rig.log.spool_depth() == 0
        kinds = [a["kind"] for a in rig.log.alarms()]
        assert kinds == ["uplink_refused", "server_state"]
        await rig.gw.close()
    run(body())


# --- lost acknowledgements: the cursor -----------------------------------------------------------
def test_lost_ack_is_reconciled_by_the_cursor_not_resent_as_a_replay(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """The recomputer stored a batch but its Ack was lost: the gateway asks the cursor
    and drops what was stored, so nothing is resent (no replay alarm) and nothing lost."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        assert rig.gw.uplink is not None
        await rig.upload()
        for _ in range(3):
            await serve_one(rig)
        await rig.gw.checkpoint()
        rig.recomputer.mode = "lose_ack"
        with pytest.raises(Exception, match="answer was lost"):
            await rig.gw.uplink.flush_once()
        assert rig.log.spool_depth() == 5  # BOOT, 3 audits, checkpoint: fate unknown
        rig.recomputer.mode = "ok"
        await serve_one(rig)
        await flush(rig)
        assert rig.log.spool_depth() == 0 and rig.recomputer.replays == 0
        assert [a.audit_seq for a in rig.recomputer.audits] == [1, 2, 3, 4]
        assert len(rig.recomputer.boots) == 1 and len(rig.recomputer.checkpoints) == 1
        assert rig.gw.uplink.stats.reconciled == 5
        await rig.gw.close()
    run(body())


def test_lost_ack_before_a_crash_is_reconciled_at_start(tmp_path: Path,
                                                        tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        assert rig.gw.uplink is not None
        await rig.upload()
        await serve_one(rig)
        rig.recomputer.mode = "lose_ack"
        with pytest.raises(Exception, match="answer was lost"):
            await rig.gw.uplink.flush_once()
        stored = rig.recomputer
        await rig.gw.close()  # the gateway dies without the answer
        again = make_rig(tmp_path, tiny_model_dir, epsilon=1.0)
        again.recomputer = stored
        assert again.gw.uplink is not None
        again.gw.uplink.transport = stored
        stored.mode = "ok"
        await started(again)
        await flush(again)
        assert stored.replays == 0 and again.log.spool_depth() == 0
        assert [a.audit_seq for a in stored.audits] == [1]
        await again.gw.close()
    run(body())


def test_a_cursor_not_signed_by_the_recomputer_drops_nothing(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """Attack: the operator answers the cursor in the recomputer's name, claiming the
    spooled audit record was stored (a forged cursor once made the gateway drop its
    spool). Unsigned, or signed by another key, it is not believed: the record stays
    and reaches the recomputer."""
    from ivp.protocol.envelope import CURSOR, sign_message
    from ivp.protocol.messages import UplinkCursor

    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        assert rig.gw.uplink is not None
        await rig.upload()
        await flush(rig)
        real = rig.recomputer.cursor
        forgeries = iter([lambda c: canonical(c),
                          lambda c: canonical(sign_message(CURSOR, c, SigningKey.generate()))])

        async def lying(gateway_id: str, boot_id: str | None) -> bytes:
            raw = await real(gateway_id, boot_id)
            honest = decode(Envelope.from_bytes(raw).payload_bytes(), UplinkCursor)
            return next(forgeries)(msgspec.structs.replace(honest, next_audit_seq=9))

        rig.recomputer.cursor = lying  # type: ignore[method-assign]
        for _ in range(2):
            rig.recomputer.mode = "down"
            await serve_one(rig)
            with pytest.raises(TransportError):
                await rig.gw.uplink.flush_once()
            rig.recomputer.mode = "ok"
            assert rig.gw.uplink._stale
            await flush(rig)  # reconciles first: the lie is not believed
        assert "cursor not believed" in rig.gw.uplink.stats.last_error
        assert [a.audit_seq for a in rig.recomputer.audits] == [1, 2]  # nothing dropped
        await rig.gw.close()
    run(body())


def test_server_bytes_never_reach_an_upstream_error_text() -> None:
    """Attack: the server answers a bad status line that carries data; the error text
    (which reaches alarms, the operator's upload answer, a client's 502) names only
    what failed."""
    from ivp.errors import TransportError
    from ivp.gateway.upstream import HttpUpstream

    async def body() -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1 << 16)
            writer.write(b"IVP-LEAK-0123 not http\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upstream = HttpUpstream(f"http://127.0.0.1:{port}")
        try:
            for call in (lambda: upstream.post("/v1/completions", b"{}", timeout=5),
                         lambda: upstream.get("/health", timeout=5)):
                with pytest.raises(TransportError) as err:
                    await call()
                assert "LEAK" not in str(err.value) and "server unreachable" in str(err.value)
        finally:
            await upstream.close()
            server.close()
            await server.wait_closed()
    run(body())
