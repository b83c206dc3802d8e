"""The weight upload encrypted to the gateway's device key (HPKE), decrypted and hashed
inside the gateway: the operator's wire carries no weight byte in the clear, and a
stream sealed to another device, altered or cut never boots the server."""

from __future__ import annotations

import json
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer
from test_gateway_rig import COMPLETION, MODEL_ID, make_rig, run

from ivp.device import SoftDevice
from ivp.gateway.app import build_app
from ivp.gateway.upload import HPKE_UPLOAD, upload_model
from ivp.protocol.hpke import kem_public_hex, seal_stream, upload_info


def test_encrypted_upload_boots_and_serves(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = make_rig(tmp_path, tiny_model_dir, with_uplink=False)
        key = bytes.fromhex(kem_public_hex(rig.device))
        async with TestClient(TestServer(build_app(rig.gw))) as c:
            answer = await upload_model(str(c.make_url("")), tiny_model_dir, MODEL_ID,
                                        encrypt_to=key)
            assert answer["http_status"] == 200 and answer["state"] == "serving", answer
            assert bytes(rig.server.received) == rig.model.blob  # plaintext past the gateway
            r = await c.post("/v1/completions", data=COMPLETION)
            assert r.status == 200
        await rig.gw.close()
    run(body())


async def _alarms(c: TestClient) -> str:
    return json.dumps(json.loads(await (await c.get("/alarms")).read()))


def test_stream_for_another_device_or_model_never_boots(tmp_path: Path,
                                                        tiny_model_dir: Path) -> None:
    """Attack: replay an upload sealed to another gateway (or for another model) —
    it does not open here, the server is power-killed, the gateway stays in UPLOAD."""
    async def body() -> None:
        rig = make_rig(tmp_path, tiny_model_dir, with_uplink=False)
        stranger = bytes.fromhex(kem_public_hex(SoftDevice(tmp_path / "stranger")))
        mine = bytes.fromhex(kem_public_hex(rig.device))
        async with TestClient(TestServer(build_app(rig.gw))) as c:
            for key, info in ((stranger, upload_info(MODEL_ID)), (mine, upload_info("x"))):
                data = b"".join(seal_stream([rig.model.blob], key, info))
                r = await c.post(f"/upload?model_id={MODEL_ID}", data=data,
                                 headers={"Content-Type": HPKE_UPLOAD})
                answer = json.loads(await r.read())
                assert r.status == 400 and answer["state"] == "power_kill", answer
                assert rig.gw.state.value == "upload"
            assert rig.model.blob[:4096] not in bytes(rig.server.received)
            assert "upload_broken" in await _alarms(c) and "does not open" in await _alarms(c)
        await rig.gw.close()
    run(body())


def test_cut_or_altered_stream_power_kills(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = make_rig(tmp_path, tiny_model_dir, with_uplink=False)
        mine = bytes.fromhex(kem_public_hex(rig.device))
        sealed = b"".join(seal_stream([rig.model.blob], mine, upload_info(MODEL_ID)))
        altered = bytearray(sealed)
        altered[len(altered) // 2] ^= 1
        async with TestClient(TestServer(build_app(rig.gw))) as c:
            for data, text in ((sealed[:-100], "cut short"), (bytes(altered), "does not open"),
                               (b"plain bytes, not sealed at all" * 4, "not an ivp HPKE")):
                r = await c.post(f"/upload?model_id={MODEL_ID}", data=data,
                                 headers={"Content-Type": HPKE_UPLOAD})
                answer = json.loads(await r.read())
                assert r.status == 400 and answer["state"] == "power_kill", answer
                assert text in await _alarms(c), text
                assert rig.gw.state.value == "upload"
            r = await c.post(f"/upload?model_id={MODEL_ID}", data=sealed,
                             headers={"Content-Type": HPKE_UPLOAD})
            assert json.loads(await r.read())["state"] == "serving"  # and then it boots
        await rig.gw.close()
    run(body())
