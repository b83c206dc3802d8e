"""Scale-out: the Ray worker pool (two actor processes) gives the local pool's verdicts."""

from __future__ import annotations

import os

import pytest
from msgspec.structs import replace
from test_recomputer_support import run

from ivp.protocol.encoding import canonical, decode
from ivp.protocol.messages import AuditRecord, Verdict, manifest_digest
from ivp.recomputer.workers import LocalPool, ModelSource, RayPool, VerifyJob, make_pool
from ivp.whitelist import read_model_files

pytest_plugins = ("test_recomputer_support",)


def test_ray_pool_matches_local_pool(tiny_model_dir, tiny_manifest, gateway,
                                     tiny_engine) -> None:
    pytest.importorskip("ray")
    sources = [ModelSource(tiny_manifest, read_model_files(tiny_model_dir, tiny_manifest))]
    jobs = []
    for i, t in enumerate((0.0, 1.0, 0.7, 0.0)):
        pair = gateway.pair(f"Hello number {i}", temperature=t, max_tokens=6)
        if i == 3:  # one cheat among them
            out = [(pair.output_token_ids[0] + 11) % 500 + 3, *pair.output_token_ids[1:]]
            pair = replace(pair, output_token_ids=out, output_text=tiny_engine.tokenizer.decode(
                out, skip_special_tokens=True))
        record = AuditRecord(gateway_id=gateway.gateway_id, boot_id=gateway.boot_id,
                             audit_seq=i + 1, chain_prev="0" * 64, chain_head="0" * 64,
                             pair=pair)
        jobs.append(VerifyJob(i + 1, manifest_digest(tiny_manifest), canonical(record)))

    def strip(outcomes: list) -> list[Verdict]:
        return [replace(decode(o.verdict, Verdict), time=0.0) for o in outcomes]

    async def main() -> tuple[list[Verdict], list[Verdict], list[int]]:
        local = LocalPool(sources, size=1)
        await local.start()
        want = strip(await local.verify(jobs))
        await local.close()
        pool = RayPool(sources, size=2)
        await pool.start()
        try:
            halves = [await pool.verify(jobs[:2]), await pool.verify(jobs[2:])]
            got = strip(halves[0] + halves[1])
            pids = list(pool.pids)
        finally:
            await pool.close()
        return want, got, pids

    want, got, pids = run(main())
    assert got == want
    assert [v.passed for v in got] == [True, True, True, False]
    assert len(set(pids)) == 2 and os.getpid() not in pids  # two real actor processes


def test_worker_spec_parsing(tiny_manifest) -> None:
    from ivp.errors import ValidationError

    assert isinstance(make_pool("3", [], "exact"), LocalPool)
    assert make_pool("3", [], "exact").size == 3
    assert isinstance(make_pool("ray", [], "exact"), RayPool)
    assert make_pool("ray://10.0.0.1:10001", [], "exact").address == "ray://10.0.0.1:10001"
    with pytest.raises(ValidationError):
        make_pool("lots", [], "exact")
    with pytest.raises(ValidationError, match="at least two actors"):
        RayPool([], size=1)
