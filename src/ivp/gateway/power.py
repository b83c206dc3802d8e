"""The server's power switch: the gateway holds it (the server is a child process).

The note's server has no disk, and its only state is in RAM; "power kill" wipes it.
Here the server is a child process of the gateway: power on = start a fresh process,
power off = SIGKILL its whole process group, POWER_KILL = off + on. Nothing of the
old process survives (its memory is gone with it), so every boot starts from a fresh
upload.

Two guards keep the switch honest:

* the child is launched through a tiny shim that sets ``PR_SET_PDEATHSIG`` (Linux):
  if the gateway dies (even by kill -9), the server dies with it — a server can
  never keep serving, unlogged, without its gateway;
* an unexpected exit of the server (it crashed, someone killed it) is reported to
  the gateway, which treats it as power loss: counter to zero, back to UPLOAD.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ivp.errors import TransportError

# Runs before the server: (isolated: join its cgroup and network namespace), die with
# the gateway, then exec the real command (isolated: bwrap, which drops the rest).
_SHIM = (
    "import ctypes,os,signal,sys\n"
    "libc = ctypes.CDLL('libc.so.6', use_errno=True)\n"
    "cgroup = os.environ.pop('IVP_CGROUP', '')\n"
    "if cgroup:\n"
    "    with open(cgroup, 'w') as f:\n"
    "        f.write(str(os.getpid()))\n"
    "netns = os.environ.pop('IVP_NETNS', '')\n"
    "if netns:\n"
    "    fd = os.open(netns, os.O_RDONLY)\n"
    "    if libc.setns(fd, 0x40000000) != 0:\n"  # CLONE_NEWNET
    "        sys.exit(1)\n"
    "    os.close(fd)\n"
    "try:\n"
    "    libc.prctl(1, int(signal.SIGKILL))\n"  # PR_SET_PDEATHSIG
    "except OSError:\n"
    "    pass\n"
    "expected = os.environ.pop('IVP_GATEWAY_PID', '')\n"
    "if expected and os.getppid() != int(expected):\n"
    "    sys.exit(1)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


class PowerSwitch(Protocol):
    """What the gateway needs from the server's power supply."""

    @property
    def is_on(self) -> bool: ...

    async def power_on(self) -> None: ...

    async def power_off(self) -> None: ...

    def on_power_loss(self, callback: Callable[[str], None]) -> None: ...


def server_command(template: str, port: int, host: str = "127.0.0.1",
                   weights: str = "") -> list[str]:
    """Split ``template`` (shell-like) and fill ``{port}``, ``{host}`` (the address the
    server binds) and ``{weights}`` (its RAM-only weights directory, when isolated)."""
    return [arg.replace("{port}", str(port)).replace("{host}", host)
            .replace("{weights}", weights) for arg in shlex.split(template)]


class ProcessPower:
    """Runs the server command as a child process in its own process group.

    Args:
        command: argv of the server (``{port}`` already filled in).
        log_path: where the server's stdout/stderr go (the operator's console).
    """

    def __init__(self, command: list[str], log_path: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        if not command:
            raise ValueError("empty server command")
        self.command = command
        self.log_path = log_path
        self.env = env
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._callback: Callable[[str], None] | None = None
        self.cycles = 0

    @property
    def is_on(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.is_on and self._proc is not None else None

    def on_power_loss(self, callback: Callable[[str], None]) -> None:
        self._callback = callback

    async def power_on(self) -> None:
        if self.is_on:
            return
        env = {**(self.env or os.environ), "IVP_GATEWAY_PID": str(os.getpid()),
               "PYTHONUNBUFFERED": "1"}
        out = open(self.log_path, "ab") if self.log_path else asyncio.subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _SHIM, *self.command,
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env=env, start_new_session=True,
            )
        except OSError as exc:
            raise TransportError(f"cannot power on the server ({self.command[0]}): {exc}") from None
        finally:
            if not isinstance(out, int):
                out.close()
        self.cycles += 1
        self._watch = asyncio.create_task(self._watcher(self._proc), name="ivp-server-power")

    async def _watcher(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if proc is self._proc and self._callback is not None:
            # not the exit status itself: the server chooses it, and the reason goes
            # into an alarm that leaves the gateway
            how = "was killed by a signal" if code < 0 else "exited"
            self._callback(f"server process {how} unexpectedly")

    async def power_off(self) -> None:
        proc, self._proc = self._proc, None
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


__all__ = ["PowerSwitch", "ProcessPower", "server_command"]
