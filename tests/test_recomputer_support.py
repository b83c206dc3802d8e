"""Shared helpers of the recomputer tests: inspectors, a scripted gateway, a recomputer.

No gateway process is needed: :class:`ScriptedGateway` generates honest pairs with the
reference engine on the tiny model, links them into the pair chain and signs BOOT,
CHECKPOINT and AUDIT envelopes with its own key, exactly as a gateway does.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ivp.protocol import envelope as env
from ivp.protocol.chain import genesis, link
from ivp.protocol.encoding import canonical, to_builtins
from ivp.protocol.keys import SigningKey
from ivp.protocol.messages import (
    AdminRequest,
    AuditRecord,
    BootClose,
    BootRecord,
    Checkpoint,
    Manifest,
    PairRecord,
    SamplingParams,
    Tag,
    Whitelist,
    manifest_digest,
)
from ivp.protocol.quorum import InspectorKey, QuorumPolicy

T = TypeVar("T")
MODEL_ID = "tiny-llama"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@dataclass
class Inspectors:
    us: SigningKey
    cn: SigningKey
    us2: SigningKey
    policy: QuorumPolicy

    @classmethod
    def create(cls) -> Inspectors:
        us, cn, us2 = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
        keys = [InspectorKey(keyid=k.keyid, party=p, public_key=k.verify_key.hex, name=n)
                for k, p, n in ((us, "US", "us-1"), (cn, "CN", "cn-1"), (us2, "US", "us-2"))]
        return cls(us, cn, us2, QuorumPolicy(threshold=2, keys=keys,
                                             required_parties=["US", "CN"]))

    @property
    def quorum(self) -> list[SigningKey]:
        return [self.us, self.cn]

    def request(self, instruction: str, args: dict[str, Any], *, ttl: float = 300.0,
                nonce: str | None = None, signers: list[SigningKey] | None = None,
                payload_type: str = env.ADMIN) -> bytes:
        req = AdminRequest(instruction=instruction, args=args,  # type: ignore[arg-type]
                           nonce=nonce or secrets.token_hex(16), expires=time.time() + ttl)
        keys = self.quorum if signers is None else signers
        return env.sign(payload_type, canonical(req), keys).to_bytes()


@dataclass
class ScriptedGateway:
    """Makes the signed records an honest gateway would send (or variations of them)."""

    gateway_id: str
    engine: Any
    manifest: Manifest
    key: SigningKey = field(default_factory=SigningKey.generate)
    url: str = "http://127.0.0.1:9"
    epsilon: float = 0.5
    boot_id: str = "boot-1"
    pair_seq: int = 0
    audit_seq: int = 0
    pos: int = 0  # pairs linked into the chain (only audited ones, here)
    head: str = ""
    counter: int = 0  # the device's monotonic counter
    boot_counter: int = 0  # the counter the current boot's BOOT states
    booted: bool = False
    previous: BootClose | None = None
    boot_time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.head = genesis(self.gateway_id, self.boot_id)

    def sign(self, payload_type: str, message: object, key: SigningKey | None = None) -> dict:
        return to_builtins(env.sign_message(payload_type, message, key or self.key))

    def boot(self, boot_id: str | None = None, **changes: Any) -> dict:
        """The BOOT of ``boot_id`` (or the current boot again), naming the previous
        boot's closing state and the next device counter, as a gateway does."""
        if boot_id is not None and boot_id != self.boot_id:
            self.previous = BootClose(boot_id=self.boot_id, pairs_served=self.pos,
                                      audits=self.audit_seq, chain_head=self.head,
                                      counter=self.counter) if self.booted else None
            self.boot_id, self.pair_seq, self.audit_seq, self.pos = boot_id, 0, 0, 0
            self.head = genesis(self.gateway_id, boot_id)
            self.boot_counter = 0
        if not self.boot_counter:
            self.counter += 1
            self.boot_counter = self.counter
        self.booted = True
        fields = dict(gateway_id=self.gateway_id, boot_id=self.boot_id,
                      model_id=self.manifest.model_id,
                      manifest_digest=manifest_digest(self.manifest), epsilon=self.epsilon,
                      time=self.boot_time, url=self.url, counter=self.boot_counter,
                      previous=self.previous)
        fields.update(changes)
        return self.sign(env.BOOT, BootRecord(**fields))

    def checkpoint(self, pairs_served: int | None = None, audits: int | None = None,
                   **changes: Any) -> dict:
        self.counter += 1
        fields: dict[str, Any] = dict(
            gateway_id=self.gateway_id, boot_id=self.boot_id,
            pairs_served=self.pos if pairs_served is None else pairs_served,
            audits=self.audit_seq if audits is None else audits, chain_head=self.head,
            time=time.time(), counter=self.counter)
        fields.update(changes)
        return self.sign(env.CHECKPOINT, Checkpoint(**fields))

    def pair(self, prompt: str = "The quick brown fox", *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, max_tokens: int = 12,
             seed: int | None = None) -> PairRecord:
        """Serve one honest pair (generation under sampler spec v1) and chain it."""
        tok = self.engine.tokenizer
        ids = tok.encode(prompt)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                max_tokens=max_tokens)
        seed = secrets.randbits(64) if seed is None else seed
        gen = self.engine.generate(ids, params, seed)
        pair = PairRecord(
            tag=Tag(self.gateway_id, self.boot_id, self.pair_seq), model_id=self.manifest.model_id,
            endpoint="completions", input=prompt, prompt_token_ids=ids,
            output_token_ids=gen.token_ids,
            output_text=tok.decode(gen.token_ids, skip_special_tokens=True),
            finish_reason=gen.finish_reason, seed=seed, params=params,
            t_request=time.time(), t_response=time.time())
        self.pair_seq += 1
        return pair

    def audit(self, pair: PairRecord | None = None, **pair_kw: Any) -> dict:
        """Chain ``pair`` (or a fresh honest one) and wrap it as the next audit record."""
        pair = pair or self.pair(**pair_kw)
        prev = self.head
        self.head = link(prev, pair)
        self.audit_seq += 1
        self.pos += 1
        return self.sign(env.AUDIT, AuditRecord(
            gateway_id=self.gateway_id, boot_id=self.boot_id, audit_seq=self.audit_seq,
            chain_prev=prev, chain_head=self.head, pair=pair, chain_pos=self.pos))


