"""The recomputer store's tables and the triggers that keep its history append-only
(``ivp.recomputer.store``; the module docstring there says what each table holds)."""

from __future__ import annotations

SCHEMA = """
CREATE TABLE IF NOT EXISTS enrolments(
    device_id TEXT PRIMARY KEY, kind TEXT NOT NULL, public_key TEXT NOT NULL,
    keyid TEXT NOT NULL UNIQUE, url TEXT NOT NULL DEFAULT '', time REAL NOT NULL,
    admin_seq INTEGER);
CREATE TABLE IF NOT EXISTS gateways(
    gateway_id TEXT PRIMARY KEY, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    time REAL NOT NULL, shutdown_pending INTEGER NOT NULL DEFAULT 0,
    shutdown_envelope BLOB);
CREATE TABLE IF NOT EXISTS boots(
    gateway_id TEXT NOT NULL, boot_id TEXT NOT NULL, model_id TEXT NOT NULL,
    manifest_digest TEXT NOT NULL, epsilon REAL NOT NULL, time REAL NOT NULL,
    url TEXT NOT NULL, received REAL NOT NULL, whitelisted INTEGER NOT NULL,
    envelope BLOB NOT NULL, PRIMARY KEY(gateway_id, boot_id));
CREATE TABLE IF NOT EXISTS checkpoints(
    id INTEGER PRIMARY KEY, gateway_id TEXT NOT NULL, boot_id TEXT NOT NULL,
    pairs_served INTEGER NOT NULL, audits INTEGER NOT NULL, chain_head TEXT NOT NULL,
    time REAL NOT NULL, received REAL NOT NULL, envelope BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS checkpoints_boot ON checkpoints(gateway_id, boot_id, id);
CREATE TABLE IF NOT EXISTS audits(
    id INTEGER PRIMARY KEY, gateway_id TEXT NOT NULL, boot_id TEXT NOT NULL,
    audit_seq INTEGER NOT NULL, pair_seq INTEGER NOT NULL, manifest_digest TEXT NOT NULL,
    received REAL NOT NULL, envelope BLOB NOT NULL, payload BLOB NOT NULL,
    verified INTEGER NOT NULL DEFAULT 0, UNIQUE(gateway_id, boot_id, audit_seq));
CREATE INDEX IF NOT EXISTS audits_queue ON audits(verified, id);
CREATE TABLE IF NOT EXISTS verdicts(
    audit_id INTEGER PRIMARY KEY REFERENCES audits(id), gateway_id TEXT NOT NULL,
    boot_id TEXT NOT NULL, audit_seq INTEGER NOT NULL, passed INTEGER NOT NULL,
    verdict BLOB NOT NULL, time REAL NOT NULL);
CREATE INDEX IF NOT EXISTS verdicts_gateway ON verdicts(gateway_id, audit_id);
CREATE TABLE IF NOT EXISTS alarms(
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, gateway_id TEXT, boot_id TEXT,
    detail TEXT NOT NULL, time REAL NOT NULL, last_time REAL NOT NULL,
    count INTEGER NOT NULL DEFAULT 1, acked_admin_seq INTEGER);
CREATE TABLE IF NOT EXISTS admin_log(
    seq INTEGER PRIMARY KEY, entry BLOB NOT NULL, hash TEXT NOT NULL,
    envelope BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS nonces(nonce TEXT PRIMARY KEY, admin_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS settings(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS served(model_id TEXT PRIMARY KEY, last_served REAL NOT NULL);
CREATE TABLE IF NOT EXISTS gateway_alarms(
    gateway_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, boot_id TEXT,
    time REAL NOT NULL, received REAL NOT NULL, envelope BLOB NOT NULL,
    PRIMARY KEY(gateway_id, seq));
CREATE TABLE IF NOT EXISTS relays(
    id INTEGER PRIMARY KEY, gateway_id TEXT NOT NULL, admin_seq INTEGER NOT NULL,
    instruction TEXT NOT NULL, envelope BLOB NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', answer TEXT NOT NULL DEFAULT '',
    time REAL NOT NULL, relay_seq INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS relays_pending ON relays(state, gateway_id, id);
CREATE TABLE IF NOT EXISTS refused(
    id INTEGER PRIMARY KEY, gateway_id TEXT NOT NULL, boot_id TEXT, kind TEXT NOT NULL,
    n INTEGER NOT NULL, digest TEXT NOT NULL UNIQUE, error TEXT NOT NULL,
    received REAL NOT NULL, envelope BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS heartbeats(
    gateway_id TEXT PRIMARY KEY, state TEXT NOT NULL, counter INTEGER NOT NULL,
    received REAL NOT NULL, envelope BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS bound(
    id INTEGER PRIMARY KEY CHECK (id = 1), counter INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sensor_events(
    id INTEGER PRIMARY KEY, sensor_id TEXT NOT NULL, seq INTEGER NOT NULL,
    kind TEXT NOT NULL, event TEXT NOT NULL, received REAL NOT NULL,
    UNIQUE(sensor_id, seq));
"""

# History the API must never rewrite.
APPEND_ONLY = ("admin_log", "verdicts", "gateway_alarms", "refused")
TRIGGERS = "\n".join(
    f"""CREATE TRIGGER IF NOT EXISTS {t}_no_update BEFORE UPDATE ON {t}
        BEGIN SELECT RAISE(ABORT, '{t} is append-only'); END;
        CREATE TRIGGER IF NOT EXISTS {t}_no_delete BEFORE DELETE ON {t}
        BEGIN SELECT RAISE(ABORT, '{t} is append-only'); END;"""
    for t in APPEND_ONLY
) + """
CREATE TRIGGER IF NOT EXISTS audits_no_rewrite BEFORE UPDATE OF envelope, payload,
    gateway_id, boot_id, audit_seq ON audits
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS audits_no_delete BEFORE DELETE ON audits
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
"""

__all__ = ["APPEND_ONLY", "SCHEMA", "TRIGGERS"]
