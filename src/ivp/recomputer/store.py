"""The recomputer's durable state: one SQLite file, written before anything is acknowledged.

Tables: enrolments, gateways (state as the recomputer sees it, and the control
message — SHUTDOWN or READMIT — pending delivery), boots, checkpoints, audits (the
durable proof-request queue: ``verified = 0`` rows are the queue), verdicts, alarms,
gateway alarms (the signed envelopes of the gateways' own alarms), refused (records
signed by an enrolled gateway but refused: kept as evidence, since the gateway deletes
its copy on the signed refusal), the latest heartbeat per gateway, the hash-chained
admin log, used admin nonces, relays (inspectors' instructions to forward to each
gateway), settings (whitelist, ε, reboot schedule) and sensor events.

Sealing (``ivp.recomputer.seal``): every row that grants trust carries an HMAC made by
the recomputer's device key on this connection only; rows written, edited or deleted
by anyone else are found at open, moved to ``quarantine`` and reported (``tampered``).

Rollback (with a ``device``): a genuine older copy of the whole file passes the seals,
so every commit that changes sealed rows is also **bound to the device's monotonic
counter**, as the gateway binds its log (``ivp.gateway.rollback``): just before COMMIT
it advances the counter and records the new value in the sealed ``bound`` row of that
same commit. At open the store's value is judged against the device's by the
gateway's own rule (``rollback.judge``: equal, or one behind after a crash between the
advance and the COMMIT, is a store that lost nothing anyone was told of). Further
behind, missing while the device has counted, or ahead of the device, the store is
``locked``: no commit that changes sealed rows goes through (StoreRolledBackError)
until one made with ``accept=True`` (the inspectors' quorum ``accept_store``) binds it
again. One commit of slack means the last commit alone could be undone unseen, so a
commit whose effect leaves the recomputer at once — an admin request's answer, a
SHUTDOWN — is followed by a bare one (:meth:`confirm`) before it leaves; an uplink
batch or a verdict undone alone is seen anyway (the gateways' signed counts claim
the records, the audit queue verifies again). Commits that change no sealed row
(alarms, sensor readings, relays, the served times) cost no counter advance: the
counter moves once per trust-granting commit — an uplink batch, a batch of verdicts,
an admin request — not per row, which keeps it to one extra sync (a TPM NV
increment, ~2 ms; a sealed slot and an fdatasync with ``--device soft``) per group
commit, as on the gateway (an admin request or a SHUTDOWN pays two).

Durability: WAL journal with ``synchronous=FULL``, so a transaction that returned is
on disk (an Ack is sent only after its transaction returned). Triggers make the
admin log, the verdicts and the audit envelopes append-only: a bug (or a careless
operator with the sqlite3 shell) cannot rewrite history through the normal API.

The store does no checking of its own: the pure cores (``ingest``, ``admin``) decide,
the store records. It is used from one thread at a time (the service runs every call
on a single-thread executor).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ivp.device import Device
from ivp.errors import PeerDataError, StoreRolledBackError
from ivp.gateway.rollback import CounterCheck, judge
from ivp.protocol.encoding import to_builtins
from ivp.protocol.envelope import Envelope
from ivp.recomputer.seal import SEALED, Finding, Sealer, quarantine
from ivp.recomputer.store_schema import SCHEMA, TRIGGERS


def _payload(envelope: bytes) -> bytes:
    return Envelope.from_bytes(bytes(envelope)).payload_bytes()


@dataclass(frozen=True)
class AlarmRow:
    """An alarm as stored. Repeats of an open alarm (same kind, gateway, boot) bump
    ``count`` instead of adding rows, so a flood of refused records stays readable."""

    id: int
    kind: str
    gateway_id: str | None
    boot_id: str | None
    detail: str
    time: float
    last_time: float
    count: int
    acked_admin_seq: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "gateway_id": self.gateway_id,
            "boot_id": self.boot_id, "detail": self.detail, "time": self.time,
            "last_time": self.last_time, "count": self.count,
            "acknowledged": self.acked_admin_seq is not None,
            "acked_admin_seq": self.acked_admin_seq,
        }


@dataclass(frozen=True)
class PendingRelay:
    """An inspectors' request to relay to one gateway, as its ``relay_seq``-th relay."""

    id: int
    gateway_id: str
    relay_seq: int
    admin_seq: int
    instruction: str
    envelope: bytes


