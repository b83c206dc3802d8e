"""ADMIN_REQUEST: every refusal (exact error, logged, state unchanged) and every instruction."""

from __future__ import annotations

import secrets
import sqlite3
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from test_recomputer_support import Inspectors, ScriptedGateway, body, enrol, run

from ivp.errors import ChainError, ExpiredError, QuorumError, StateError, ValidationError
from ivp.protocol import envelope as env
from ivp.protocol.encoding import canonical, to_builtins
from ivp.protocol.keys import SigningKey, VerifyKey
from ivp.protocol.messages import Whitelist
from ivp.recomputer.admin import verify_log
from ivp.recomputer.app import make_app
from ivp.recomputer.service import AdminRefusedError, Recomputer
from ivp.whitelist import sign_whitelist

pytest_plugins = ("test_recomputer_support",)


def enrol_args(key: SigningKey | None = None, device_id: str = "gw-x") -> dict[str, Any]:
    key = key or SigningKey.generate()
    return {"device_id": device_id, "public_key": key.verify_key.hex, "kind": "gateway",
            "url": "http://127.0.0.1:9"}


async def refused(rec: Recomputer, data: bytes) -> AdminRefusedError:
    before = (set(rec.ingest.devices), set(rec.admin.nonces), rec.admin.seq)
    with pytest.raises(AdminRefusedError) as info:
        await rec.handle_admin(data)
    # Trusted state did not move; only the log grew by one (refused) entry.
    assert (set(rec.ingest.devices), set(rec.admin.nonces)) == before[:2]
    assert rec.admin.seq == before[2] + 1 == info.value.log_seq
    [(_, raw, _)] = rec.store.admin_log(since=info.value.log_seq - 1)
    assert b'"accepted":false' in raw
    return info.value


async def refused_unlogged(rec: Recomputer, data: bytes) -> AdminRefusedError:
    """Refused, and with no valid inspector signature: not in the log at all."""
    before = (set(rec.ingest.devices), set(rec.admin.nonces), rec.admin.seq,
              len(rec.store.admin_log()))
    with pytest.raises(AdminRefusedError) as info:
        await rec.handle_admin(data)
    assert info.value.log_seq is None
    assert (set(rec.ingest.devices), set(rec.admin.nonces), rec.admin.seq,
            len(rec.store.admin_log())) == before
    return info.value


def refusal_case(config: Any, data_of: Any, error: type, match: str,
                 logged: bool = True) -> None:
    async def main() -> None:
        rec = Recomputer(config)
        err = await (refused if logged else refused_unlogged)(rec, data_of())
        assert type(err.cause) is error, err.cause
        assert match in str(err.cause)
        await rec.close()
    run(main())


def test_quorum_request_is_accepted_and_logged(config, inspectors) -> None:
    async def main() -> None:
        rec = Recomputer(config)
        answer = await rec.handle_admin(inspectors.request("enrol_device", enrol_args()))
        assert answer["accepted"] and answer["log_seq"] == 1
        assert answer["result"]["device_id"] == "gw-x"
        assert "gw-x" in rec.ingest.devices
        await rec.close()
    run(main())


def test_missing_party_is_refused(config, inspectors) -> None:
    """Abuse: one party (two US keys) acts alone."""
    refusal_case(config, lambda: inspectors.request(
        "enrol_device", enrol_args(), signers=[inspectors.us, inspectors.us2]),
        QuorumError, "no signature from party CN")


def test_below_threshold_is_refused(config, inspectors) -> None:
    refusal_case(config, lambda: inspectors.request(
        "enrol_device", enrol_args(), signers=[inspectors.us]),
        QuorumError, "1 valid signature(s), 2 required")


def test_signature_by_an_outsider_does_not_count(config, inspectors) -> None:
    refusal_case(config, lambda: inspectors.request(
        "enrol_device", enrol_args(), signers=[inspectors.us, SigningKey.generate()]),
        QuorumError, "2 required")


def test_expired_request_is_refused(config, inspectors) -> None:
    refusal_case(config, lambda: inspectors.request("enrol_device", enrol_args(), ttl=-1),
                 ExpiredError, "request expired")


def test_request_valid_too_long_is_refused(config, inspectors) -> None:
    """Abuse: a request signed now and held back to be used years later."""
    refusal_case(config, lambda: inspectors.request("enrol_device", enrol_args(),
                                                    ttl=30 * 86400),
                 ExpiredError, "at most 604800 s allowed")


def test_instruction_outside_the_closed_list_is_refused(config, inspectors) -> None:
    refusal_case(config, lambda: inspectors.request("run_shell", {"cmd": "rm -rf /"}),
                 ValidationError, "instruction 'run_shell' is not on the closed list")


