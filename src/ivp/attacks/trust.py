"""The trust boundary made real (issue 15): what the operator does with root on a host.

* ``enrolment-bypass``: the operator writes an enrolment of a key of their own straight
  into the recomputer's SQLite file (no inspectors' quorum) and restarts it, then signs
  records with that key. The sealed store refuses the row at start.
* ``direct-connection``: the server, isolated by the kernel (``ivp gateway
  --isolate``), tries to reach the recomputer, another gateway, a host service through
  its gateway's address and an outside address straight. Every attempt fails in the
  kernel, and the gateway notices from the kernel's counters.
* ``store-rollback``: the operator copies the recomputer's store while a gateway
  serves, lets the audit catch that gateway cheating (failed verdict, SHUTDOWN), then
  puts the older copy back and restarts the recomputer, to undo the catch. The store
  is bound to the device's monotonic counter: the copy is locked at start
  (``store_rolled_back``, signed on the notice feed) and takes no trust decision.

docs/TRUST.md says what each defence enforces and what it does not.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import msgspec

from ivp.attacks.base import (
    Context,
    Evidence,
    Result,
    Scenario,
    Victim,
    refusal,
    require,
    short,
)
from ivp.attacks.tap import post_uplink
from ivp.protocol.encoding import canonical
from ivp.protocol.envelope import BOOT, sign
from ivp.protocol.keys import SigningKey
from ivp.protocol.messages import BootRecord, manifest_digest

SEAL = ("sealed store: every row that grants trust carries an HMAC by the recomputer's "
        "device key, made on its own connection only; a row without one is quarantined "
        "at start and alarmed (store_tampered)")
COUNTER = ("counter-bound store: every commit of trust-granting rows advances the "
           "recomputer's device counter and records it in the sealed bound row; a store "
           "behind its device at start is locked (store_rolled_back, signed on GET "
           "/notices) and takes no trust decision (uplink, INPUT, verification, admin) "
           "until the inspectors' quorum accept_store")
ISOLATION = ("kernel isolation (--isolate): the server's own network namespace whose only "
             "link is a veth pair to its gateway, an nftables table that rejects what the "
             "gateway did not open, and the kernel's counters read by the gateway "
             "(server_network)")
ROGUE = "rogue-gw"


# --- enrolment-bypass -------------------------------------------------------------------------
def enrolment_bypass(ctx: Context, result: Result) -> None:
    """Write an enrolment of the operator's own key into the recomputer's store, restart
    it, and BOOT a gateway of the operator's own that the inspectors never enrolled."""
    key = SigningKey.generate()
    store = ctx.dc.root / "recomputer" / "recomputer.sqlite"
    t0 = time.time()
    result.started = t0
    with sqlite3.connect(store, timeout=30) as db:  # the sqlite3 shell, as root
        db.execute("INSERT INTO enrolments VALUES (?,?,?,?,?,?,?)",
                   (ROGUE, "gateway", key.verify_key.hex, key.verify_key.keyid,
                    "http://127.0.0.1:9", t0, None))
    proc = ctx.dc.restart_recomputer(wait=True, timeout=60.0)
    if not proc.alive():
        result.error = f"the recomputer did not start again (exit {proc.popen.returncode})"
        return
    require(result, "store_tampered naming the written enrolment",
            ctx.wait_for(lambda: _tampered(ctx, t0), 10.0))
    boot = BootRecord(gateway_id=ROGUE, boot_id="rogue-boot-1", model_id=ctx.dc.model_id,
                      manifest_digest=manifest_digest(ctx.dc.manifest),
                      epsilon=ctx.dc.epsilon, time=time.time(), url="http://127.0.0.1:9",
                      counter=1)
    envelope = msgspec.to_builtins(sign(BOOT, canonical(boot), [key]))
    status, raw = post_uplink(ctx.dc.recomputer_url,
                              json.dumps({"envelopes": [envelope]}).encode())
    answer = json.loads(raw)["results"][0] if status == 200 else {"ok": False,
                                                                  "error": f"HTTP {status}"}
    result.details["rogue_boot_answer"] = answer
    require(result, "the rogue gateway's signed BOOT is refused (its key is not enrolled)",
            Evidence(time.time(), "recomputer POST /uplink", f"refused: {answer['error']}")
            if not answer.get("ok") and "enrol" in str(answer.get("error", "")) else None)
    gateways = ctx.dc.recomputer_status().get("gateways", {})
    result.details["rogue_known"] = ROGUE in (gateways if isinstance(gateways, dict)
                                              else {g.get("gateway_id") for g in gateways})
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        result.details["rogue_enrolled_in_store"] = bool(db.execute(
            "SELECT 1 FROM enrolments WHERE device_id = ?", (ROGUE,)).fetchone())


