"""The recomputer on a TPM (``ivp recomputer --device tpm``), against swtpm: its signing
key, the seal key of its store and its uplink KEM key exist only inside the TPM, so
root who reads the recomputer's files can neither sign as it, seal a forged row nor
open a sealed uplink body."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_recomputer_support import (
    Inspectors,
    ScriptedGateway,
    body,
    enrol,
    enrol_then_write_rogue,
    results,
    run,
)

from ivp.device.swtpm import Swtpm
from ivp.errors import BrickedError
from ivp.protocol import envelope as env
from ivp.protocol.acks import UplinkAck
from ivp.protocol.encoding import decode
from ivp.protocol.hpke import UPLINK_INFO, seal_message
from ivp.protocol.keys import P256, VerifyKey
from ivp.recomputer.seal import SEAL_PURPOSE
from ivp.recomputer.service import Recomputer

pytest_plugins = ("test_recomputer_support",)


def _files(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())


def test_recomputer_keys_live_in_the_tpm(config: Any, inspectors: Inspectors,
                                         gateway: ScriptedGateway, swtpm: Swtpm) -> None:
    """P-256 identity made by the TPM; no key of the device in any file of its state;
    a signed ack verifies under the published key; a sealed uplink body opens."""
    config = dataclasses.replace(config, device="tpm", tpm=swtpm.tcti)

    async def main() -> None:
        rec = Recomputer(config)
        ident = rec.identity()
        key = VerifyKey.from_hex(ident["public_key"])
        assert key.scheme == P256
        await enrol(rec, inspectors, gateway)
        sealed = seal_message(bytes.fromhex(ident["kem_public_key"]), UPLINK_INFO,
                              body(gateway.boot()))
        ack = await rec.uplink(sealed, sealed=True)
        assert results(ack) == [(True, "")]
        assert ack.signed is not None  # signed inside the TPM, under the published key
        receipt = decode(env.open_signed(ack.signed, env.ACK, key), UplinkAck)
        assert receipt.gateway_id == gateway.gateway_id
        seal_key = rec.device.derive_key(SEAL_PURPOSE)
        await rec.close()
        state = _files(config.state_dir / "device")
        assert sorted(p.name for p in (config.state_dir / "device").iterdir()) == ["tpm.json"]
        assert seal_key not in _files(config.state_dir) and seal_key.hex().encode() not in state
    run(main())


def test_written_row_refused_and_a_copied_store_trusts_nothing(
        config: Any, inspectors: Inspectors, gateway: ScriptedGateway, swtpm: Swtpm,
        tmp_path: Path, tiny_engine: Any, tiny_manifest: Any) -> None:
    """The seal under a TPM key: a row written with the sqlite3 shell is refused with
    store_tampered; the whole state directory copied next to another TPM is a
    stranger there (the keys, the seal's among them, never left the first TPM)."""
    config = dataclasses.replace(config, device="tpm", tpm=swtpm.tcti)
    rogue = ScriptedGateway("rogue-gw", tiny_engine, tiny_manifest)

    async def main() -> None:
        await enrol_then_write_rogue(config, inspectors, gateway, rogue)
        copy = tmp_path / "copied-state"
        shutil.copytree(config.state_dir, copy)
        second = Recomputer(config)
        assert set(second.ingest.devices) == {"gw-a"}
        alarms = [a for a in await second.alarms() if a["kind"] == "store_tampered"]
        assert len(alarms) == 1 and "rogue-gw" in alarms[0]["detail"], alarms
        assert results(await second.uplink(body(rogue.boot())))[0][0] is False
        await second.close()
        with Swtpm(tmp_path / "other-tpm") as other:  # the operator's own TPM
            moved = dataclasses.replace(config, state_dir=copy, tpm=other.tcti)
            with pytest.raises(BrickedError):  # a stranger: it neither signs nor seals
                Recomputer(moved)
    run(main())


def test_print_identity_reads_the_tpm(tmp_path: Path, swtpm: Swtpm) -> None:
    from typer.testing import CliRunner

    from ivp.cli import app

    args = ["recomputer", "--state", str(tmp_path / "rc"), "--device", "tpm", "--tpm",
            swtpm.tcti, "--print-identity"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    ident = json.loads(first.output.strip().splitlines()[-1])
    assert ident["public_key"].startswith("ecdsa-p256:") and len(ident["kem_public_key"]) == 64
    again = json.loads(CliRunner().invoke(app, args).output.strip().splitlines()[-1])
    assert again == ident  # the same TPM, the same keys
    soft = CliRunner().invoke(app, ["recomputer", "--state", str(tmp_path / "rc"),
                                    "--print-identity"])
    assert soft.exit_code != 0 or json.loads(
        soft.output.strip().splitlines()[-1])["public_key"] != ident["public_key"]


def test_restored_state_dir_is_caught_by_the_tpm_counter(
        config: Any, inspectors: Inspectors, gateway: ScriptedGateway, swtpm: Swtpm,
        tmp_path: Path) -> None:
    """With ``--device tpm`` the counter is the TPM's NV counter: putting back an older
    copy of the WHOLE state directory (store, notices, device dir) sets nothing back
    there, so the store is refused (with soft it goes unseen:
    test_recomputer_rollback.py)."""
    config = dataclasses.replace(config, device="tpm", tpm=swtpm.tcti)

    async def main() -> None:
        first = Recomputer(config)
        await enrol(first, inspectors, gateway)
        await first.close()
        copy = tmp_path / "state-copy"
        shutil.copytree(config.state_dir, copy)
        second = Recomputer(config)
        assert not second.locked  # an honest restart
        await second.handle_admin(inspectors.request("set_epsilon", {"epsilon": 0.5}))
        await second.close()
        shutil.rmtree(config.state_dir)
        shutil.copytree(copy, config.state_dir)
        third = Recomputer(config)
        check = third.store.rollback
        assert third.locked and check is not None and check.verdict == "rolled_back"
        # the ε commit and its confirmation (the admin answer left after both)
        assert check.device - (check.log or 0) == 2
        alarms = [a for a in await third.alarms() if a["kind"] == "store_rolled_back"]
        assert len(alarms) == 1 and f"the device is at {check.device}" in alarms[0]["detail"]
        assert third.ingest.epsilon is None  # the stale state, not served
        await third.close()
    run(main())
