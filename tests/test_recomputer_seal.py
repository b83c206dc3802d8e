"""The sealed recomputer store (``ivp.recomputer.seal``): rows that grant trust carry a
MAC made by the recomputer's device; rows written, edited or deleted outside the
recomputer are refused at the next start, kept in quarantine, and alarmed."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_recomputer_support import (
    Inspectors,
    ScriptedGateway,
    body,
    enrol_then_write_rogue,
    results,
    run,
)

from ivp.attacks.knockouts import knocked_out
from ivp.protocol.keys import SigningKey
from ivp.recomputer.seal import SEALED, Sealer
from ivp.recomputer.service import Recomputer
from ivp.recomputer.store import Store

pytest_plugins = ("test_recomputer_support",)
KEY = bytes(range(32))
ENROL = "INSERT INTO enrolments VALUES (?,?,?,?,?,?,?)"


def rogue_row(device_id: str = "rogue-gw") -> tuple[Any, ...]:
    key = SigningKey.generate().verify_key
    return (device_id, "gateway", key.hex, key.keyid, "http://127.0.0.1:9", time.time(), None)


def outside(path: Path, sql: str, args: tuple[Any, ...] = ()) -> None:
    """What the operator does with the sqlite3 shell: its own connection, no key."""
    with sqlite3.connect(path) as db:
        db.execute(sql, args)


def quarantined(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT tbl, what FROM quarantine ORDER BY id").fetchall()


def test_rows_written_by_the_store_stay_trusted(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = Store(path, Sealer(KEY))
    store.append_admin(1, b"{}", "h1", b"env", "n1", [(ENROL, rogue_row("gw-a"))])
    store.put_setting("epsilon", 0.25)
    store.put_setting("epsilon", 0.5)  # replaced: the old seal goes with the old row
    store.set_gateway("gw-a", "shutdown", "why", 1.0)
    store.set_gateway("gw-a", "readmitted", "", 2.0)  # an upsert: resealed
    store.close()
    again = Store(path, Sealer(KEY))
    assert again.tampered == []
    assert [e["device_id"] for e in again.snapshot().enrolments] == ["gw-a"]
    assert again.snapshot().settings["epsilon"] == 0.5


@pytest.mark.parametrize(("table", "sql", "args"), [
    ("enrolments", ENROL, rogue_row()),
    ("settings", "INSERT OR REPLACE INTO settings VALUES ('epsilon', '0.0')", ()),
    ("gateways", "INSERT INTO gateways VALUES ('gw-b', 'readmitted', '', 1.0, 0, NULL)", ()),
    ("nonces", "DELETE FROM nonces", ()),
])
def test_rows_written_edited_or_deleted_outside_are_refused(
        tmp_path: Path, table: str, sql: str, args: tuple[Any, ...]) -> None:
    path = tmp_path / "s.sqlite"
    store = Store(path, Sealer(KEY))
    store.append_admin(1, b"{}", "h1", b"env", "n1", [(ENROL, rogue_row("gw-a"))])
    store.put_setting("epsilon", 0.25)
    store.close()
    outside(path, sql, args)
    again = Store(path, Sealer(KEY))
    assert [f.table for f in again.tampered] == [table]
    snap = again.snapshot()
    assert [e["device_id"] for e in snap.enrolments] == ["gw-a"]  # the forged one is out
    assert snap.settings.get("epsilon") in (None, 0.25)  # never the forged 0.0
    assert snap.gateways == []
    assert quarantined(path)  # kept as evidence, not lost
    again.close()
    assert Store(path, Sealer(KEY)).tampered == []  # reported once, then held aside


def test_a_different_device_key_trusts_nothing(tmp_path: Path) -> None:
    """A store copied to another recomputer (or sealed by a key the operator made)."""
    path = tmp_path / "s.sqlite"
    store = Store(path, Sealer(KEY))
    store.append_admin(1, b"{}", "h1", b"env", "n1", [(ENROL, rogue_row("gw-a"))])
    store.close()
    other = Store(path, Sealer(bytes(32)))
    assert {f.table for f in other.tampered} == {"enrolments", "admin_log", "nonces"}
    assert other.snapshot().enrolments == [] and other.snapshot().admin_head is None


def test_edited_verdict_and_audit_are_refused(tmp_path: Path) -> None:
    """A failed verdict edited to pass, a queued record marked verified outside."""
    path = tmp_path / "s.sqlite"
    store = Store(path, Sealer(KEY))
    with store.transaction() as db:
        for i in (1, 2):
            db.execute("INSERT INTO audits(id, gateway_id, boot_id, audit_seq, pair_seq,"
                       " manifest_digest, received, envelope, payload) VALUES"
                       " (?,?,?,?,?,?,?,?,?)", (i, "gw-a", "b", i, i, "d", 1.0, b"e", b"p"))
        db.execute("INSERT INTO verdicts VALUES (1, 'gw-a', 'b', 1, 0, ?, 1.0)",
                   (b'{"passed": false}',))
        db.execute("UPDATE audits SET verified = 1 WHERE id = 1")
    store.close()
    outside(path, "DROP TRIGGER verdicts_no_update")  # the shell can drop a trigger
    outside(path, "UPDATE verdicts SET passed = 1")
    outside(path, "UPDATE audits SET verified = 1 WHERE id = 2")
    again = Store(path, Sealer(KEY))
    assert {f.table for f in again.tampered} == {"verdicts", "audits"}
    assert again.counts()["passed"] == 0  # the edited verdict is not counted
    with again.transaction() as db:  # a verdict the recomputer writes is sealed ...
        db.execute("INSERT INTO audits(id, gateway_id, boot_id, audit_seq, pair_seq,"
                   " manifest_digest, received, envelope, payload) VALUES"
                   " (3, 'gw-a', 'b', 3, 3, 'd', 2.0, x'00', x'00')")
        db.execute("INSERT INTO verdicts VALUES (3, 'gw-a', 'b', 3, 1, ?, 2.0)", (b"{}",))
    # ... and the trigger the shell dropped is back
    with pytest.raises(sqlite3.IntegrityError, match="append-only"), \
            again.transaction() as db:
        db.execute("UPDATE verdicts SET passed = 0")


# --- hypothesis: whatever the store writes survives; whatever else is written does not ----
values = st.one_of(st.integers(-2**63, 2**63 - 1), st.text(max_size=40),
                   st.floats(allow_nan=False), st.binary(max_size=40))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.text(min_size=1, max_size=12), values), min_size=1,
                     max_size=6, unique_by=lambda r: r[0]),
       forged=st.tuples(st.text(min_size=1, max_size=12), values), inside=st.booleans())
def test_any_row_is_trusted_only_if_the_store_wrote_it(
        tmp_path_factory: pytest.TempPathFactory, rows: list[tuple[str, Any]],
        forged: tuple[str, Any], inside: bool) -> None:
    path = tmp_path_factory.mktemp("h") / "s.sqlite"
    store = Store(path, Sealer(KEY))
    with store.transaction() as db:
        db.executemany("INSERT INTO settings VALUES (?, ?)", rows)
    if inside:
        with store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", forged)
    store.close()
    if not inside:
        outside(path, "INSERT OR REPLACE INTO settings VALUES (?, ?)", forged)
    again = Store(path, Sealer(KEY))
    with sqlite3.connect(path) as db:
        kept = dict(db.execute("SELECT key, value FROM settings").fetchall())
    again.close()
    if inside:
        assert again.tampered == []
        assert len(kept) == len({k for k, _ in rows} | {forged[0]})
    else:
        assert [f.table for f in again.tampered] == ["settings"]
        assert forged[0] not in kept  # refused (the row it replaced is gone: alarmed)
        replaced = forged[0] in {k for k, _ in rows}
        assert again.tampered[0].missing == int(replaced)
        assert set(kept) == {k for k, _ in rows} - {forged[0]}


# --- the recomputer: refused at restart, with an alarm -------------------------------------
def test_enrolment_written_into_the_store_is_refused_with_an_alarm(
        config: Any, inspectors: Inspectors, gateway: ScriptedGateway,
        tiny_engine: Any, tiny_manifest: Any) -> None:
    rogue = ScriptedGateway("rogue-gw", tiny_engine, tiny_manifest)

    async def main() -> None:
        path = await enrol_then_write_rogue(config, inspectors, gateway, rogue)
        second = Recomputer(config)
        assert set(second.ingest.devices) == {"gw-a"}  # trusted state did not change
        alarms = [a for a in await second.alarms() if a["kind"] == "store_tampered"]
        assert len(alarms) == 1 and "rogue-gw" in alarms[0]["detail"], alarms
        assert "enrolments: 1 row(s) without a valid seal" in alarms[0]["detail"]
        ack = await second.uplink(body(rogue.boot()))  # the rogue key still signs nothing
        assert results(ack)[0][0] is False
        ack = await second.uplink(body(gateway.boot()))  # the enrolled gateway works
        assert results(ack) == [(True, "")]
        await second.close()
        row = json.loads(sqlite3.connect(path).execute(
            "SELECT row FROM quarantine").fetchone()[0])
        assert row["device_id"] == "rogue-gw"
    run(main())


def test_seal_knockout_trusts_the_written_enrolment(
        config: Any, inspectors: Inspectors, tiny_engine: Any, tiny_manifest: Any) -> None:
    """With the seal check off the same row is trusted: the check is what refuses it."""
    rogue = ScriptedGateway("rogue-gw", tiny_engine, tiny_manifest)

    async def main() -> None:
        await enrol_then_write_rogue(config, inspectors, None, rogue)
        with knocked_out("seal"):
            second = Recomputer(config)
        assert "rogue-gw" in second.ingest.devices
        ack = await second.uplink(body(rogue.boot()))
        assert results(ack) == [(True, "")]
        assert not [a for a in await second.alarms() if a["kind"] == "store_tampered"]
        await second.close()
    run(main())


def test_every_sealed_table_exists() -> None:
    from ivp.recomputer.store_schema import SCHEMA

    assert all(f"CREATE TABLE IF NOT EXISTS {t}(" in SCHEMA for t in SEALED)
