"""Knock-out tests of issue 12's defences: each attack is stopped with its defence,
and gets through with exactly that defence switched off (``ivp.attacks.knockouts``).

Every test plays the attack twice, on the same code, once as built and once inside
``knocked_out(NAME)``; the second run must show the attack succeeding. A defence whose
knock-out changes nothing would be a test that cannot fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from test_gateway_rig import COMPLETION, flush, make_rig, run, started
from test_recomputer_support import ScriptedGateway

from ivp.attacks.knockouts import KNOCKOUTS, knocked_out
from ivp.errors import TransportError
from ivp.protocol.messages import Manifest
from ivp.recomputer.ingest import Ingest, Outcome, Rules

pytest_plugins = ("test_recomputer_support",)
NOW = 1_000_000.0


def test_every_knockout_is_named_and_undone() -> None:
    from ivp.gateway.release import ReleasePolicy

    policy = ReleasePolicy(base=1.0)
    for name in KNOCKOUTS:
        with knocked_out(name):
            pass
    assert policy.release(1.0, 0.1).at == 1.0  # restored after the block
    with pytest.raises(ValueError, match="unknown knockout"), knocked_out("no-such-defence"):
        pass


# --- the recomputer's accounting -------------------------------------------------------------
def _ingest(manifest: Manifest, gw: ScriptedGateway) -> Ingest:
    ing = Ingest(lambda m: manifest if m == manifest.model_id else None,
                 Rules(checkpoint_period=10), now=NOW - 100)
    ing.enrol(gw.gateway_id, "gateway", gw.key.verify_key.hex, gw.url)
    return ing


def _admit(ing: Ingest, item: Any, now: float) -> Outcome:
    out = ing.admit(item, now)
    if out.effect is not None:
        ing.apply(out.effect)
    return out


def _withheld_by_checkpoints(manifest: Manifest, engine: Any) -> list[str]:
    """Drop record 2, keep checkpointing every 5 s: alarms at 22 s after the first claim."""
    gw = ScriptedGateway("gw-a", engine, manifest)
    ing = _ingest(manifest, gw)
    _admit(ing, gw.boot(), NOW)
    _admit(ing, gw.audit(), NOW)
    gw.audit()  # withheld
    for t in (1, 5, 10, 15, 20):
        _admit(ing, gw.checkpoint(), NOW + t)
        ing.tick(NOW + t)
    return [a.kind for a in ing.tick(NOW + 22)]


def test_first_claim_knockout(tiny_manifest: Manifest, tiny_engine: Any) -> None:
    assert _withheld_by_checkpoints(tiny_manifest, tiny_engine) == ["audit_withheld"]
    with knocked_out("first-claim"):
        assert _withheld_by_checkpoints(tiny_manifest, tiny_engine) == []


def _abandoned(manifest: Manifest, engine: Any) -> list[str]:
    gw = ScriptedGateway("gw-a", engine, manifest)
    ing = _ingest(manifest, gw)
    _admit(ing, gw.boot(), NOW)
    gw.audit()  # withheld
    _admit(ing, gw.boot("boot-2"), NOW + 2)  # names boot-1 closed with 1 audit
    return [a.kind for a in ing.tick(NOW + 23) if a.boot_id == "boot-1"]


def test_all_boots_knockout(tiny_manifest: Manifest, tiny_engine: Any) -> None:
    assert _abandoned(tiny_manifest, tiny_engine) == ["audit_withheld"]
    with knocked_out("all-boots"):
        assert _abandoned(tiny_manifest, tiny_engine) == []


def _after_gap(manifest: Manifest, engine: Any) -> bool:
    gw = ScriptedGateway("gw-a", engine, manifest)
    ing = _ingest(manifest, gw)
    _admit(ing, gw.boot(), NOW)
    _admit(ing, gw.audit(), NOW)
    gw.audit()  # withheld
    return _admit(ing, gw.audit(), NOW).ok  # the record after the gap: stored?


def test_gap_store_knockout(tiny_manifest: Manifest, tiny_engine: Any) -> None:
    assert _after_gap(tiny_manifest, tiny_engine) is True
    with knocked_out("gap-store"):
        assert _after_gap(tiny_manifest, tiny_engine) is False


def test_uplink_caps_knockout() -> None:
    from ivp.errors import ValidationError
    from ivp.recomputer import uplink

    junk = json.dumps({"envelopes": [{}] * 300_000}).encode()
    with pytest.raises(ValidationError, match="at most 256"):
        uplink.batch_items(junk)
    with knocked_out("uplink-caps"):
        assert len(uplink.batch_items(junk)) == 300_000  # every item would be worked on


# --- the gateway -------------------------------------------------------------------------------
class ForgingWire:
    """The operator answering the uplink in the recomputer's name: ok: true, unsigned,
    and nothing passed on."""

    async def post(self, body: bytes) -> bytes:
        n = len(json.loads(body)["envelopes"])
        return json.dumps({"results": [{"ok": True, "error": ""}] * n}).encode()


def _forged_ack_deletes(tmp_path: Path, tiny_model_dir: Path) -> int:
    async def body() -> int:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        await rig.upload()
        await (await rig.gw.complete("completions", COMPLETION)).after_release()
        assert rig.gw.uplink is not None
        rig.gw.uplink.transport = ForgingWire()  # type: ignore[assignment]
        rig.gw.uplink._reconcile = None
        with contextlib.suppress(TransportError):
            await rig.gw.uplink.flush_once()
        left = rig.log.spool_depth()
        await rig.gw.close()
        return left
    return run(body())


def test_signed_ack_knockout(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert _forged_ack_deletes(tmp_path / "a", tiny_model_dir) >= 2  # BOOT + AUDIT kept
    with knocked_out("signed-ack"):
        assert _forged_ack_deletes(tmp_path / "b", tiny_model_dir) == 0  # both gone


def _restored_log_serves(tmp_path: Path, tiny_model_dir: Path) -> str:
    import shutil
    import sqlite3

    async def body() -> str:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        await rig.upload()
        with sqlite3.connect(rig.log.path) as src, \
                sqlite3.connect(tmp_path / "copy.sqlite") as dst:
            src.backup(dst)
        for _ in range(3):
            await (await rig.gw.complete("completions", COMPLETION)).after_release()
        await rig.gw.close()
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / f"log.sqlite{suffix}").unlink(missing_ok=True)
        shutil.copy(tmp_path / "copy.sqlite", tmp_path / "log.sqlite")
        again = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        state = again.gw.state.value
        await again.gw.close()
        return state
    return run(body())


def test_counter_knockout(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert _restored_log_serves(tmp_path / "a", tiny_model_dir) == "shutdown"
    with knocked_out("counter"):
        assert _restored_log_serves(tmp_path / "b", tiny_model_dir) == "upload"


def _old_relay_after_new(tmp_path: Path, tiny_model_dir: Path) -> float | None:
    from test_gateway_control import relayed

    async def body() -> float | None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        old = relayed(rig, "set_epsilon", {"epsilon": 0.01})
        await rig.gw.admin(relayed(rig, "set_epsilon", {"epsilon": 0.5}))  # relay 1: 0.5
        await rig.gw.admin(old)  # relay 1 again, made earlier: carries 0.01
        eps = rig.gw._settings.epsilon
        await rig.gw.close()
        return eps
    return run(body())


def test_relay_order_knockout(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert _old_relay_after_new(tmp_path / "a", tiny_model_dir) == 0.5
    with knocked_out("relay-order"):
        assert _old_relay_after_new(tmp_path / "b", tiny_model_dir) == 0.01


def _latencies(tmp_path: Path, tiny_model_dir: Path) -> list[float]:
    from ivp.gateway.release import ReleasePolicy

    async def body() -> list[float]:
        rig = await started(make_rig(tmp_path, tiny_model_dir, with_uplink=False,
                                     release=ReleasePolicy(base=0.12)))
        await rig.upload()
        out = []
        for delay in (0.0, 0.08):
            rig.server.delay = delay
            t = time.monotonic()
            await (await rig.gw.complete("completions", COMPLETION)).after_release()
            out.append(time.monotonic() - t)
        await rig.gw.close()
        return out
    return run(body())


def test_release_knockout(tmp_path: Path, tiny_model_dir: Path) -> None:
    fast, slow = _latencies(tmp_path / "a", tiny_model_dir)
    assert abs(slow - fast) < 0.04  # both at the budget: the delay is invisible
    with knocked_out("release"):
        fast, slow = _latencies(tmp_path / "b", tiny_model_dir)
    assert slow - fast > 0.06  # the server's delay reaches the client


# --- the recomputer's deliveries -----------------------------------------------------------
def _shutdown_delivered_to_a_fake_200(config: Any, inspectors: Any, gateway: Any) -> bool:
    from aiohttp import web
    from aiohttp.test_utils import TestServer
    from test_recomputer_support import enrol

    from ivp.recomputer.service import Recomputer

    async def body() -> bool:
        async def fake(_request: web.Request) -> web.Response:
            return web.json_response({"state": "shutdown"})  # the operator's answer

        app = web.Application()
        app.router.add_post("/control", fake)
        server = TestServer(app)
        await server.start_server()
        gateway.url = str(server.make_url("")).rstrip("/")
        rec = Recomputer(config)
        await rec.start()
        await enrol(rec, inspectors, gateway)
        await rec._shutdown(gateway.gateway_id, "test")
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not rec.store.pending_shutdowns():
                break
        delivered = not rec.store.pending_shutdowns()
        await rec.close()
        await server.close()
        return delivered
    return run(body())


def test_receipts_knockout(config: Any, inspectors: Any, gateway: Any, tmp_path: Path) -> None:
    from dataclasses import replace

    assert _shutdown_delivered_to_a_fake_200(config, inspectors, gateway) is False
    with knocked_out("receipts"):
        assert _shutdown_delivered_to_a_fake_200(
            replace(config, state_dir=tmp_path / "rc2"), inspectors, gateway) is True


_ = flush
