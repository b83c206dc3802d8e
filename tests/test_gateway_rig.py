"""Shared rig for the gateway tests: a Gateway wired to in-memory peers (no tests here)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ivp.device import Device, SoftDevice
from ivp.gateway.core import Gateway, GatewayConfig
from ivp.gateway.log import PairLog
from ivp.gateway.testing import FakePower, FakeRecomputer, FakeServer
from ivp.protocol.encoding import canonical
from ivp.protocol.envelope import SHUTDOWN, sign
from ivp.protocol.keys import SigningKey
from ivp.protocol.messages import Manifest, Shutdown, Whitelist
from ivp.protocol.quorum import InspectorKey, QuorumPolicy
from ivp.whitelist import TrustedWhitelist, make_manifest, sign_whitelist

T = TypeVar("T")
MODEL_ID = "tiny"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def chunks(data: bytes, size: int = 1 << 16) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


@dataclass
class Model:
    """The tiny model's whitelisted manifest, its bytes, and the inspectors' keys."""

    manifest: Manifest
    blob: bytes
    inspector: SigningKey
    policy: QuorumPolicy
    whitelist_bytes: bytes

    def file_span(self, name: str) -> tuple[int, int]:
        pos = 0
        for f in self.manifest.files:
            if f.name == name:
                return pos, pos + f.size
            pos += f.size
        raise KeyError(name)

    def signed_whitelist(self, version: int, manifests: list[Manifest] | None = None,
                         expires: float | None = None) -> bytes:
        wl = Whitelist(version=version, expires=expires or time.time() + 3600,
                       manifests=manifests if manifests is not None else [self.manifest])
        return sign_whitelist(wl, [self.inspector]).to_bytes()


_MODELS: dict[Path, Model] = {}


def tiny(model_dir: Path) -> Model:
    if model_dir not in _MODELS:
        manifest = make_manifest(model_dir, MODEL_ID)
        blob = b"".join((model_dir / f.name).read_bytes() for f in manifest.files)
        key = SigningKey.generate()
        policy = QuorumPolicy(threshold=1, keys=[InspectorKey(
            keyid=key.keyid, party="US", public_key=key.verify_key.hex)])
        wl = Whitelist(version=1, expires=time.time() + 86400, manifests=[manifest])
        _MODELS[model_dir] = Model(manifest, blob, key, policy,
                                   sign_whitelist(wl, [key]).to_bytes())
    return _MODELS[model_dir]


@dataclass
class Rig:
    gw: Gateway
    server: FakeServer
    power: FakePower
    recomputer: FakeRecomputer
    device: Device
    log: PairLog
    model: Model
    recomputer_key: SigningKey
    state_dir: Path

    async def upload(self, data: bytes | None = None, model_id: str = MODEL_ID,
                     chunk: int = 1 << 16) -> dict[str, Any]:
        return await self.gw.upload(model_id, chunks(self.model.blob if data is None
                                                     else data, chunk))

    def shutdown_envelope(self, key: SigningKey | None = None, gateway_id: str = "gw-test",
                          reason: str = "audit failed") -> bytes:
        msg = Shutdown(gateway_id=gateway_id, reason=reason, time=time.time(),
                       nonce="0123456789abcdef0123")
        return sign(SHUTDOWN, canonical(msg), [key or self.recomputer_key]).to_bytes()


def make_rig(state_dir: Path, model_dir: Path, *, epsilon: float = 1.0,
             recomputer_key: SigningKey | None = None, with_uplink: bool = True,
             whitelist_bytes: bytes | None = None, server: FakeServer | None = None,
             device: Device | None = None, **config: Any) -> Rig:
    """A gateway on ``state_dir`` (reusing it restarts the same device and log); a
    software device unless ``device`` is given."""
    model = tiny(model_dir)
    device = device or SoftDevice(state_dir / "device")
    log = PairLog(state_dir / "log.sqlite", device)
    trusted = TrustedWhitelist(model.policy)
    trusted.update(whitelist_bytes or model.whitelist_bytes)
    server = server or FakeServer()
    power = FakePower(server)
    rc = FakeRecomputer(gateway_key=None if device.bricked else device.public_key)
    rkey = recomputer_key or SigningKey.from_seed(b"r" * 32)
    config.setdefault("checkpoint_interval", 0)
    gw = Gateway(GatewayConfig(gateway_id="gw-test", epsilon=epsilon, **config), device, log,
                 trusted, server, power, uplink=rc if with_uplink else None,
                 recomputer_key=rkey.verify_key)
    return Rig(gw, server, power, rc, device, log, model, rkey, state_dir)


async def started(rig: Rig, background_uplink: bool = False) -> Rig:
    """Start the gateway; by default the uplink is then driven by hand (:func:`flush`)."""
    await rig.gw.start()
    if rig.gw.uplink is not None and not background_uplink:
        await rig.gw.uplink.stop()
    return rig


async def flush(rig: Rig) -> None:
    """Let the uplink drain the spool (in-memory recomputer: immediate)."""
    assert rig.gw.uplink is not None
    while await rig.gw.uplink.flush_once():
        pass


COMPLETION = b'{"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 8}'
