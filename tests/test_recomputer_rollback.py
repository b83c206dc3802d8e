"""The recomputer's store against rollback (``Store`` bound to the device counter): an
older copy of the whole store (rows and seals together, genuine but old) is refused at
start with a ``store_rolled_back`` alarm on the signed notices feed, takes no trust
decision, and is trusted again only by the inspectors' quorum ``accept_store``; honest
restarts, also after a kill -9 between the counter's advance and the commit, pass."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from test_recomputer_support import (
    MODEL_ID,
    Inspectors,
    ScriptedGateway,
    body,
    enrol,
    results,
    run,
)

from ivp.attacks.knockouts import knocked_out
from ivp.device import SoftDevice
from ivp.errors import StoreRolledBackError
from ivp.protocol.notices import Watcher
from ivp.recomputer.admin_shell import AdminRefusedError
from ivp.recomputer.seal import SEAL_PURPOSE, SEALED, Sealer
from ivp.recomputer.service import Recomputer
from ivp.recomputer.store import Store

pytest_plugins = ("test_recomputer_support",)
STORE = "recomputer.sqlite"


def save(state: Path, to: Path, device: bool = False) -> None:
    """The operator's copy of the store (its WAL too), and of the device dir if asked."""
    to.mkdir(parents=True)
    for p in state.glob(STORE + "*"):
        shutil.copy2(p, to / p.name)
    if device:
        shutil.copytree(state / "device", to / "device")


def put_back(copy: Path, state: Path) -> None:
    for p in state.glob(STORE + "*"):
        p.unlink()
    for p in copy.glob(STORE + "*"):
        shutil.copy2(p, state / p.name)
    if (copy / "device").exists():
        shutil.rmtree(state / "device")
        shutil.copytree(copy / "device", state / "device")


def trusted(path: Path) -> str:
    """A digest of every sealed table's rows and of the seals: the trust-granting state."""
    h = hashlib.sha256()
    with sqlite3.connect(path) as db:
        for t in (*SEALED, "seals"):
            for row in sorted(map(repr, db.execute(f"SELECT * FROM {t}"))):
                h.update(f"{t}:{row}\n".encode())
    return h.hexdigest()


def kinds(alarms: list[dict[str, Any]], kind: str = "store_rolled_back") -> list[dict]:
    return [a for a in alarms if a["kind"] == kind]


async def set_back(config: Any, inspectors: Inspectors, gateway: ScriptedGateway,
                   tmp_path: Path, device: bool = False) -> None:
    """Enrol (counter 2: an admin commit and its confirmation), copy, then a BOOT
    (3) and an ε (4, 5) the copy lacks; put the copy back (with the device dir if
    ``device``)."""
    first = Recomputer(config)
    await enrol(first, inspectors, gateway)
    await first.close()
    save(config.state_dir, tmp_path / "copy", device)
    second = Recomputer(config)
    assert not second.locked and kinds(await second.alarms()) == []  # an honest restart
    assert results(await second.uplink(body(gateway.boot()))) == [(True, "")]
    await second.handle_admin(inspectors.request("set_epsilon", {"epsilon": 0.5}))
    await second.close()
    put_back(tmp_path / "copy", config.state_dir)


def test_an_older_copy_of_the_store_is_refused(
        config: Any, inspectors: Inspectors, gateway: ScriptedGateway,
        tmp_path: Path) -> None:
    """The copy passes every seal; the counter says 3 commits are missing: alarmed on
    the signed feed, and uplink, cursors, INPUT and admin are refused, state unchanged."""
    path = config.state_dir / STORE

    async def main() -> None:
        await set_back(config, inspectors, gateway, tmp_path)
        before = trusted(path)
        rec = Recomputer(config)
        assert rec.locked and rec.store.tampered == []  # genuine rows: the seals pass
        check = rec.store.rollback
        assert check is not None and (check.verdict, check.log, check.device) == (
            "rolled_back", 2, 5)
        [alarm] = kinds(await rec.alarms())
        assert alarm["detail"].startswith(
            "the recomputer's store was set back: it was last committed under device "
            "counter 2, the device is at 5 (3 commits missing: an older copy of the store "
            "was put back); the inspectors re-accept the store as it stands with a quorum "
            "`ivp admin accept-store --device-counter 5`"), alarm
        feed = await rec.notice_feed(0, 0)
        watcher = Watcher(rec.device.public_key)
        notices = [watcher.notice(json.dumps(n).encode()) for n in feed["notices"]]
        assert [n.body["detail"] for n in notices if n.body.get("kind") ==
                "store_rolled_back"] == [alarm["detail"]]  # signed, for the inspectors
        locked = "the recomputer's store was set back and takes no trust decision"
        with pytest.raises(StoreRolledBackError, match=locked):
            await rec.uplink(body(gateway.checkpoint()))
        with pytest.raises(StoreRolledBackError, match=locked):
            await rec.cursor(gateway.gateway_id, None)
        with pytest.raises(StoreRolledBackError, match=locked):
            rec.route(MODEL_ID, "client")
        assert rec.served_models() == []
        with pytest.raises(AdminRefusedError, match="only a quorum accept_store") as refused:
            await rec.handle_admin(inspectors.request("set_epsilon", {"epsilon": 0.25}))
        assert refused.value.log_seq is None  # not logged: a log entry would be a commit
        with pytest.raises(StoreRolledBackError):  # nor through the store directly
            rec.store.put_setting("epsilon", 0.25)
        assert rec.queue_depth() == 0  # the stale queue is not verified
        await rec.close()
        assert trusted(path) == before
        again = Recomputer(config)  # still locked at the next start, the alarm repeated
        assert again.locked and [a["count"] for a in kinds(await again.alarms())] == [2]
        await again.close()
    run(main())


