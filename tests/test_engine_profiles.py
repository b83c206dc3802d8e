"""The whitelist names the engine: one manifest per (model, engine, dtype), each with its δ.

The gateway's deployment (``--engine``, ``--dtype``, set by the inspectors) picks the
profile; a profile the whitelist does not name never boots; the server refuses a
manifest for another engine; the recomputer judges each boot under the δ of the
profile its BOOT names. Manifests from before engines existed stay valid.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_gateway_rig import MODEL_ID, make_rig, run, started, tiny

from ivp.errors import ValidationError
from ivp.gateway.core import State
from ivp.gateway.errors import UnknownModelError
from ivp.protocol.encoding import canonical, decode
from ivp.protocol.messages import Manifest, NoiseBound, Whitelist, manifest_digest
from ivp.whitelist import make_manifest


def profile(model_dir: Path, engine: str, dtype: str, delta: float) -> Manifest:
    return make_manifest(model_dir, MODEL_ID, engine=engine, dtype=dtype,
                         noise_bound=NoiseBound(delta=delta, method="test", samples=1))


def test_manifest_without_an_engine_is_the_reference_engines(tiny_model_dir: Path) -> None:
    """Old manifests (no ``engine`` field) decode as the reference engine's."""
    manifest = make_manifest(tiny_model_dir, MODEL_ID)
    old = json.loads(canonical(manifest))
    del old["engine"]
    again = decode(json.dumps(old).encode(), Manifest)
    assert again.engine == "reference" and again == manifest


def test_whitelist_holds_one_manifest_per_profile(tiny_model_dir: Path) -> None:
    ref = make_manifest(tiny_model_dir, MODEL_ID)
    vllm32 = profile(tiny_model_dir, "vllm", "float32", 1e-4)
    vllm16 = profile(tiny_model_dir, "vllm", "bfloat16", 0.5)
    wl = Whitelist(version=1, expires=2e9, manifests=[vllm32, ref, vllm16])
    assert wl.manifest(MODEL_ID) == ref  # the reference engine's first
    assert wl.manifest(MODEL_ID, "vllm", "bfloat16") == vllm16
    assert wl.manifest(MODEL_ID, "sglang") is None
    assert wl.manifests_for(MODEL_ID) == [vllm32, ref, vllm16]
    with pytest.raises(ValueError, match="unique"):
        Whitelist(version=1, expires=2e9, manifests=[vllm32, vllm32])
    doubled = json.loads(canonical(wl))
    doubled["manifests"].append(doubled["manifests"][0])
    with pytest.raises(ValidationError, match="unique"):
        decode(json.dumps(doubled).encode(), Whitelist)


def test_gateway_refuses_to_boot_an_engine_the_whitelist_does_not_name(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """Deployment error or attack: a server on an engine nobody calibrated. Refused before
    the server is touched; the gateway stays in UPLOAD."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, engine="vllm"))
        cycles = rig.power.cycles
        with pytest.raises(UnknownModelError, match="whitelisted only for reference/float32"):
            await rig.upload()
        assert rig.power.cycles == cycles and rig.gw.state is State.UPLOAD
        assert rig.server.manifest is None  # nothing reached the server
        await rig.gw.close()
    run(body())


def test_gateway_boots_the_profile_of_its_deployment(tmp_path: Path,
                                                     tiny_model_dir: Path) -> None:
    """The server receives the vLLM manifest, and the BOOT names its digest (its δ)."""
    model = tiny(tiny_model_dir)
    vllm = profile(tiny_model_dir, "vllm", "float32", 1e-4)
    wl = model.signed_whitelist(2, [model.manifest, vllm])

    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, engine="vllm",
                                     whitelist_bytes=wl))
        result = await rig.upload()
        assert result["state"] == "serving"
        assert rig.server.manifest == vllm
        await rig.gw.uplink.flush_once()  # type: ignore[union-attr]
        [boot] = rig.recomputer.boots
        assert boot.manifest_digest == manifest_digest(vllm) != manifest_digest(model.manifest)
        await rig.gw.close()
    run(body())


def test_gateway_without_a_dtype_refuses_an_ambiguous_profile(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    model = tiny(tiny_model_dir)
    wl = model.signed_whitelist(2, [profile(tiny_model_dir, "vllm", "float32", 1e-4),
                                    profile(tiny_model_dir, "vllm", "bfloat16", 0.5)])

    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, engine="vllm",
                                     whitelist_bytes=wl))
        with pytest.raises(UnknownModelError, match="must name one"):
            await rig.upload()
        assert rig.gw.state is State.UPLOAD and rig.server.manifest is None
        await rig.gw.close()
    run(body())


def test_server_refuses_a_manifest_for_another_engine(tiny_model_dir: Path) -> None:
    from test_server import LiveServer, call

    live = LiveServer()
    try:
        status, answer = call(live.url + "/boot/manifest",
                              canonical(profile(tiny_model_dir, "vllm", "float32", 1e-4)))
        assert status == 400
        assert "runs the reference engine" in answer["error"]["message"]
        assert live.server.state == "empty"
    finally:
        live.close()


def test_recomputer_judges_each_profile_under_its_own_delta(tiny_model_dir: Path) -> None:
    """Two profiles of one model share one replay engine but not their δ."""
    from ivp.recomputer.workers import ModelSource, Verifier
    from ivp.whitelist.manifest import read_model_files

    ref = profile(tiny_model_dir, "reference", "float32", 1e-6)
    vllm = profile(tiny_model_dir, "vllm", "float32", 3e-4)
    verifier = Verifier([ModelSource(m, read_model_files(tiny_model_dir, m)) for m in (ref, vllm)])
    (_, e1, p1), (_, e2, p2) = (verifier._models[manifest_digest(m)] for m in (ref, vllm))
    assert e1 is e2
    assert (p1.delta, p2.delta) == (1e-6, 3e-4)