def _tampered(ctx: Context, since: float) -> Evidence | None:
    for a in ctx.alarms():
        if a["kind"] == "store_tampered" and a["time"] >= since and ROGUE in a["detail"]:
            return Evidence(a["time"], "recomputer /alarms",
                            f"store_tampered: {a['detail'][:240]}")
    return None


# --- store-rollback ---------------------------------------------------------------------------
STORE_FILES = ("recomputer.sqlite", "recomputer.sqlite-wal", "recomputer.sqlite-shm")


def store_rollback(ctx: Context, result: Result) -> None:
    """Copy the recomputer's store while the victim serves, let the audit catch the
    victim's cheat (failed verdict, SHUTDOWN), then stop the recomputer, put the copy
    back (the store file only: ``device/`` stays) and start it again."""
    from ivp.attacks.serving import shut_down

    assert ctx.victim is not None
    victim = ctx.victim_id
    state = ctx.dc.root / "recomputer"
    copy = ctx.scratch / "store-rollback" / STORE_FILES[0]
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.unlink(missing_ok=True)
    # the sqlite3 shell's .backup, as root, while the recomputer runs: a consistent copy
    # of every committed row and seal (copying the file and its WAL by hand could tear)
    with contextlib.closing(sqlite3.connect(state / STORE_FILES[0], timeout=30)) as live, \
            contextlib.closing(sqlite3.connect(copy)) as out:
        live.backup(out)
        result.details["copied_bound_counter"] = _bound(out)
    result.details["victim_in_copy"] = ctx.dc.recomputer_status()["gateways"].get(
        victim, {}).get("state")

    # what the operator wants undone: the audit catches the victim's server cheating
    t_cheat = time.time()
    ctx.dc.trigger_attack(ctx.victim)
    caught = Result("caught", "audit")  # counts the requests of this step alone
    # the catch is this scenario's premise, not its detection: it gets the full defaults
    # even in a run whose patience is short (a knock-out run on a loaded machine once
    # gave up after 12 requests, before any of the victim's pairs was audited)
    verify_fail = ctx.drive(lambda: ctx.alarm(["verify_fail"], t_cheat, victim),
                            cap=max(ctx.cap, 200), timeout=max(ctx.patience, 60.0),
                            result=caught)
    result.requests_sent += caught.requests_sent
    result.details["requests_until_caught"] = caught.requests_sent
    down = shut_down(ctx, result) if verify_fail is not None else None
    rc_view = ctx.dc.recomputer_status()["gateways"].get(victim, {})
    result.details["before_restore"] = {
        "verify_fail": str(verify_fail) if verify_fail else None,
        "victim_failed_verdicts": len(ctx.failed_verdicts(victim, t_cheat)),
        "victim_at_recomputer": rc_view.get("state"),
        "victim_gateway_state": result.details.get("gateway_state")}
    if verify_fail is None or down is None or rc_view.get("state") != "shutdown":
        result.error = ("nothing to undo: the audit did not catch and shut down the "
                        f"victim ({result.details['before_restore']})")
        return

    # the rollback: stop the recomputer, put the older store back, start it again
    t0 = time.time()
    result.started = t0
    ctx.dc.recomputer.stop()
    for name in STORE_FILES:
        (state / name).unlink(missing_ok=True)
    shutil.copy2(copy, state / STORE_FILES[0])
    proc = ctx.dc.restart_recomputer(wait=True, timeout=60.0)
    if not proc.alive():
        result.error = f"the recomputer did not start again (exit {proc.popen.returncode})"
        return
    # at once, before anything else can happen: the restored state must not be used —
    # the INPUT of a client, and the recomputer's books on the caught gateway
    status, answer = ctx.post(ctx.dc.recomputer_url + "/v1/completions", json.dumps(
        {"model": ctx.dc.model_id, "prompt": "hello", "max_tokens": 4}).encode())
    result.requests_sent += 1
    refused = refusal("recomputer POST /v1/completions", status, answer, 409,
                      "StoreRolledBackError")
    rc_view = ctx.dc.recomputer_status()["gateways"].get(victim, {})
    result.details["input_after_restore"] = status
    result.details["input_answer"] = short(answer)
    with contextlib.suppress(OSError, ValueError):
        result.details["models_after_restore"] = [
            m["id"] for m in ctx.dc.get(ctx.dc.recomputer_url + "/v1/models")["data"]]
    result.details["after_restore"] = {
        "victim_at_recomputer": rc_view.get("state"),
        "victim_failed_verdicts": len(ctx.failed_verdicts(victim, t_cheat)),
        "verify_fail_in_alarms": ctx.alarm(["verify_fail"], t_cheat, victim) is not None}

    found = require(result, "a store_rolled_back alarm at the recomputer (/alarms)",
                    ctx.wait_for(lambda: ctx.alarm(["store_rolled_back"], t0, None), 10.0))
    if found is not None:
        result.detected_at = found.time
    notices = _signed_notices(ctx)
    result.details["notice_feed"] = {k: v for k, v in notices.items()
                                     if k not in ("found", "verify_fail_notice")}
    require(result, "the store_rolled_back alarm on the signed notice feed (GET /notices, "
            "signatures and chain verified by the inspectors' key)", notices["found"])
    require(result, "INPUT refused (409 StoreRolledBackError): the restored state routes "
            "no request", refused)
    honest = ctx.dc.handles[ctx.honest].gateway_id  # a locked store judges no silence
    result.details["honest_at_recomputer_after_restore"] = ctx.dc.recomputer_status()[
        "gateways"].get(honest, {}).get("state")
    # the catch itself survives on the feed: signed before the SHUTDOWN left, in
    # notices.sqlite, which the operator did not put back
    require(result, f"{victim}'s verify_fail still on the signed notice feed (the catch "
            "the restore erased from the store)", notices["verify_fail_notice"].get(victim))


