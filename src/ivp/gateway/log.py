"""The durable log (SNG property 3's memory): the rolling I/O log and the audit spool,
SQLite on the operator's disk, sealed. The only module of the gateway that touches SQLite.

The note's gateway NVMe holds "whitelist hashes + rolling I/O buffer". The operator
holds that disk, so:

* every pair and every spooled envelope is **sealed** (AES-256-GCM under a key the
  device derives from its UID, ``device.seal``), with associated data naming its
  place (boot, position), so the operator can neither read the traffic nor move a
  record to another place unseen; after a tamper the key is gone and nothing here can
  be read by anyone;
* every pair is **hash-chained** (``protocol.chain``) per boot; the chain head lives
  in ``boots`` and goes out in checkpoints and audit records, so a deleted, changed or
  reordered pair breaks what the recomputer holds (what is chained, and the records
  that carry the heads, are decided by the pure ``serving`` core: this module reads
  the stored head, calls it, and writes what it returns);
* commits are **durable** (WAL, ``synchronous=FULL``): :meth:`PairLog.append` returns
  only after the pairs are on disk, and the gateway releases a response only after
  that (several concurrent pairs may share one commit: group commit);
* a **streamed** pair is durable chunk by chunk: :meth:`PairLog.progress` keeps each
  open stream's first row (the pair without output: prompt, parameters, seed, tag)
  and then one sealed row per chunk holding only what it adds, before its tokens are
  released (so a stream costs the log bytes in proportion to its length); the pair is
  chained once, whole, when the stream ends (:meth:`append` drops the rows in the same
  commit), and a stream the end of a boot or a crash cut is chained as it stood
  (:meth:`cut_streams`: the first row plus every chunk, in order), so no released
  token is ever missing; a stream whose rows do not open or miss a chunk is refused
  (alarmed), never chained short;
* the sampling decision (:meth:`PairLog.decide`) turns a pair into a signed, numbered
  audit record in the spool *in the same transaction* that deletes the pair, so a
  crash can never lose a kept pair, skip an audit number or number one twice;
* the spool is store-and-forward: rows leave only when the recomputer acknowledged
  them (or refused them, which is alarmed, or its cursor shows them stored after an
  acknowledgement was lost);
* alarms are kept locally and, when the caller signs them, spooled as numbered
  ``GatewayAlarm`` envelopes in the same transaction (the counter is sealed meta);
* ``meta`` holds the gateway's persisted state, sealed: the shutdown in force, the
  newest whitelist, the inspectors' settings, the alarm counter;
* every commit is **bound to the device's monotonic counter**: it advances the counter
  first, then writes the new value into ``meta`` in the same transaction, so the log
  always holds the counter value of its last commit. The advance may be made a moment
  ahead, while the log's thread is idle and a commit is coming (:meth:`PairLog.reserve`:
  a stream is at its server, or a commit just ended with more queued behind it), so
  that commit waits for one disk flush, not two; at most one value is ever advanced and
  not yet recorded, as when a commit is cut short.
  A restored copy of the log, or a fresh one in place of a deleted log, holds a value
  behind the device's, which the gateway sees at its next start (``rollback.judge``).
  The value also goes into every BOOT record and checkpoint, so the recomputer sees it
  too.

:class:`PairLog` is synchronous and not thread-safe: the gateway drives it from one
worker thread. It signs nothing itself: callers pass a ``sign`` function (the device
key stays in the device).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ivp.device import Device
from ivp.errors import PeerDataError, StateError, ValidationError
from ivp.gateway import serving
from ivp.gateway.serving import Link
from ivp.gateway.streaming import ChunkWrite, StreamChunk, cut_pair
from ivp.protocol.encoding import canonical, decode
from ivp.protocol.messages import AuditRecord, BootClose, Checkpoint, PairRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS boots (
    boot_id TEXT PRIMARY KEY, model_id TEXT NOT NULL, started REAL NOT NULL,
    genesis TEXT NOT NULL, head TEXT NOT NULL, pairs INTEGER NOT NULL DEFAULT 0,
    audits INTEGER NOT NULL DEFAULT 0, closed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS pairs (
    boot_id TEXT NOT NULL, pos INTEGER NOT NULL, prev TEXT NOT NULL, head TEXT NOT NULL,
    sealed BLOB NOT NULL, PRIMARY KEY (boot_id, pos));
CREATE TABLE IF NOT EXISTS streams (
    boot_id TEXT NOT NULL, seq INTEGER NOT NULL, sealed BLOB NOT NULL,
    PRIMARY KEY (boot_id, seq));
CREATE TABLE IF NOT EXISTS stream_chunks (
    boot_id TEXT NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL, sealed BLOB NOT NULL,
    PRIMARY KEY (boot_id, seq, idx));
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, boot_id TEXT NOT NULL,
    n INTEGER NOT NULL, created REAL NOT NULL, sealed BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS alarms (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, kind TEXT NOT NULL,
    message TEXT NOT NULL);
"""

