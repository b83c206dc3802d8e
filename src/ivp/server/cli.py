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
    if threads:
        import torch

        torch.set_num_threads(threads)
    from ivp.server.app import run_server

    if weights_dir is not None and not weights_dir.is_dir():
        raise typer.BadParameter(f"--weights-dir {weights_dir}: not a directory")
    asyncio.run(run_server(host, port, chosen, attack_trigger, weights_dir))
