"""`ivp gateway` / `ivp upload` command lines (in-process, no server started)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from test_gateway_rig import tiny
from typer.testing import CliRunner

from ivp.cli import app
from ivp.protocol.encoding import canonical
from ivp.protocol.keys import SigningKey
from ivp.protocol.messages import Whitelist
from ivp.whitelist import sign_whitelist


def test_print_identity_is_stable(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["gateway", "--state", str(tmp_path), "--gateway-id", "gw-x", "--print-identity"]
    first = json.loads(runner.invoke(app, args).stdout.strip().splitlines()[-1])
    second = json.loads(runner.invoke(app, args).stdout.strip().splitlines()[-1])
    assert first == second and first["gateway_id"] == "gw-x"
    assert len(first["public_key"]) == 64 and len(first["keyid"]) == 32
    default = runner.invoke(app, ["gateway", "--state", str(tmp_path), "--print-identity"])
    assert json.loads(default.stdout)["gateway_id"] == "gw-" + first["keyid"][:12]


def test_gateway_refuses_to_start_on_a_bad_whitelist(tmp_path: Path,
                                                      tiny_model_dir: Path) -> None:
    model = tiny(tiny_model_dir)
    (tmp_path / "policy.json").write_bytes(canonical(model.policy))
    forged = sign_whitelist(Whitelist(version=1, expires=time.time() + 60,
                                      manifests=[model.manifest]), [SigningKey.generate()])
    expired = model.signed_whitelist(1, expires=time.time() - 1)
    runner = CliRunner()
    for name, data, why in (("forged", forged.to_bytes(), "signature"),
                            ("expired", expired, "expired"), ("junk", b"{", "Envelope")):
        (tmp_path / name).write_bytes(data)
        result = runner.invoke(app, ["gateway", "--state", str(tmp_path / "s"), "--policy",
                                     str(tmp_path / "policy.json"), "--whitelist",
                                     str(tmp_path / name), "--port", "0",
                                     "--recomputer-key", "ab" * 32])
        assert result.exit_code == 2, (name, result.output)
        assert why in result.output, (name, result.output)
    result = runner.invoke(app, ["gateway", "--state", str(tmp_path / "s")])
    assert result.exit_code == 2 and "--whitelist" in result.output


def test_upload_command_reports_an_unreachable_gateway(tmp_path: Path,
                                                       tiny_model_dir: Path) -> None:
    result = CliRunner().invoke(app, ["upload", "http://127.0.0.1:9", str(tiny_model_dir),
                                      "--model-id", "tiny"])
    assert result.exit_code == 2 and "unreachable" in result.output
