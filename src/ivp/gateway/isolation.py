"""The server isolated by the kernel (``ivp gateway --isolate``; root only).

Without it, only good manners keep the server from talking past its gateway: it runs
as an ordinary process with the host's network. With it, Linux enforces, for the
server's whole process tree:

- **network**: its own network namespace whose only link is a veth pair to the
  gateway (a 169.254.x.y/30 link, IPv6 off); no route anywhere else, so a connection
  to the recomputer, another gateway or any outside address fails in the kernel. On
  the gateway's side an nftables table accepts from the veth only packets of
  connections the gateway opened, and counts and rejects everything the server
  starts itself (it may not reach the host's services through the gateway's address);
- **processes**: its own cgroup (v2); power off writes ``cgroup.kill``, so every
  process dies, also one that left the process group;
- **privileges and view** (bubblewrap): no capabilities at all (it can neither change
  its network nor mount, trace or enter anything), its own PID, IPC, UTS and cgroup
  namespaces (it sees and signals no process but its own), the whole file system
  read-only, with the gateway's state directory and every other server's RAM hidden;
- **memory**: one writable place, a ``ramfs`` mount (ramfs pages are never swapped)
  for its weights, HOME and TMPDIR, which power off unmounts, freeing them.

The gateway notices an attempt where Linux counts it: the nftables counter of
packets the server sent towards the host, and the namespace's own IP/TCP/UDP counters
(``/proc/PID/net/snmp``): ``OutNoRoutes`` (a destination with no route),
``ActiveOpens`` (the server opening any TCP connection, even to its own loopback) and
``OutDatagrams`` (any UDP datagram, a DNS lookup included). The server never needs any
of these: the gateway connects to it, not the other way round.

Not enforced: a UNIX socket file that the host leaves on a path the server can see
still accepts its connection (read-only mounts do not stop that); the host's root can
undo all of it (docs/TRUST.md).

Every name (namespace ``ivp-<tag>``, links ``ivh<tag>``/``ivs<tag>``, table
``ivp_<tag>``, cgroup ``ivp/<tag>``, mount ``/run/ivp/<tag>/ram``) derives from one
tag, and :meth:`Sandbox.setup` first removes whatever an earlier, killed gateway
with the same tag left behind; :meth:`Sandbox.teardown` removes it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ivp.errors import MisuseError, StateError
from ivp.gateway.power import ProcessPower

RUN_DIR = Path("/run/ivp")
_LOCK = RUN_DIR / "isolate.lock"


def _cgroup2_root() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup on current systems)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1])
    return None


def check_can_isolate() -> None:
    """Raises MisuseError with what is missing (root, ip, nft, cgroup v2)."""
    if os.geteuid() != 0:
        raise MisuseError("--isolate needs root (network namespaces, cgroups and mounts "
                          "are the kernel's to give): run the gateway as root, or drop "
                          "--isolate")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("bwrap", "bubblewrap")):
        if shutil.which(tool) is None:
            raise MisuseError(f"--isolate needs `{tool}` (Debian {package}): run "
                              "scripts/system-deps.sh")
    if _cgroup2_root() is None:
        raise MisuseError("--isolate needs a cgroup v2 hierarchy (mount -t cgroup2)")


def sweep_orphans() -> list[str]:
    """Tear down every sandbox whose gateway is dead (killed with -9, so it could not
    clean up: its namespace, table, cgroup and RAM mount would stay). Returns the tags."""
    swept = []
    for owner in RUN_DIR.glob("*/owner"):
        try:
            pid = int(owner.read_text())
            os.kill(pid, 0)
            continue  # alive (or a recycled pid: left alone, to be safe)
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue
        Sandbox(owner.parent.name).teardown()
        swept.append(owner.parent.name)
    return swept


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise StateError(f"isolation: `{' '.join(args)}` failed: "
                         f"{(done.stderr or done.stdout).strip()}")
    return done


@dataclass(frozen=True)
class NetCounters:
    """What the kernel counted of the server's network attempts (all should stay 0)."""

    rejected: int  # packets the server sent towards the host, rejected by nftables
    no_route: int  # IP OutNoRoutes in its namespace
    tcp_opens: int  # TCP ActiveOpens in its namespace
    udp_out: int  # UDP OutDatagrams in its namespace

    def since(self, earlier: NetCounters) -> NetCounters:
        return NetCounters(self.rejected - earlier.rejected, self.no_route - earlier.no_route,
                           self.tcp_opens - earlier.tcp_opens, self.udp_out - earlier.udp_out)

    def __bool__(self) -> bool:
        return any((self.rejected, self.no_route, self.tcp_opens, self.udp_out))

    def describe(self) -> str:
        parts = [f"{n} {what}" for n, what in (
            (self.rejected, "packet(s) towards the host rejected"),
            (self.no_route, "send(s) to an address with no route"),
            (self.tcp_opens, "TCP connection attempt(s)"),
            (self.udp_out, "UDP datagram(s)")) if n]
        return ", ".join(parts) or "none"


