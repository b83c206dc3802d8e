"""The recomputer service over HTTP: uplink → durable queue → verdict → alarm + SHUTDOWN,
INPUT routing, restart, tamper = brick. Fake gateways are small in-process aiohttp apps."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace as dc_replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from msgspec.structs import replace
from test_recomputer_support import MODEL_ID, Inspectors, ScriptedGateway, body, enrol, results, run

from ivp.errors import BrickedError, TransportError, ValidationError
from ivp.protocol import envelope as env
from ivp.protocol.acks import ControlReceipt, digest_of
from ivp.protocol.encoding import to_builtins
from ivp.protocol.keys import SigningKey, VerifyKey
from ivp.protocol.messages import Shutdown
from ivp.recomputer.app import make_app
from ivp.recomputer.service import Config, Recomputer

pytest_plugins = ("test_recomputer_support",)


class FakeGateway:
    """Answers INPUT, records /control bodies, reports a state on /status."""

    def __init__(self, gateway_id: str) -> None:
        self.gateway_id = gateway_id
        self.state, self.boot_id = "serving", None
        self.controls: list[bytes] = []
        self.served = 0
        self.server: TestServer | None = None
        self.key: SigningKey | None = None  # signs receipts (None: the operator's 200)

    def app(self) -> web.Application:
        app = web.Application()

        async def completions(request: web.Request) -> web.Response:
            payload = await request.json()
            self.served += 1
            return web.json_response({"choices": [{"text": "hi", "token_ids": [5, 6],
                                                   "finish_reason": "length"}],
                                      "model": payload["model"], "by": self.gateway_id})

        async def control(request: web.Request) -> web.Response:
            data = await request.read()
            self.controls.append(data)
            self.state = "shutdown"
            answer: dict[str, Any] = {"state": "shutdown"}
            if self.key is not None:  # what a real gateway signs
                receipt = ControlReceipt(gateway_id=self.gateway_id, kind="shutdown",
                                         digest=digest_of(data), ref="x", outcome="applied",
                                         state="shutdown", time=time.time())
                answer["receipt"] = to_builtins(env.sign_message(env.RECEIPT, receipt,
                                                                 self.key))
            return web.json_response(answer)

        async def status(request: web.Request) -> web.Response:
            return web.json_response({"gateway_id": self.gateway_id, "state": self.state,
                                      "boot_id": self.boot_id})

        app.router.add_post("/v1/completions", completions)
        app.router.add_post("/v1/chat/completions", completions)
        app.router.add_post("/control", control)
        app.router.add_get("/status", status)
        return app

    async def start(self) -> str:
        self.server = TestServer(self.app())
        await self.server.start_server()
        return str(self.server.make_url("")).rstrip("/")

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()


@asynccontextmanager
async def serving(config: Config, **kw: Any) -> AsyncIterator[tuple[Recomputer, TestClient]]:
    rec = Recomputer(dc_replace(config, **kw) if kw else config)
    client = TestClient(TestServer(make_app(rec)))
    await client.start_server()
    try:
        yield rec, client
    finally:
        await client.close()


async def online(rec: Recomputer, client: TestClient, inspectors: Inspectors,
                 gw: ScriptedGateway, fake: FakeGateway) -> None:
    """Start the fake gateway, enrol it, send its BOOT."""
    gw.url = await fake.start()
    fake.key = gw.key
    fake.boot_id = gw.boot_id
    await enrol(rec, inspectors, gw)
    r = await client.post("/uplink", data=body(gw.boot()))
    assert (await r.json())["results"] == [{"ok": True, "error": ""}]


def test_honest_audits_are_stored_then_verified_and_pass(config, inspectors, gateway) -> None:
    async def main() -> None:
        fake = FakeGateway("gw-a")
        async with serving(config) as (rec, client):
            await online(rec, client, inspectors, gateway, fake)
            records = [gateway.audit(max_tokens=6, temperature=t) for t in (0.0, 1.0, 0.7)]
            r = await client.post("/uplink", data=body(*records, gateway.checkpoint()))
            assert r.status == 200
            assert [x["ok"] for x in (await r.json())["results"]] == [True] * 4
            await rec.drain()
            verdicts = await (await client.get("/verdicts?gateway_id=gw-a")).json()
            assert [(v["audit_seq"], v["passed"]) for v in verdicts] == \
                [(1, True), (2, True), (3, True)]
            status = await (await client.get("/status")).json()
            assert status["verdicts"] == {"passed": 3, "failed": 0, "total": 3}
            assert status["queue_depth"] == 0 and status["alarms"] == 0
            assert status["store"]["sync_mode"] == "FULL"
            g = status["gateways"]["gw-a"]
            assert (g["state"], g["model_id"], g["audits_received"], g["pairs_served"]) == \
                ("serving", MODEL_ID, 3, 3)
            assert await (await client.get("/alarms")).json() == []
        await fake.close()
    run(main())


async def _uplink_a_cheat(rec: Any, client: Any, gateway: Any, tiny_engine: Any,
                          fake: FakeGateway) -> None:
    """Uplink the audit of a pair whose first token the server changed, let the
    recomputer verify it, and wait (up to 2 s) for the SHUTDOWN to reach ``fake``."""
    pair = gateway.pair(max_tokens=6, temperature=0.0)
    out = list(pair.output_token_ids)
    out[0] = (out[0] + 7) % 500 + 3
    bad = replace(pair, output_token_ids=out, output_text=tiny_engine.tokenizer.decode(
        out, skip_special_tokens=True))
    r = await client.post("/uplink", data=body(gateway.audit(bad)))
    assert (await r.json())["results"][0]["ok"]
    await rec.drain()
    for _ in range(100):
        if fake.controls:
            break
        await _sleep(0.02)


def test_failed_verdict_alarms_and_sends_signed_shutdown(config, inspectors, gateway,
                                                         tiny_engine) -> None:
    """Attack: a server alters its weights after boot; one audited pair gives it away."""
    async def main() -> None:
        fake = FakeGateway("gw-a")
        async with serving(config) as (rec, client):
            await online(rec, client, inspectors, gateway, fake)
            await _uplink_a_cheat(rec, client, gateway, tiny_engine, fake)
            [v] = await (await client.get("/verdicts")).json()
            assert v["passed"] is False
            alarms = await (await client.get("/alarms")).json()
            assert [a["kind"] for a in alarms] == ["verify_fail"]
            # The SHUTDOWN is signed by the recomputer's device key and names the gateway.
            ident = await (await client.get("/identity")).json()
            [raw] = fake.controls
            payload = env.open_signed(env.Envelope.from_bytes(raw), env.SHUTDOWN,
                                      VerifyKey.from_hex(ident["public_key"]))
            from ivp.protocol.encoding import decode
            order = decode(payload, Shutdown)
            assert order.gateway_id == "gw-a" and "audit record 1 failed" in order.reason
            status = await (await client.get("/status")).json()
            assert status["gateways"]["gw-a"]["state"] == "shutdown"
            # No longer routed: INPUT for the model gets 503.
            r = await client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "x"})
            assert r.status == 503
            assert MODEL_ID in (await r.json())["error"]["message"]
        await fake.close()
    run(main())


def test_a_shutdowns_reason_is_on_the_signed_feed_before_it_leaves(
        config, inspectors, gateway, tiny_engine) -> None:
    """The failed verdict and its verify_fail are notices by the time the SHUTDOWN
    reaches the gateway, with no tick in between (tick_interval 1 h): an older store
    put back at once cannot erase the catch from the feed (red team store-rollback)."""
    from ivp.protocol.notices import Watcher

    async def main() -> None:
        fake = FakeGateway("gw-a")
        async with serving(config, tick_interval=3600.0) as (rec, client):
            await online(rec, client, inspectors, gateway, fake)
            await _uplink_a_cheat(rec, client, gateway, tiny_engine, fake)
            assert fake.controls, "no SHUTDOWN delivered"
            watcher = Watcher(rec.device.public_key)
            feed = [watcher.notice(b) for b in rec.notices.after(0)]  # no GET: as stored
            got = sorted(f"{n.kind}:{n.body['kind'] if n.kind == 'alarm' else n.body['passed']}"
                         for n in feed)
            assert got == ["alarm:verify_fail", "verdict:False"], feed
        await fake.close()
    run(main())


def test_restart_with_queued_records_verifies_each_exactly_once(config, inspectors,
                                                                gateway) -> None:
    async def main() -> None:
        first = Recomputer(config)  # never started: records stay queued
        await enrol(first, inspectors, gateway)
        ack = await first.uplink(body(gateway.boot(), *[gateway.audit(max_tokens=5)
                                                        for _ in range(3)]))
        assert [ok for ok, _ in results(ack)] == [True] * 4
        await first.close()
        db = sqlite3.connect(config.state_dir / "recomputer.sqlite")
        assert db.execute("SELECT COUNT(*) FROM audits WHERE verified = 0").fetchone()[0] == 3
        second = Recomputer(config)
        assert second.queue_depth() == 3
        await second.start()
        await second.drain()
        assert [v["audit_seq"] for v in await second.verdicts()] == [1, 2, 3]
        # The audit sequence survived the restart: a replay of record 1 is refused.
        await second.close()
        third = Recomputer(config)
        await third.start()
        assert third.queue_depth() == 0
        ack = await third.uplink(body(gateway.audit(max_tokens=5)))
        assert results(ack) == [(True, "")]
        await third.drain()
        assert [v["audit_seq"] for v in await third.verdicts()] == [1, 2, 3, 4]
        await third.close()
        assert db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] == 4
    run(main())


def test_refused_uplink_is_alarmed_and_reported_per_envelope(config, inspectors,
                                                             gateway) -> None:
    async def main() -> None:
        async with serving(config) as (rec, client):
            await enrol(rec, inspectors, gateway)
            rogue = SigningKey.generate()
            r = await client.post("/uplink", data=body(
                gateway.boot(), gateway.sign(env.BOOT, _boot(gateway, "b2"), key=rogue)))
            res = (await r.json())["results"]
            assert res[0] == {"ok": True, "error": ""}
            assert res[1]["ok"] is False and res[1]["error"].startswith("SignatureError: ")
            [alarm] = await (await client.get("/alarms")).json()
            assert alarm["kind"] == "unenrolled" and alarm["acknowledged"] is False
            r = await client.post("/uplink", data=b"not json")
            assert r.status == 400 and (await r.json())["error"]["type"] == "ValidationError"
    run(main())


def test_input_is_balanced_and_503_names_model_and_last_served(config, inspectors,
                                                                tiny_engine,
                                                                tiny_manifest) -> None:
    async def main() -> None:
        fakes = [FakeGateway("gw-a"), FakeGateway("gw-b")]
        gws = [ScriptedGateway(f.gateway_id, tiny_engine, tiny_manifest) for f in fakes]
        async with serving(config) as (rec, client):
            r = await client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "x"})
            assert r.status == 503
            assert (await r.json())["error"]["message"] == (
                f"model {MODEL_ID!r} is whitelisted but no gateway is serving it right now "
                "(last served never); try again later")
            for gw, fake in zip(gws, fakes, strict=True):
                await online(rec, client, inspectors, gw, fake)
            for i in range(6):
                path = "/v1/chat/completions" if i % 2 else "/v1/completions"
                r = await client.post(path, json={"model": MODEL_ID, "prompt": "x"})
                assert r.status == 200 and (await r.json())["choices"][0]["token_ids"] == [5, 6]
            assert [f.served for f in fakes] == [3, 3]
            # Health checks take a gateway that says it is not serving out of rotation.
            fakes[0].state = "power_kill"
            await rec.health_check()
            for _ in range(2):
                r = await client.post("/v1/completions", json={"model": MODEL_ID})
                assert (await r.json())["by"] == "gw-b"
            fakes[1].state = "upload"
            await rec.health_check()
            r = await client.post("/v1/completions", json={"model": MODEL_ID})
            msg = (await r.json())["error"]["message"]
            assert r.status == 503 and "last served 20" in msg and "power_kill" in msg
            r = await client.post("/v1/completions", json={"prompt": "no model"})
            assert r.status == 400 and "model is required" in (await r.json())["error"]["message"]
        for f in fakes:
            await f.close()
    run(main())


def test_unreachable_gateway_is_skipped(config, inspectors, tiny_engine, tiny_manifest) -> None:
    async def main() -> None:
        fakes = [FakeGateway("gw-a"), FakeGateway("gw-b")]
        gws = [ScriptedGateway(f.gateway_id, tiny_engine, tiny_manifest) for f in fakes]
        async with serving(config) as (rec, client):
            for gw, fake in zip(gws, fakes, strict=True):
                await online(rec, client, inspectors, gw, fake)
            await fakes[0].close()  # gw-a's port now refuses connections
            for _ in range(3):
                r = await client.post("/v1/completions", json={"model": MODEL_ID})
                assert r.status == 200 and (await r.json())["by"] == "gw-b"
            status = await (await client.get("/status")).json()
            assert status["gateways"]["gw-a"]["healthy"] is False
        await fakes[1].close()
    run(main())


def test_rate_limit_per_client(config, inspectors, gateway) -> None:
    async def main() -> None:
        fake = FakeGateway("gw-a")
        async with serving(config, rate_limit=0.001, rate_burst=2) as (rec, client):
            await online(rec, client, inspectors, gateway, fake)
            codes = [(await client.post("/v1/completions", json={"model": MODEL_ID})).status
                     for _ in range(3)]
            assert codes == [200, 200, 429]
            # Attack: a fresh Authorization header per request (ivp verifies none, so it
            # must not buy a fresh bucket: 12 of 12 got through that way)
            for i in range(12):
                r = await client.post("/v1/completions", json={"model": MODEL_ID},
                                      headers={"Authorization": f"Bearer rotated-{i}"})
                assert r.status == 429, i
                assert (await r.json())["error"]["type"] == "RateLimitedError"
            assert fake.served == 2  # nothing more reached the gateway
        await fake.close()
    run(main())


def test_cluster_shutdown_policy_and_readmission(config, inspectors, tiny_engine,
                                                 tiny_manifest) -> None:
    async def main() -> None:
        fakes = [FakeGateway("gw-a"), FakeGateway("gw-b")]
        gws = [ScriptedGateway(f.gateway_id, tiny_engine, tiny_manifest) for f in fakes]
        async with serving(config, shutdown_on=frozenset({"verify_fail", "sequence_gap"}),
                           shutdown_scope="cluster") as (rec, client):
            for gw, fake in zip(gws, fakes, strict=True):
                await online(rec, client, inspectors, gw, fake)
            gws[0].audit_seq = 4  # a gap: records 1..4 withheld
            r = await client.post("/uplink", data=body(gws[0].audit(max_tokens=3)))
            assert (await r.json())["results"][0]["ok"] is True  # stored after the gap
            for _ in range(100):
                if all(f.controls for f in fakes):
                    break
                await _sleep(0.02)
            status = await (await client.get("/status")).json()
            assert {g["state"] for g in status["gateways"].values()} == {"shutdown"}
            assert all(len(f.controls) == 1 for f in fakes)
            # Re-admission by quorum; routing resumes only after a fresh BOOT.
            await rec.handle_admin(inspectors.request("readmit_gateway",
                                                      {"gateway_id": "gw-b"}))
            r = await client.post("/v1/completions", json={"model": MODEL_ID})
            assert r.status == 503
            await client.post("/uplink", data=body(gws[1].boot("boot-2")))
            r = await client.post("/v1/completions", json={"model": MODEL_ID})
            assert r.status == 200 and (await r.json())["by"] == "gw-b"
        for f in fakes:
            await f.close()
    run(main())


def test_shutdown_cannot_be_triggered_by_unauthenticated_alarms(config) -> None:
    """Attack: anyone sends forged records in an honest gateway's name to get it shut."""
    with pytest.raises(ValidationError, match="forged"):
        dc_replace(config, shutdown_on=frozenset({"verify_fail", "forged"}))


