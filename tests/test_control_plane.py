"""A real gateway core and a real recomputer together: lost acknowledgements, uplinked
gateway alarms, chain positions, relayed inspectors' instructions and re-admission.

The gateway drives an in-memory server (``ivp.gateway.testing``); the recomputer is the
real service. The first tests connect them in-process; the last two over HTTP on
loopback (aiohttp test servers), as deployed."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from test_gateway_rig import COMPLETION, MODEL_ID, Rig, flush, make_rig, run, started

from ivp.errors import TransportError
from ivp.gateway.app import build_app
from ivp.gateway.core import State
from ivp.gateway.uplink import HttpUplink
from ivp.protocol.encoding import canonical, to_builtins
from ivp.protocol.envelope import ADMIN, Envelope, sign
from ivp.protocol.keys import SigningKey
from ivp.protocol.messages import AdminRequest
from ivp.recomputer.app import make_app
from ivp.recomputer.service import AdminRefusedError, Config, Recomputer


def admin_request(rig: Rig, instruction: str, args: dict[str, Any],
                  key: SigningKey | None = None) -> bytes:
    req = AdminRequest(instruction=instruction, args=args,  # type: ignore[arg-type]
                       nonce=secrets.token_hex(16), expires=time.time() + 300)
    return sign(ADMIN, canonical(req), [key or rig.model.inspector]).to_bytes()


def recomputer(rig: Rig, tmp_path: Path, models: dict[str, Path] | None = None) -> Recomputer:
    return Recomputer(Config(state_dir=tmp_path / "rc", policy=rig.model.policy,
                             whitelist=rig.model.whitelist_bytes, models=models or {},
                             health_interval=3600.0, tick_interval=3600.0))


async def enrol(rec: Recomputer, rig: Rig, url: str = "") -> None:
    await rec.handle_admin(admin_request(rig, "enrol_device", {
        "device_id": "gw-test", "public_key": rig.device.public_key.hex, "kind": "gateway",
        "url": url}))


class InProcess:
    """The gateway's uplink straight into ``Recomputer.uplink`` / ``.cursor``.

    ``lose``: the recomputer stores the next batch, then its answer is lost.
    """

    def __init__(self, rec: Recomputer, with_cursor: bool = True) -> None:
        self.rec, self.lose = rec, False
        if not with_cursor:
            self.cursor = None  # type: ignore[assignment]

    async def post(self, body: bytes) -> bytes:
        ack = await self.rec.uplink(body)
        if self.lose:
            self.lose = False
            raise TransportError("the recomputer's answer was lost")
        return canonical(ack)

    async def cursor(self, gateway_id: str, boot_id: str | None) -> bytes:
        return canonical(await self.rec.signed_cursor(gateway_id, boot_id))


async def wired(tmp_path: Path, tiny_model_dir: Path, *, cursor: bool = True,
                **config: Any) -> tuple[Rig, Recomputer, InProcess]:
    rig = make_rig(tmp_path / "gw", tiny_model_dir, epsilon=1.0, **config)
    rec = recomputer(rig, tmp_path)
    trust(rig, rec)
    await enrol(rec, rig)
    link = InProcess(rec, with_cursor=cursor)
    assert rig.gw.uplink is not None
    rig.gw.uplink.transport = link
    if not cursor:
        rig.gw.uplink._reconcile = None
    return await started(rig), rec, link


def trust(rig: Rig, rec: Recomputer) -> None:
    """Give the gateway the real recomputer's key (as ``--recomputer-key`` does)."""
    key = rec.device.public_key
    rig.gw.recomputer_key = key
    rig.gw._spool.recomputer_key = key


def stored(rec: Recomputer, sql: str) -> list[bytes]:
    """First column of ``sql`` over the recomputer's store (the bytes it holds)."""
    return [bytes(r[0]) for r in rec.store._db.execute(sql)]


async def kinds(rec: Recomputer) -> list[str]:
    return [a["kind"] for a in await rec.alarms()]


async def serve(rig: Rig, n: int, jitter: float = 0.0) -> None:
    rng = random.Random(5)

    async def one() -> None:
        r = await rig.gw.complete("completions", COMPLETION)
        await asyncio.sleep(rng.uniform(0, jitter))
        if r.after_release is not None:
            await r.after_release()

    await asyncio.gather(*(one() for _ in range(n)))