def _snmp(pid: int) -> dict[str, dict[str, int]]:
    """``/proc/PID/net/snmp`` of the namespace ``pid`` lives in, as {table: {field: n}}."""
    lines = Path(f"/proc/{pid}/net/snmp").read_text().splitlines()
    out: dict[str, dict[str, int]] = {}
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        name, *fields = head.split()
        _, *numbers = values.split()
        out[name.rstrip(":")] = {f: int(v) for f, v in zip(fields, numbers, strict=False)}
    return out


@dataclass(frozen=True)
class Sandbox:
    """The kernel objects of one isolated server, all named from ``tag``."""

    tag: str  # 8 hex characters
    hide: tuple[str, ...] = ()  # more paths the server must not see (the gateway's state)

    @classmethod
    def for_state(cls, state_dir: Path) -> Sandbox:
        """One sandbox per gateway state directory (stable across restarts), which it
        hides from the server."""
        resolved = Path(state_dir).resolve()
        tag = hashlib.sha256(os.fsencode(resolved)).hexdigest()[:8]
        return cls(tag, (str(resolved),))

    # --- names ------------------------------------------------------------------------------
    @property
    def netns(self) -> str:
        return f"ivp-{self.tag}"

    @property
    def host_if(self) -> str:
        return f"ivh{self.tag}"

    @property
    def server_if(self) -> str:
        return f"ivs{self.tag}"

    @property
    def table(self) -> str:
        return f"ivp_{self.tag}"

    @property
    def _subnet(self) -> tuple[int, int]:
        """169.254.A.B/30 from the tag: A in 1..254 (not 169, 254's metadata), B = 4k."""
        n = int(self.tag, 16)
        a = 1 + n % 253
        if a == 169:
            a = 170
        return a, 4 * ((n >> 8) % 64)

    @property
    def gateway_ip(self) -> str:
        a, b = self._subnet
        return f"169.254.{a}.{b + 1}"

    @property
    def server_ip(self) -> str:
        a, b = self._subnet
        return f"169.254.{a}.{b + 2}"

    @property
    def cgroup(self) -> Path:
        root = _cgroup2_root()
        if root is None:
            raise MisuseError("no cgroup v2 hierarchy")
        return root / "ivp" / self.tag

    @property
    def ram(self) -> Path:
        """The server's RAM-only directory (its HOME and its weights)."""
        return RUN_DIR / self.tag / "ram"

    # --- life cycle -------------------------------------------------------------------------
    def setup(self) -> None:
        """Create namespace, veth pair, firewall, cgroup and RAM mount (after removing
        what a killed predecessor left).

        Raises:
            MisuseError: not root, or a tool is missing.
            StateError: a step failed (the message names the command); nothing is left.
        """
        check_can_isolate()
        RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        with open(_LOCK, "w") as lock:  # gateways starting at once pick subnets apart
            fcntl.flock(lock, fcntl.LOCK_EX)
            sweep_orphans()
            self.teardown()
            try:
                self._create()
                (RUN_DIR / self.tag / "owner").write_text(f"{os.getpid()}\n")
            except BaseException:
                self.teardown()
                raise

    def _create(self) -> None:
        taken = _run("ip", "-o", "-4", "addr", "show").stdout
        if f" {self.gateway_ip}/" in taken or f" {self.server_ip}/" in taken:
            raise StateError(f"isolation: link {self.gateway_ip}/30 is in use on this host")
        ns, h, s = self.netns, self.host_if, self.server_if
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", h, "type", "veth", "peer", "name", s)
        _run("ip", "link", "set", s, "netns", ns)
        for path in (f"/proc/sys/net/ipv6/conf/{h}/disable_ipv6",):
            with contextlib.suppress(OSError):
                Path(path).write_text("1\n")
        _run("ip", "netns", "exec", ns, "sh", "-c",
             f"echo 1 > /proc/sys/net/ipv6/conf/{s}/disable_ipv6 2>/dev/null; true")
        _run("ip", "addr", "add", f"{self.gateway_ip}/30", "dev", h)
        _run("ip", "link", "set", h, "up")
        _run("ip", "-n", ns, "addr", "add", f"{self.server_ip}/30", "dev", s)
        _run("ip", "-n", ns, "link", "set", s, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        # From the veth: only the replies of connections the gateway opened.
        rules = (
            f"table inet {self.table} {{\n"
            f"  counter rejected {{ }}\n"
            f"  chain input {{\n"
            f"    type filter hook input priority -10; policy accept;\n"
            f"    iifname \"{h}\" ct state established accept\n"
            f"    iifname \"{h}\" counter name \"rejected\" reject\n"
            f"  }}\n"
            f"  chain forward {{\n"
            f"    type filter hook forward priority -10; policy accept;\n"
            f"    iifname \"{h}\" counter name \"rejected\" drop\n"
            f"  }}\n"
            f"}}\n")
        done = subprocess.run(["nft", "-f", "-"], input=rules, capture_output=True, text=True)
        if done.returncode != 0:
            raise StateError(f"isolation: nftables refused the table: {done.stderr.strip()}")
        self.cgroup.mkdir(parents=True, exist_ok=True)
        self.mount_ram()

    def mount_ram(self) -> None:
        """A fresh ramfs for the server (mode 0700)."""
        self.ram.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.ram.mkdir(mode=0o700, exist_ok=True)
        if not os.path.ismount(self.ram):
            _run("mount", "-t", "ramfs", "-o", "mode=0700", "ivp-server-ram", str(self.ram))
        (self.ram / "tmp").mkdir(mode=0o700, exist_ok=True)

    def unmount_ram(self) -> None:
        """Free the server's RAM files (its processes must be dead: see :meth:`kill`)."""
        if os.path.ismount(self.ram):
            _run("umount", str(self.ram))

    def processes(self) -> list[int]:
        try:
            text = (self.cgroup / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def kill(self, timeout: float = 10.0) -> None:
        """Kill every process of the cgroup and wait until it is empty."""
        kill_file = self.cgroup / "cgroup.kill"
        deadline = time.monotonic() + timeout
        while self.processes():
            if kill_file.exists():
                kill_file.write_text("1\n")
            else:  # kernels before 5.14: one by one
                for pid in self.processes():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
            if time.monotonic() > deadline:
                raise StateError(f"isolation: processes {self.processes()} survive a kill")
            time.sleep(0.01)

    def _remove_cgroup(self, timeout: float = 5.0) -> None:
        """rmdir the cgroup: it stays busy until its killed processes are reaped."""
        deadline = time.monotonic() + timeout
        while self.cgroup.exists():
            try:
                self.cgroup.rmdir()
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.02)

    def teardown(self) -> None:
        """Remove everything of this sandbox; quiet about what is already gone."""
        with contextlib.suppress(MisuseError, StateError, OSError):
            self.kill()
        with contextlib.suppress(OSError, StateError):
            self.unmount_ram()
        with contextlib.suppress(MisuseError):
            self._remove_cgroup()
        _run("nft", "delete", "table", "inet", self.table, check=False)
        _run("ip", "link", "del", self.host_if, check=False)
        _run("ip", "netns", "del", self.netns, check=False)
        with contextlib.suppress(OSError):
            self.ram.rmdir()
        with contextlib.suppress(OSError, MisuseError):
            if not self.cgroup.exists():  # else left for a later sweep to finish
                (RUN_DIR / self.tag / "owner").unlink()
        with contextlib.suppress(OSError):
            self.ram.parent.rmdir()

    # --- the server's side --------------------------------------------------------------------
    def shim_env(self) -> dict[str, str]:
        """What the power shim (``gateway.power``) needs to put the server in here: it
        joins the cgroup and the network namespace before it execs :meth:`wrap`."""
        return {"IVP_CGROUP": str(self.cgroup / "cgroup.procs"),
                "IVP_NETNS": f"/run/netns/{self.netns}", "HOME": str(self.ram),
                "TMPDIR": str(self.ram / "tmp"), "HF_HUB_OFFLINE": "1"}

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` under bubblewrap: no capabilities, own PID/IPC/UTS/cgroup namespaces,
        everything read-only but its RAM, the gateway's state and other sandboxes hidden;
        it dies with its parent."""
        hidden = [arg for path in (str(RUN_DIR), *self.hide) if os.path.isdir(path)
                  for arg in ("--tmpfs", path)]
        return ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                *hidden, "--bind", str(self.ram), str(self.ram),
                "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--cap-drop", "ALL", "--die-with-parent", "--new-session", "--", *argv]

    # --- what the kernel counted ----------------------------------------------------------
    def holds(self, pid: int | None) -> bool:
        """Whether process ``pid`` is inside this sandbox's network namespace yet."""
        if pid is None:
            return False
        try:
            return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(
                f"/run/netns/{self.netns}").st_ino
        except OSError:
            return False

    def counters(self, pid: int | None) -> NetCounters:
        """The counters now; the namespace's own only if ``pid`` is inside it (else 0)."""
        rejected = 0
        listing = _run("nft", "list", "counter", "inet", self.table, "rejected",
                       check=False).stdout
        for word, value in zip(listing.split(), listing.split()[1:], strict=False):
            if word == "packets":
                rejected = int(value)
        snmp: dict[str, dict[str, int]] = {}
        if pid is not None and self.holds(pid):
            with contextlib.suppress(OSError, ValueError):
                snmp = _snmp(pid)
        return NetCounters(
            rejected=rejected, no_route=snmp.get("Ip", {}).get("OutNoRoutes", 0),
            tcp_opens=snmp.get("Tcp", {}).get("ActiveOpens", 0),
            udp_out=snmp.get("Udp", {}).get("OutDatagrams", 0))


class IsolatedPower(ProcessPower):
    """The server's power switch, with the server inside a :class:`Sandbox`.

    Power on mounts a fresh RAM directory and starts the server in the namespace,
    cgroup and uid of the sandbox; power off kills the whole cgroup and unmounts the
    RAM. While on, the kernel's counters are read every ``poll`` seconds and each
    increase is reported once through :meth:`on_net_attempt`.
    """

    def __init__(self, sandbox: Sandbox, command: list[str], log_path: Path | None = None,
                 poll: float = 0.5) -> None:
        super().__init__(sandbox.wrap(command), log_path,
                         env={**os.environ, **sandbox.shim_env()})
        self.sandbox = sandbox
        self.poll = poll
        self._net_callback: Callable[[str], None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._seen = NetCounters(0, 0, 0, 0)

    def on_net_attempt(self, callback: Callable[[str], None]) -> None:
        self._net_callback = callback

    async def power_on(self) -> None:
        if self.is_on:
            return
        await asyncio.to_thread(self.sandbox.mount_ram)
        await super().power_on()
        for _ in range(500):  # the shim enters the namespace within milliseconds
            if not self.is_on or self.sandbox.holds(self.pid):
                break
            await asyncio.sleep(0.002)
        self._seen = await asyncio.to_thread(self.sandbox.counters, self.pid)
        self._monitor = asyncio.create_task(self._watch_counters(), name="ivp-isolation")

    async def power_off(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            self._monitor = None
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.check_counters()  # what the server tried just before
        await super().power_off()
        await asyncio.to_thread(self.sandbox.kill)  # whatever left the process group
        await asyncio.to_thread(self.sandbox.unmount_ram)

    async def check_counters(self) -> NetCounters:
        """Read the counters now; report (and return) what grew since the last read."""
        now = await asyncio.to_thread(self.sandbox.counters, self.pid)
        if not self.sandbox.holds(self.pid):  # its namespace's counters unreadable now
            now = replace(self._seen, rejected=now.rejected)
        grown = now.since(self._seen)
        self._seen = now
        if grown and self._net_callback is not None:
            self._net_callback(f"the isolated server tried to use the network: "
                               f"{grown.describe()} (the kernel refused each)")
        return grown

    async def _watch_counters(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            with contextlib.suppress(OSError, StateError):
                await self.check_counters()


__all__ = ["IsolatedPower", "NetCounters", "Sandbox", "check_can_isolate", "sweep_orphans"]