def test_tamper_bricks_the_recomputer(config, inspectors) -> None:
    async def main() -> None:
        async with serving(config, tamper_endpoint=True) as (_rec, client):
            assert (await client.get("/identity")).status == 200
            r = await client.post("/tamper")
            assert r.status == 200
            for method, path in (("GET", "/identity"), ("GET", "/status"),
                                 ("POST", "/uplink"), ("POST", "/admin"),
                                 ("POST", "/v1/completions"), ("GET", "/verdicts")):
                r = await client.request(method, path, data=b"{}")
                answer = await r.json()
                assert r.status == 403 and answer["error"]["type"] == "BrickedError", path
        with pytest.raises(BrickedError):
            Recomputer(config)
    run(main())


def test_tamper_endpoint_is_off_by_default(config) -> None:
    async def main() -> None:
        async with serving(config) as (rec, client):
            assert (await client.post("/tamper")).status == 404
            assert not rec.device.bricked
    run(main())


def test_metrics_endpoint(config, inspectors, gateway) -> None:
    async def main() -> None:
        fake = FakeGateway("gw-a")
        async with serving(config) as (rec, client):
            await online(rec, client, inspectors, gateway, fake)
            await client.post("/uplink", data=body(gateway.audit(max_tokens=4)))
            await rec.drain()
            text = await (await client.get("/metrics")).text()
            assert 'ivp_verdicts_total{result="passed"} 1.0' in text
            assert 'ivp_uplink_envelopes_total{result="ok"} 2.0' in text
            assert 'ivp_gateways{state="serving"} 1.0' in text
            assert 'ivp_admin_requests_total{instruction="enrol_device",result="accepted"} 1.0' \
                in text
        await fake.close()
    run(main())


