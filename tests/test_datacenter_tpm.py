"""A live loopback datacenter whose gateway and recomputer keep their keys in TPMs
(swtpm): the gateway enrolled by its P-256 public key, every record it signs made by
its TPM, sealed to the recomputer's TPM-derived KEM key, accepted and verified like an
Ed25519 gateway's; the recomputer's acks and seals made by its own TPM."""

from __future__ import annotations

from pathlib import Path

from ivp.datacenter import LoopbackDatacenter
from ivp.device.swtpm import Swtpm


def test_tpm_gateway_is_enrolled_audited_and_passes(tmp_path: Path, swtpm: Swtpm) -> None:
    swtpm.stop()  # the fixture only proves swtpm is here; each gateway gets its own
    with LoopbackDatacenter(tmp_path / "dc", gateways=1, epsilon=1.0, device="tpm") as dc:
        [h] = dc.handles
        assert h.public_key.startswith("ecdsa-p256:")
        assert not (h.state_dir / "device" / "uid.secret").exists()  # no key file at all
        assert dc.recomputer_key.startswith("ecdsa-p256:")  # the gateway obeys that key
        assert not (dc.root / "recomputer" / "device" / "uid.secret").exists()
        answers = dc.send(6, concurrency=2, max_tokens=8)
        assert all(a["status"] == 200 for a in answers), answers[:2]
        dc.drain()
        verdicts = dc.verdicts()
        assert len(verdicts) == 6 and all(v["passed"] for v in verdicts), verdicts[:2]
        assert dc.alarms() == []
