"""The console's read-only window on the recomputer's store.

The console opens the recomputer's SQLite file a second time with ``mode=ro`` and
``query_only``: SQLite itself refuses any write through this connection, so no page,
however buggy, can change trusted state. WAL lets it read while the recomputer
writes; it sees every transaction the recomputer committed.

Only reads the console needs and the store does not offer live here (incremental alarm
reads, audits joined with their verdicts, per-boot audit counts); everything about the
live gateways comes from the service (``Recomputer.status``).
"""

from __future__ import annotations

import json
import sqlite3
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ivp.recomputer.store import AlarmRow


@dataclass(frozen=True)
class AuditRow:
    """One stored audit record with its verdict (None while it waits in the queue)."""

    id: int
    gateway_id: str
    boot_id: str
    audit_seq: int
    manifest_digest: str
    received: float
    verdict: dict[str, Any] | None
    envelope: bytes = b""
    payload: bytes = b""

    @property
    def status(self) -> str:
        if self.verdict is None:
            return "queued"
        return "passed" if self.verdict["passed"] else "failed"

    @property
    def max_delta(self) -> float | None:
        """max_t δ*_t of the verdict (None: no per-position figures were kept)."""
        figures = (self.verdict or {}).get("position_delta") or []
        return max(figures) if figures else None


@dataclass(frozen=True)
class BootRow:
    gateway_id: str
    boot_id: str
    model_id: str
    epsilon: float
    time: float  # the BOOT record's own time
    pairs_served: int | None  # the latest signed checkpoint's
    audits_claimed: int | None
    audits_received: int