def test_invalid_whitelist_refuses_start(config, inspectors, tiny_manifest) -> None:
    import time

    from ivp.errors import QuorumError
    from ivp.protocol.messages import Whitelist
    from ivp.whitelist import sign_whitelist
    wl = Whitelist(version=1, expires=time.time() + 100, manifests=[tiny_manifest])
    one_party = sign_whitelist(wl, [inspectors.us, inspectors.us2]).to_bytes()
    with pytest.raises(QuorumError, match="no signature from party CN"):
        Recomputer(dc_replace(config, whitelist=one_party))


def test_model_files_are_checked_against_the_manifest(config, tmp_path, tiny_model_dir) -> None:
    import shutil

    from ivp.errors import DigestError

    copy = tmp_path / "model-copy"
    shutil.copytree(tiny_model_dir, copy)
    shard = sorted(copy.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DigestError, match="does not match manifest"):
        Recomputer(dc_replace(config, models={MODEL_ID: copy}))


async def _sleep(s: float) -> None:
    import asyncio

    await asyncio.sleep(s)


def _boot(gw: ScriptedGateway, boot_id: str) -> Any:
    import time

    from ivp.protocol.messages import BootRecord, manifest_digest

    return BootRecord(gateway_id=gw.gateway_id, boot_id=boot_id, model_id=gw.manifest.model_id,
                      manifest_digest=manifest_digest(gw.manifest), epsilon=gw.epsilon,
                      time=time.time(), url=gw.url)


