"""Audit ingestion at the recomputer (SRC): signed records over HTTP, checked, stored.

Simulated gateways (enrolled by a quorum-signed admin request, each with its own
Ed25519 key) send signed AUDIT envelopes — realistic pairs: a 24-token prompt, a
64-token output — to ``POST /uplink`` in batches of 64 (the gateways' uplink batch),
one batch in flight per gateway, several gateways at once. The recomputer is the real
service and HTTP app (``ivp.recomputer``): each envelope is decoded, its signer looked up
among the enrolled keys, its signature verified, its payload decoded, its chain link and
sequence checked, and the batch is written to SQLite (WAL, the store's own sync mode,
reported) before the Ack. Only the verification pool is held idle (``HoldPool``): the
records wait in the durable queue, since re-running them is what
bench/replay_vs_generate.py measures.

Envelopes are signed before the clock starts (signing is the gateways' work).
Goal (issue 4): >= 5,000 records/s on 2 cores.

Encryption (issue 15): the same number of records is also sent *sealed*, as a gateway
with ``--recomputer-kem-key`` sends them: each batch body sealed to the recomputer's
X25519 KEM key (HPKE base mode, ``ivp.protocol.hpke.seal_message``; sealed before the
clock, as signing), opened by the recomputer before its checks. Clear and sealed
rounds alternate on the same recomputer (clear, sealed, clear, sealed: each mode gets
half its records per round, on fresh gateways) so that load drift hits both alike;
``sealed_vs_clear`` is the ratio of their rates in this one run.

    .venv/bin/python bench/ingest.py [--quick] [--records 40000] [--gateways 4]

The last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PY,
    cpu_seconds,
    durable_commit_ms,
    emit,
    free_port,
    machine,
    note,
    processes,
    spawn,
    wait_http,
    whitelist_for,
    work_dir,
)

MODEL_ID = "tiny-llama"
BATCH = 64  # envelopes per POST, as ivp.gateway.uplink
PROMPT_TOKENS, OUTPUT_TOKENS = 24, 64
GOAL = 5000.0


# --- the recomputer, in its own process --------------------------------------------------------
class HoldPool:
    """A verification pool that takes jobs and never answers (records stay queued)."""

    size, name = 1, "hold"

    async def start(self) -> None:
        self._never = asyncio.Event()

    async def verify(self, jobs: Sequence[Any]) -> list[Any]:
        await self._never.wait()
        return []

    async def close(self) -> None:
        return None


def serve(args: argparse.Namespace) -> None:
    """``--serve``: the recomputer's app on ``--port`` with the verification pool held."""
    from aiohttp import web

    from ivp.protocol.encoding import decode
    from ivp.protocol.quorum import QuorumPolicy
    from ivp.recomputer.app import make_app
    from ivp.recomputer.service import Config, Recomputer

    config = Config(state_dir=Path(args.state), policy=decode(Path(args.policy).read_bytes(),
                                                                QuorumPolicy),
                    whitelist=Path(args.whitelist).read_bytes(), models={},
                    health_interval=3600.0, tick_interval=3600.0)
    config.signature_workers = args.signature_workers
    rec = Recomputer(config, pool=HoldPool())  # type: ignore[arg-type]
    app = make_app(rec)

    async def warm(_app: web.Application) -> None:
        await rec.start_signature_workers()

    app.on_startup.append(warm)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


