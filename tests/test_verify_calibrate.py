"""Calibration: reproducible δ, a manifest that carries it, and the only way it reaches
gateways — a new whitelist version signed under the quorum policy."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from ivp.errors import QuorumError
from ivp.protocol.encoding import decode
from ivp.protocol.keys import SigningKey
from ivp.protocol.messages import Manifest, SamplingParams, Whitelist
from ivp.protocol.quorum import InspectorKey, QuorumPolicy
from ivp.verify import calibrate as cal
from ivp.verify.prompts import CALIBRATION, encode_prompts
from ivp.verify.serving import ServingConfig
from ivp.whitelist import TrustedWhitelist, make_manifest, sign_whitelist

US = SigningKey.from_seed(b"\x11" * 32)
CN = SigningKey.from_seed(b"\x22" * 32)
POLICY = QuorumPolicy(
    threshold=2,
    keys=[InspectorKey(keyid=k.keyid, party=p, public_key=k.verify_key.hex)
          for k, p in ((US, "US"), (CN, "CN"))],
    required_parties=["US", "CN"],
)
PARAMS = (SamplingParams(temperature=1.0, max_tokens=6),
          SamplingParams(temperature=0.7, top_k=40, top_p=0.9, max_tokens=6))
CONFIGS = (ServingConfig(1, 1), ServingConfig(4, 2))


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    from ivp.engine.loading import load_from_dir
    from ivp.engine.reference import ReferenceEngine

    return ReferenceEngine(*load_from_dir(tiny_model_dir))


def _measure(engine) -> cal.Calibration:
    prompts = encode_prompts(engine.tokenizer, CALIBRATION[:3], chat=False)
    return cal.measure(engine, cal.calibration_requests(prompts, PARAMS), CONFIGS, (1, 4))


def test_calibration_is_reproducible(engine) -> None:
    a, b = _measure(engine), _measure(engine)
    assert a.delta == b.delta and a.observed == b.observed
    np.testing.assert_array_equal(a.row_span, b.row_span)
    assert a.method() == b.method()
    assert 0 < a.observed < 1e-3  # honest CPU nondeterminism exists, and it is tiny
    assert a.delta >= a.safety * a.observed and a.delta >= a.extrapolated
    assert a.samples == sum(s.rows for s in a.sources)
    assert {s.serving for s in a.sources} == {c.name for c in CONFIGS}


def test_tail_extrapolation() -> None:
    rng = np.random.default_rng(0)
    x = rng.exponential(1e-6, size=10_000)
    est = cal.tail_extrapolation(x, horizon=1e12)
    # exponential tail: max over N ≈ β ln N = 1e-6 · 27.6
    assert 20e-6 < est < 35e-6
    assert cal.tail_extrapolation(np.zeros(0)) == 0.0


def test_calibrated_delta_reaches_gateways_only_in_a_quorum_signed_whitelist(
        engine, tiny_model_dir: Path) -> None:
    result = _measure(engine)
    manifest = cal.calibrated_manifest(tiny_model_dir, "tiny", result)
    assert manifest.noise_bound is not None
    assert manifest.noise_bound.delta == result.delta
    assert manifest.noise_bound.samples == result.samples
    assert "GPU server not measured" in manifest.noise_bound.method
    # same files as the uncalibrated manifest: only the noise bound differs
    assert manifest.files == make_manifest(tiny_model_dir, "tiny").files

    now = time.time()
    trusted = TrustedWhitelist(POLICY)
    v1 = Whitelist(version=1, expires=now + 3600, manifests=[make_manifest(tiny_model_dir,
                                                                           "tiny")])
    trusted.update(sign_whitelist(v1, [US, CN]).to_bytes(), now)
    v2 = Whitelist(version=2, expires=now + 3600, manifests=[manifest])
    with pytest.raises(QuorumError):  # one party cannot change δ alone
        trusted.update(sign_whitelist(v2, [US]).to_bytes(), now)
    assert trusted.current is not None and trusted.current.version == 1
    assert trusted.manifest("tiny", now).noise_bound is None  # state unchanged
    trusted.update(sign_whitelist(v2, [US, CN]).to_bytes(), now)
    nb = trusted.manifest("tiny", now).noise_bound
    assert nb is not None and nb.delta == result.delta


def test_calibrate_cli_writes_the_manifest(tiny_model_dir: Path, tmp_path: Path) -> None:
    from ivp.cli import app

    out = tmp_path / "tiny.manifest.json"
    res = CliRunner().invoke(app, [
        "calibrate", str(tiny_model_dir), "--model-id", "tiny", "--manifest-out", str(out),
        "--prompts", "2", "--max-tokens", "4", "--batch-sizes", "1,3", "--threads", "1",
        "--json"])
    assert res.exit_code == 0, res.output
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    manifest = decode(out.read_bytes(), Manifest)
    assert manifest.noise_bound is not None
    assert manifest.noise_bound.delta == figures["delta"] > 0
    bad = CliRunner().invoke(app, ["calibrate", str(tiny_model_dir), "--model-id", "tiny",
                                   "--manifest-out", str(out), "--batch-sizes", "x"])
    assert bad.exit_code == 2


def test_calibrate_prices_false_alarms_and_refuses_a_profile_above_the_bar(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The figures carry the expected honest false alarms per temperature; a profile whose
    honest messages would fail more often than --max-false-alarm gets no manifest (exit 3,
    the reason named), and nothing already at --manifest-out is touched."""
    from ivp.cli import app
    from ivp.verify import views

    args = ["calibrate", str(tiny_model_dir), "--model-id", "tiny", "--prompts", "2",
            "--max-tokens", "4", "--batch-sizes", "1,3", "--threads", "1", "--json"]
    out = tmp_path / "ok.json"
    res = CliRunner().invoke(app, [*args, "--manifest-out", str(out)])
    assert res.exit_code == 0, res.output
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    temps = [a["temperature"] for a in figures["false_alarms"]]
    assert temps[0] == 0.0 and 1.0 in temps
    assert 0.0 <= figures["worst_false_alarm_per_message"] <= 1e-3 and out.is_file()

    real = views.false_alarm_table

    def noisy(rec: Any, delta: float, max_tokens: int) -> list[dict[str, Any]]:
        rows = real(rec, delta, max_tokens)
        rows[-1] = rows[-1] | {"per_message": 0.37}  # as bf16 vLLM against an fp32 replay
        return rows

    monkeypatch.setattr(views, "false_alarm_table", noisy)
    kept = tmp_path / "kept.json"
    kept.write_bytes(b"previous manifest")
    res = CliRunner().invoke(app, [*args, "--manifest-out", str(kept)])
    assert res.exit_code == 3
    assert "no manifest written" in res.output and "0.37" in res.output
    assert kept.read_bytes() == b"previous manifest"
    assert json.loads(res.stdout.strip().splitlines()[0])["manifest"] is None
    res = CliRunner().invoke(app, [*args, "--manifest-out", str(kept), "--max-false-alarm", "1"])
    assert res.exit_code == 0 and kept.read_bytes() != b"previous manifest"