_ = json


class PoisonPool:
    """A pool whose worker crashes on one record and passes the others."""

    name, size = "poison", 1

    def __init__(self, poison_seq: int) -> None:
        self.poison_seq, self.calls = poison_seq, []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def verify(self, jobs: list) -> list:
        import time

        from ivp.protocol.encoding import canonical, decode
        from ivp.protocol.messages import AuditRecord, Verdict
        from ivp.recomputer.workers import Outcome

        records = [decode(j.payload, AuditRecord) for j in jobs]
        self.calls.append([r.audit_seq for r in records])
        if any(r.audit_seq == self.poison_seq for r in records):
            raise RuntimeError("worker died")
        return [Outcome(j.audit_id, canonical(Verdict(
            gateway_id=r.gateway_id, boot_id=r.boot_id, audit_seq=r.audit_seq,
            model_id=r.pair.model_id, passed=True, mode="exact", reason="ok", tokens=1,
            failures=0, max_margin=0.0, bound=0.0, time=time.time())))
            for j, r in zip(jobs, records, strict=True)]


def test_record_crashing_the_worker_is_parked_not_blocking(config, inspectors,
                                                          gateway) -> None:
    async def main() -> None:
        pool = PoisonPool(poison_seq=2)
        rec = Recomputer(config, pool=pool)
        await rec.start()
        await enrol(rec, inspectors, gateway)
        await rec.uplink(body(gateway.boot(), *[gateway.audit(max_tokens=3) for _ in range(3)]))
        await rec.drain()
        assert [v["audit_seq"] for v in await rec.verdicts()] == [1, 3]
        assert [a["kind"] for a in await rec.alarms()] == ["verifier_error"]
        assert pool.calls[0] == [1, 2, 3] and [2] in pool.calls
        status = await rec.status()
        assert status["unverifiable"] == 1 and status["queue_depth"] == 0
        await rec.close()
    run(main())


