"""Every command of `ivp` explains itself in --help."""

from __future__ import annotations

from typing import Any

import typer
from typer.testing import CliRunner

from ivp.cli import app


def _commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    if hasattr(group, "commands"):  # a group (typer vendors its own click classes)
        for name, cmd in group.commands.items():
            found += _commands(cmd, (*path, name))
    return found


def test_every_command_has_help() -> None:
    root = typer.main.get_command(app)
    paths = _commands(root)
    names = {p[0] for p in paths if p}
    for expected in ("demo", "server", "gateway", "upload", "recomputer", "admin", "keys",
                     "whitelist", "plan", "sim"):
        assert expected in names, f"`ivp {expected}` is missing"
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        cmd = root
        for name in path:
            cmd = cmd.commands[name]  # type: ignore[attr-defined]
        text = (cmd.help or cmd.short_help or "").strip()
        assert len(text) > 20, f"`ivp {' '.join(path)}` has no real help text"
        assert "Usage" in result.output
