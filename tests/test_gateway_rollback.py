"""The operator who owns the gateway's disk: a restored, deleted or pre-SHUTDOWN copy of
the sealed log is caught at the next start (``ivp.gateway.rollback``), the BOOT and
checkpoints carry the device counter and the previous boot's closing state, a
shut-down gateway keeps sending heartbeats, and ``/status`` tells no audit decision
before the recomputer acknowledged the record."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from test_gateway_rig import COMPLETION, Rig, flush, make_rig, run, started

from ivp.device.soft import SoftDevice
from ivp.gateway import rollback
from ivp.gateway.core import State
from ivp.gateway.log import PairLog


def copy_log(rig: Rig, to: Path) -> None:
    """The operator's consistent copy of the live, sealed log (no key needed)."""
    with sqlite3.connect(rig.log.path) as src, sqlite3.connect(to) as dst:
        src.backup(dst)


def put_back(state: Path, copy: Path | None) -> None:
    """The operator puts an old copy in place of the log (None: deletes it)."""
    for suffix in ("", "-wal", "-shm"):
        (state / f"log.sqlite{suffix}").unlink(missing_ok=True)
    if copy is not None:
        shutil.copy(copy, state / "log.sqlite")


async def serve(rig: Rig, n: int) -> None:
    for _ in range(n):
        await (await rig.gw.complete("completions", COMPLETION)).after_release()


def test_judge_tells_the_cases_apart() -> None:
    assert rollback.judge(None, 0, False).verdict == "fresh"
    assert rollback.judge(None, 0, True).verdict == "fresh"  # a log from before counters
    assert rollback.judge(7, 7, True).verdict == "ok"
    interrupted = rollback.judge(6, 7, True)
    assert interrupted.keep_undecided and not interrupted.locked
    assert rollback.judge(3, 7, True).locked and "4 commits missing" in \
        rollback.judge(3, 7, True).explain()
    assert rollback.judge(None, 7, False).verdict == "deleted"
    assert rollback.judge(9, 7, True).verdict == "device_behind"


