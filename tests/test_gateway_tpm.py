"""A gateway whose device is a TPM (swtpm): the records it signs carry ECDSA P-256
signatures made inside the TPM, its log is sealed under a TPM-bound key, and a tamper
clears the TPM so that the gateway stays bricked."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_gateway_rig import COMPLETION, flush, make_rig, run, started

from ivp.device import SoftDevice
from ivp.device.swtpm import Swtpm
from ivp.device.tpm import TpmDevice
from ivp.errors import BrickedError, PeerDataError
from ivp.gateway.core import State
from ivp.protocol import chain


def test_gateway_signs_every_record_in_the_tpm(tmp_path: Path, tiny_model_dir: Path,
                                               swtpm: Swtpm) -> None:
    async def body() -> None:
        device = TpmDevice(tmp_path / "device", swtpm.tcti)
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0, device=device))
        boot_id = (await rig.upload())["boot_id"]
        replies = await asyncio.gather(*(rig.gw.complete("completions", COMPLETION)
                                         for _ in range(6)))
        for r in replies:
            await r.after_release()
        cp = await rig.gw.checkpoint()
        await flush(rig)
        # The fake recomputer checked each envelope against the TPM's P-256 public key.
        assert rig.recomputer.gateway_key == device.public_key
        assert device.public_key.scheme == "ecdsa-p256"
        assert [b.boot_id for b in rig.recomputer.boots] == [boot_id]
        assert sorted(a.audit_seq for a in rig.recomputer.audits) == list(range(1, 7))
        head = chain.genesis("gw-test", boot_id)
        by_prev = {a.chain_prev: a for a in rig.recomputer.audits}
        for _ in range(6):
            head = by_prev[head].chain_head
        assert cp is not None and cp.chain_head == head
        await rig.gw.close()
        device.close()
    run(body())


def test_log_is_sealed_under_the_tpm(tmp_path: Path, tiny_model_dir: Path,
                                     swtpm: Swtpm) -> None:
    """After a restart on the same TPM the sealed log opens; with a software device on
    the same disk (the operator's copy of the state) it does not."""
    async def body() -> None:
        device = TpmDevice(tmp_path / "device", swtpm.tcti)
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0, device=device,
                                     with_uplink=False))
        await rig.upload()
        r = await rig.gw.complete("completions", COMPLETION)
        await r.after_release()
        await rig.gw.close()
        device.close()
        again = TpmDevice(tmp_path / "device", swtpm.tcti)
        reopened = make_rig(tmp_path, tiny_model_dir, device=again, with_uplink=False)
        assert reopened.log.spool_batch()  # BOOT + audit, unsealed by the TPM's key
        reopened.log.close()
        again.close()
        stranger = make_rig(tmp_path, tiny_model_dir, device=SoftDevice(tmp_path / "soft"),
                            with_uplink=False)
        with pytest.raises(PeerDataError):
            stranger.log.spool_batch()
        stranger.log.close()
    run(body())


def test_tamper_clears_the_tpm_and_the_gateway_stays_bricked(
        tmp_path: Path, tiny_model_dir: Path, swtpm: Swtpm) -> None:
    async def body() -> None:
        device = TpmDevice(tmp_path / "device", swtpm.tcti)
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0, device=device,
                                     with_uplink=False))
        await rig.upload()
        assert (await rig.gw.tamper())["state"] == "bricked"
        assert not rig.server.powered
        with pytest.raises(BrickedError):
            await rig.gw.complete("completions", COMPLETION)
        await rig.gw.close()
        device.close()
        (tmp_path / "device" / "BRICKED").unlink()  # the operator removes the marker
        again_device = TpmDevice(tmp_path / "device", swtpm.tcti)
        assert again_device.bricked  # the TPM's seed is new: not this device's key
        again = await started(make_rig(tmp_path, tiny_model_dir, device=again_device,
                                       with_uplink=False))
        assert again.gw.state is State.BRICKED
        with pytest.raises(BrickedError):
            await again.upload()
        await again.gw.close()
    run(body())
