"""`ivp recomputer` and `ivp admin`: build, sign separately, send, read the log."""

from __future__ import annotations

import json
import time
from pathlib import Path

from test_recomputer_support import Inspectors
from typer.testing import CliRunner

from ivp.cli import app
from ivp.protocol.encoding import canonical
from ivp.protocol.keys import SigningKey

PASSPHRASE = "inspector passphrase"
runner = CliRunner(env={"IVP_KEY_PASSPHRASE": PASSPHRASE})

pytest_plugins = ("test_recomputer_support",)


def keyfiles(tmp_path: Path, inspectors: Inspectors) -> dict[str, str]:
    out = {}
    for name, key in (("us", inspectors.us), ("cn", inspectors.cn)):
        path = tmp_path / f"{name}.key"
        key.save(path, passphrase=PASSPHRASE.encode())
        out[name] = str(path)
    return out


def test_print_identity(tmp_path: Path) -> None:
    result = runner.invoke(app, ["recomputer", "--state", str(tmp_path), "--print-identity"])
    assert result.exit_code == 0, result.output
    ident = json.loads(result.output)
    assert len(ident["public_key"]) == 64 and len(ident["keyid"]) == 32
    again = runner.invoke(app, ["recomputer", "--state", str(tmp_path), "--print-identity"])
    assert json.loads(again.output) == ident  # the key lives in the device, stable


def test_recomputer_refuses_to_start_on_an_under_signed_whitelist(tmp_path, inspectors,
                                                                  tiny_manifest) -> None:
    from ivp.protocol.messages import Whitelist
    from ivp.whitelist import sign_whitelist

    policy = tmp_path / "policy.json"
    policy.write_bytes(canonical(inspectors.policy))
    wl = tmp_path / "wl.json"
    wl.write_bytes(sign_whitelist(Whitelist(version=1, expires=time.time() + 60,
                                            manifests=[tiny_manifest]),
                                  [inspectors.us]).to_bytes())
    result = runner.invoke(app, ["recomputer", "--state", str(tmp_path / "rc"), "--policy",
                                 str(policy), "--whitelist", str(wl), "--port", "0"])
    assert result.exit_code == 2
    assert "refuses to start: QuorumError" in result.output


def test_admin_enrol_in_one_go(live, tmp_path, inspectors) -> None:
    url, rec = live
    keys = keyfiles(tmp_path, inspectors)
    device = SigningKey.generate()
    result = runner.invoke(app, [
        "admin", "enrol", url, "--device-id", "gw-a", "--public-key", device.verify_key.hex,
        "--url", "http://127.0.0.1:9", "--key", keys["us"], "--key", keys["cn"]])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["accepted"] is True
    assert "gw-a" in rec.ingest.devices


def test_admin_parties_sign_separately_then_send(live, tmp_path, inspectors) -> None:
    url, rec = live
    keys = keyfiles(tmp_path, inspectors)
    request = tmp_path / "req.json"
    result = runner.invoke(app, ["admin", "request", "set_epsilon", "--args",
                                 '{"epsilon": 0.05}', "--out", str(request),
                                 "--key", keys["us"]])
    assert result.exit_code == 0, result.output
    # One party alone is refused (exit 1, reason printed) ...
    result = runner.invoke(app, ["admin", "send", url, str(request)])
    assert result.exit_code == 1 and "no signature from party CN" in result.output
    # ... the other party countersigns the same file, and the request goes through.
    result = runner.invoke(app, ["admin", "sign", str(request), "--key", keys["cn"]])
    assert result.exit_code == 0 and "2 signature(s)" in result.output
    result = runner.invoke(app, ["admin", "send", url, str(request)])
    assert result.exit_code == 0, result.output
    assert rec.ingest.epsilon == 0.05
    result = runner.invoke(app, ["admin", "log", url])
    assert result.exit_code == 0, result.output
    assert "chain ok: 2 entries" in result.output
    assert "refused  set_epsilon" in result.output and "ACCEPTED set_epsilon" in result.output


def test_admin_key_needs_its_passphrase(live, tmp_path, inspectors) -> None:
    """An inspector key file at rest is encrypted: without the passphrase it signs
    nothing, and the request never leaves (the recomputer's log does not move)."""
    url, rec = live
    keys = keyfiles(tmp_path, inspectors)
    before = rec.ingest.epsilon
    for env, text in (({"IVP_KEY_PASSPHRASE": None}, "is encrypted"),
                      ({"IVP_KEY_PASSPHRASE": "guess"}, "wrong passphrase")):
        result = CliRunner(env=env).invoke(app, [
            "admin", "set-epsilon", url, "--epsilon", "0.07", "--key", keys["us"],
            "--key", keys["cn"]])
        assert result.exit_code == 2 and text in result.output, result.output
    assert rec.ingest.epsilon == before


def test_admin_request_outside_the_list_is_refused_locally(tmp_path) -> None:
    result = runner.invoke(app, ["admin", "request", "format_disk", "--out",
                                 str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "not on the closed list" in result.output
