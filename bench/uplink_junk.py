"""Junk on the uplink: how long one unauthenticated batch stalls the recomputer.

The red team's attack (issue 12, class 6): one ``POST /uplink`` of 300,000 ``{}`` items
(0.9 MB) was admitted item by item under the recomputer's global lock and stalled it
for 23 s; honest gateways then looked silent and could be shut down. This bench starts
the real recomputer app (verification pool held, as bench/ingest.py), enrols and boots
one gateway, and while a prober sends that gateway's honest signed audit records, one
per ``POST /uplink`` every 20 ms, measuring each answer, it sends:

* ``junk_one``: the red team's single body of 300,000 ``{}`` items;
* ``junk_flood``: 200 bodies of 256 junk items each, 8 at a time (the most a batch may
  hold under the new cap, sent as fast as the recomputer takes them).

With ``--baseline-src DIR`` (e.g. ``git archive 45deef8 src | tar -x -C /tmp/base``)
the same run is made against that build too, in the same invocation, so the two are
compared on one machine under one load.

    .venv/bin/python bench/uplink_junk.py [--baseline-src /tmp/base/src]

The last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PY, emit, free_port, machine, note, processes, spawn, wait_http, work_dir
from ingest import MODEL_ID, Gateway, _prepare, _resign

JUNK_ITEMS = 300_000


async def _measure(url: str, gw: Gateway, junk: list[bytes], parallel: int) -> dict[str, Any]:
    """Send ``junk`` (``parallel`` at a time) while probing with honest records."""
    import aiohttp

    rng = random.Random(11)
    latencies: list[float] = []
    refused = 0
    done = asyncio.Event()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        async def probe() -> None:
            nonlocal refused
            while not done.is_set():
                body = json.dumps({"envelopes": [gw.audit(rng)]}).encode()
                t = time.perf_counter()
                async with s.post(url + "/uplink", data=body) as r:
                    answer = await r.json(content_type=None)
                latencies.append(time.perf_counter() - t)
                if r.status != 200 or not answer["results"][0]["ok"]:
                    refused += 1
                await asyncio.sleep(0.02)

        statuses: list[int] = []
        junk_seconds: list[float] = []

        async def send(body: bytes) -> None:
            t = time.perf_counter()
            async with s.post(url + "/uplink", data=body) as r:
                await r.read()
                statuses.append(r.status)
            junk_seconds.append(time.perf_counter() - t)

        prober = asyncio.create_task(probe())
        await asyncio.sleep(0.5)  # the honest baseline first
        before = len(latencies)
        t0 = time.perf_counter()
        queue = list(junk)
        while queue:
            batch, queue = queue[:parallel], queue[parallel:]
            await asyncio.gather(*(send(b) for b in batch))
        wall = time.perf_counter() - t0
        await asyncio.sleep(0.5)
        done.set()
        await prober
    during = sorted(latencies[before:]) or [0.0]
    return {"junk_requests": len(junk), "junk_statuses": sorted(set(statuses)),
            "junk_wall_s": round(wall, 3), "junk_answer_max_s": round(max(junk_seconds), 3),
            "honest_batches": len(latencies), "honest_refused": refused,
            "honest_p50_ms_during": round(during[len(during) // 2] * 1e3, 2),
            "honest_max_ms_during": round(during[-1] * 1e3, 2),
            "honest_max_ms_before": round(max(latencies[:before] or [0.0]) * 1e3, 2)}


def _run_build(name: str, src: str | None, work: Path, trust: dict[str, Path],
               inspector: Any, manifest: Any) -> dict[str, Any]:
    junk_one = [json.dumps({"envelopes": [{}] * JUNK_ITEMS}).encode()]
    junk_flood = [json.dumps({"envelopes": [{}] * 256}).encode()] * 200
    out: dict[str, Any] = {"src": src or "this tree"}
    with processes() as procs:
        port = free_port()
        env = {"PYTHONPATH": src} if src else None
        p = spawn(f"recomputer-{name}", [
            PY, str(Path(__file__).resolve().parent / "ingest.py"), "--serve",
            "--state", str(work / f"rc-{name}"), "--port", str(port),
            "--policy", str(trust["policy"]), "--whitelist", str(trust["whitelist"]),
            "--signature-workers", "0"], work, env=env)
        procs.append(p)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/status", timeout=120, proc=p.popen)
        gw = Gateway(f"gw-{name}")
        try:
            asyncio.run(_prepare(url, inspector, [gw], manifest))
        except RuntimeError as exc:  # an older build refuses this build's v2 BOOT: the
            out["boot_refused"] = str(exc)[:200]  # probes are then refused, still timed
        for case, junk, parallel in (("junk_one", junk_one, 1), ("junk_flood", junk_flood, 8)):
            note(f"{name}: {case}")
            out[case] = asyncio.run(_measure(url, gw, junk, parallel))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-src", default=None,
                        help="src/ directory of another build, run side by side")
    args = parser.parse_args(argv)
    from _common import whitelist_for

    from ivp.engine.tiny import build_tiny_model
    from ivp.protocol.keys import SigningKey
    from ivp.protocol.quorum import InspectorKey, QuorumPolicy
    from ivp.whitelist import make_manifest

    work = work_dir("uplink-junk")
    model = build_tiny_model(work / "model")
    trust = whitelist_for(model, MODEL_ID, work / "trust")
    manifest = make_manifest(model, MODEL_ID)
    inspector = SigningKey.generate()
    policy = QuorumPolicy(threshold=1, keys=[InspectorKey(
        keyid=inspector.keyid, party="US", public_key=inspector.verify_key.hex, name="bench")])
    trust = _resign(trust, policy, inspector, manifest, work)
    result: dict[str, Any] = {"bench": "uplink_junk", "junk_items": JUNK_ITEMS,
                              "machine_before": machine()}
    result["current"] = _run_build("current", None, work, trust, inspector, manifest)
    if args.baseline_src:
        result["baseline"] = _run_build("baseline", args.baseline_src, work, trust,
                                        inspector, manifest)
    result["machine_after"] = machine()
    emit(result)


if __name__ == "__main__":
    main()