def test_other_document_type_is_refused(config, inspectors) -> None:
    """Abuse: a quorum signature over another document type replayed as an instruction."""
    refusal_case(config, lambda: inspectors.request("enrol_device", enrol_args(),
                                                    payload_type=env.WHITELIST),
                 ValidationError, "expected payload type", logged=False)


def test_malformed_arguments_are_refused(config, inspectors) -> None:
    refusal_case(config, lambda: inspectors.request(
        "enrol_device", {**enrol_args(), "extra": 1}), ValidationError, "extra")
    refusal_case(config, lambda: inspectors.request("set_epsilon", {"epsilon": 1.5}),
                 ValidationError, "epsilon")


def test_junk_is_refused_without_a_permanent_log_entry(config) -> None:
    """Attack: unauthenticated junk POSTed to /admin, over and over: each once added a
    permanent entry to the append-only admin log. A request with no valid inspector
    signature is refused and counted, never logged."""
    refusal_case(config, lambda: b"\x00garbage", ValidationError, "Envelope", logged=False)
    outsider = SigningKey.generate()
    deep = b'{"instruction":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    refusal_case(config, lambda: env.sign(env.ADMIN, deep, [outsider]).to_bytes(),
                 ValidationError, "nested too deeply", logged=False)
    refusal_case(config, lambda: env.sign(env.ADMIN, b'{"instruction":"set_epsilon"}',
                                          [outsider]).to_bytes(),
                 QuorumError, "0 valid signature(s)", logged=False)


def test_replayed_nonce_is_refused_also_after_restart(config, inspectors) -> None:
    """Abuse: a captured, valid request is sent again."""
    async def main() -> None:
        rec = Recomputer(config)
        data = inspectors.request("set_epsilon", {"epsilon": 0.1})
        await rec.handle_admin(data)
        err = await refused(rec, data)
        assert type(err.cause) is ChainError and "already used" in str(err.cause)
        await rec.close()
        again = Recomputer(config)
        err = await refused(again, data)
        assert type(err.cause) is ChainError
        assert again.admin.seq == 3
        await again.close()
    run(main())


def test_refused_request_does_not_burn_its_nonce(config, inspectors) -> None:
    """A request submitted under-signed (by anyone who saw it) can still be completed."""
    async def main() -> None:
        rec = Recomputer(config)
        nonce = secrets.token_hex(16)
        args = enrol_args()
        await refused(rec, inspectors.request("enrol_device", args, nonce=nonce,
                                              signers=[inspectors.us]))
        answer = await rec.handle_admin(inspectors.request("enrol_device", args, nonce=nonce))
        assert answer["accepted"]
        await rec.close()
    run(main())


def test_state_checks_refuse_senseless_instructions(config, inspectors) -> None:
    async def main() -> None:
        rec = Recomputer(config)
        key = SigningKey.generate()
        await rec.handle_admin(inspectors.request("enrol_device", enrol_args(key)))
        for instruction, args, match in (
            ("enrol_device", enrol_args(key, "gw-y"), "already enrolled"),
            ("enrol_device", enrol_args(None, "gw-x"), "already enrolled"),
            ("ack_alarm", {"alarm_id": 99}, "no alarm 99"),
            ("readmit_gateway", {"gateway_id": "gw-x"}, "not shut down"),
            ("rotate_key", {"device_id": "nobody", "public_key": "ab" * 32}, "not enrolled"),
        ):
            err = await refused(rec, inspectors.request(instruction, args))
            assert type(err.cause) is StateError and match in str(err.cause), (instruction, err)
        await rec.close()
    run(main())


def test_alarm_is_acknowledged_only_by_quorum(config, inspectors, gateway) -> None:
    async def main() -> None:
        rec = Recomputer(config)
        await enrol(rec, inspectors, gateway)
        rogue = SigningKey.generate()
        await rec.uplink(body(gateway.sign(env.BOOT, _boot_of(gateway), key=rogue)))
        [alarm] = await rec.alarms()
        await refused(rec, inspectors.request("ack_alarm", {"alarm_id": alarm["id"]},
                                              signers=[inspectors.cn]))
        assert (await rec.alarms())[0]["acknowledged"] is False
        answer = await rec.handle_admin(inspectors.request(
            "ack_alarm", {"alarm_id": alarm["id"], "note": "test key, not an attack"}))
        [after] = await rec.alarms()
        assert after["acknowledged"] and after["acked_admin_seq"] == answer["log_seq"]
        err = await refused(rec, inspectors.request("ack_alarm", {"alarm_id": alarm["id"]}))
        assert "already acknowledged" in str(err.cause)
        await rec.close()
    run(main())


