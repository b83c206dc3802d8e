"""Which package may import which: the layers the code's readers rely on stay one-way."""

from __future__ import annotations

import ast
import gc
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ivp"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (inside functions and
    ``TYPE_CHECKING`` blocks too: a lazy import is still a dependency)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_the_server_does_not_import_its_cheats() -> None:
    """The cheats depend on the server (they fill in its Attack hook), never the reverse;
    only the process entry (``ivp server --attack``, cli.py) arms one."""
    server = [p for p in (SRC / "server").glob("*.py") if p.name not in ("attacks.py",
                                                                          "cli.py")]
    cheats = {m for m in _imports(SRC / "server" / "cli.py") if "attacks" in m}
    assert cheats and all(not m.startswith("ivp.attacks") for m in cheats)
    assert len(server) >= 2 and {p.name: {m for m in _imports(p) if "server.attacks" in m}
                                 for p in server} == {p.name: set() for p in server}
    assert "ivp.server.attacks" not in _loaded_after("ivp.server.app")


def test_the_red_team_suite_stands_on_the_datacenter_not_the_demo() -> None:
    """``ivp demo`` plays the suite; the suite must not import the demo back."""
    suite = sorted((SRC / "attacks").glob("*.py"))
    assert suite and {p.name: {m for m in _imports(p) if m.startswith("ivp.demo")}
                      for p in suite} == {p.name: set() for p in suite}
    assert "ivp.datacenter" in set().union(*(_imports(p) for p in suite))


def test_the_datacenter_stands_on_the_protocol_not_on_the_demo_or_the_suite() -> None:
    """The loopback datacenter is what the demo and the suite both drive: it imports
    neither (it left ``ivp.demo`` for that, issue 13)."""
    names = _imports(SRC / "datacenter.py")
    assert any(m.startswith("ivp.protocol") for m in names)
    assert {m for m in names if m.startswith(("ivp.demo", "ivp.attacks"))} == set()


# What a pure core may not load: event loops, threads, processes, sockets, HTTP, SQLite.
IO_MODULES = {"asyncio", "threading", "concurrent.futures", "subprocess", "socket",
              "selectors", "ssl", "http.client", "urllib.request", "aiohttp", "sqlite3"}
PURE_CORES = ["ivp.gateway.boot", "ivp.gateway.serving", "ivp.gateway.control",
              "ivp.gateway.proxy", "ivp.gateway.streaming"]
SHELLS = {"ivp.gateway.boot_shell", "ivp.gateway.datapath", "ivp.gateway.control_shell",
          "ivp.gateway.commit", "ivp.gateway.log", "ivp.gateway.core", "ivp.gateway.app"}


def test_the_gateway_pure_cores_load_no_io() -> None:
    """Boot (property 2), serving (property 3), control, request checks and streams decide on
    bytes alone: importing them, with all they import, loads no I/O module and no
    shell — so their tests run without a loop, a disk or a socket."""
    for core in PURE_CORES:
        loaded = _loaded_after(core)
        assert core in loaded
        assert {m for m in loaded if m.split(".")[0] in IO_MODULES or m in IO_MODULES
                } == set(), core
        assert loaded & SHELLS == set(), core
    # The check can fail: a shell does load them.
    assert {"asyncio", "sqlite3"} <= _loaded_after("ivp.gateway.datapath")


def _loaded_after(module: str) -> set[str]:
    """The modules a fresh interpreter loads when it imports ``module`` (those it had
    loaded before, at start-up, do not count)."""
    code = (f"import sys\nbefore = set(sys.modules)\nimport {module}\n"
            "print('\\n'.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return set(out.split())


def test_the_gateway_library_makes_no_process_wide_change(tmp_path: Path,
                                                         tiny_model_dir: Path) -> None:
    """A boot entering SERVING leaves the GC's heap as it was: only the process entry
    (``ivp gateway``) freezes it, through the ``on_serving`` hook it passes in."""
    from test_gateway_rig import make_rig, run, started

    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        frozen = gc.get_freeze_count()
        assert (await rig.upload())["state"] == "serving"
        assert gc.get_freeze_count() == frozen
        calls: list[str] = []
        rig.gw.on_serving = lambda: calls.append(rig.gw.state.value)
        assert (await rig.upload())["state"] == "serving"  # a second boot, through the hook
        assert calls == ["upload"] and gc.get_freeze_count() == frozen
        await rig.gw.close()
    run(body())