def test_sweep_schedule_rotates_requests_in_whole_batches() -> None:
    configs = (ServingConfig(1, 1), ServingConfig(3, 2), ServingConfig(8, 1, "eager"))
    plan = cal.schedule(10, configs, per_config=4)
    assert [len(p) for p in plan] == [4, 6, 8]  # at least 4, a whole number of batches
    assert plan[1][0] == 4 and plan[2][0] == 0  # each config starts where the last stopped
    assert sorted({i for p in plan for i in p}) == list(range(10))
    assert cal.schedule(5, configs, None) == [list(range(5))] * 3


def test_sweep_resumes_from_its_checkpoint(engine, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each source is stored whole; a rerun serves nothing and gives the same δ, the
    same records, and the half-span is what δ bounds (never above the absolute max)."""
    from ivp.verify.serving import ServingPath

    prompts = encode_prompts(engine.tokenizer, CALIBRATION[:4], chat=False)
    configs = (ServingConfig(1, 1), ServingConfig(3, 2, "eager"))
    kwargs = dict(per_config=3, kept_per_batch=2, records=True, checkpoint=tmp_path)
    first = cal.measure(engine, cal.calibration_requests(prompts, PARAMS), configs, **kwargs)
    assert len(list(tmp_path.glob("*.npz"))) == 2 and not list(tmp_path.glob(".*"))
    assert first.records is not None and first.records.positions == first.samples
    assert {s.serving for s in first.sources} == {"batch 1, 1 thread",
                                                  "batch 3, 2 threads, eager"}
    assert all(s.max_span <= s.max_abs for s in first.sources)
    assert "sdpa/eager" in first.method() or "eager/sdpa" in first.method()
    monkeypatch.setattr(ServingPath, "serve", lambda *a, **k: pytest.fail("served again"))
    again = cal.measure(engine, cal.calibration_requests(prompts, PARAMS), configs, **kwargs)
    assert again.delta == first.delta
    np.testing.assert_array_equal(again.records.span, first.records.span)