class StoreReader:
    """Read-only queries over ``recomputer.sqlite``. One thread at a time."""

    def __init__(self, path: Path) -> None:
        uri = "file:" + urllib.parse.quote(str(Path(path).resolve())) + "?mode=ro"
        self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA query_only = ON")

    def close(self) -> None:
        self._db.close()

    # --- alarms -------------------------------------------------------------------------
    def alarm_marks(self) -> tuple[int, float, int]:
        """(newest id, newest last_time, acknowledged count): changes whenever an alarm
        is raised, repeated or acknowledged."""
        r = self._db.execute("SELECT COALESCE(MAX(id), 0), COALESCE(MAX(last_time), 0),"
                             " COUNT(acked_admin_seq) FROM alarms").fetchone()
        return int(r[0]), float(r[1]), int(r[2])

    def alarms_changed(self, after_id: int, after_time: float) -> list[AlarmRow]:
        """Alarms raised after ``after_id`` or repeated after ``after_time``, oldest first."""
        return [AlarmRow(**dict(r)) for r in self._db.execute(
            "SELECT * FROM alarms WHERE id > ? OR last_time > ? ORDER BY id",
            (after_id, after_time))]

    def alarms(self, limit: int = 500) -> list[AlarmRow]:
        """The newest ``limit`` alarms, newest first."""
        return [AlarmRow(**dict(r)) for r in self._db.execute(
            "SELECT * FROM alarms ORDER BY id DESC LIMIT ?", (limit,))]

    def open_alarms(self) -> int:
        return int(self._db.execute(
            "SELECT COUNT(*) FROM alarms WHERE acked_admin_seq IS NULL").fetchone()[0])

    def open_alarms_by_gateway(self) -> dict[str, int]:
        return {str(r[0]): int(r[1]) for r in self._db.execute(
            "SELECT gateway_id, COUNT(*) FROM alarms WHERE acked_admin_seq IS NULL"
            " AND gateway_id IS NOT NULL GROUP BY gateway_id")}

    # --- audits and verdicts --------------------------------------------------------------
    def audits(self, gateway_id: str | None = None, status: str | None = None,
               limit: int = 50, before: int | None = None) -> list[AuditRow]:
        """Audit records newest first, optionally of one gateway and one status
        (``passed``, ``failed``, ``queued``), with ids below ``before``."""
        where: list[str] = ["1"]
        args: list[Any] = []
        if gateway_id:
            where.append("a.gateway_id = ?")
            args.append(gateway_id)
        if status == "queued":
            where.append("v.audit_id IS NULL")
        elif status in ("passed", "failed"):
            where.append("v.passed = ?")
            args.append(1 if status == "passed" else 0)
        if before is not None:
            where.append("a.id < ?")
            args.append(before)
        rows = self._db.execute(
            "SELECT a.id, a.gateway_id, a.boot_id, a.audit_seq, a.manifest_digest, a.received,"
            " v.verdict FROM audits a LEFT JOIN verdicts v ON v.audit_id = a.id"
            f" WHERE {' AND '.join(where)} ORDER BY a.id DESC LIMIT ?", (*args, limit))
        return [_audit_row(r) for r in rows]

    def audit(self, audit_id: int) -> AuditRow | None:
        r = self._db.execute(
            "SELECT a.id, a.gateway_id, a.boot_id, a.audit_seq, a.manifest_digest, a.received,"
            " v.verdict, a.envelope, a.payload FROM audits a LEFT JOIN verdicts v"
            " ON v.audit_id = a.id WHERE a.id = ?", (audit_id,)).fetchone()
        return None if r is None else _audit_row(r, whole=True)

    def passed_verdicts(self, limit: int = 20000) -> list[dict[str, Any]]:
        """The newest ``limit`` passed verdicts (for the margin distribution)."""
        return [json.loads(r[0]) for r in self._db.execute(
            "SELECT verdict FROM verdicts WHERE passed = 1 ORDER BY audit_id DESC LIMIT ?",
            (limit,))]

    # --- boots, devices, sensors ----------------------------------------------------------
    def boots(self) -> list[BootRow]:
        """Every boot with its latest signed checkpoint and the audits stored of it."""
        received = {(r[0], r[1]): int(r[2]) for r in self._db.execute(
            "SELECT gateway_id, boot_id, COUNT(*) FROM audits GROUP BY gateway_id, boot_id")}
        latest = {(r[0], r[1]): (int(r[2]), int(r[3])) for r in self._db.execute(
            "SELECT c.gateway_id, c.boot_id, c.pairs_served, c.audits FROM checkpoints c"
            " JOIN (SELECT MAX(id) AS id FROM checkpoints GROUP BY gateway_id, boot_id) m"
            " ON c.id = m.id")}
        out = []
        for r in self._db.execute("SELECT gateway_id, boot_id, model_id, epsilon, time"
                                  " FROM boots ORDER BY received, rowid"):
            key = (str(r[0]), str(r[1]))
            cp = latest.get(key)
            out.append(BootRow(key[0], key[1], str(r[2]), float(r[3]), float(r[4]),
                               cp[0] if cp else None, cp[1] if cp else None,
                               received.get(key, 0)))
        return out

    def enrolled(self, kind: str) -> dict[str, dict[str, Any]]:
        """device_id -> {public_key, keyid, url, time} of enrolled devices of ``kind``."""
        return {str(r["device_id"]): {k: r[k] for k in ("public_key", "keyid", "url", "time")}
                for r in self._db.execute("SELECT * FROM enrolments WHERE kind = ?", (kind,))}

    def latest_sensor_events(self) -> dict[str, tuple[str, float, int]]:
        """sensor_id -> (envelope JSON, received, readings stored) of its newest reading."""
        counts = {str(r[0]): int(r[1]) for r in self._db.execute(
            "SELECT sensor_id, COUNT(*) FROM sensor_events GROUP BY sensor_id")}
        return {str(r[0]): (str(r[1]), float(r[2]), counts.get(str(r[0]), 0))
                for r in self._db.execute(
                    "SELECT sensor_id, event, received FROM sensor_events WHERE id IN"
                    " (SELECT MAX(id) FROM sensor_events GROUP BY sensor_id)")}

    # --- admin ------------------------------------------------------------------------------
    def admin_log(self) -> list[tuple[int, bytes, str, bytes]]:
        """(seq, entry bytes, hash, request envelope as received) in log order."""
        return [(int(r[0]), bytes(r[1]), str(r[2]), bytes(r[3])) for r in self._db.execute(
            "SELECT seq, entry, hash, envelope FROM admin_log ORDER BY seq")]

    def relays_by_admin_seq(self) -> dict[int, list[tuple[str, str, str]]]:
        """admin seq -> [(gateway_id, state, answer)] of the instruction's relays."""
        out: dict[int, list[tuple[str, str, str]]] = {}
        for r in self._db.execute("SELECT admin_seq, gateway_id, state, answer FROM relays"
                                  " ORDER BY id"):
            out.setdefault(int(r[0]), []).append((str(r[1]), str(r[2]), str(r[3])))
        return out


def _audit_row(r: sqlite3.Row, whole: bool = False) -> AuditRow:
    return AuditRow(
        id=int(r["id"]), gateway_id=str(r["gateway_id"]), boot_id=str(r["boot_id"]),
        audit_seq=int(r["audit_seq"]), manifest_digest=str(r["manifest_digest"]),
        received=float(r["received"]),
        verdict=None if r["verdict"] is None else json.loads(r["verdict"]),
        envelope=bytes(r["envelope"]) if whole else b"",
        payload=bytes(r["payload"]) if whole else b"")


__all__ = ["AuditRow", "BootRow", "StoreReader"]