def test_restored_log_copy_locks_the_gateway(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Attack: copy the log before cheating requests, restore it after: the audit
    records kept meanwhile would be erased. The gateway refuses to serve from it."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        await rig.upload()
        copy_log(rig, tmp_path / "copy.sqlite")
        await serve(rig, 3)  # kept (ε = 1): the records the copy does not hold
        await rig.gw.close()
        put_back(tmp_path, tmp_path / "copy.sqlite")
        again = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        assert again.gw.state is State.SHUTDOWN
        assert again.gw.shutdown_reason.startswith("log rollback detected: the log was set "
                                                   "back")
        kinds = [a["kind"] for a in again.log.alarms()]
        assert "log_rollback" in kinds
        await flush(again)
        [beat] = again.recomputer.heartbeats[-1:]
        assert beat.state == "shutdown" and beat.locked and "log rollback" in beat.reason
        await again.gw.close()
        third = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        assert third.gw.state is State.SHUTDOWN  # persisted: a restart does not clear it
        await third.gw.close()
    run(body())


def test_deleted_log_locks_the_gateway(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Attack: delete the log while the gateway is off (with it every record spooled)."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        await rig.upload()
        await serve(rig, 2)
        await rig.gw.close()
        put_back(tmp_path, None)
        again = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        assert again.gw.state is State.SHUTDOWN
        assert "the log was deleted or replaced" in again.gw.shutdown_reason
        await again.gw.close()
    run(body())


def test_restoring_a_copy_from_before_a_shutdown_serves_nothing(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """Attack: the recomputer shut the gateway down; the operator restores a copy of the
    log from before the SHUTDOWN, and the gateway would serve its server again."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        await rig.upload()
        copy_log(rig, tmp_path / "copy.sqlite")
        await rig.gw.control(rig.shutdown_envelope())
        assert rig.gw.state is State.SHUTDOWN
        await rig.gw.close()
        put_back(tmp_path, tmp_path / "copy.sqlite")
        again = await started(make_rig(tmp_path, tiny_model_dir))
        assert again.gw.state is State.SHUTDOWN and "log rollback" in again.gw.shutdown_reason
        await again.gw.close()
    run(body())


def test_a_recomputer_shutdown_replaces_the_lockdown_and_a_readmit_lifts_it(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    from test_gateway_control import readmit

    from ivp.protocol.encoding import decode
    from ivp.protocol.envelope import Envelope
    from ivp.protocol.messages import Shutdown

    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir))
        await rig.upload()
        copy_log(rig, tmp_path / "copy.sqlite")
        await serve(rig, 2)
        await rig.gw.close()
        put_back(tmp_path, tmp_path / "copy.sqlite")
        again = await started(make_rig(tmp_path, tiny_model_dir))
        assert again.gw.state is State.SHUTDOWN
        order = again.shutdown_envelope()
        answer = await again.gw.control(order)
        assert answer["state"] == "shutdown" and "receipt" in answer
        nonce = decode(Envelope.from_bytes(order).payload_bytes(), Shutdown).nonce
        assert await again.gw.control_shell.shutdown_nonce() == nonce
        lifted = await again.gw.control(readmit(again, nonce))
        assert lifted["readmitted"] is True and again.gw.state is State.UPLOAD
        await again.gw.close()
        fourth = await started(make_rig(tmp_path, tiny_model_dir))
        assert fourth.gw.state is State.UPLOAD  # the counter was re-bound: no false alarm
        await fourth.gw.close()
    run(body())


def test_an_interrupted_commit_keeps_every_undecided_pair(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """A crash between advancing the counter and committing leaves the log one behind:
    the last draw batch's fate is unknown, so every pair awaiting its draw is kept."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=0.0001,
                                     with_uplink=False))
        await rig.upload()
        pair = rig.log.append  # commit two pairs, then "crash" before their draws
        del pair
        replies = [await rig.gw.complete("completions", COMPLETION) for _ in range(2)]
        assert rig.log.pair_count() == 2
        await rig.gw.close()
        rig.device.advance_counter()  # the counter moved; the commit never came
        del replies
        again = await started(make_rig(tmp_path, tiny_model_dir, epsilon=0.0001,
                                       with_uplink=False))
        assert again.gw.state is State.UPLOAD  # not a rollback: it serves again
        assert again.log.pair_count() == 0 and again.log.totals()[1] == 2  # both kept
        assert "commit_interrupted" in [a["kind"] for a in again.log.alarms()]
        await again.gw.close()
    run(body())


def test_a_counter_value_advanced_ahead_is_recorded_by_one_commit_and_never_two_ahead(
        tmp_path: Path) -> None:
    """``PairLog.reserve`` (a stream is at its server) advances the device counter for
    the coming commit, which then records that value without advancing again; a commit
    that is undone gives it back; a clean close records it; never two values ahead."""
    device = SoftDevice(tmp_path / "device")
    log = PairLog(tmp_path / "log.sqlite", device)
    log.set_meta("k", b"v")  # a bound commit: the log holds the device's value
    at = device.counter()
    assert log.bound_counter() == at
    log.reserve()
    log.reserve()  # one value ahead at most
    assert device.counter() == at + 1 and log.spare == at + 1
    log.set_meta("k", b"w")  # records the reserved value: no advance of its own
    assert device.counter() == at + 1 and log.bound_counter() == at + 1 and log.spare is None
    log.reserve()
    with pytest.raises(RuntimeError), log.transaction():
        raise RuntimeError("a refused batch")  # undone: the value is the next commit's
    assert log.spare == at + 2 and log.bound_counter() == at + 1
    log.reserve()  # still only one ahead
    assert device.counter() == at + 2
    log.close()  # records the value ahead: the next start finds log and device agreeing
    again = PairLog(tmp_path / "log.sqlite", device)
    assert rollback.judge(again.bound_counter(), device.counter(), True).verdict == "ok"
    again.reserve()
    del again  # a crash with a value ahead: one behind, read as a cut commit
    third = PairLog(tmp_path / "log.sqlite", device)
    assert rollback.judge(third.bound_counter(), device.counter(), True).verdict == \
        "interrupted"
    third.close()


def test_commits_queued_behind_a_commit_find_the_counter_advanced_and_never_two_ahead(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """Under load the group commit advances the device counter for the next commit on
    the log's thread right after a commit with more queued behind it (while the loop
    hands out the results), so the next commit waits for one flush; at every advance the
    device is at most one value past what the log has recorded."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=0.01,
                                     with_uplink=False, draw_linger=0.0))
        await rig.upload()
        log, device = rig.log, rig.device
        advance = device.advance_counter
        seen: list[tuple[bool, int, int]] = []  # (in a commit, device, log) at each advance

        def watched_advance() -> int:
            in_commit = log._db.in_transaction
            recorded = log._recorded if in_commit else log.bound_counter()
            seen.append((in_commit, device.counter(), recorded or 0))
            time.sleep(0.02)  # a slow flush: the next requests queue behind this commit
            return advance()

        device.advance_counter = watched_advance  # type: ignore[method-assign]

        async def request(i: int) -> None:
            await asyncio.sleep(0.005 * i)  # each arrives while the one before commits
            await (await rig.gw.complete("completions", COMPLETION)).after_release()

        await asyncio.gather(*(request(i) for i in range(12)))
        await rig.gw.writer.flush()
        device.advance_counter = advance  # type: ignore[method-assign]
        assert seen and all(dev <= rec for _, dev, rec in seen), seen  # never two ahead
        between = [s for s in seen if not s[0]]
        assert between, seen  # advanced between commits, not inside the next one
        assert log.bound_counter() in (device.counter(), device.counter() - 1)
        await rig.gw.close()
        assert rollback.judge(PairLog(tmp_path / "log.sqlite", device).bound_counter(),
                              device.counter(), True).verdict == "ok"  # close records it
    run(body())


def test_a_commit_or_advance_that_fails_advances_nothing_ahead(tmp_path: Path) -> None:
    """A COMMIT (or a counter advance) that fails may or may not be on disk: its value is
    not used again, and no value is advanced ahead until a commit records a newer one
    (else a crash could leave the log two behind: a false rollback)."""
    device = SoftDevice(tmp_path / "device")
    log = PairLog(tmp_path / "log.sqlite", device)
    log.set_meta("k", b"v")
    db = log._db

    class FailingCommit:
        def __getattr__(self, name: str) -> object:
            return getattr(db, name)

        def execute(self, sql: str, *args: object) -> object:
            if sql == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error")
            return db.execute(sql, *args)

    log._db = FailingCommit()  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError):
        log.set_meta("k", b"w")
    log._db = db
    at = device.counter()
    log.reserve()
    assert log.spare is None and device.counter() == at
    log.set_meta("k", b"x")  # a newer value recorded: advancing ahead is safe again
    log.reserve()
    assert log.spare == device.counter() == at + 2
    log.set_meta("k", b"y")
    advance = device.advance_counter

    def failing_advance() -> int:
        advance()  # on the device, but its caller never learns the value
        raise OSError("the counter's flush failed")

    device.advance_counter = failing_advance  # type: ignore[method-assign]
    with pytest.raises(OSError):
        log.reserve()
    device.advance_counter = advance  # type: ignore[method-assign]
    at = device.counter()
    log.reserve()  # the failed advance may count: none ahead until a commit records one
    assert log.spare is None and device.counter() == at
    log.close()


def test_boot_and_checkpoints_carry_the_counter_and_the_previous_boot(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        first = await rig.upload()
        await serve(rig, 2)
        second = await rig.upload()
        await flush(rig)
        b1, b2 = rig.recomputer.boots
        assert b1.previous is None and 0 < b1.counter < b2.counter
        assert b2.previous is not None and b2.previous.boot_id == first["boot_id"]
        assert (b2.previous.pairs_served, b2.previous.audits) == (2, 2)
        final = [c for c in rig.recomputer.checkpoints if c.boot_id == first["boot_id"]][-1]
        assert final.counter > b1.counter and final.undecided == 0
        assert b2.boot_id == second["boot_id"]
        await rig.gw.close()
    run(body())


def test_status_reveals_no_audit_decision_before_its_acknowledgement(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """Attack: read /status or /metrics right after a cheating request to learn whether
    its pair was kept, and roll back only then. Nothing there moves with the draw."""
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, epsilon=1.0))
        await rig.upload()
        await flush(rig)
        before = await rig.gw.status()
        metrics_before = rig.gw.metrics.render()
        await serve(rig, 1)  # kept (ε = 1), not yet acknowledged
        after = await rig.gw.status()
        assert (after["audits"], after["spool_depth"]) == (before["audits"],
                                                           before["spool_depth"])
        assert b"ivp_gateway_audits_total 0.0" in rig.gw.metrics.render()
        assert b"pairs_deleted" not in metrics_before
        await flush(rig)  # acknowledged by the recomputer: now it may say so
        assert (await rig.gw.status())["audits"] == 1
        assert b"ivp_gateway_audits_total 1.0" in rig.gw.metrics.render()
        await rig.gw.close()
    run(body())


def test_a_shut_down_gateway_keeps_sending_heartbeats(tmp_path: Path,
                                                       tiny_model_dir: Path) -> None:
    async def body() -> None:
        rig = await started(make_rig(tmp_path, tiny_model_dir, checkpoint_interval=0.1),
                            background_uplink=True)
        await rig.upload()
        answer = await rig.gw.control(rig.shutdown_envelope())
        assert answer["receipt"]["payloadType"].endswith("receipt+json;v=1")
        await asyncio.sleep(0.5)
        beats = [b for b in rig.recomputer.heartbeats if b.state == "shutdown"]
        assert beats and not beats[-1].locked and beats[-1].shutdown_nonce
        await rig.gw.close()
    run(body())