def _bound(db: sqlite3.Connection) -> int | None:
    row = db.execute("SELECT counter FROM bound WHERE id = 1").fetchone()
    return None if row is None else int(row[0])


def _signed_notices(ctx: Context) -> dict[str, Any]:
    """Read the whole notice feed as an inspector does (``ivp watch``): every notice
    checked against the recomputer's key the inspectors hold, in order and chained."""
    from ivp.errors import IvpError
    from ivp.protocol.keys import VerifyKey
    from ivp.protocol.notices import Watcher

    watcher = Watcher(VerifyKey.from_hex(ctx.dc.recomputer_key))
    out: dict[str, Any] = {"verified": 0, "error": "", "verify_fail": {}, "found": None,
                           "verify_fail_notice": {}}
    try:
        while True:
            page = ctx.dc.get(f"{ctx.dc.recomputer_url}/notices?after={watcher.seq}")
            for item in page["notices"]:
                notice = watcher.notice(canonical(item))
                body = notice.body
                if notice.kind == "alarm" and body.get("kind") == "verify_fail":
                    gid = str(body.get("gateway_id"))
                    out["verify_fail"][gid] = out["verify_fail"].get(gid, 0) + 1
                    out["verify_fail_notice"].setdefault(gid, Evidence(
                        notice.time, "recomputer GET /notices (signed)",
                        f"notice {notice.seq}: verify_fail ({gid}): "
                        f"{str(body.get('detail'))[:200]}"))
                if (notice.kind == "alarm" and body.get("kind") == "store_rolled_back"
                        and out["found"] is None):
                    out["found"] = Evidence(notice.time, "recomputer GET /notices (signed)",
                                            f"notice {notice.seq}: store_rolled_back: "
                                            f"{str(body.get('detail'))[:240]}")
            if not page.get("more") or not page["notices"]:
                break
    except (OSError, ValueError, IvpError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["verified"] = watcher.seq
    return out


# --- direct-connection ------------------------------------------------------------------------
class _Listener:
    """A TCP listener on every host address that counts who connected (the operator's
    collaborator outside, or any host service): the server must never reach it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("0.0.0.0", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def _host_port(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


def direct_connection(ctx: Context, result: Result) -> None:
    """The isolated server tries to reach, past its gateway: the recomputer, another
    gateway, a host service (on loopback and through its gateway's own address) and an
    outside address."""
    from ivp.gateway.isolation import Sandbox
    from ivp.server.attacks import direct_report_name

    victim = ctx.victim
    assert victim is not None
    h = ctx.dc.handles[victim]
    assert h.trigger is not None
    box = Sandbox.for_state(h.state_dir)
    listener = _Listener()
    targets = {"recomputer": _host_port(ctx.dc.recomputer_url),
               "another gateway": _host_port(ctx.dc.handles[ctx.honest].url),
               "host service": f"127.0.0.1:{listener.port}",
               "host via the gateway's address": f"{box.gateway_ip}:{listener.port}",
               "outside": "192.0.2.1:80"}
    name = direct_report_name(h.trigger)
    reports = [box.ram / "tmp" / name, Path(tempfile.gettempdir()) / name]
    for path in reports:
        path.unlink(missing_ok=True)
    t0 = time.time()
    result.started = t0
    try:
        h.trigger.write_text(json.dumps({"targets": list(targets.values())}))
        # one request reaches the server: it tries every way out, then answers it
        status, _ = ctx.post(h.url + "/v1/completions", json.dumps(
            {"model": ctx.dc.model_id, "prompt": "hello", "max_tokens": 4}).encode())
        result.requests_sent += 1
        report = _read_report(reports, 30.0)
        result.details["attempts"] = report
        require(result, f"the gateway's own alarm server_network ({h.gateway_id} /alarms)",
                ctx.wait_for(lambda: ctx.gateway_alarm(victim, ["server_network"], t0),
                             15.0))
        require(result, "the inspectors see it: gateway:server_network at the recomputer",
                ctx.wait_for(lambda: ctx.alarm(["gateway:server_network"], t0,
                                               h.gateway_id), 20.0))
        if report is None:
            result.missing.append("the server's own account of its attempts")
            return
        reached = sorted(f"{what} ({target}, {kind})" for what, target in targets.items()
                         for kind, done in (("tcp", report["tcp"].get(target)),
                                            ("udp", report["udp"].get(target)))
                         if done == "connected")
        result.details["reached"] = reached
        result.details["listener_connections"] = listener.connections
        result.details["served"] = status
        require(result, "every TCP attempt fails in the kernel (refused, unreachable or "
                "rejected) and no listener sees a connection",
                Evidence(time.time(), "the server's attempts + the host listener",
                         "; ".join(f"{w}: {report['tcp'].get(t)}" for w, t in targets.items()))
                if not reached and listener.connections == 0 else None)
    finally:
        listener.close()


def _read_report(paths: list[Path], timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in paths:
            with contextlib.suppress(OSError, ValueError):
                return dict(json.loads(path.read_text()))
        time.sleep(0.2)
    return None


SCENARIOS = (
    Scenario(
        "enrolment-bypass", "protocol",
        "The operator writes an enrolment of a key of its own straight into the "
        "recomputer's SQLite store (no quorum), restarts the recomputer and boots a "
        "gateway of its own with that key.",
        SEAL, enrolment_bypass, needs="datacenter"),
    Scenario(
        "store-rollback", "protocol",
        "The operator copies the recomputer's store while a gateway serves; once the "
        "audit has caught that gateway cheating and shut it down, it stops the "
        "recomputer, puts the older store back (the device dir as it is) and restarts it.",
        COUNTER, store_rollback, needs="datacenter",
        victim=Victim(server_attack="rogue-model-persists")),
    Scenario(
        "direct-connection", "protocol",
        "The server, isolated by the kernel, tries to reach the recomputer, another "
        "gateway, a host service and an outside address straight, past its gateway.",
        ISOLATION, direct_connection, needs="gateway",
        victim=Victim(server_attack="direct-connection", isolated=True)),
)

__all__ = ["SCENARIOS"]