def test_whitelist_update_goes_up_only(config, inspectors, tiny_manifest) -> None:
    def signed(version: int, keys: list[SigningKey]) -> dict:
        wl = Whitelist(version=version, expires=time.time() + 3600, manifests=[tiny_manifest])
        return to_builtins(sign_whitelist(wl, keys))

    async def main() -> None:
        rec = Recomputer(config)
        err = await refused(rec, inspectors.request(
            "whitelist_update", {"whitelist": signed(1, inspectors.quorum)}))
        assert type(err.cause) is ExpiredError and "rollback" in str(err.cause)
        err = await refused(rec, inspectors.request(
            "whitelist_update", {"whitelist": signed(2, [inspectors.us, inspectors.us2])}))
        assert type(err.cause) is QuorumError
        await rec.handle_admin(inspectors.request(
            "whitelist_update", {"whitelist": signed(2, inspectors.quorum)}))
        assert rec.whitelist.current is not None and rec.whitelist.current.version == 2
        await rec.close()
        again = Recomputer(config)  # the stored v2 wins over the v1 given at start
        assert again.whitelist.current is not None and again.whitelist.current.version == 2
        await again.close()
    run(main())


def test_epsilon_reboot_schedule_and_key_rotation(config, inspectors, gateway) -> None:
    async def main() -> None:
        rec = Recomputer(config)
        await enrol(rec, inspectors, gateway)
        await rec.handle_admin(inspectors.request("set_epsilon", {"epsilon": 0.25}))
        await rec.handle_admin(inspectors.request("reboot_schedule", {"interval_s": 3600}))
        await rec.uplink(body(gateway.boot()))  # declares ε = 0.5
        assert [a["kind"] for a in await rec.alarms()] == ["epsilon_mismatch"]
        new = SigningKey.generate()
        await rec.handle_admin(inspectors.request(
            "rotate_key", {"device_id": gateway.gateway_id, "public_key": new.verify_key.hex}))
        ack = await rec.uplink(body(gateway.checkpoint()))  # still signed by the old key
        assert ack.results[0].ok is False and "SignatureError" in ack.results[0].error
        gateway.key = new
        assert (await rec.uplink(body(gateway.checkpoint()))).results[0].ok
        await rec.close()
        again = Recomputer(config)
        assert (again.ingest.epsilon, again.ingest.reboot_interval) == (0.25, 3600)
        assert again.ingest.devices[gateway.gateway_id].key.hex == new.verify_key.hex
        await again.close()
    run(main())


def test_admin_log_is_hash_chained_signed_and_append_only(config, inspectors) -> None:
    async def main() -> None:
        rec = Recomputer(config)
        client = TestClient(TestServer(make_app(rec)))
        await client.start_server()
        r = await client.post("/admin", data=inspectors.request("enrol_device", enrol_args()))
        assert r.status == 200
        r = await client.post("/admin", data=inspectors.request(
            "enrol_device", enrol_args(), signers=[inspectors.us]))
        answer = await r.json()
        assert r.status == 403 and answer["accepted"] is False and answer["log_seq"] == 2
        assert answer["error"]["type"] == "QuorumError"
        log = await (await client.get("/admin/log")).json()
        assert [(e["seq"], e["accepted"]) for e in log["entries"]] == [(1, True), (2, False)]
        ident = await (await client.get("/identity")).json()
        head = env.Envelope(**{**log["head"], "signatures": [
            env.Signature(**s) for s in log["head"]["signatures"]]})
        env.open_signed(head, "application/vnd.ivp.admin-log-head+json;v=1",
                        VerifyKey.from_hex(ident["public_key"]))
        await client.close()
        rows = Recomputer(config).store.admin_log()
        assert verify_log(rows) == log["entries"][-1]["hash"]
        # An edited or dropped entry breaks the chain ...
        edited = [(s, raw.replace(b'"accepted":false', b'"accepted":true'), h)
                  for s, raw, h in rows]
        with pytest.raises(ChainError, match="entry 2 was altered"):
            verify_log(edited)
        with pytest.raises(ChainError, match="expected entry 1"):
            verify_log(rows[1:])
        # ... and the store refuses to rewrite it at all.
        db = sqlite3.connect(config.state_dir / "recomputer.sqlite")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("UPDATE admin_log SET entry = ? WHERE seq = 2", (canonical({}),))
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("DELETE FROM admin_log")
    run(main())


def _boot_of(gw: ScriptedGateway) -> Any:
    from ivp.protocol.messages import BootRecord, manifest_digest

    return BootRecord(gateway_id=gw.gateway_id, boot_id=gw.boot_id,
                      model_id=gw.manifest.model_id, manifest_digest=manifest_digest(gw.manifest),
                      epsilon=gw.epsilon, time=time.time(), url=gw.url)


_ = Inspectors
