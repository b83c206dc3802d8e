"""The sealed store: every row that grants trust carries a MAC made with the device key.

The operator owns the recomputer's disk, so SQLite alone is a convention: a row
written into ``recomputer.sqlite`` with the sqlite3 shell (an enrolment of a key of
their own, a re-admitted gateway, a verdict that passed) would be trusted after a
restart. Here each row of the :data:`SEALED` tables has a seal, an HMAC-SHA256 under a
key derived from the recomputer's device (``derive_key("recomputer/store-seal/v1")``),
over the table's name and the row's every column. Seals are made by TEMP triggers that
exist only on the recomputer's own connection, calling a SQL function that holds the
key: a row written by any other connection gets no seal, a row edited elsewhere no
longer matches its seal, and a row deleted elsewhere leaves its seal behind.

At open, :meth:`Sealer.check` compares every row with the seals; :func:`quarantine`
then moves each row without a seal out of its table into ``quarantine`` (kept as
evidence: nothing is thrown away) and records each seal without a row (a deleted row),
and the recomputer raises one ``store_tampered`` alarm per table. The cores only ever
see sealed rows.

What it does not stop: an operator who reads the device secret (``--device soft``
keeps it in a file) can make seals. An older copy of the whole file (rows and seals
together) is genuine, only old: the seal cannot tell; the device counter bound into
every commit of sealed rows can (``Sealer.writes`` tells the store a transaction
changed sealed rows; ``ivp.recomputer.store`` binds it, docs/TRUST.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

#: the tables whose rows grant trust: who is enrolled (and with which key), a gateway's
#: state (a re-admission), its boots (whitelisted or not), the whitelist, ε and the
#: reboot schedule (settings), the admin log and its burnt nonces, the audit queue (a
#: record marked verified leaves the queue), the verdicts, and the device counter value
#: the store last committed them under (``bound``: the rollback defence)
SEALED = ("enrolments", "gateways", "boots", "settings", "admin_log", "nonces", "audits",
          "verdicts", "bound")
SEAL_PURPOSE = "recomputer/store-seal/v1"
SEAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS seals(tbl TEXT NOT NULL, mac TEXT NOT NULL,
    PRIMARY KEY(tbl, mac)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quarantine(
    id INTEGER PRIMARY KEY, tbl TEXT NOT NULL, what TEXT NOT NULL, row TEXT NOT NULL,
    found REAL NOT NULL);
"""
#: at most this many rows are named in one alarm's detail (the rest are counted)
NAMED = 5


def _field(value: object) -> bytes:
    """One column, typed and length-prefixed, so no two rows encode alike."""
    if value is None:
        tag, raw = b"n", b""
    elif isinstance(value, bool | int):
        tag, raw = b"i", str(int(value)).encode()
    elif isinstance(value, float):
        tag, raw = b"f", value.hex().encode()
    elif isinstance(value, str):
        tag, raw = b"s", value.encode("utf-8", "surrogatepass")
    elif isinstance(value, bytes | bytearray | memoryview):
        tag, raw = b"b", bytes(value)
    else:  # SQLite hands a function nothing else
        raise TypeError(f"cannot seal a {type(value).__name__}")
    return tag + struct.pack(">Q", len(raw)) + raw


def _printable(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"hex": bytes(value).hex()}
    return value


@dataclass
class Finding:
    """What the check found in one table: rows without a valid seal (written or edited
    outside the recomputer) and seals without their row (rows deleted outside)."""

    table: str
    unsealed: list[dict[str, object]] = field(default_factory=list)  # rowid + columns
    missing: int = 0

    def describe(self) -> str:
        parts = []
        if self.unsealed:
            named = ", ".join(_name(self.table, r) for r in self.unsealed[:NAMED])
            more = len(self.unsealed) - NAMED
            parts.append(f"{len(self.unsealed)} row(s) without a valid seal (written or "
                         f"edited outside the recomputer) refused and quarantined: {named}"
                         + (f" and {more} more" if more > 0 else ""))
        if self.missing:
            parts.append(f"{self.missing} sealed row(s) deleted outside the recomputer")
        return f"{self.table}: " + "; ".join(parts)


def _name(table: str, row: dict[str, object]) -> str:
    """A short name for a refused row (its key columns)."""
    keys = {"enrolments": ("device_id", "kind"), "gateways": ("gateway_id", "state"),
            "boots": ("gateway_id", "boot_id"), "settings": ("key",),
            "admin_log": ("seq",), "nonces": ("nonce",), "audits": ("gateway_id", "audit_seq"),
            "verdicts": ("audit_id", "passed"), "bound": ("counter",)}.get(table, ())
    return "(" + ", ".join(f"{k}={row.get(k)!s:.40}" for k in keys) + ")"


