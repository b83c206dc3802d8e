"""Start and stop a software TPM (swtpm, Debian's ``swtpm``) for tests and the demo.

One swtpm per device, as a real gateway has its own TPM: its NV state lives in the
given directory, it listens on loopback TCP only, and :meth:`Swtpm.stop` ends it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from ivp.errors import MisuseError, TransportError


def _free_port_pair() -> int:
    """A port P with P and P+1 free (swtpm's command and control sockets)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise TransportError("no two free adjacent loopback ports for swtpm")


class Swtpm:
    """A running swtpm process; ``tcti`` is what :class:`~ivp.device.tpm.TpmDevice` takes.

    Raises:
        MisuseError: swtpm is not installed (scripts/system-deps.sh installs it).
        TransportError: it did not start.
    """

    def __init__(self, state_dir: Path, port: int | None = None, timeout: float = 10.0) -> None:
        binary = shutil.which("swtpm")
        if binary is None:
            raise MisuseError("swtpm is not installed: run scripts/system-deps.sh (as root)")
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port_pair()
        self.log = self.state_dir / "swtpm.log"
        self._proc = subprocess.Popen(
            [binary, "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir}",
             "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
             "--flags", "not-need-init,startup-clear", "--log", f"file={self.log}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise TransportError(f"swtpm exited ({self._proc.returncode}); see {self.log}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TransportError(f"swtpm did not listen on port {self.port}") from None
                time.sleep(0.02)

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> Swtpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
