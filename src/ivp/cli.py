"""`ivp …` — the command line of the inference-only verification package.

Each part of ivp registers its own commands from ``ivp/<part>/cli.py`` (a function
``register(app)``), so this file only assembles them. Heavy imports (torch) happen
inside commands, keeping ``ivp --help`` fast.
"""

from __future__ import annotations

import importlib
import importlib.util

import typer

app = typer.Typer(
    name="ivp",
    help=(
        "Inference-only verification package. Secure network gateways (SNG) boot servers "
        "only with whitelisted weights and log every input/output pair; the secure "
        "recomputer (SRC) re-runs a random sample and shuts a cheating server down.\n\n"
        "Start with `ivp demo` (a whole datacenter on loopback)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Parts in the order their commands appear in --help.
PARTS = (
    "demo", "engine", "whitelist", "gateway", "server", "recomputer", "verify", "plan", "sim",
    "attacks",
)

def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"ivp {version('ivp')}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="Print ivp's version and exit.")) -> None:
    """Inference-only verification package (see --help)."""


for _part in PARTS:
    _name = f"ivp.{_part}.cli"
    if importlib.util.find_spec(f"ivp.{_part}") and importlib.util.find_spec(_name):
        importlib.import_module(_name).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
