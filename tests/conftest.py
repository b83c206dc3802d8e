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