# --- the gateways' side --------------------------------------------------------------------------
class Gateway:
    """Signs the records an honest gateway sends (synthetic pairs: ingestion does not
    replay them)."""

    def __init__(self, gateway_id: str) -> None:
        from ivp.protocol.chain import genesis
        from ivp.protocol.keys import SigningKey

        self.gateway_id, self.key = gateway_id, SigningKey.generate()
        self.boot_id = secrets.token_hex(16)
        self.head = genesis(gateway_id, self.boot_id)
        self.seq = 0

    def boot(self, manifest: Any) -> dict[str, Any]:
        from ivp.protocol import envelope as env
        from ivp.protocol.encoding import to_builtins
        from ivp.protocol.messages import BootRecord, manifest_digest

        return to_builtins(env.sign_message(env.BOOT, BootRecord(
            gateway_id=self.gateway_id, boot_id=self.boot_id, model_id=MODEL_ID,
            manifest_digest=manifest_digest(manifest), epsilon=0.2, time=time.time(),
            url="http://127.0.0.1:9"), self.key))

    def audit(self, rng: Any) -> dict[str, Any]:
        from ivp.protocol import envelope as env
        from ivp.protocol.chain import link
        from ivp.protocol.encoding import to_builtins
        from ivp.protocol.messages import AuditRecord, PairRecord, SamplingParams, Tag

        self.seq += 1
        pair = PairRecord(
            tag=Tag(self.gateway_id, self.boot_id, self.seq * 5), model_id=MODEL_ID,
            endpoint="completions", input="a prompt of about twenty-four tokens " * 3,
            prompt_token_ids=[rng.randrange(3, 640) for _ in range(PROMPT_TOKENS)],
            output_token_ids=[rng.randrange(3, 640) for _ in range(OUTPUT_TOKENS)],
            output_text="some output text " * 16, finish_reason="length",
            seed=rng.getrandbits(64), params=SamplingParams(temperature=0.7,
                                                            max_tokens=OUTPUT_TOKENS),
            t_request=time.time(), t_response=time.time())
        prev, self.head = self.head, link(self.head, pair)
        record = AuditRecord(gateway_id=self.gateway_id, boot_id=self.boot_id,
                             audit_seq=self.seq, chain_prev=prev, chain_head=self.head,
                             pair=pair)
        return to_builtins(env.sign_message(env.AUDIT, record, self.key))


def admin_enrol(key: Any, gw: Gateway) -> bytes:
    from ivp.protocol import envelope as env
    from ivp.protocol.encoding import canonical
    from ivp.protocol.messages import AdminRequest

    request = AdminRequest(instruction="enrol_device", args={  # type: ignore[arg-type]
        "device_id": gw.gateway_id, "public_key": gw.key.verify_key.hex, "kind": "gateway",
        "url": "http://127.0.0.1:9"}, nonce=secrets.token_hex(16), expires=time.time() + 600)
    return env.sign(env.ADMIN, canonical(request), [key]).to_bytes()


async def post(session: Any, url: str, body: bytes,
               content_type: str = "application/json") -> tuple[int, Any]:
    async with session.post(url, data=body, headers={"Content-Type": content_type}) as r:
        return r.status, await r.json(content_type=None)


async def send_all(url: str, per_gateway: list[list[bytes]], content_type: str
                   ) -> tuple[float, list[float], int]:
    """Every gateway's batches, one in flight per gateway: (seconds, latencies, refused)."""
    import aiohttp

    latencies: list[float] = []
    refused = 0

    async def one(batches: list[bytes]) -> None:
        nonlocal refused
        async with aiohttp.ClientSession() as s:
            for body in batches:
                t = time.perf_counter()
                status, ack = await post(s, url + "/uplink", body, content_type)
                latencies.append(time.perf_counter() - t)
                if status != 200:
                    raise RuntimeError(f"/uplink answered {status}: {ack}")
                refused += sum(1 for r in ack["results"] if not r["ok"])

    t = time.perf_counter()
    await asyncio.gather(*(one(b) for b in per_gateway))
    return time.perf_counter() - t, latencies, refused


