"""What one streamed chunk's durable commit costs the log, by the chunk's place in the
stream: WAL bytes and CPU per chunk of one long stream in one-token chunks (a
generating server's pace), the shell's per-chunk work included (re-serialising the
chunk's events and building what the log keeps), with the log's own code.

Runs against whichever ``ivp`` is importable, so the same script measures the code
before the chunk rows (each chunk's commit rewrote the whole pair so far: built, text
re-decoded, sealed, written) and after (one row of what the chunk adds), e.g.

    .venv/bin/python bench/stream_log.py --tokens 4096
    PYTHONPATH=/tmp/linear-base/src .venv/bin/python bench/stream_log.py --tokens 4096

The log runs with ``synchronous=NORMAL`` and no automatic checkpoint: the WAL then only
grows, so its size after each commit is the bytes that commit wrote (the same pages
``FULL`` writes, without waiting for fsyncs), and CPU is process time. The last stdout
line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, machine, work_dir


def run(tokens: int, quick: bool = False) -> dict[str, Any]:
    from transformers import AutoTokenizer

    import ivp.gateway.log as logmod
    from ivp.device.soft import SoftDevice
    from ivp.engine.tiny import build_tiny_model
    from ivp.gateway.streaming import ClientStream
    from ivp.protocol.chain import genesis
    from ivp.protocol.messages import PairRecord, SamplingParams, Tag

    work = work_dir("stream-log")
    tok = AutoTokenizer.from_pretrained(build_tiny_model(work / "model"))
    ids = (tok.encode("It was the best of times, it was the worst of times; naïve café. ",
                      add_special_tokens=False) * tokens)[:tokens]

    def decode(x: list[int]) -> str:
        return str(tok.decode(x, skip_special_tokens=True))

    chunk_rows = hasattr(logmod, "_CHUNK")  # the code after the change
    log = logmod.PairLog(work / "log.sqlite", SoftDevice(work / "device"), synchronous="NORMAL")
    log._db.execute("PRAGMA wal_autocheckpoint=0")
    wal = Path(f"{log.path}-wal")
    boot = "boot-1"
    log.begin_boot(boot, "tiny", genesis("gw", boot), lambda counter, prev: b"boot")
    tag = Tag(gateway_id="gw", boot_id=boot, seq=0)
    client = ClientStream("completions", model_id="tiny", tag=tag, prompt_len=8, decode=decode)

    def pair(out: list[int], text: str) -> PairRecord:
        return PairRecord(tag=tag, model_id="tiny", endpoint="completions", input="prompt",
                          prompt_token_ids=list(range(3, 11)), output_token_ids=out,
                          output_text=text, finish_reason="cut", seed=7,
                          params=SamplingParams(max_tokens=tokens), t_request=1.0,
                          t_response=time.time())

    wal_bytes, cpu_us = [], []
    for k, t in enumerate(ids):
        size, t0 = wal.stat().st_size if wal.exists() else 0, time.process_time()
        client.push([t])  # the chunk's events, as the shell makes them
        if chunk_rows:
            from ivp.gateway.streaming import ChunkWrite, StreamChunk

            text, tail = client.logged_text()
            log.progress(boot, [ChunkWrite(0, k, StreamChunk([t], text, tail, time.time()),
                                           pair([], "") if k == 0 else None)])
        else:  # the shell's _pair("cut"): every id so far, their whole decoding
            log.progress(boot, [pair(list(client.ids), decode(client.ids))])
        cpu_us.append((time.process_time() - t0) * 1e6)
        wal_bytes.append(wal.stat().st_size - size)
    log.close()

    def mean(xs: list[float]) -> float:
        return round(sum(xs) / len(xs), 1)

    at = [i for i in (10, 1000, 4000) if i < tokens]
    return {"bench": "stream_log", "quick": quick,
            "code": "chunk rows" if chunk_rows else "whole pair", "tokens": tokens,
            "machine": machine(),
            "wal_bytes_total": sum(wal_bytes),
            "wal_bytes_per_token": round(sum(wal_bytes) / tokens, 1),
            "wal_bytes_at_chunk": {str(i): wal_bytes[i] for i in at},
            "cpu_us_per_chunk": mean(cpu_us),
            "cpu_us_first_100_chunks": mean(cpu_us[:100]),
            "cpu_us_last_100_chunks": mean(cpu_us[-100:]),
            "pythonpath": os.environ.get("PYTHONPATH", "")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    args = parser.parse_args(argv)
    emit(run(200 if args.quick else args.tokens, args.quick))


if __name__ == "__main__":
    main()