@dataclass(frozen=True)
class QueuedAudit:
    """One unverified audit record: the unit of work for the worker pool."""

    id: int
    gateway_id: str
    boot_id: str
    audit_seq: int
    manifest_digest: str
    payload: bytes


@dataclass
class Snapshot:
    """Everything the pure cores need to resume after a restart."""

    enrolments: list[dict[str, Any]] = field(default_factory=list)
    gateways: list[dict[str, Any]] = field(default_factory=list)
    boots: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # latest per boot
    claims: list[dict[str, Any]] = field(default_factory=list)  # audits claimed, first when
    audit_heads: list[dict[str, Any]] = field(default_factory=list)  # per boot
    nonces: set[str] = field(default_factory=set)
    admin_head: tuple[int, str] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    served: dict[str, float] = field(default_factory=dict)
    sensor_heads: dict[str, int] = field(default_factory=dict)
    alarm_heads: list[dict[str, Any]] = field(default_factory=list)  # per gateway
    heartbeats: dict[str, tuple[float, int]] = field(default_factory=dict)  # received, counter


class Store:
    """SQLite at ``path``; see the module docstring for the durability contract."""

    def __init__(self, path: Path, sealer: Sealer | None = None,
                 now: float | None = None, device: Device | None = None) -> None:
        """Open (or create) the store; with ``sealer``, check every trust-granting row
        against its seal first and quarantine the rows that fail (``self.tampered``
        lists them by table; the caller raises the alarms); with ``device`` too, judge
        the store's bound counter against the device's (``self.rollback``; the caller
        raises the alarm of a locked store)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self.journal_mode = str(self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        self._db.execute("PRAGMA synchronous=FULL")
        self.sync_mode = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[
            int(self._db.execute("PRAGMA synchronous").fetchone()[0])
        ]
        self._db.executescript(SCHEMA + TRIGGERS)
        relay_columns = {r[1] for r in self._db.execute("PRAGMA table_info(relays)")}
        if "relay_seq" not in relay_columns:  # a store from before numbered relays
            self._db.execute("ALTER TABLE relays ADD COLUMN relay_seq INTEGER NOT NULL "
                             "DEFAULT 0")
        self.tampered: list[Finding] = []
        if sealer is not None:
            sealer.install(self._db)
            self.tampered = sealer.check(self._db)
            if self.tampered:  # foreign keys still off: a kept verdict may name a moved audit
                quarantine(self._db, sealer, self.tampered,
                           time.time() if now is None else now)
        self._db.execute("PRAGMA foreign_keys=ON")
        self._sealer = sealer
        self._device = device
        self._accepted = False
        self.rollback: CounterCheck | None = None
        self.rollback_error = ""  # why the counter could not be read, if it could not
        if device is not None:
            if sealer is None:
                raise ValueError("a store bound to a device counter must be sealed")
            self.rollback = self._judge(device)

    def _judge(self, device: Device) -> CounterCheck:
        """The store's bound counter (only a sealed row counts: an edited one was just
        quarantined) against the device's; a device counter that does not open counts
        as a set-back store, as on the gateway."""
        bound = self.bound_counter()
        history = any(self._db.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone()
                      for t in SEALED if t != "bound")
        try:
            return judge(bound, device.counter(), history)
        except PeerDataError as exc:
            self.rollback_error = str(exc)
            return CounterCheck("rolled_back", bound, 0)

    @property
    def locked(self) -> bool:
        """The store was set back and not yet accepted: no trust-granting commit."""
        return self.rollback is not None and self.rollback.locked and not self._accepted

    def _bind(self, accept: bool) -> None:
        """Just before COMMIT of a transaction that changed sealed rows: advance the
        device counter, then record its new value in this very commit (a crash after
        the advance leaves the store one behind: ``interrupted``, not a rollback).

        Raises:
            StoreRolledBackError: the store is locked and this is not the acceptance.
        """
        assert self._device is not None
        if self.locked and not accept:
            raise StoreRolledBackError(
                "the recomputer's store was set back (store_rolled_back): it commits no "
                "trust-granting state until the inspectors accept it (accept_store)")
        value = self._device.advance_counter()
        self._db.execute("INSERT OR REPLACE INTO bound VALUES (1, ?)", (value,))

    def confirm(self) -> None:
        """A bare commit that only advances the counter and binds it: made after a
        commit whose effect leaves the recomputer (an admin answer, a SHUTDOWN), so
        that undoing that commit means undoing two counted commits — which the one
        commit of slack a crash is allowed never covers (``rollback.judge``).

        Raises:
            StoreRolledBackError: the store is locked.
        """
        if self._device is None:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._bind(False)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def bound_counter(self) -> int | None:
        row = self._db.execute("SELECT counter FROM bound WHERE id = 1").fetchone()
        return None if row is None else int(row[0])

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self, accept: bool = False) -> Iterator[sqlite3.Connection]:
        """One durable transaction (BEGIN IMMEDIATE … COMMIT, or ROLLBACK on error);
        bound to the device counter if it changed sealed rows (``accept``: the one
        commit allowed in a locked store, which accepts it)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            before = self._sealer.writes if self._sealer is not None else 0
            yield self._db
            if self._device is not None and self._sealer is not None and (
                    accept or self._sealer.writes != before):
                self._bind(accept)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        if accept:
            self._accepted = True

    # --- snapshot -------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        db = self._db
        snap = Snapshot()
        snap.enrolments = [dict(r) for r in db.execute("SELECT * FROM enrolments")]
        snap.gateways = [dict(r) for r in db.execute(
            "SELECT gateway_id, state, reason, time, shutdown_pending FROM gateways")]
        snap.boots = [dict(r) for r in db.execute(
            "SELECT gateway_id, boot_id, model_id, manifest_digest, epsilon, time, url,"
            " received, whitelisted FROM boots ORDER BY received, rowid")]
        snap.checkpoints = [
            {**dict(r), "payload": _payload(r["envelope"])} for r in db.execute(
                "SELECT c.gateway_id, c.boot_id, c.received, c.envelope FROM checkpoints c"
                " JOIN (SELECT MAX(id) AS id FROM checkpoints GROUP BY gateway_id, boot_id) m"
                " ON c.id = m.id")]
        snap.claims = [dict(r) for r in db.execute(
            "SELECT gateway_id, boot_id, audits, MIN(received) AS received FROM checkpoints"
            " GROUP BY gateway_id, boot_id, audits ORDER BY gateway_id, boot_id, audits")]
        snap.audit_heads = []
        for r in db.execute(
                "SELECT gateway_id, boot_id, MAX(audit_seq) AS last_seq, MAX(pair_seq) AS"
                " last_pair_seq, COUNT(*) AS n FROM audits GROUP BY gateway_id, boot_id"
                ).fetchall():
            head = dict(r)
            if head["n"] != head["last_seq"]:  # a gap: every number, to know which
                head["numbers"] = db.execute(
                    "SELECT audit_seq, pair_seq FROM audits WHERE gateway_id = ? AND"
                    " boot_id = ?", (head["gateway_id"], head["boot_id"])).fetchall()
            snap.audit_heads.append(head)
        snap.nonces = {r[0] for r in db.execute("SELECT nonce FROM nonces")}
        head = db.execute("SELECT seq, hash FROM admin_log ORDER BY seq DESC LIMIT 1").fetchone()
        snap.admin_head = (int(head[0]), str(head[1])) if head else None
        snap.settings = {r[0]: json.loads(r[1]) for r in db.execute("SELECT * FROM settings")}
        snap.served = {r[0]: float(r[1]) for r in db.execute("SELECT * FROM served")}
        snap.sensor_heads = {r[0]: int(r[1]) for r in db.execute(
            "SELECT sensor_id, MAX(seq) FROM sensor_events GROUP BY sensor_id")}
        snap.alarm_heads = []
        for r in db.execute("SELECT gateway_id, MAX(seq) AS last_seq, COUNT(*) AS n"
                            " FROM gateway_alarms GROUP BY gateway_id").fetchall():
            head = {**dict(r), "last_pair_seq": 0}
            if head["n"] != head["last_seq"]:
                head["numbers"] = [(int(x[0]), 0) for x in db.execute(
                    "SELECT seq FROM gateway_alarms WHERE gateway_id = ?", (r[0],))]
            snap.alarm_heads.append(head)
        snap.heartbeats = {r[0]: (float(r[1]), int(r[2])) for r in db.execute(
            "SELECT gateway_id, received, counter FROM heartbeats")}
        return snap

    def boot_envelope(self, gateway_id: str, boot_id: str) -> bytes:
        row = self._db.execute("SELECT envelope FROM boots WHERE gateway_id = ? AND boot_id = ?",
                               (gateway_id, boot_id)).fetchone()
        return bytes(row[0])

    # --- uplink -----------------------------------------------------------------------------
    def write_uplink(self, effects: Sequence[Any], alarms: Sequence[Any],
                     evidence: Sequence[Any] = ()) -> list[int | None]:
        """Record admitted envelopes, refused ones kept as evidence and raised alarms
        in ONE durable transaction.

        Returns, per effect, the audit row id (audits) or None. Effects and evidence are
        the ``ingest`` objects; the store reads their fields only. Evidence already held
        (the same payload digest) is not stored twice.
        """
        ids: list[int | None] = []
        with self.transaction() as db:
            for e in effects:
                ids.append(self._write_effect(db, e))
            for v in evidence:
                db.execute("INSERT OR IGNORE INTO refused(gateway_id, boot_id, kind, n,"
                           " digest, error, received, envelope) VALUES (?,?,?,?,?,?,?,?)",
                           (v.gateway_id, v.boot_id, v.kind, v.n, v.digest, v.error,
                            v.received, v.envelope))
            for a in alarms:
                self._add_alarm(db, a)
        return ids

    def evidence(self, gateway_id: str | None = None) -> list[dict[str, Any]]:
        """Refused records kept as evidence (without their envelopes), oldest first."""
        return [dict(r) for r in self._db.execute(
            "SELECT id, gateway_id, boot_id, kind, n, digest, error, received FROM refused"
            " WHERE ? IS NULL OR gateway_id = ? ORDER BY id", (gateway_id, gateway_id))]

    @staticmethod
    def _write_effect(db: sqlite3.Connection, e: Any) -> int | None:
        kind = e.kind
        if kind == "boot":
            b = e.record
            db.execute(
                "INSERT INTO boots VALUES (?,?,?,?,?,?,?,?,?,?)",
                (b.gateway_id, b.boot_id, b.model_id, b.manifest_digest, b.epsilon, b.time,
                 e.url, e.received, int(e.whitelisted), e.envelope),
            )
            return None
        if kind == "checkpoint":
            c = e.record
            db.execute(
                "INSERT INTO checkpoints(gateway_id, boot_id, pairs_served, audits, chain_head,"
                " time, received, envelope) VALUES (?,?,?,?,?,?,?,?)",
                (c.gateway_id, c.boot_id, c.pairs_served, c.audits, c.chain_head, c.time,
                 e.received, e.envelope),
            )
            return None
        if kind == "audit":
            r = e.record
            cur = db.execute(
                "INSERT INTO audits(gateway_id, boot_id, audit_seq, pair_seq, manifest_digest,"
                " received, envelope, payload) VALUES (?,?,?,?,?,?,?,?)",
                (r.gateway_id, r.boot_id, r.audit_seq, r.pair.tag.seq, e.manifest_digest,
                 e.received, e.envelope, e.payload),
            )
            return int(cur.lastrowid or 0)
        if kind == "alarm":
            a = e.record
            db.execute("INSERT INTO gateway_alarms VALUES (?,?,?,?,?,?,?)",
                       (a.gateway_id, a.seq, a.kind, a.boot_id, a.time, e.received,
                        e.envelope))
            return None
        if kind == "heartbeat":  # only the latest counts (when it was last heard)
            h = e.record
            db.execute("INSERT OR REPLACE INTO heartbeats VALUES (?,?,?,?,?)",
                       (h.gateway_id, h.state, h.counter, e.received, e.envelope))
            return None
        return None  # duplicates: nothing to write

    # --- alarms -----------------------------------------------------------------------------
    def add_alarms(self, alarms: Iterable[Any], above: int = 0) -> list[int]:
        """Store alarms; ``above``: number them above this id (the notice feed's
        cursor: after a restored store the row ids start again below what the feed
        already published, and an alarm under a published id would never be sent)."""
        with self.transaction() as db:
            ids = []
            for a in alarms:
                top = db.execute("SELECT COALESCE(MAX(id), 0) FROM alarms").fetchone()[0]
                ids.append(self._add_alarm(db, a, max(int(top), above) + 1 if above else None))
            return ids

    @staticmethod
    def _add_alarm(db: sqlite3.Connection, a: Any, alarm_id: int | None = None) -> int:
        row = db.execute(
            "SELECT id FROM alarms WHERE kind = ? AND gateway_id IS ? AND boot_id IS ?"
            " AND acked_admin_seq IS NULL ORDER BY id DESC LIMIT 1",
            (a.kind, a.gateway_id, a.boot_id),
        ).fetchone() if a.dedupe else None
        repeats = getattr(a, "repeats", 1)
        if row is not None:
            db.execute("UPDATE alarms SET count = count + ?, last_time = ?, detail = ?"
                       " WHERE id = ?", (repeats, a.time, a.detail, row[0]))
            return int(row[0])
        cur = db.execute(
            "INSERT INTO alarms(id, kind, gateway_id, boot_id, detail, time, last_time,"
            " count) VALUES (?,?,?,?,?,?,?,?)",
            (alarm_id, a.kind, a.gateway_id, a.boot_id, a.detail, a.time, a.time, repeats),
        )
        return int(cur.lastrowid or 0)

    def alarms(self, open_only: bool = False) -> list[AlarmRow]:
        sql = "SELECT * FROM alarms" + (" WHERE acked_admin_seq IS NULL" if open_only else "")
        return [AlarmRow(**dict(r)) for r in self._db.execute(sql + " ORDER BY id")]

    def alarms_after(self, alarm_id: int, limit: int = 500) -> list[AlarmRow]:
        """Alarms stored after ``alarm_id``, in order (the notice feed's source)."""
        return [AlarmRow(**dict(r)) for r in self._db.execute(
            "SELECT * FROM alarms WHERE id > ? ORDER BY id LIMIT ?", (alarm_id, limit))]

    def alarm(self, alarm_id: int) -> AlarmRow | None:
        r = self._db.execute("SELECT * FROM alarms WHERE id = ?", (alarm_id,)).fetchone()
        return AlarmRow(**dict(r)) if r else None

    def open_alarm_keys(self) -> set[tuple[str, str | None, str | None]]:
        return {(r[0], r[1], r[2]) for r in self._db.execute(
            "SELECT kind, gateway_id, boot_id FROM alarms WHERE acked_admin_seq IS NULL")}

    # --- queue and verdicts -----------------------------------------------------------------
    def queued(self) -> list[QueuedAudit]:
        """Every audit record without a verdict, oldest first (re-queued at start)."""
        return [
            QueuedAudit(r["id"], r["gateway_id"], r["boot_id"], r["audit_seq"],
                        r["manifest_digest"], bytes(r["payload"]))
            for r in self._db.execute(
                "SELECT id, gateway_id, boot_id, audit_seq, manifest_digest, payload"
                " FROM audits WHERE verified = 0 ORDER BY id")
        ]

    def write_verdicts(self, verdicts: Sequence[tuple[int, Any, bytes]],
                       alarms: Sequence[Any] = ()) -> list[int]:
        """Store verdicts (audit id, Verdict, canonical bytes) and mark them verified.

        A verdict for an audit that already has one is skipped (exactly once, even if a
        worker answered twice). Returns the audit ids newly given a verdict.
        """
        fresh: list[int] = []
        with self.transaction() as db:
            for audit_id, v, raw in verdicts:
                cur = db.execute(
                    "INSERT OR IGNORE INTO verdicts VALUES (?,?,?,?,?,?,?)",
                    (audit_id, v.gateway_id, v.boot_id, v.audit_seq, int(v.passed), raw, v.time),
                )
                if cur.rowcount:
                    db.execute("UPDATE audits SET verified = 1 WHERE id = ?", (audit_id,))
                    fresh.append(audit_id)
            for a in alarms:
                self._add_alarm(db, a)
        return fresh

    def verdicts(self, gateway_id: str | None = None, limit: int = 10000) -> list[bytes]:
        if gateway_id is None:
            rows = self._db.execute("SELECT verdict FROM verdicts ORDER BY audit_id LIMIT ?",
                                    (limit,))
        else:
            rows = self._db.execute("SELECT verdict FROM verdicts WHERE gateway_id = ?"
                                    " ORDER BY audit_id LIMIT ?", (gateway_id, limit))
        return [bytes(r[0]) for r in rows]

    def verdicts_after(self, audit_id: int, limit: int = 500
                       ) -> list[tuple[int, float, bytes]]:
        """(audit id, time, verdict bytes) stored after ``audit_id``, in order."""
        return [(int(r[0]), float(r[1]), bytes(r[2])) for r in self._db.execute(
            "SELECT audit_id, time, verdict FROM verdicts WHERE audit_id > ?"
            " ORDER BY audit_id LIMIT ?", (audit_id, limit))]

    def counts(self) -> dict[str, int]:
        db = self._db
        passed, failed = db.execute(
            "SELECT COALESCE(SUM(passed), 0), COALESCE(SUM(1 - passed), 0) FROM verdicts"
        ).fetchone()
        return {
            "audits": int(db.execute("SELECT COUNT(*) FROM audits").fetchone()[0]),
            "queued": int(db.execute("SELECT COUNT(*) FROM audits WHERE verified = 0")
                          .fetchone()[0]),
            "passed": int(passed), "failed": int(failed),
            "alarms": int(db.execute("SELECT COUNT(*) FROM alarms").fetchone()[0]),
            "open_alarms": int(db.execute(
                "SELECT COUNT(*) FROM alarms WHERE acked_admin_seq IS NULL").fetchone()[0]),
        }

    def verdict_counts_by_gateway(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self._db.execute(
            "SELECT gateway_id, SUM(passed), SUM(1 - passed) FROM verdicts GROUP BY gateway_id"
        ):
            out[r[0]] = {"passed": int(r[1]), "failed": int(r[2])}
        return out

    # --- gateways ---------------------------------------------------------------------------
    def set_gateway(self, gateway_id: str, state: str, reason: str, now: float,
                    shutdown_pending: bool = False, shutdown_envelope: bytes | None = None,
                    alarms: Sequence[Any] = ()) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO gateways VALUES (?,?,?,?,?,?) ON CONFLICT(gateway_id) DO UPDATE"
                " SET state = excluded.state, reason = excluded.reason, time = excluded.time,"
                " shutdown_pending = excluded.shutdown_pending,"
                " shutdown_envelope = excluded.shutdown_envelope",
                (gateway_id, state, reason, now, int(shutdown_pending), shutdown_envelope),
            )
            for a in alarms:
                self._add_alarm(db, a)

    def pending_shutdowns(self) -> list[tuple[str, bytes]]:
        return [(r[0], bytes(r[1])) for r in self._db.execute(
            "SELECT gateway_id, shutdown_envelope FROM gateways WHERE shutdown_pending = 1"
            " AND shutdown_envelope IS NOT NULL")]

    def control_envelope(self, gateway_id: str) -> bytes | None:
        """The last control message (SHUTDOWN or READMIT) made for ``gateway_id``."""
        row = self._db.execute("SELECT shutdown_envelope FROM gateways WHERE gateway_id = ?",
                               (gateway_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def shutdown_delivered(self, gateway_id: str, receipted: float | None = None) -> None:
        """The pending control message was receipted by the gateway (at ``receipted``)."""
        with self.transaction() as db:
            db.execute("UPDATE gateways SET shutdown_pending = 0 WHERE gateway_id = ?",
                       (gateway_id,))

    # --- admin ------------------------------------------------------------------------------
    def append_admin(self, seq: int, entry: bytes, digest: str, envelope: bytes,
                     nonce: str | None, effects: Sequence[tuple[str, tuple[Any, ...]]],
                     alarms: Sequence[Any] = (), accept: bool = False) -> None:
        """Append one admin log entry, burn its nonce (if accepted) and apply its
        effects (SQL statements built by ``service``), all in one transaction
        (``accept``: the inspectors' ``accept_store``, which unlocks a set-back store)."""
        with self.transaction(accept=accept) as db:
            db.execute("INSERT INTO admin_log VALUES (?,?,?,?)", (seq, entry, digest, envelope))
            if nonce is not None:
                db.execute("INSERT INTO nonces VALUES (?,?)", (nonce, seq))
            for sql, args in effects:
                db.execute(sql, args)
            for a in alarms:
                self._add_alarm(db, a)

    def admin_log(self, since: int = 0) -> list[tuple[int, bytes, str]]:
        return [(int(r[0]), bytes(r[1]), str(r[2])) for r in self._db.execute(
            "SELECT seq, entry, hash FROM admin_log WHERE seq > ? ORDER BY seq", (since,))]

    def admin_envelope(self, seq: int) -> bytes | None:
        r = self._db.execute("SELECT envelope FROM admin_log WHERE seq = ?", (seq,)).fetchone()
        return bytes(r[0]) if r else None

    # --- relays (inspectors' instructions forwarded to the gateways) ----------------------------
    def pending_relays(self, gateway_id: str | None = None,
                       limit: int = 1000) -> list[PendingRelay]:
        """Relays not yet answered, oldest first."""
        return [PendingRelay(int(r[0]), str(r[1]), int(r[2]), int(r[3]), str(r[4]),
                             bytes(r[5])) for r in self._db.execute(
            "SELECT id, gateway_id, relay_seq, admin_seq, instruction, envelope FROM relays"
            " WHERE state = 'pending' AND (? IS NULL OR gateway_id = ?) ORDER BY id LIMIT ?",
            (gateway_id, gateway_id, limit))]

    def relay_targets(self) -> list[str]:
        """Gateways with relays not yet answered."""
        return [str(r[0]) for r in self._db.execute(
            "SELECT DISTINCT gateway_id FROM relays WHERE state = 'pending'")]

    def relay_done(self, relay_id: int, state: str, answer: str,
                   alarms: Sequence[Any] = ()) -> None:
        """Mark a relay ``delivered`` or ``refused`` (with the gateway's answer)."""
        with self.transaction() as db:
            db.execute("UPDATE relays SET state = ?, answer = ? WHERE id = ?",
                       (state, answer[:2000], relay_id))
            for a in alarms:
                self._add_alarm(db, a)

    def relay_counts(self) -> dict[str, dict[str, int]]:
        """Per gateway: relays by state."""
        out: dict[str, dict[str, int]] = {}
        for r in self._db.execute("SELECT gateway_id, state, COUNT(*) FROM relays"
                                  " GROUP BY gateway_id, state"):
            out.setdefault(r[0], {})[r[1]] = int(r[2])
        return out

    # --- settings and misc --------------------------------------------------------------------
    def put_setting(self, key: str, value: Any) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)",
                       (key, json.dumps(to_builtins(value), sort_keys=True)))

    def put_served(self, served: dict[str, float]) -> None:
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO served VALUES (?, ?)", list(served.items()))

    def add_sensor_events(self, events: Sequence[tuple[str, int, str, str, float]],
                          alarms: Sequence[Any] = ()) -> None:
        """Store readings (sensor, seq, kind, envelope JSON, received) and their alarms."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO sensor_events(sensor_id, seq, kind, event, received)"
                " VALUES (?,?,?,?,?)", list(events))
            for a in alarms:
                self._add_alarm(db, a)

    def sensor_events(self) -> list[tuple[str, float]]:
        return [(str(r[0]), float(r[1])) for r in self._db.execute(
            "SELECT event, received FROM sensor_events ORDER BY id")]