def run(args: argparse.Namespace) -> dict[str, Any]:
    import random

    from ivp.engine.tiny import build_tiny_model
    from ivp.protocol.hpke import SEALED_UPLINK, UPLINK_INFO, seal_message
    from ivp.protocol.keys import SigningKey
    from ivp.protocol.quorum import InspectorKey, QuorumPolicy
    from ivp.whitelist import make_manifest

    work = work_dir("ingest")
    note(f"work dir {work}")
    model = build_tiny_model(work / "model")
    trust = whitelist_for(model, MODEL_ID, work / "trust")
    manifest = make_manifest(model, MODEL_ID)
    # the whitelist's policy has one inspector; re-use its key for the enrolment below
    inspector = SigningKey.generate()
    policy = QuorumPolicy(threshold=1, keys=[InspectorKey(
        keyid=inspector.keyid, party="US", public_key=inspector.verify_key.hex, name="bench")])
    trust = _resign(trust, policy, inspector, manifest, work)
    modes = ("clear", "sealed")
    rounds = 2  # clear, sealed, clear, sealed
    per = args.records // (args.gateways * rounds)  # per gateway and round, each mode
    n = per * args.gateways * rounds  # records per mode
    gateways = {(mode, r): [Gateway(f"gw-{mode}-{r}-{i}") for i in range(args.gateways)]
                for mode in modes for r in range(rounds)}
    note(f"signing {n * len(modes)} audit records")
    rng = random.Random(7)
    t = time.perf_counter()
    bodies: dict[tuple[str, int], list[list[bytes]]] = {}
    for key, gws in gateways.items():
        bodies[key] = []
        for gw in gws:
            records = [gw.audit(rng) for _ in range(per)]
            bodies[key].append([json.dumps({"envelopes": records[i:i + BATCH]}).encode()
                                for i in range(0, per, BATCH)])
    sign_s = time.perf_counter() - t
    size = statistics.mean(len(b) for bs in bodies[("clear", 0)] for b in bs) / BATCH
    result: dict[str, Any] = {"bench": "ingest", "quick": args.quick, "records": n,
                              "gateways": args.gateways, "batch": BATCH,
                              "envelope_bytes": round(size), "machine_before": machine(),
                              "durable_commit_floor": durable_commit_ms(work),
                              "gateway_side_signing_per_s": round(n * len(modes) / sign_s)}
    figures: dict[str, dict[str, Any]] = {m: {"seconds": 0.0, "cpu": 0.0, "refused": 0,
                                              "latencies": []} for m in modes}
    with processes() as procs:
        port = free_port()
        p = spawn("recomputer", [PY, __file__, "--serve", "--state", str(work / "rc"),
                                 "--port", str(port), "--policy", str(trust["policy"]),
                                 "--whitelist", str(trust["whitelist"]),
                                 "--signature-workers", str(args.signature_workers)], work)
        procs.append(p)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/status", timeout=120, proc=p.popen)
        kem = bytes.fromhex(json.loads(_get(url + "/identity"))["kem_public_key"])
        t = time.perf_counter()
        for r in range(rounds):  # the gateways' side: seal each batch body
            bodies[("sealed", r)] = [[seal_message(kem, UPLINK_INFO, b) for b in bs]
                                     for bs in bodies[("sealed", r)]]
        seal_s = time.perf_counter() - t
        asyncio.run(_prepare(url, inspector, [g for gs in gateways.values() for g in gs],
                             manifest))
        for r in range(rounds):
            for mode in modes:
                note(f"sending round {r + 1}, {mode}")
                cpu0 = cpu_seconds(p.popen.pid, children=True)
                seconds, latencies, refused = asyncio.run(send_all(
                    url, bodies[(mode, r)],
                    SEALED_UPLINK if mode == "sealed" else "application/json"))
                f = figures[mode]
                f["cpu"] += cpu_seconds(p.popen.pid, children=True) - cpu0
                f["seconds"] += seconds
                f["refused"] += refused
                f["latencies"] += latencies
        status = json.loads(_get(url + "/status"))
    seal_check = _seal_check(work / "rc")  # the recomputer has stopped: its next start
    out = {}
    for mode, f in figures.items():
        lat = sorted(f["latencies"])
        out[mode] = {
            "seconds": round(f["seconds"], 3), "records_per_s": round(n / f["seconds"], 1),
            "refused": f["refused"],
            "batch_latency_ms": {"p50": round(lat[len(lat) // 2] * 1e3, 2),
                                 "p99": round(lat[int(0.99 * (len(lat) - 1))] * 1e3, 2)},
            "recomputer_cpu_us_per_record": round(f["cpu"] / n * 1e6, 1)}
    clear, sealed = out["clear"], out["sealed"]
    result.update({
        # the clear figures stay at the top level (the goal is stated for them)
        "seconds": clear["seconds"], "records_per_s": clear["records_per_s"],
        "refused": clear["refused"] + sealed["refused"],
        "queue_depth_after": status.get("queue_depth"), "store": status.get("store"),
        "batch_latency_ms": clear["batch_latency_ms"],
        "recomputer_cpu_us_per_record": clear["recomputer_cpu_us_per_record"],
        "sealed": sealed,
        "sealed_vs_clear": round(sealed["records_per_s"] / clear["records_per_s"], 4),
        "sealed_extra_cpu_us_per_record": round(
            sealed["recomputer_cpu_us_per_record"] - clear["recomputer_cpu_us_per_record"], 1),
        "gateway_side_sealing_us_per_record": round(seal_s / n * 1e6, 2),
        "signature_workers": args.signature_workers,
        "store_seal_check_at_start": seal_check,
        "machine_after": machine(),
    })
    result["goal_met"] = result["records_per_s"] >= GOAL and result["refused"] == 0
    return result


def _seal_check(state: Path) -> dict[str, Any]:
    """What the store's seal check costs the recomputer's next start: the store it left
    (every record of both modes), opened as ``Recomputer`` opens it (``ivp.recomputer.seal``:
    one HMAC per sealed row). Nothing may be found tampered."""
    from ivp.device import SoftDevice
    from ivp.recomputer.seal import SEAL_PURPOSE, Sealer
    from ivp.recomputer.store import Store

    key = SoftDevice(state / "device").derive_key(SEAL_PURPOSE)
    t = time.perf_counter()
    store = Store(state / "recomputer.sqlite", Sealer(key))
    seconds = time.perf_counter() - t
    with store.transaction() as db:
        rows = int(db.execute("SELECT count(*) FROM seals").fetchone()[0])
    tampered = [f.table for f in store.tampered]
    store.close()
    if tampered:
        raise RuntimeError(f"the bench's own store was found tampered: {tampered}")
    return {"sealed_rows": rows, "seconds": round(seconds, 3),
            "us_per_row": round(seconds / max(rows, 1) * 1e6, 2)}


def _resign(trust: dict[str, Path], policy: Any, key: Any, manifest: Any,
            work: Path) -> dict[str, Path]:
    """Policy + whitelist under ``key`` (the bench also signs the enrolments with it)."""
    from ivp.protocol.encoding import canonical
    from ivp.protocol.messages import Whitelist
    from ivp.whitelist import sign_whitelist

    (work / "trust" / "policy.json").write_bytes(canonical(policy))
    wl = Whitelist(version=1, expires=time.time() + 86400, manifests=[manifest])
    (work / "trust" / "whitelist.json").write_bytes(sign_whitelist(wl, [key]).to_bytes())
    return trust


async def _prepare(url: str, inspector: Any, gateways: list[Gateway], manifest: Any) -> None:
    """Enrol every gateway (admin quorum) and send its BOOT record."""
    import aiohttp

    async with aiohttp.ClientSession() as s:
        for gw in gateways:
            status, answer = await post(s, url + "/admin", admin_enrol(inspector, gw))
            if status != 200:
                raise RuntimeError(f"enrolment refused: {answer}")
            status, ack = await post(s, url + "/uplink",
                                     json.dumps({"envelopes": [gw.boot(manifest)]}).encode())
            if status != 200 or not ack["results"][0]["ok"]:
                raise RuntimeError(f"BOOT refused: {ack}")


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return str(r.read().decode())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1,024 records per mode, signatures inline (smoke test)")
    parser.add_argument("--records", type=int, default=40_000,
                        help="records per mode (clear and sealed each)")
    parser.add_argument("--gateways", type=int, default=4)
    parser.add_argument("--signature-workers", type=int, default=1,
                        help="recomputer processes checking signatures (0: inline)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--whitelist", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args)
        return
    if args.quick:
        args.records, args.signature_workers = 1024, 0
    emit(run(args))


if __name__ == "__main__":
    main()