def test_inspectors_accept_the_set_back_store_by_quorum(
        config: Any, inspectors: Inspectors, gateway: ScriptedGateway,
        tmp_path: Path) -> None:
    async def main() -> None:
        await set_back(config, inspectors, gateway, tmp_path)
        rec = Recomputer(config)
        assert rec.locked
        with pytest.raises(AdminRefusedError, match="the device is at 5") as refused:
            await rec.handle_admin(inspectors.request("accept_store", {"device_counter": 4}))
        assert refused.value.log_seq is None and rec.locked  # an earlier rollback's value
        one = inspectors.quorum[:1]
        with pytest.raises(AdminRefusedError):  # one inspector alone cannot
            await rec.handle_admin(inspectors.request("accept_store", {"device_counter": 5},
                                                      signers=one))
        assert rec.locked
        request = inspectors.request("accept_store", {"device_counter": 5, "note": "ok"})
        answer = await rec.handle_admin(request)
        assert answer["accepted"] and not rec.locked
        assert [a["acknowledged"] for a in kinds(await rec.alarms())] == [True]
        assert results(await rec.uplink(body(gateway.boot()))) == [(True, "")]
        with pytest.raises(AdminRefusedError, match="already used"):
            await rec.handle_admin(request)  # replayed: its nonce is burnt
        with pytest.raises(AdminRefusedError, match="not locked"):  # nothing to accept
            await rec.handle_admin(inspectors.request("accept_store", {"device_counter": 5}))
        await rec.close()
        again = Recomputer(config)
        assert again.store.rollback is not None and again.store.rollback.verdict == "ok"
        assert not again.locked and [a["count"] for a in kinds(await again.alarms())] == [1]
        await again.close()
    run(main())


def test_one_admin_request_undone_is_caught(
        config: Any, inspectors: Inspectors, gateway: ScriptedGateway,
        tmp_path: Path) -> None:
    """The last commit alone is the crash's slack; an admin request is two counted
    commits (``Store.confirm``) before its answer leaves, so undoing it is refused."""
    async def main() -> None:
        first = Recomputer(config)
        await enrol(first, inspectors, gateway)
        await first.close()
        save(config.state_dir, tmp_path / "copy")
        second = Recomputer(config)
        await second.handle_admin(inspectors.request("set_epsilon", {"epsilon": 0.5}))
        await second.close()
        put_back(tmp_path / "copy", config.state_dir)
        rec = Recomputer(config)
        check = rec.store.rollback
        assert rec.locked and check is not None and (check.log, check.device) == (2, 4)
        await rec.close()
    run(main())


def test_store_and_soft_device_restored_together_go_unseen(
        config: Any, inspectors: Inspectors, gateway: ScriptedGateway,
        tmp_path: Path) -> None:
    """The documented limit of ``--device soft``: its counter is a file in the state
    directory, so restoring it with the store sets both back (docs/TRUST.md)."""
    async def main() -> None:
        await set_back(config, inspectors, gateway, tmp_path, device=True)
        rec = Recomputer(config)
        check = rec.store.rollback
        assert check is not None and (check.verdict, check.log, check.device) == ("ok", 2, 2)
        assert not rec.locked and kinds(await rec.alarms()) == []
        assert rec.ingest.epsilon is None  # the ε commit is gone, unseen
        await rec.close()
    run(main())


def test_a_deleted_store_is_refused(config: Any, inspectors: Inspectors,
                                    gateway: ScriptedGateway) -> None:
    """A fresh store where the device has counted commits (burnt nonces gone)."""
    async def main() -> None:
        first = Recomputer(config)
        await enrol(first, inspectors, gateway)
        await first.close()
        for p in config.state_dir.glob(STORE + "*"):
            p.unlink()
        rec = Recomputer(config)
        assert rec.locked and rec.store.rollback is not None
        assert rec.store.rollback.verdict == "deleted"
        [alarm] = kinds(await rec.alarms())
        assert "holds no bound counter while the device is at 2" in alarm["detail"]
        await rec.close()
    run(main())