class Sealer:
    """Makes and checks seals with ``key`` on one SQLite connection."""

    def __init__(self, key: bytes, tables: Sequence[str] = SEALED) -> None:
        if len(key) < 32:
            raise ValueError("a seal key must have at least 32 bytes")
        self._key = key
        self.tables = tuple(tables)
        self._columns: dict[str, list[str]] = {}
        #: sealed rows inserted, updated or deleted on the installed connection (by its
        #: triggers); the store reads it to know whether a commit grants trust
        self.writes = 0

    def mac(self, table: str, *values: object) -> str:
        """The seal of one row: HMAC-SHA256 over the table name and each column."""
        data = _field(table) + b"".join(_field(v) for v in values)
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()

    def _row_mac(self, table: str, *values: object) -> str:
        """:meth:`mac` as the triggers call it: also counts the sealed write."""
        self.writes += 1
        return self.mac(table, *values)

    def install(self, db: sqlite3.Connection) -> None:
        """Create the seal tables, the key's SQL function and the TEMP triggers that
        seal every insert, update and delete made on ``db`` (and on no other
        connection). Call after the schema exists, before any write."""
        db.executescript(SEAL_SCHEMA)
        # REPLACE deletes the row it replaces: only with recursive triggers does that
        # delete drop the old seal
        db.execute("PRAGMA recursive_triggers = ON")
        db.create_function("ivp_seal", -1, self.mac, deterministic=True)
        # not deterministic: SQLite must call it for every row it seals (it counts them)
        db.create_function("ivp_seal_row", -1, self._row_mac)
        for table in self.tables:
            cols = [r[1] for r in db.execute(f"PRAGMA main.table_info({table})")]
            if not cols:
                raise ValueError(f"no table {table} to seal")
            self._columns[table] = cols
            new = ", ".join(f"NEW.{c}" for c in cols)
            old = ", ".join(f"OLD.{c}" for c in cols)
            add = (f"INSERT OR IGNORE INTO seals VALUES ('{table}', "
                   f"ivp_seal_row('{table}', {new}));")
            drop = (f"DELETE FROM seals WHERE tbl = '{table}' AND "
                    f"mac = ivp_seal_row('{table}', {old});")
            for event, body in (("INSERT", add), ("UPDATE", drop + add), ("DELETE", drop)):
                db.execute(f"CREATE TEMP TRIGGER IF NOT EXISTS seal_{table}_{event.lower()} "
                           f"AFTER {event} ON main.{table} BEGIN {body} END")

    def columns(self, table: str) -> list[str]:
        return list(self._columns[table])

    def check(self, db: sqlite3.Connection) -> list[Finding]:
        """Every table's rows against its seals; a Finding for each table that differs."""
        found = []
        for table in self.tables:
            cols = self._columns[table]
            seals = {r[0] for r in db.execute("SELECT mac FROM seals WHERE tbl = ?", (table,))}
            finding = Finding(table)
            matched = 0
            for row in db.execute(f"SELECT rowid, {', '.join(cols)} FROM main.{table}"):
                if self.mac(table, *row[1:]) in seals:
                    matched += 1
                else:
                    finding.unsealed.append(
                        {"rowid": row[0], **{c: _printable(v) for c, v in zip(cols, row[1:],
                                                                             strict=True)}})
            finding.missing = len(seals) - matched
            if finding.unsealed or finding.missing:
                found.append(finding)
        return found


def quarantine(db: sqlite3.Connection, sealer: Sealer, findings: Iterable[Finding],
               now: float) -> None:
    """Move every unsealed row into ``quarantine`` and record (then forget) the seals of
    deleted rows, in one transaction, so that the next restart does not raise the same
    alarm again and the cores only ever load sealed rows.

    The store's own triggers (append-only history) are dropped for the move and made
    again before the commit; foreign keys must be off (a sealed verdict may name an
    audit row that was edited outside).
    """
    findings = list(findings)
    db.execute("BEGIN IMMEDIATE")
    try:
        triggers = db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"
                              ).fetchall()
        for name, _sql in triggers:
            db.execute(f"DROP TRIGGER main.{name}")
        for f in findings:
            for row in f.unsealed:
                db.execute("INSERT INTO quarantine(tbl, what, row, found) VALUES (?,?,?,?)",
                           (f.table, "unsealed", json.dumps(row, sort_keys=True), now))
                db.execute(f"DELETE FROM main.{f.table} WHERE rowid = ?", (row["rowid"],))
            if f.missing:
                cols = ", ".join(sealer.columns(f.table))
                kept = {r[0] for r in db.execute(
                    f"SELECT ivp_seal('{f.table}', {cols}) FROM main.{f.table}")}
                gone = [r[0] for r in db.execute("SELECT mac FROM seals WHERE tbl = ?",
                                                 (f.table,)) if r[0] not in kept]
                for mac in gone:
                    db.execute("INSERT INTO quarantine(tbl, what, row, found) VALUES "
                               "(?,?,?,?)", (f.table, "deleted", json.dumps({"seal": mac}),
                                             now))
                    db.execute("DELETE FROM seals WHERE tbl = ? AND mac = ?", (f.table, mac))
        for _name, sql in triggers:
            db.execute(sql)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


__all__ = ["SEALED", "SEAL_PURPOSE", "Finding", "Sealer", "quarantine"]
