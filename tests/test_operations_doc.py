"""docs/OPERATIONS.md, run: every command block of the page, in order, on free ports.

A block runs with ``bash -e`` in one working directory, with the virtual environment's
``bin`` first on PATH. A comment before a block says how: ``run: environment`` (what a
person types once in every terminal: run before every later block), ``run: background
until "TEXT"`` (a long-running process, in its own terminal for a person: started, then
waited for until its output shows TEXT), ``run: until "TEXT"`` (run again until its
output shows TEXT: state that takes a moment to arrive). The other blocks must exit 0.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "OPERATIONS.md"
PORTS = ("8000", "8200", "8300")
_BLOCK = re.compile(r"(?:<!-- run: (?P<how>[^>]*?) -->\s*\n)?```sh\n(?P<body>.*?)```", re.S)


def blocks(text: str) -> list[tuple[str, str]]:
    """(how, commands) of each ```sh block, in order."""
    return [(m["how"] or "", m["body"]) for m in _BLOCK.finditer(text)]


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _until(how: str) -> str:
    found = re.search(r'until "([^"]+)"', how)
    assert found, f"bad run comment {how!r}"
    return found[1]


def test_the_page_has_every_step() -> None:
    text = PAGE.read_text()
    steps = [b for _, b in blocks(text)]
    joined = "\n".join(steps)
    for needed in ("ivp keys new", "ivp keys policy", "ivp model tiny", "ivp whitelist manifest",
                   "ivp whitelist build", "ivp whitelist sign", "ivp recomputer",
                   "ivp admin enrol", "ivp gateway", "ivp upload", "/v1/chat/completions",
                   "ivp alarms", "ivp admin readmit"):
        assert needed in joined, needed
    assert all(how in ("", "environment") or how.startswith(("background until", "until"))
               for how, _ in blocks(text))


@pytest.mark.slow
def test_every_command_of_the_operations_page_runs_in_order(tmp_path: Path) -> None:
    text = PAGE.read_text()
    for port in PORTS:  # the page's fixed ports, moved to free ones
        text = re.sub(rf"\b{port}\b", _free_port(), text)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
           f"{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    background: list[tuple[subprocess.Popen[bytes], Path]] = []
    preamble = ""
    try:
        for i, (how, body) in enumerate(blocks(text)):
            if how == "environment":
                preamble += body
                continue
            body = preamble + body
            if how.startswith("background"):
                log = tmp_path / f"block-{i}.log"
                with open(log, "wb") as out:
                    proc = subprocess.Popen(["bash", "-e", "-c", body], cwd=tmp_path, env=env,
                                            stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
                background.append((proc, log))
                marker, deadline = _until(how), time.monotonic() + 300
                while marker not in log.read_text(errors="replace"):
                    assert proc.poll() is None, f"block {i} exited:\n{log.read_text()}"
                    assert time.monotonic() < deadline, f"block {i}: no {marker!r}"
                    time.sleep(0.2)
                continue
            deadline = time.monotonic() + 180
            while True:
                out = subprocess.run(["bash", "-e", "-c", body], cwd=tmp_path, env=env,
                                     capture_output=True, text=True, timeout=600)
                shown = out.stdout + out.stderr
                if not how:
                    assert out.returncode == 0, f"block {i}:\n{body}\n{shown}"
                    break
                if out.returncode == 0 and _until(how) in shown:
                    break
                assert time.monotonic() < deadline, (
                    f"block {i}: no {_until(how)!r}:\n{shown}\n" + "\n".join(
                        f"--- {log.name}:\n{log.read_text(errors='replace')[-3000:]}"
                        for _, log in background))
                time.sleep(1.0)
    finally:
        for proc, _ in reversed(background):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