def test_silenced_gateway_alarms_from_the_ticker_and_policy_shuts_it(config, inspectors,
                                                                     gateway) -> None:
    """Attack: the operator cuts a serving gateway's uplink (no more checkpoints)."""
    from ivp.recomputer.ingest import Rules

    async def main() -> None:
        fake = FakeGateway("gw-a")
        async with serving(config, rules=Rules(checkpoint_period=0.1), tick_interval=0.05,
                           shutdown_on=frozenset({"checkpoint_missing"})) as (rec, client):
            await online(rec, client, inspectors, gateway, fake)
            for _ in range(100):
                if fake.controls:
                    break
                await _sleep(0.05)
            alarms = await (await client.get("/alarms")).json()
            assert [a["kind"] for a in alarms][:1] == ["checkpoint_missing"]
            assert fake.controls and rec.ingest.gateways["gw-a"].state == "shutdown"
        await fake.close()
    run(main())


def test_uplink_cursor_and_gateway_alarms_survive_a_restart(config, inspectors,
                                                            gateway) -> None:
    """GET /uplink/cursor reports what is stored; the alarm and audit numbering (what
    the cursor and the replay check rest on) survive a restart."""
    from ivp.protocol.messages import GatewayAlarm

    alarm = gateway.sign(env.ALARM, GatewayAlarm(
        gateway_id=gateway.gateway_id, seq=1, kind="power_kill", message="digest", time=1.0))

    async def main() -> None:
        async with serving(config) as (rec, client):
            await enrol(rec, inspectors, gateway)
            r = await client.post("/uplink", data=body(gateway.boot(), gateway.audit(), alarm))
            assert [x["ok"] for x in (await r.json())["results"]] == [True] * 3
            r = await client.get(f"/uplink/cursor?gateway_id=gw-a&boot_id={gateway.boot_id}")
            assert r.status == 200
            from ivp.protocol.encoding import convert, decode
            from ivp.protocol.messages import UplinkCursor
            signed = convert(await r.json(), env.Envelope)  # signed by the recomputer's key
            cur = decode(env.open_signed(signed, env.CURSOR, rec.device.public_key),
                         UplinkCursor)
            assert (cur.boot_known, cur.next_audit_seq, cur.next_alarm_seq) == (True, 2, 2)
            r = await client.get("/uplink/cursor")
            assert r.status == 400 and "gateway_id" in (await r.json())["error"]["message"]
            r = await client.get("/uplink/cursor?gateway_id=bad%20id")
            assert r.status == 400
            [stored] = await (await client.get("/alarms")).json()
            assert stored["kind"] == "gateway:power_kill"
        async with serving(config) as (rec, client):
            cur = (await rec.cursor("gw-a", gateway.boot_id))
            assert (cur.next_audit_seq, cur.next_alarm_seq) == (2, 2)
            r = await client.post("/uplink", data=body(alarm))
            assert (await r.json())["results"][0]["error"].startswith("ChainError: gateway "
                                                                      "alarm 1 replayed")
    run(main())


