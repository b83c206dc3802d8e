"""`ivp server`: run the reference inference server (normally started by its gateway)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the `server` command to the root CLI."""
    app.command(name="server", no_args_is_help=False)(server)


def _attack_names() -> str:
    from ivp.server.attacks import ATTACKS

    return "; ".join(f"{a.name}: {a.help}" for a in ATTACKS.values())


def server(
    port: Annotated[int, typer.Option(help="TCP port to listen on (0 = any free port; the "
                                           "chosen one is printed).")] = 8100,
    host: Annotated[str, typer.Option(help="Address to bind. Keep 127.0.0.1: only the "
                                           "gateway may reach the server.")] = "127.0.0.1",
    attack: Annotated[str | None, typer.Option(
        help="DEMO/TEST ONLY: make this server cheat. One of: rogue-model-persists, int8, "
             "seed-ignored (see the ivp.server.attacks registry).")] = None,
    attack_trigger: Annotated[Path | None, typer.Option(
        help="With --attack: the cheat starts once this file exists (checked before each "
             "request). Without it the cheat starts at boot.")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch's default).")] = 0,
    engine: Annotated[str, typer.Option(
        help="reference (ivp's transformers engine, one request at a time) or vllm (vLLM's "
             "continuous batching; needs vLLM installed: make vllm, then run this "
             "command with .venv-vllm/bin/python -m ivp.cli). Both follow sampler spec v1 "
             "and the same boot protocol.")] = "reference",
    max_model_len: Annotated[int, typer.Option(
        help="vllm: longest prompt + output in tokens (capped by the model's).")] = 4096,
    kv_cache_mb: Annotated[int, typer.Option(
        help="vllm: KV-cache memory in MiB (host RAM on CPU, GPU memory on CUDA).")] = 1024,
    max_num_seqs: Annotated[int, typer.Option(
        help="vllm: most requests batched together.")] = 64,
    record_logits: Annotated[Path | None, typer.Option(
        help="vllm, CALIBRATION/TESTS ONLY: also save every logits row spec v1 chose from "
             "as DIR/<request id>/<t>.npy.")] = None,
    weights_dir: Annotated[Path | None, typer.Option(
        help="Keep the streamed shards as files here and memory-map them (an isolated "
             "gateway passes its RAM-only, never-swapped mount: {weights}). Default: in "
             "process memory.")] = None,
) -> None:
    """Reference inference server (OpenAI-compatible, token ids in every answer).

    It starts EMPTY and boots only from the weights its gateway streams to it
    (POST /boot/manifest, then POST /boot/stream); weights live in memory only,
    never on disk. Until then inference answers 503. Generation follows sampler
    spec v1 with the seed the gateway writes into each request.

    Routes: GET /health, POST /boot/manifest, POST /boot/stream,
    POST /v1/completions, POST /v1/chat/completions (see docs/ARCHITECTURE.md).
    Prints "ivp server: listening on http://HOST:PORT" on stdout once it accepts.
    """
    import asyncio

    from ivp.errors import ValidationError
    from ivp.server.attacks import get_attack

    if attack_trigger is not None and attack is None:
        raise typer.BadParameter("--attack-trigger needs --attack")
    try:
        chosen = get_attack(attack) if attack else None
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from None
    from ivp.server.backends import ENGINES

    if engine not in ENGINES:
        raise typer.BadParameter(f"--engine must be one of {', '.join(ENGINES)}")
    options: dict[str, object] = {}
    if engine == "vllm":
        options = {"max_model_len": max_model_len, "kv_cache_mb": kv_cache_mb,
                   "max_num_seqs": max_num_seqs,
                   "record_logits": str(record_logits) if record_logits else None,
                   "cheats": chosen is not None}
        try:
            import vllm  # noqa: F401

            from ivp.engine.vllm_engine import guard_process_group
        except ImportError as exc:
            raise typer.BadParameter(f"--engine vllm: vLLM does not import here ({exc}); "
                                     "run `make vllm` and use .venv-vllm/bin/python") \
                from None
    if engine == "vllm" and not guard_process_group():
        typer.echo("ivp server: not a process-group leader: vLLM's processes will not be "
                   "killed with this server (the gateway starts it as one)", err=True)
    if threads:
        import torch

        torch.set_num_threads(threads)
    from ivp.server.app import run_server

    if weights_dir is not None and not weights_dir.is_dir():
        raise typer.BadParameter(f"--weights-dir {weights_dir}: not a directory")
    asyncio.run(run_server(host, port, chosen, attack_trigger, weights_dir,  # type: ignore[arg-type]
                           engine, options))