def body(*envelopes: dict) -> bytes:
    return json.dumps({"envelopes": list(envelopes)}).encode()


def results(ack: Any) -> list[tuple[bool, str]]:
    return [(r.ok, r.error) for r in ack.results]


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path) -> Any:
    from ivp.engine.loading import load_from_dir
    from ivp.engine.reference import ReferenceEngine

    model, tokenizer = load_from_dir(tiny_model_dir)
    return ReferenceEngine(model, tokenizer)


@pytest.fixture(scope="session")
def tiny_manifest(tiny_model_dir: Path) -> Manifest:
    from ivp.whitelist import make_manifest

    return make_manifest(tiny_model_dir, MODEL_ID)


@pytest.fixture(scope="session")
def inspectors() -> Inspectors:
    return Inspectors.create()


@pytest.fixture(scope="session")
def whitelist_bytes(inspectors: Inspectors, tiny_manifest: Manifest) -> bytes:
    from ivp.whitelist import sign_whitelist

    wl = Whitelist(version=1, expires=time.time() + 86400, manifests=[tiny_manifest])
    return sign_whitelist(wl, inspectors.quorum).to_bytes()


@pytest.fixture
def config(tmp_path: Path, inspectors: Inspectors, whitelist_bytes: bytes,
           tiny_model_dir: Path) -> Any:
    from ivp.recomputer.service import Config

    return Config(state_dir=tmp_path / "rc", policy=inspectors.policy,
                  whitelist=whitelist_bytes, models={MODEL_ID: tiny_model_dir},
                  health_interval=3600.0, tick_interval=3600.0)


@pytest.fixture
def gateway(tiny_engine: Any, tiny_manifest: Manifest) -> ScriptedGateway:
    return ScriptedGateway("gw-a", tiny_engine, tiny_manifest)


async def enrol(rec: Any, inspectors: Inspectors, gw: ScriptedGateway) -> dict:
    return await rec.handle_admin(inspectors.request("enrol_device", {
        "device_id": gw.gateway_id, "public_key": gw.key.verify_key.hex, "kind": "gateway",
        "url": gw.url}))


async def enrol_then_write_rogue(config: Any, inspectors: Inspectors,
                                 gateway: ScriptedGateway | None,
                                 rogue: ScriptedGateway) -> Path:
    """A recomputer enrols ``gateway`` (None: nothing) and stops; then the operator
    writes an enrolment of ``rogue`` straight into its store with the sqlite3 shell (its
    own connection, no key, no quorum). Returns the store's path."""
    from ivp.recomputer.service import Recomputer

    first = Recomputer(config)
    if gateway is not None:
        await enrol(first, inspectors, gateway)
    await first.close()
    path = Path(config.state_dir) / "recomputer.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO enrolments VALUES (?,?,?,?,?,?,?)",
                   (rogue.gateway_id, "gateway", rogue.key.verify_key.hex,
                    rogue.key.verify_key.keyid, rogue.url, time.time(), 99))
    return path


@pytest.fixture
def live(config: Any) -> Iterator[tuple[str, Any]]:
    """A recomputer served from a background thread on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from aiohttp import web

    from ivp.recomputer.app import make_app
    from ivp.recomputer.service import Recomputer

    rec = Recomputer(config)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)

        async def start() -> None:
            holder["runner"] = web.AppRunner(make_app(rec))
            await holder["runner"].setup()
            await web.TCPSite(holder["runner"], "127.0.0.1", port).start()
            ready.set()

        loop.run_until_complete(start())
        loop.run_forever()
        loop.run_until_complete(holder["runner"].cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(60)
    yield f"http://127.0.0.1:{port}", rec
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
