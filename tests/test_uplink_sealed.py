"""Audit records sealed to the recomputer end to end: the gateway seals each uplink body
to the recomputer's X25519 KEM key (HPKE, ``ivp.protocol.hpke.seal_message``); the
operator's network sees no prompt or output; the recomputer opens the body before it
checks the signatures inside; a body that does not open is refused whole (HTTP 400)
and changes nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from test_recomputer_support import Inspectors, ScriptedGateway, body, enrol, run

from ivp.device import SoftDevice
from ivp.errors import ValidationError
from ivp.gateway.uplink import HttpUplink
from ivp.protocol.hpke import (
    SEALED_UPLINK,
    UPLINK_INFO,
    device_kem_key,
    kem_public_hex,
    open_message,
    seal_message,
)
from ivp.recomputer.app import make_app
from ivp.recomputer.service import Recomputer

pytest_plugins = ("test_recomputer_support",)
PROMPT = "the secret prompt of a client 7c1e"


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> SoftDevice:
    return SoftDevice(tmp_path_factory.mktemp("dev"))


def _public(device: SoftDevice) -> bytes:
    return bytes.fromhex(kem_public_hex(device))


# --- the message seal --------------------------------------------------------------------------
def test_round_trip_and_nothing_readable(device: SoftDevice) -> None:
    sealed = seal_message(_public(device), UPLINK_INFO, PROMPT.encode())
    assert PROMPT.encode() not in sealed
    assert open_message(device_kem_key(device), UPLINK_INFO, sealed) == PROMPT.encode()
    again = seal_message(_public(device), UPLINK_INFO, PROMPT.encode())
    assert again != sealed  # a fresh ephemeral key each time: equal bodies do not show


def test_other_key_or_use_does_not_open(device: SoftDevice, tmp_path: Path) -> None:
    sealed = seal_message(_public(device), UPLINK_INFO, b"x")
    other = SoftDevice(tmp_path / "other")
    with pytest.raises(ValidationError, match="does not open"):
        open_message(device_kem_key(other), UPLINK_INFO, sealed)
    with pytest.raises(ValidationError, match="does not open"):
        open_message(device_kem_key(device), b"ivp/upload/v1/x", sealed)
    with pytest.raises(ValidationError, match="not an X25519 public key"):
        seal_message(b"short", UPLINK_INFO, b"x")


@settings(max_examples=80, deadline=None)
@given(plaintext=st.binary(max_size=300), where=st.integers(min_value=0), flip=st.integers(1, 255),
       cut=st.integers(min_value=0))
def test_any_altered_or_cut_byte_is_refused(device: SoftDevice, plaintext: bytes, where: int,
                                            flip: int, cut: int) -> None:
    sealed = seal_message(_public(device), UPLINK_INFO, plaintext)
    altered = bytearray(sealed)
    altered[where % len(sealed)] ^= flip
    with pytest.raises(ValidationError):
        open_message(device_kem_key(device), UPLINK_INFO, bytes(altered))
    with pytest.raises(ValidationError):
        open_message(device_kem_key(device), UPLINK_INFO, sealed[:cut % len(sealed)])


# --- end to end: gateway transport → the operator's wire → the recomputer ----------------------
def test_gateway_seals_and_the_recomputer_opens(config: Any, inspectors: Inspectors,
                                                gateway: ScriptedGateway) -> None:
    """What crosses the wire carries no prompt or output; the records inside are
    stored and verified as if they had come in the clear."""
    async def main() -> None:
        rec = Recomputer(config)
        await enrol(rec, inspectors, gateway)
        wire: list[tuple[str, bytes]] = []  # what the operator's network carries

        async def tapped(request: web.Request) -> web.Response:
            raw = await request.read()
            wire.append((request.content_type, raw))
            ack = await rec.uplink(raw, sealed=request.content_type == SEALED_UPLINK)
            return web.Response(body=ack_bytes(ack), content_type="application/json")

        app = web.Application()
        app.router.add_post("/uplink", tapped)
        server = TestServer(app)
        await server.start_server()
        transport = HttpUplink(str(server.make_url("/")),
                               seal_to=bytes.fromhex(rec.identity()["kem_public_key"]))
        audit = gateway.audit(max_tokens=5, prompt=PROMPT)
        answer = json.loads(await transport.post(body(gateway.boot(), audit)))
        assert [r["ok"] for r in answer["results"]] == [True, True]
        await transport.close()
        await server.close()
        (kind, raw), = wire
        assert kind == SEALED_UPLINK
        assert PROMPT.encode() not in raw and b"envelopes" not in raw
        await rec.start()
        await rec.drain()
        assert [v["passed"] for v in await rec.verdicts()] == [True]
        await rec.close()
    run(main())


def ack_bytes(ack: Any) -> bytes:
    from ivp.protocol.encoding import canonical

    return canonical(ack)


def test_sealed_body_that_does_not_open_is_refused_whole(config: Any, inspectors: Inspectors,
                                                         gateway: ScriptedGateway,
                                                         tmp_path: Path) -> None:
    """An altered sealed body, or one sealed to another key, is a 400 ValidationError;
    nothing is stored; the gateway's next good body is taken."""
    async def main() -> None:
        rec = Recomputer(config)
        client = TestClient(TestServer(make_app(rec)))
        await client.start_server()
        await enrol(rec, inspectors, gateway)
        mine = bytes.fromhex(rec.identity()["kem_public_key"])
        good = seal_message(mine, UPLINK_INFO, body(gateway.boot()))
        altered = good[:-1] + bytes([good[-1] ^ 1])
        stranger = seal_message(_public(SoftDevice(tmp_path / "x")), UPLINK_INFO,
                                body(gateway.boot()))
        headers = {"Content-Type": SEALED_UPLINK}
        for bad in (altered, stranger, b"not sealed at all"):
            r = await client.post("/uplink", data=bad, headers=headers)
            assert r.status == 400
            error = (await r.json())["error"]
            assert error["type"] == "ValidationError", error
            assert "sealed" in error["message"]
        assert (await rec.status())["gateways"]["gw-a"]["state"] != "serving"
        r = await client.post("/uplink", data=good, headers=headers)
        assert (await r.json())["results"] == [{"ok": True, "error": ""}]
        await client.close()
    run(main())


