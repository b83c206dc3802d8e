"""A model directory whose files live in RAM only, for engines that open a path.

The server receives its weights as a byte stream and must never write them to disk
(DESIGN.md, "Whitelist and secure boot"). The reference engine loads from bytes;
an engine such as vLLM opens a directory. :class:`RamModelDir` gives it one without
a byte on disk: each file is an anonymous ``memfd`` of this process, and the
directory (mode 0700, on tmpfs where there is one) holds only symbolic links to
``/proc/<pid>/fd/<n>``. A memfd lives exactly as long as some process holds it open
or mapped, so when the server dies — POWER_KILL is SIGKILL of its process group —
the kernel frees every byte of it, with nothing to clean up; :meth:`close` frees it
earlier, once the engine has loaded the weights into its own memory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "ivp-model-"  # + "<pid>-<random>": a directory of this process


def _link_root() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _sweep(root: Path) -> None:
    """Remove link directories of dead processes (their memfds died with them)."""
    for path in root.glob(PREFIX + "*"):
        pid = path.name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)


class RamModelDir:
    """``files`` (name -> bytes) as memfds behind a private directory of links.

    Entries are moved out of ``files`` as they are copied, so the peak memory is the
    model plus one file. A value that is a ``Path`` (a shard the server already keeps
    in the gateway's RAM-only mount, ``ivp server --weights-dir``) is linked as it is.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, files: dict[str, bytes | Path]) -> None:
        root = _link_root()
        _sweep(root)
        self.path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))  # 0700
        self._fds: list[int] = []
        try:
            for name in sorted(files):
                if "/" in name or name in ("", ".", ".."):
                    raise ValueError(f"bad file name {name!r}")
                data = files.pop(name)
                if isinstance(data, Path):
                    os.symlink(data.resolve(), self.path / name)
                    continue
                fd = os.memfd_create(name, os.MFD_CLOEXEC)
                self._fds.append(fd)
                _write_all(fd, data)
                os.symlink(f"/proc/{os.getpid()}/fd/{fd}", self.path / name)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Drop the links and this process's hold on the bytes (idempotent)."""
        shutil.rmtree(self.path, ignore_errors=True)
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def __enter__(self) -> RamModelDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


__all__ = ["RamModelDir"]