def test_nested_json_is_a_400_not_a_500(config) -> None:
    """Attack: a body nested 100,000 deep raised RecursionError (HTTP 500) on INPUT, the
    uplink and the sensors route; it is bad input, answered 400 ValidationError."""
    async def main() -> None:
        async with serving(config) as (_rec, client):
            deep = b"[" * 100_000 + b"]" * 100_000
            for path in ("/v1/completions", "/uplink", "/sensors"):
                r = await client.post(path, data=deep)
                assert r.status == 400, path
                assert (await r.json())["error"]["type"] == "ValidationError", path
    run(main())


def test_junk_uplink_is_refused_whole_before_any_per_item_work(config) -> None:
    """Attack: 300,000 junk items in one uplink body once stalled the recomputer 23 s;
    the batch is refused at once, naming the cap, and nothing is stored or alarmed."""
    async def main() -> None:
        async with serving(config) as (rec, client):
            r = await client.post("/uplink", data=json.dumps({"envelopes": [{}] * 300_000}))
            assert r.status == 400
            assert "at most 256 per batch" in (await r.json())["error"]["message"]
            r = await client.post("/uplink", data=b"x" * (16 * 1024 * 1024 + 1))
            assert r.status == 413
            assert (await rec.status())["alarms"] == 0
    run(main())


