"""The recomputer's notice feed: every alarm and verdict, signed and chained
(:mod:`ivp.protocol.notices`), for inspectors who subscribe from outside.

:class:`NoticeLog` keeps the signed notices in ``notices.sqlite`` beside the store
(append-only: each stored alarm and verdict is published once, by its row id, in the
order the recomputer stored them). ``GET /notices?after=N&wait=S`` serves the notices
after N, waiting up to S seconds for one (a subscribed stream by long polling), with a
heartbeat signed at that moment. ``ivp watch URL`` is the inspector's side.

An alarm is published as it was when first stored; later repeats (its ``count``) and
acknowledgements are not re-published (an acknowledgement is in the admin log).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from ivp.protocol import envelope as env
from ivp.protocol.encoding import canonical
from ivp.protocol.keys import Signer
from ivp.protocol.notices import GENESIS, HEARTBEAT, NOTICE, Heartbeat, Notice, notice_hash

_SCHEMA = """
CREATE TABLE IF NOT EXISTS notices(
    seq INTEGER PRIMARY KEY, source TEXT NOT NULL UNIQUE, hash TEXT NOT NULL,
    envelope BLOB NOT NULL);
CREATE TRIGGER IF NOT EXISTS notices_no_update BEFORE UPDATE ON notices
    BEGIN SELECT RAISE(ABORT, 'notices are append-only'); END;
CREATE TRIGGER IF NOT EXISTS notices_no_delete BEFORE DELETE ON notices
    BEGIN SELECT RAISE(ABORT, 'notices are append-only'); END;
"""
MAX_BATCH = 500  # notices per answer


class NoticeLog:
    """Signed, numbered, chained notices, stored durably before they are served."""

    def __init__(self, path: Path, signer: Signer) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._signer = signer
        self._lock = threading.Lock()

    def head(self) -> tuple[int, str]:
        row = self._db.execute("SELECT seq, hash FROM notices ORDER BY seq DESC LIMIT 1"
                               ).fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

    def cursor(self, kind: str) -> int:
        """The highest store row id of ``kind`` already published (0: none)."""
        row = self._db.execute(
            "SELECT MAX(CAST(substr(source, ?) AS INTEGER)) FROM notices WHERE source LIKE ?",
            (len(kind) + 2, f"{kind}:%")).fetchone()
        return int(row[0] or 0)

    def publish(self, items: list[tuple[str, int, float, dict[str, Any]]]) -> int:
        """Sign and append (kind, store row id, time, body) items not yet published, in
        order; returns how many were new."""
        new = 0
        with self._lock:
            seq, prev = self.head()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for kind, row_id, when, body in items:
                    source = f"{kind}:{row_id}"
                    if self._db.execute("SELECT 1 FROM notices WHERE source = ?",
                                        (source,)).fetchone():
                        continue
                    notice = Notice(seq=seq + 1, prev=prev, kind=kind,  # type: ignore[arg-type]
                                    time=when, body=body)
                    payload = canonical(notice)
                    data = env.sign(NOTICE, payload, [self._signer]).to_bytes()
                    seq, prev = seq + 1, notice_hash(payload)
                    self._db.execute("INSERT INTO notices VALUES (?,?,?,?)",
                                     (seq, source, prev, data))
                    new += 1
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return new

    def after(self, seq: int, limit: int = MAX_BATCH) -> list[bytes]:
        return [bytes(r[0]) for r in self._db.execute(
            "SELECT envelope FROM notices WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, min(limit, MAX_BATCH)))]

    def heartbeat(self, now: float | None = None) -> bytes:
        """A heartbeat naming the head, signed now."""
        seq, head = self.head()
        beat = Heartbeat(time=time.time() if now is None else now, head_seq=seq, head=head)
        return env.sign(HEARTBEAT, canonical(beat), [self._signer]).to_bytes()

    def close(self) -> None:
        self._db.close()


__all__ = ["MAX_BATCH", "NoticeLog"]