# --- 1. lost acknowledgements ---------------------------------------------------------------------
def test_lost_ack_is_not_alarmed_as_a_replay_and_replays_still_are(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig, rec, link = await wired(tmp_path, tiny_model_dir)
        assert rig.gw.uplink is not None
        await rig.upload()
        await serve(rig, 3)
        link.lose = True
        with pytest.raises(TransportError):
            await rig.gw.uplink.flush_once()
        await serve(rig, 1)
        await flush(rig)
        assert rig.log.spool_depth() == 0
        assert await kinds(rec) == []  # no replay, no gap, nothing refused
        assert (await rec.status())["gateways"]["gw-test"]["audits_received"] == 4
        assert [a["kind"] for a in rig.log.alarms()] == []
        # the replayed-audit attack is still caught: a stored record sent again
        first = stored(rec, "SELECT envelope FROM audits ORDER BY id LIMIT 1")[0]
        ack = await rec.uplink(b'{"envelopes":[' + first + b"]}")
        assert not ack.results[0].ok and ack.results[0].error.startswith("ChainError: ")
        assert "replayed" in ack.results[0].error
        assert await kinds(rec) == ["replay"]
        await rig.gw.close()
        await rec.close()
    run(body())


def test_without_the_cursor_a_lost_ack_would_be_refused_as_a_replay(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """The control for the test above: the cursor step is what prevents the alarm."""
    async def body() -> None:
        rig, rec, link = await wired(tmp_path, tiny_model_dir, cursor=False)
        assert rig.gw.uplink is not None
        await rig.upload()
        await serve(rig, 1)
        link.lose = True
        with pytest.raises(TransportError):
            await rig.gw.uplink.flush_once()
        await flush(rig)
        assert "replay" in await kinds(rec)
        await rig.gw.close()
        await rec.close()
    run(body())


# --- 4. gateway alarms, 5. chain positions --------------------------------------------------------
def test_gateway_alarms_reach_the_recomputer_and_overtaking_pairs_pass_the_chain_rules(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig, rec, _ = await wired(tmp_path, tiny_model_dir)
        with pytest.raises(Exception, match="POWER_KILL"):
            await rig.upload(rig.model.blob[:-1])  # a short stream: power kill
        await rig.upload()
        original = rig.server.post
        rng = random.Random(3)

        async def slow(path, body, **kw):  # type: ignore[no-untyped-def]
            if path == "/v1/completions":
                await asyncio.sleep(rng.uniform(0, 0.03))
            return await original(path, body, **kw)

        rig.server.post = slow  # type: ignore[method-assign]
        for _ in range(3):  # answers overtake each other: chain order != tag order
            await serve(rig, 6, jitter=0.01)
            await rig.gw.checkpoint()
            await flush(rig)
        await rig.upload()  # closes the boot with a final checkpoint
        await flush(rig)
        assert await kinds(rec) == ["gateway:power_kill"]
        view = (await rec.status())["gateways"]["gw-test"]
        assert view["alarms_received"] == 1
        records = [json.loads(Envelope.from_bytes(e).payload_bytes())
                   for e in stored(rec, "SELECT envelope FROM audits ORDER BY id")]
        assert len(records) == 18
        positions = [r["chain_pos"] for r in records]
        assert sorted(positions) == list(range(1, 19))
        assert positions != sorted(positions)  # they did overtake
        await rig.gw.close()
        await rec.close()
    run(body())


# --- 2. re-admission and 3. relayed instructions, over HTTP ---------------------------------------
class Deployed:
    """A recomputer and a gateway, each behind its own aiohttp server on loopback."""

    def __init__(self, rig: Rig, rec: Recomputer) -> None:
        self.rig, self.rec = rig, rec
        self.rc = TestClient(TestServer(make_app(rec)))
        self.gw = TestClient(TestServer(build_app(rig.gw)))

    async def __aenter__(self) -> Deployed:
        await self.rc.start_server()
        rc_url = str(self.rc.make_url("")).rstrip("/")
        assert self.rig.gw.uplink is not None
        self.rig.gw.uplink.transport = HttpUplink(rc_url)
        trust(self.rig, self.rec)
        await self.gw.start_server()  # starts the gateway (uplink in the background)
        self.gw_url = str(self.gw.make_url("")).rstrip("/")
        self.rig.gw.config.url = self.gw_url
        await enrol(self.rec, self.rig, self.gw_url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.gw.close()
        await self.rc.close()

    async def admin(self, instruction: str, args: dict[str, Any],
                    key: SigningKey | None = None) -> tuple[int, dict[str, Any]]:
        r = await self.rc.post("/admin", data=admin_request(self.rig, instruction, args, key))
        return r.status, await r.json()


async def until(check: Callable[[], Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_full_cycle_fail_shutdown_readmit_upload_serving_routed(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """FAIL → signed SHUTDOWN → readmit without quorum refused → quorum readmit →
    signed READMIT → fresh upload → serving → routed by the recomputer."""
    async def body() -> None:
        rig = make_rig(tmp_path / "gw", tiny_model_dir, epsilon=1.0)
        rec = recomputer(rig, tmp_path, models={MODEL_ID: tiny_model_dir})
        async with Deployed(rig, rec) as dc:
            first = await rig.upload()
            await until(lambda: rec.ingest.serving(MODEL_ID))
            r = await dc.rc.post("/v1/completions", data=COMPLETION)
            assert r.status == 200  # the fake server is not the model: its audit FAILs
            await until(lambda: rig.gw.state is State.SHUTDOWN)
            assert rec.ingest.gateways["gw-test"].state == "shutdown"
            r = await dc.rc.post("/v1/completions", data=COMPLETION)
            assert r.status == 503

            status, answer = await dc.admin("readmit_gateway", {"gateway_id": "gw-test"},
                                            key=SigningKey.generate())
            assert status == 403 and answer["accepted"] is False
            assert answer["error"]["type"] == "QuorumError"
            await asyncio.sleep(0.2)
            assert rig.gw.state is State.SHUTDOWN
            assert rec.ingest.gateways["gw-test"].state == "shutdown"

            status, answer = await dc.admin("readmit_gateway", {"gateway_id": "gw-test"})
            assert status == 200 and answer["result"]["state"] == "readmitted"
            await until(lambda: rig.gw.state is State.UPLOAD)
            assert rig.server.powered and rig.server.state == "empty"
            r = await dc.rc.post("/v1/completions", data=COMPLETION)
            assert r.status == 503  # not routed on the boot that was caught

            second = await rig.upload()
            assert second["boot_id"] != first["boot_id"]
            await until(lambda: rec.ingest.gateways["gw-test"].state == "serving")
            r = await dc.rc.post("/v1/completions", data=COMPLETION)
            assert r.status == 200
            assert (await r.json())["ivp"]["tag"]["boot_id"] == second["boot_id"]
            kinds_ = [a["kind"] for a in await rec.alarms()]
            assert "verify_fail" in kinds_ and "gateway:shutdown" in kinds_
            assert "gateway:readmitted" in kinds_
    run(body())


def test_inspectors_instructions_are_relayed_to_the_gateways(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """set_epsilon, reboot_schedule and whitelist_update reach the gateway as the
    inspectors signed them; its next BOOT declares the new ε, so the recomputer raises
    no epsilon_mismatch."""
    async def body() -> None:
        rig = make_rig(tmp_path / "gw", tiny_model_dir, epsilon=1.0)
        rec = recomputer(rig, tmp_path)
        async with Deployed(rig, rec) as dc:
            status, answer = await dc.admin("set_epsilon", {"epsilon": 0.5})
            assert status == 200 and answer["result"]["relayed_to"] == ["gw-test"]
            status, _ = await dc.admin("reboot_schedule", {"interval_s": 3600})
            assert status == 200
            v2 = to_builtins(Envelope.from_bytes(rig.model.signed_whitelist(2)))
            status, _ = await dc.admin("whitelist_update", {"whitelist": v2})
            assert status == 200
            await until(lambda: rig.gw.config.reboot_interval == 3600)
            await until(lambda: rig.gw.whitelist.current.version == 2)  # type: ignore[union-attr]
            assert rig.gw._settings.epsilon == 0.5
            await rig.upload()
            await until(lambda: rec.ingest.gateways["gw-test"].state == "serving")
            boot = rec.ingest.boots[("gw-test", rig.gw._boot.boot_id)]  # type: ignore[union-attr]
            assert boot.record.epsilon == 0.5
            assert [a["kind"] for a in await rec.alarms()] == []
            relays = (await rec.status())["gateways"]["gw-test"]["relays"]
            assert relays == {"delivered": 3}
            # the operator delivering the inspectors' request at the gateway itself (not
            # numbered and signed by the recomputer) changes nothing
            request = stored(rec, "SELECT envelope FROM relays ORDER BY id LIMIT 1")[0]
            again = await dc.gw.post("/admin", data=request)
            assert again.status == 400
            assert (await again.json())["error"]["type"] == "ValidationError"
            assert rig.gw._settings.relay_seq == 3
    run(body())


def test_readmit_needs_a_shut_down_gateway(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig, rec, _ = await wired(tmp_path, tiny_model_dir)
        with pytest.raises(AdminRefusedError, match="not shut down"):
            await rec.handle_admin(admin_request(rig, "readmit_gateway",
                                                 {"gateway_id": "gw-test"}))
        assert rec.ingest.gateways["gw-test"].state == "enrolled"
        await rig.gw.close()
        await rec.close()
    run(body())