def test_openai_client_sees_503_retry_after_for_a_model_no_gateway_serves(
        config, inspectors, gateway) -> None:
    """A whitelisted model with no serving gateway: 503 + Retry-After (worth retrying);
    a model the whitelist lacks: 404 model_not_found (not worth it). With the real SDK."""
    import openai

    async def main() -> None:
        async with serving(config, health_interval=2.0) as (rec, client):
            base = str(client.make_url("/v1"))
            async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0) as sdk:
                assert (await sdk.models.list()).data == []
                with pytest.raises(openai.APIStatusError) as err:
                    await sdk.completions.create(model=MODEL_ID, prompt="hi", max_tokens=2)
                assert err.value.status_code == 503
                assert err.value.response.headers["Retry-After"] == "2"
                assert err.value.code == "model_not_served"
                assert "whitelisted but no gateway is serving it" in err.value.message
                with pytest.raises(openai.NotFoundError) as missing:
                    await sdk.completions.create(model="llama-70b", prompt="hi", max_tokens=2)
                assert missing.value.code == "model_not_found"
                with pytest.raises(openai.APIStatusError) as unserved:
                    await sdk.models.retrieve(MODEL_ID)
                assert unserved.value.status_code == 503
                fake = FakeGateway("gw-a")
                await online(rec, client, inspectors, gateway, fake)
                assert [m.id for m in (await sdk.models.list()).data] == [MODEL_ID]
                assert (await sdk.models.retrieve(MODEL_ID)).id == MODEL_ID
                await fake.close()
    run(main())


def test_rate_limited_client_gets_retry_after(config, inspectors, gateway) -> None:
    async def main() -> None:
        fake = FakeGateway("gw-a")
        async with serving(config, rate_limit=0.5, rate_burst=1) as (rec, client):
            await online(rec, client, inspectors, gateway, fake)
            assert (await client.post("/v1/completions", json={"model": MODEL_ID})).status == 200
            r = await client.post("/v1/completions", json={"model": MODEL_ID})
            assert r.status == 429 and r.headers["Retry-After"] == "2"
            assert (await r.json())["error"]["code"] == "rate_limit_exceeded"
        await fake.close()
    run(main())


def test_closing_while_a_store_write_runs_waits_for_it(config) -> None:
    """A cancelled task's store write keeps running on the store's thread; close's own
    writes (last-served times, folded alarms) once ran beside it on the loop's thread and
    failed with "cannot start a transaction within a transaction". They queue behind it."""
    async def main() -> None:
        async with serving(config) as (rec, _client):
            started = threading.Event()

            def slow_write() -> None:
                with rec.store.transaction():
                    started.set()
                    time.sleep(0.3)

            rec._spawn(rec._db(slow_write))
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
            rec.router.last_served["m"] = 1.0
            rec._served_dirty = True
        # leaving ``serving`` closed the app, and the recomputer with it, without an error
    run(main())


def test_a_failed_uplink_write_acknowledges_nothing_and_the_resent_batch_is_taken(
        config, inspectors, gateway) -> None:
    """The store refuses one uplink write (a full disk): the batch is answered as not
    taken, the recomputer's trusted state is reloaded from the store (the records' effects
    it had applied in memory are undone), and the gateway's resend of the same records
    is accepted and verified once each."""
    async def main() -> None:
        rec = Recomputer(config)
        await rec.start()
        await enrol(rec, inspectors, gateway)
        boot = gateway.boot()
        records = [gateway.audit(max_tokens=5) for _ in range(2)]
        real = rec.store.write_uplink

        def full_disk(*args: Any) -> Any:
            rec.store.write_uplink = real  # once
            raise sqlite3.OperationalError("database or disk is full")

        rec.store.write_uplink = full_disk  # type: ignore[method-assign]
        with pytest.raises(TransportError, match="store write failed"):
            await rec.uplink(body(boot, *records))
        assert rec.queue_depth() == 0
        ack = await rec.uplink(body(boot, *records))  # the same bytes again
        assert [ok for ok, _ in results(ack)] == [True] * 3
        await rec.drain()
        assert [v["audit_seq"] for v in await rec.verdicts()] == [1, 2]
        await rec.close()
    run(main())
