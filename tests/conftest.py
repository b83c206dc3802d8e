"""Shared fixtures: one live loopback datacenter for the whole session, tiny models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests that run in vLLM's environment (tests/test_vllm.py starts them there).
collect_ignore = ["vllm_side"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ivp.engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def datacenter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A recomputer and two gateways (each powering a server) on 127.0.0.1.

    Shared by every integration test: tests must not shut its gateways down or leave
    it in a state the next test would trip over (use a private datacenter for that).
    """
    from ivp.demo.datacenter import LoopbackDatacenter

    dc = LoopbackDatacenter(tmp_path_factory.mktemp("datacenter"), gateways=2, epsilon=0.5)
    with dc:
        yield dc


def _tpm_missing() -> str | None:
    """Why the TPM tests cannot run here (None: they can)."""
    import importlib.util
    import shutil

    if shutil.which("swtpm") is None:
        return "swtpm is not installed (scripts/system-deps.sh installs it)"
    if importlib.util.find_spec("tpm2_pytss") is None:
        return "tpm2-pytss is not installed (make .venv/.installed installs it)"
    return None


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[object]:
    """A fresh software TPM of this test's own (stopped after it). Skipped where swtpm is
    missing on a developer's machine; in CI (CI=true, where make installs it) a missing
    swtpm fails the test instead."""
    import os

    from ivp.device.swtpm import Swtpm

    missing = _tpm_missing()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    with Swtpm(tmp_path / "swtpm") as tpm:
        yield tpm