def test_recomputer_identity_names_its_kem_key(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ivp.cli import app

    out = CliRunner().invoke(app, ["recomputer", "--state", str(tmp_path / "rc"),
                                   "--print-identity"])
    assert out.exit_code == 0, out.output
    ident = json.loads(out.output.strip().splitlines()[-1])
    assert ident["kem_public_key"] == kem_public_hex(SoftDevice(tmp_path / "rc" / "device"))



@pytest.mark.parametrize("required", [True, False])
def test_recomputer_that_requires_sealed_uplink_refuses_clear_bodies(
        config: Any, inspectors: Inspectors, gateway: ScriptedGateway, required: bool) -> None:
    """--require-sealed-uplink: a valid, signed but clear body is a 400 and changes
    nothing; the same body sealed is taken. Without the flag the clear body is taken
    (so the refusal comes from the flag alone)."""
    import dataclasses

    async def main() -> None:
        rec = Recomputer(dataclasses.replace(config, require_sealed_uplink=required))
        client = TestClient(TestServer(make_app(rec)))
        await client.start_server()
        await enrol(rec, inspectors, gateway)
        clear = body(gateway.boot())
        r = await client.post("/uplink", data=clear,
                              headers={"Content-Type": "application/json"})
        answer = await r.json()
        if not required:
            assert r.status == 200 and answer["results"] == [{"ok": True, "error": ""}]
        else:
            assert r.status == 400, answer
            assert answer["error"]["type"] == "ValidationError"
            assert "--require-sealed-uplink" in answer["error"]["message"]
            assert (await rec.status())["gateways"]["gw-a"]["state"] != "serving"
            mine = bytes.fromhex(rec.identity()["kem_public_key"])
            r = await client.post("/uplink", data=seal_message(mine, UPLINK_INFO, clear),
                                  headers={"Content-Type": SEALED_UPLINK})
            assert (await r.json())["results"] == [{"ok": True, "error": ""}]
        await client.close()
        await rec.close()
    run(main())