def test_a_restored_soft_device_dir_alone_is_refused(
        config: Any, inspectors: Inspectors, gateway: ScriptedGateway,
        tmp_path: Path) -> None:
    """The device's counter behind its own store: the device state was put back."""
    async def main() -> None:
        first = Recomputer(config)
        await enrol(first, inspectors, gateway)
        await first.close()
        shutil.copytree(config.state_dir / "device", tmp_path / "device")
        second = Recomputer(config)
        await second.handle_admin(inspectors.request("set_epsilon", {"epsilon": 0.5}))
        await second.close()
        shutil.rmtree(config.state_dir / "device")
        shutil.copytree(tmp_path / "device", config.state_dir / "device")
        rec = Recomputer(config)
        check = rec.store.rollback
        assert rec.locked and check is not None
        assert (check.verdict, check.log, check.device) == ("device_behind", 4, 2)
        [alarm] = kinds(await rec.alarms())
        assert "device counter (2) is behind its own store (4)" in alarm["detail"]
        await rec.close()
    run(main())


def test_an_edited_counter_row_is_quarantined_and_refused(
        config: Any, inspectors: Inspectors, gateway: ScriptedGateway,
        tmp_path: Path) -> None:
    """Moving the restored copy's counter up with the sqlite3 shell breaks its seal."""
    async def main() -> None:
        await set_back(config, inspectors, gateway, tmp_path)
        with sqlite3.connect(config.state_dir / STORE) as db:
            db.execute("UPDATE bound SET counter = 5")
        rec = Recomputer(config)
        assert [f.table for f in rec.store.tampered] == ["bound"]
        assert rec.locked and rec.store.rollback is not None
        assert rec.store.rollback.verdict == "deleted"
        await rec.close()
    run(main())


def test_store_counter_knockout_trusts_the_older_copy(
        config: Any, inspectors: Inspectors, gateway: ScriptedGateway,
        tmp_path: Path) -> None:
    """With the counter check off the same copy is trusted: the check is what refuses it."""
    async def main() -> None:
        await set_back(config, inspectors, gateway, tmp_path)
        with knocked_out("store-counter"):
            rec = Recomputer(config)
        assert not rec.locked and kinds(await rec.alarms()) == []
        assert results(await rec.uplink(body(gateway.boot()))) == [(True, "")]
        await rec.close()
    run(main())


_CUT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from ivp.device import SoftDevice
    from ivp.recomputer.seal import SEAL_PURPOSE, Sealer
    from ivp.recomputer.store import Store

    state = Path(sys.argv[1])
    device = SoftDevice(state / "device")
    store = Store(state / "recomputer.sqlite", Sealer(device.derive_key(SEAL_PURPOSE)),
                  device=device)
    store.put_setting("epsilon", 0.5)
    advance = device.advance_counter

    def advance_then_die():
        advance()  # durable: the counter moved, the commit has not happened
        os.kill(os.getpid(), signal.SIGKILL)

    device.advance_counter = advance_then_die
    store.put_setting("epsilon", 0.25)
""")


def _open(state: Path) -> tuple[Store, SoftDevice]:
    device = SoftDevice(state / "device")
    return Store(state / STORE, Sealer(device.derive_key(SEAL_PURPOSE)), device=device), device


def test_kill_9_between_the_counter_and_the_commit_is_an_honest_restart(
        config: Any) -> None:
    """The gateway's rule: a store one behind its device lost only the commit that was
    cut (nothing it held was acknowledged); it starts without an alarm, and binds on."""
    state = config.state_dir
    state.mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-c", _CUT, str(state)], capture_output=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              sys.path)})
    assert proc.returncode == -9, proc.stderr.decode()
    store, device = _open(state)
    assert store.rollback is not None
    assert (store.rollback.verdict, store.rollback.log, store.rollback.device) == (
        "interrupted", 1, 2)
    assert not store.locked and store.snapshot().settings["epsilon"] == 0.5  # cut: gone
    store.close()

    async def main() -> None:
        rec = Recomputer(config)
        assert not rec.locked and kinds(await rec.alarms()) == []
        await rec.close()
    run(main())
    store, device = _open(state)
    store.put_setting("epsilon", 0.25)  # the next commit binds past the cut one
    assert store.bound_counter() == device.counter() == 3
    store.close()
    store, _ = _open(state)
    assert store.rollback is not None and store.rollback.verdict == "ok"
    store.close()