_PAIR = "gateway/log/pair"
_STREAM = "gateway/log/stream"
_CHUNK = "gateway/log/stream-chunk"
_SPOOL = "gateway/log/spool"
_META = "gateway/log/meta"
_ALARM_SEQ = "alarm_seq"  # meta key: the last GatewayAlarm number used
_COUNTER = "counter"  # meta key: the device counter this log was last committed under


@dataclass(frozen=True)
class BootCounters:
    boot_id: str
    model_id: str
    head: str
    pairs: int
    audits: int
    closed: bool
    acked: int = 0  # audit records the recomputer acknowledged (what /status may say)


@dataclass(frozen=True)
class SpoolItem:
    id: int
    kind: str
    boot_id: str
    n: int
    envelope: bytes


class PairLog:
    """SQLite store of the hash-chained pair log, the audit spool and the alarms.

    Args:
        path: the database file (created if absent).
        device: seals and unseals every record; once it is bricked nothing opens.
        synchronous: SQLite ``synchronous`` mode; FULL (the default) fsyncs the WAL on
            every commit, so a committed pair survives power loss.
    """

    def __init__(self, path: Path, device: Device, *, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in {"FULL", "EXTRA", "NORMAL", "OFF"}:
            raise ValueError(f"bad synchronous mode {synchronous!r}")
        self.path = Path(path)
        self.device = device
        self.synchronous = synchronous.upper()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={self.synchronous}")
        self._db.executescript(SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(boots)")}
        for column in ("epsilon REAL", "acked INTEGER NOT NULL DEFAULT 0",
                       "closed_counter INTEGER NOT NULL DEFAULT 0"):
            if column.split()[0] not in columns:  # logs made before the column existed
                self._db.execute(f"ALTER TABLE boots ADD COLUMN {column}")
        self.bound = 0  # the device counter of the commit in progress (or the last one)
        self.spare: int | None = None  # advanced ahead, for the next commit to record
        self._recorded = 0  # the value the log holds (bound is that of a commit in progress)
        self._unsure = False  # a COMMIT or an advance failed: the device may be ahead

    def close(self) -> None:
        """Close the log; a counter value advanced ahead is recorded first (a log left
        one behind would read as a cut commit at the next start)."""
        if self.spare is not None:
            # a failed disk: the next start says interrupted
            with contextlib.suppress(Exception), self._txn():
                pass
        self._db.close()

    # --- transactions -------------------------------------------------------------------
    def _txn(self, bind: bool = True) -> _Txn:
        """A transaction; ``bind=False`` for a commit whose loss helps nobody (dropping
        records the recomputer already holds: undone, they are only sent again), so it
        costs no counter write on the serving path's thread."""
        return _Txn(self._db, self if bind else None)

    def reserve(self) -> None:
        """Advance the device counter now for the next commit, which then records the
        value without waiting for the device (called while the log's thread is idle and
        a commit is coming). One value ahead at most: with the commit in progress that
        would consume it, never two unrecorded (a crash leaves the log one behind at
        most, ``rollback``'s ``interrupted``)."""
        if self.spare is None and not self._unsure:
            self.spare = self._advance()

    def _advance(self) -> int:
        """The device counter's next value. An advance that fails may be on the device
        or not: nothing is advanced ahead until a commit records a newer value."""
        try:
            return self.device.advance_counter()
        except BaseException:
            self._unsure = True
            raise

    def _bind(self) -> None:
        """At the start of every commit: advance the device counter (or take the value
        :meth:`reserve` advanced), and record it in this very commit (the counter moves
        first: a commit the device never counted cannot exist, and a restored log is
        behind the device)."""
        value, self.spare = self.spare, None
        self._recorded = self.bound
        try:
            self.bound = value if value is not None else self._advance()
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                             (_COUNTER, self.device.seal(_META, str(self.bound).encode(),
                                                         _COUNTER.encode())))
        except BaseException:
            self._unbind(sure=True)
            raise

    def _bound_committed(self) -> None:
        self._recorded, self._unsure = self.bound, False

    def _unbind(self, sure: bool) -> None:
        """The commit was undone: its counter value, advanced and not recorded, is the
        next commit's (advancing again would leave the log two behind). ``sure=False``:
        the COMMIT itself failed, so the value may be on disk: it is not used again, and
        nothing is advanced ahead until a commit records a newer one."""
        if self.bound != self._recorded:
            if sure:
                self.spare = self.bound
            else:
                self._unsure = True
            self.bound = self._recorded

    def bound_counter(self) -> int | None:
        """The device counter value of the log's last commit (None: never bound: a new
        log, or one written before counters).

        Raises:
            PeerDataError: the stored value does not open (an edited log).
        """
        raw = self.get_meta(_COUNTER)
        return None if raw is None else int(raw)

    def has_history(self) -> bool:
        """Whether the log holds anything from an earlier life (boots, spool, alarms)."""
        return any(self._db.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone()
                   for t in ("boots", "spool", "alarms"))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One durable commit around several steps (the gateway's group commit: a
        batch of appends and sampling draws shares one fsync). Steps nest inside it."""
        with self._txn():
            yield

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """A savepoint inside :meth:`transaction`: a step that fails leaves no trace,
        while the steps before and after it still commit."""
        self._db.execute("SAVEPOINT step")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK TO step")
            self._db.execute("RELEASE step")
            raise
        self._db.execute("RELEASE step")

    # --- meta (sealed key/value: persisted gateway state) -------------------------------
    def get_meta(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        if row is None:
            return None
        return self.device.unseal(_META, row[0], key.encode())

    def set_meta(self, key: str, value: bytes) -> None:
        self.update_meta({key: value})

    def update_meta(self, values: dict[str, bytes], delete: tuple[str, ...] = ()) -> None:
        """Set ``values`` and delete ``delete`` in one transaction (all or nothing)."""
        sealed = {k: self.device.seal(_META, v, k.encode()) for k, v in values.items()}
        with self._txn():
            for key, value in sealed.items():
                self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                 (key, value))
            for key in delete:
                self._db.execute("DELETE FROM meta WHERE key=?", (key,))

    # --- boots --------------------------------------------------------------------------
    def begin_boot(self, boot_id: str, model_id: str, genesis: str,
                   boot_envelope: Callable[[int, BootClose | None], bytes],
                   now: float | None = None, epsilon: float | None = None) -> None:
        """Open a boot's chain and spool its signed BOOT record, in one transaction.

        ``boot_envelope(counter, previous)`` signs the BOOT record with this commit's
        device counter and the previous boot's closing state (None: the log's first).
        ``epsilon`` is the audit probability the BOOT record declares: draws for this
        boot's pairs use it, also after a restart (recovery draws).
        """
        now = time.time() if now is None else now
        with self._txn():
            previous = self.last_boot()
            self._db.execute(
                "INSERT INTO boots(boot_id, model_id, started, genesis, head, epsilon) "
                "VALUES (?, ?, ?, ?, ?, ?)", (boot_id, model_id, now, genesis, genesis, epsilon))
            self._spool("BOOT", boot_id, 0, boot_envelope(self.bound, previous), now)

    def last_boot(self) -> BootClose | None:
        """The closing state of the latest boot in the log (None: no boot yet)."""
        row = self._db.execute(
            "SELECT boot_id, pairs, audits, head, closed_counter FROM boots "
            "ORDER BY started DESC, rowid DESC LIMIT 1").fetchone()
        if row is None:
            return None
        return BootClose(boot_id=row[0], pairs_served=row[1], audits=row[2],
                         chain_head=row[3], counter=row[4])

    def undecided_epsilons(self) -> dict[str, float]:
        """The ε each boot with pairs awaiting their draw declared (recovery draws)."""
        rows = self._db.execute(
            "SELECT boot_id, epsilon FROM boots b WHERE epsilon IS NOT NULL AND EXISTS "
            "(SELECT 1 FROM pairs p WHERE p.boot_id = b.boot_id)")
        return {r[0]: float(r[1]) for r in rows}

    def counters(self, boot_id: str) -> BootCounters:
        row = self._db.execute(
            "SELECT model_id, head, pairs, audits, closed, acked FROM boots WHERE boot_id=?",
            (boot_id,)).fetchone()
        if row is None:
            raise StateError(f"no boot {boot_id!r} in the log")
        return BootCounters(boot_id, row[0], row[1], row[2], row[3], bool(row[4]), row[5])

    def open_boots(self) -> list[str]:
        rows = self._db.execute("SELECT boot_id FROM boots WHERE closed=0 ORDER BY started")
        return [r[0] for r in rows]

    def close_boot(self, boot_id: str) -> None:
        with self._txn():
            self._db.execute("UPDATE boots SET closed=1, closed_counter=? WHERE boot_id=?",
                             (self.bound, boot_id))

    def totals(self) -> tuple[int, int]:
        """(pairs served, audit records made) over every boot in the log."""
        row = self._db.execute("SELECT COALESCE(SUM(pairs),0), COALESCE(SUM(audits),0) "
                               "FROM boots").fetchone()
        return int(row[0]), int(row[1])

    # --- pairs --------------------------------------------------------------------------
    def append(self, boot_id: str, pairs: list[PairRecord],
               streams: tuple[int, ...] = ()) -> list[Link]:
        """Chain and store ``pairs`` (in order) durably, in one commit; ``streams``: the
        tag seqs of streamed pairs among them, whose stream rows go in the same commit.

        Raises:
            StateError: the boot is unknown or closed (a pair of a dead boot is dropped).
        """
        with self._txn():
            row = self._open_boot(boot_id)
            links = []
            for data, where in serving.link_pairs(boot_id, row[0], row[1], pairs):
                # the bytes both chained and sealed
                sealed = self.device.seal(_PAIR, data, f"{boot_id}/{where.pos}".encode())
                self._db.execute(
                    "INSERT INTO pairs(boot_id, pos, prev, head, sealed) VALUES (?,?,?,?,?)",
                    (boot_id, where.pos, where.prev, where.head, sealed))
                links.append(where)
            if links:
                self._db.execute("UPDATE boots SET head=?, pairs=? WHERE boot_id=?",
                                 (links[-1].head, links[-1].pos, boot_id))
            for seq in streams:
                self._drop_stream(boot_id, seq)
        return links

    def _drop_stream(self, boot_id: str, seq: int) -> None:
        for table in ("streams", "stream_chunks"):
            self._db.execute(f"DELETE FROM {table} WHERE boot_id=? AND seq=?", (boot_id, seq))

    def _open_boot(self, boot_id: str) -> tuple[str, int]:
        row = self._db.execute("SELECT head, pairs, closed FROM boots WHERE boot_id=?",
                               (boot_id,)).fetchone()
        if row is None or row[2]:
            raise StateError(f"boot {boot_id!r} is not open: pair dropped")
        return row[0], row[1]

    def progress(self, boot_id: str, chunks: list[ChunkWrite]) -> list[None]:
        """Keep each open stream's next chunk durably, in one commit: a row of its own
        (sealed, bound to its place boot/seq/index), the stream's first row with its
        first chunk. Nothing is rewritten, so the commit's bytes and work are those of
        the chunk alone, however long the stream already is.

        Raises:
            StateError: the boot is unknown or closed, or the chunk does not follow the
                stream's last one (a stream already ended: its rows went with its pair);
                the chunk is not released.
        """
        with self._txn():
            self._open_boot(boot_id)
            for w in chunks:
                where = f"{boot_id}/{w.seq}"
                if w.index == 0 and w.head is not None:
                    head = self.device.seal(_STREAM, canonical(w.head), where.encode())
                    self._insert("streams(boot_id, seq, sealed)", (boot_id, w.seq, head),
                                 where, 0)
                elif self._db.execute(
                        "SELECT 1 FROM stream_chunks WHERE boot_id=? AND seq=? AND idx=?",
                        (boot_id, w.seq, w.index - 1)).fetchone() is None:
                    raise StateError(f"stream {where} has no chunk {w.index - 1}: "
                                     f"chunk {w.index} dropped")
                sealed = self.device.seal(_CHUNK, canonical(w.chunk),
                                          f"{where}/{w.index}".encode())
                self._insert("stream_chunks(boot_id, seq, idx, sealed)",
                             (boot_id, w.seq, w.index, sealed), where, w.index)
        return [None] * len(chunks)

    def _insert(self, into: str, values: tuple[object, ...], where: str, index: int) -> None:
        """A stream row that must be new: one already there is a refused step (a
        StateError, which the group commit undoes alone), never a failed batch."""
        marks = ",".join("?" * len(values))
        try:
            self._db.execute(f"INSERT INTO {into} VALUES ({marks})", values)
        except sqlite3.IntegrityError:
            raise StateError(f"stream {where}: chunk {index} is logged already") from None

    def cut_streams(self, boot_id: str | None = None) -> dict[str, dict[int, Link]]:
        """Chain every stream left open (of ``boot_id``, else of every open boot) as it
        stood at its last durable chunk, in tag order: {boot_id: {seq: link}}. A stream
        whose rows do not open, lack the first row or miss a chunk (an edited log) is
        dropped and alarmed, never chained short; every other stream is chained."""
        out: dict[str, dict[int, Link]] = {}
        with self._txn():
            # chunk rows without a first row are a stream too: refused below, not left
            rows = self._db.execute(
                "SELECT s.boot_id, s.seq FROM (SELECT boot_id, seq FROM streams UNION "
                "SELECT boot_id, seq FROM stream_chunks) s JOIN boots b ON "
                "b.boot_id = s.boot_id WHERE b.closed = 0 AND (? IS NULL OR s.boot_id = ?) "
                "ORDER BY b.started, s.seq", (boot_id, boot_id)).fetchall()
            for bid, seq in rows:
                try:
                    pair = self._stream_pair(bid, seq)
                except (PeerDataError, ValidationError) as exc:
                    self._drop_stream(bid, seq)
                    self._alarm("log_corrupt", f"stream {bid}/{seq}: {exc}", time.time())
                    continue
                (link,) = self.append(bid, [pair], (seq,))
                out.setdefault(bid, {})[seq] = link
        return out

    def _stream_pair(self, boot_id: str, seq: int) -> PairRecord:
        """An open stream's pair as it stood: its first row plus its chunks, in order.

        Raises:
            PeerDataError: the first row is missing, a chunk is missing (a gap), or a row
                does not open (altered, or moved from another place).
            ValidationError: a row opens but does not decode, or the pair is not valid.
        """
        where = f"{boot_id}/{seq}"
        row = self._db.execute("SELECT sealed FROM streams WHERE boot_id=? AND seq=?",
                               (boot_id, seq)).fetchone()
        if row is None:
            raise PeerDataError("its first row is missing")
        head = decode(self.device.unseal(_STREAM, row[0], where.encode()), PairRecord)
        chunks = []
        for expect, (idx, sealed) in enumerate(self._db.execute(
                "SELECT idx, sealed FROM stream_chunks WHERE boot_id=? AND seq=? ORDER BY idx",
                (boot_id, seq)).fetchall()):
            if idx != expect:
                raise PeerDataError(f"chunk {expect} is missing")
            try:
                chunks.append(decode(self.device.unseal(_CHUNK, sealed,
                                                        f"{where}/{idx}".encode()),
                                     StreamChunk))
            except (PeerDataError, ValidationError) as exc:
                raise PeerDataError(f"chunk {idx} does not open: {exc}") from None
        return cut_pair(head, chunks)

    def end_boot(self, boot_id: str, gateway_id: str, sign: Callable[[Checkpoint], bytes]
                 ) -> dict[int, Link]:
        """Close a boot in one commit: its open streams chained as they stood, its final
        checkpoint, closed (no pair or chunk of it is accepted after). The links of the
        streams it chained, by tag seq."""
        with self._txn():
            cut = self.cut_streams(boot_id).get(boot_id, {})
            self.checkpoint(boot_id, gateway_id, sign)
            self.close_boot(boot_id)
        return cut

    def read_pair(self, boot_id: str, pos: int) -> tuple[Link, PairRecord] | None:
        """A logged (undecided) pair, unsealed and checked against its chain link.

        Raises:
            PeerDataError: the sealed bytes were altered or moved (AES-GCM tag).
            ChainError: the pair does not hash to its recorded link.
        """
        found = self._open_pair(boot_id, pos)
        return None if found is None else (found[0], decode(found[1], PairRecord))

    def _open_pair(self, boot_id: str, pos: int) -> tuple[Link, bytes] | None:
        """A logged pair's canonical bytes, unsealed and checked against its chain link
        (the bytes themselves were hashed into the chain: no re-encoding needed)."""
        row = self._db.execute("SELECT prev, head, sealed FROM pairs WHERE boot_id=? AND pos=?",
                               (boot_id, pos)).fetchone()
        if row is None:
            return None
        raw = self.device.unseal(_PAIR, row[2], f"{boot_id}/{pos}".encode())
        return serving.open_link(boot_id, pos, row[0], row[1], raw), raw

    def undecided(self) -> list[tuple[str, int]]:
        """Pairs still waiting for their sampling draw (after a crash): (boot_id, pos),
        by boot, then in tag order (the order the draws would have had)."""
        rows = self._db.execute(
            "SELECT p.boot_id, p.pos FROM pairs p JOIN boots b ON b.boot_id = p.boot_id "
            "ORDER BY b.started, p.pos").fetchall()
        boots = list(dict.fromkeys(r[0] for r in rows))
        keyed = []
        for boot_id, pos in rows:
            try:
                found = self.read_pair(boot_id, pos)
                seq = found[1].tag.seq if found else -1
            except PeerDataError:
                seq = -1  # unreadable: decide() will alarm
            keyed.append(((boots.index(boot_id), seq, pos), (boot_id, pos)))
        return [item for _, item in sorted(keyed)]

    def pair_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0])

    def decide(self, boot_id: str, pos: int, keep: bool,
               sign: Callable[[AuditRecord], bytes], gateway_id: str,
               now: float | None = None) -> AuditRecord | None:
        """Apply the sampling draw to one logged pair, atomically.

        ``keep``: the pair becomes audit record ``audits + 1`` of its boot, signed by
        ``sign`` and spooled; either way the pair leaves the rolling log (the chain head
        stays). Idempotent: a pair already decided is a no-op returning None.
        """
        now = time.time() if now is None else now
        with self._txn():
            found = self._open_pair(boot_id, pos)  # a pair not kept is checked, not decoded
            if found is None:
                return None
            where, raw = found
            record = None
            if keep:
                audits = self._db.execute("SELECT audits FROM boots WHERE boot_id=?",
                                          (boot_id,)).fetchone()[0]
                record = serving.audit_record(gateway_id, where, raw, audits + 1)
                self._db.execute("UPDATE boots SET audits=? WHERE boot_id=?",
                                 (audits + 1, boot_id))
                self._spool("AUDIT", boot_id, audits + 1, sign(record), now)
            self._db.execute("DELETE FROM pairs WHERE boot_id=? AND pos=?", (boot_id, pos))
        return record

    # --- checkpoints --------------------------------------------------------------------
    def checkpoint(self, boot_id: str, gateway_id: str, sign: Callable[[Checkpoint], bytes],
                   now: float | None = None) -> Checkpoint:
        """Spool a signed checkpoint of ``boot_id``'s counters (one consistent snapshot)."""
        now = time.time() if now is None else now
        with self._txn():
            c = self.counters(boot_id)
            undecided = int(self._db.execute("SELECT COUNT(*) FROM pairs WHERE boot_id=?",
                                             (boot_id,)).fetchone()[0])
            cp = serving.checkpoint(gateway_id, boot_id, c.pairs, c.head, c.audits, now,
                                    counter=self.bound, undecided=undecided)
            self._spool("CHECKPOINT", boot_id, c.pairs, sign(cp), now)
        return cp

    def heartbeat(self, sign: Callable[[int], bytes], now: float | None = None) -> None:
        """Spool a signed heartbeat (``sign(counter)``) in place of any unsent one: only
        the latest says anything (alive, and in which state)."""
        now = time.time() if now is None else now
        with self._txn():
            self._db.execute("DELETE FROM spool WHERE kind='HEARTBEAT'")
            self._spool("HEARTBEAT", "", 0, sign(self.bound), now)

    # --- spool --------------------------------------------------------------------------
    def _spool(self, kind: str, boot_id: str, n: int, envelope: bytes, now: float) -> None:
        cur = self._db.execute(
            "INSERT INTO spool(kind, boot_id, n, created, sealed) VALUES (?,?,?,?,x'')",
            (kind, boot_id, n, now))
        sid = cur.lastrowid
        sealed = self.device.seal(_SPOOL, envelope, f"{sid}/{kind}/{boot_id}/{n}".encode())
        self._db.execute("UPDATE spool SET sealed=? WHERE id=?", (sealed, sid))

    def spool_batch(self, limit: int = 64, skip: frozenset[int] = frozenset()
                    ) -> list[SpoolItem]:
        """The oldest unacknowledged envelopes, in the order they were made (those in
        ``skip`` left out: records the recomputer asked to be sent again later)."""
        rows = self._db.execute(
            "SELECT id, kind, boot_id, n, sealed FROM spool ORDER BY id LIMIT ?",
            (limit + len(skip),))
        out = []
        for sid, kind, boot_id, n, sealed in rows.fetchall():
            if sid in skip or len(out) >= limit:
                continue
            env = self.device.unseal(_SPOOL, sealed, f"{sid}/{kind}/{boot_id}/{n}".encode())
            out.append(SpoolItem(sid, kind, boot_id, n, env))
        return out

    def spool_kinds(self, ids: list[int]) -> dict[int, str]:
        """The kind of each spooled row among ``ids`` (rows gone are left out)."""
        out = {}
        for sid in ids:
            row = self._db.execute("SELECT kind FROM spool WHERE id=?", (sid,)).fetchone()
            if row is not None:
                out[sid] = str(row[0])
        return out

    def spool_depth(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])

    def spool_done(self, acked: list[int], refused: list[tuple[int, str]]) -> None:
        """Drop rows the recomputer holds: acknowledged ones, and refused ones it keeps
        as evidence (each alarmed here). Counts the boot's audit records acknowledged."""
        now = time.time()
        with self._txn(bind=False):
            for sid in acked:
                row = self._db.execute("SELECT kind, boot_id FROM spool WHERE id=?",
                                       (sid,)).fetchone()
                if row is not None and row[0] == "AUDIT":
                    self._db.execute("UPDATE boots SET acked = acked + 1 WHERE boot_id=?",
                                     (row[1],))
                self._db.execute("DELETE FROM spool WHERE id=?", (sid,))
            for sid, why in refused:
                row = self._db.execute("SELECT kind, boot_id, n FROM spool WHERE id=?",
                                       (sid,)).fetchone()
                self._db.execute("DELETE FROM spool WHERE id=?", (sid,))
                if row is not None:
                    self._alarm("uplink_refused", f"recomputer refused {row[0]} {row[1]}/{row[2]}: "
                                f"{why}", now)

    # --- alarms -------------------------------------------------------------------------
    def _alarm(self, kind: str, message: str, now: float) -> None:
        self._db.execute("INSERT INTO alarms(time, kind, message) VALUES (?,?,?)",
                         (now, kind, message[:2000]))

    def alarm(self, kind: str, message: str,
              sign: Callable[[int, float], bytes] | None = None, boot_id: str = "") -> int:
        """Keep a local alarm; with ``sign``, also spool it for the recomputer.

        ``sign(seq, now)`` returns the signed ``GatewayAlarm`` envelope numbered
        ``seq``: alarms are numbered 1, 2, 3, … per gateway without gaps (the counter is
        sealed meta, advanced in the same transaction as the spool row), so a withheld
        alarm shows as a gap at the recomputer. Returns ``seq`` (0 when not spooled).
        """
        now = time.time()
        with self._txn():
            self._alarm(kind, message, now)
            if sign is None:
                return 0
            last = self.get_meta(_ALARM_SEQ)
            seq = (int(last) if last else 0) + 1
            self._spool("ALARM", boot_id, seq, sign(seq, now), now)
            self.set_meta(_ALARM_SEQ, str(seq).encode())
        return seq

    def alarms(self, limit: int = 50) -> list[dict[str, object]]:
        rows = self._db.execute(
            "SELECT id, time, kind, message FROM alarms ORDER BY id DESC LIMIT ?", (limit,))
        return [{"id": r[0], "time": r[1], "kind": r[2], "message": r[3]} for r in rows]

    def alarm_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM alarms").fetchone()[0])


class _Txn:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (or ``ROLLBACK`` on error); nests as a no-op.
    With ``log``, every outer transaction is bound to the device counter (``_bind``
    first; ``_unbind`` if it is undone)."""

    def __init__(self, db: sqlite3.Connection, log: PairLog | None) -> None:
        self._db = db
        self._log = log
        self._outer = False

    def __enter__(self) -> None:
        if not self._db.in_transaction:
            self._db.execute("BEGIN IMMEDIATE")
            self._outer = True
            if self._log is not None:
                try:
                    self._log._bind()
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if not self._outer:
            return
        if exc_type is not None:
            self._db.execute("ROLLBACK")
            if self._log is not None:
                self._log._unbind(sure=True)
            return
        try:
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if self._log is not None:
                self._log._unbind(sure=False)
            raise
        if self._log is not None:
            self._log._bound_committed()


__all__ = ["BootCounters", "Link", "PairLog", "SpoolItem"]
