"""What each accepted admin instruction checks, records and changes (the shell's half).

``admin.AdminCore`` decides whether a request is authentic, fresh and well formed;
this module holds, per instruction of the closed list, the state check that runs
before acceptance, the SQL that records the effect in the admin log's transaction,
and the change to the in-memory cores once it is durable.

Two instructions also reach the gateways, queued in the same transaction so an
accepted instruction is never lost on its way:

* ``set_epsilon``, ``reboot_schedule`` and ``whitelist_update``: the inspectors'
  envelope itself, as received, is queued for every enrolled gateway (``relays``);
  each gateway checks the quorum on its own, so the recomputer carries the
  instruction without being able to make one up.
* ``readmit_gateway``: a ``Readmit`` signed by the recomputer key (the key the gateway
  obeys Shutdowns from), naming the Shutdown it lifts, replaces the pending control
  message of that gateway.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ivp.errors import StateError
from ivp.protocol.encoding import canonical, to_builtins
from ivp.protocol.keys import VerifyKey
from ivp.protocol.messages import ADMIN_ARGS, RELAYED_INSTRUCTIONS
from ivp.recomputer.admin import (
    AcceptStoreArgs,
    AckAlarmArgs,
    EnrolArgs,
    EpsilonArgs,
    ReadmitArgs,
    RebootArgs,
    RotateKeyArgs,
    WhitelistArgs,
)
from ivp.recomputer.ingest import Ingest
from ivp.recomputer.routing import Router
from ivp.recomputer.store import Store
from ivp.whitelist import TrustedWhitelist

Sql = list[tuple[str, tuple[Any, ...]]]


@dataclass
class AdminTargets:
    """The state admin instructions act on."""

    ingest: Ingest
    store: Store
    whitelist: TrustedWhitelist
    router: Router


def _key_taken(ingest: Ingest, public_key: str) -> bool:
    return any(d.key.hex == public_key for d in ingest.devices.values())


def check(t: AdminTargets, args: Any) -> None:
    """State checks (run on the store thread, before acceptance).

    Raises:
        StateError: the instruction makes no sense now (device or key already
            enrolled, unknown device, gateway not shut down, unknown or already
            acknowledged alarm, a store not set back or set back at another device
            counter than ``accept_store`` names).
        QuorumError, ExpiredError, ValidationError: a whitelist that would not install
            (under-signed, expired, not a higher version).
    """
    ing = t.ingest
    if isinstance(args, EnrolArgs):
        if args.device_id in ing.devices:
            raise StateError(f"device {args.device_id!r} is already enrolled (use rotate_key)")
        if _key_taken(ing, args.public_key):
            raise StateError("that public key is already enrolled")
    elif isinstance(args, RotateKeyArgs):
        if args.device_id not in ing.devices:
            raise StateError(f"device {args.device_id!r} is not enrolled")
        if _key_taken(ing, args.public_key):
            raise StateError("that public key is already enrolled")
    elif isinstance(args, ReadmitArgs):
        gw = ing.gateways.get(args.gateway_id)
        if gw is None or gw.state != "shutdown":
            raise StateError(f"gateway {args.gateway_id!r} is not shut down")
    elif isinstance(args, AckAlarmArgs):
        alarm = t.store.alarm(args.alarm_id)
        if alarm is None:
            raise StateError(f"no alarm {args.alarm_id}")
        if alarm.acked_admin_seq is not None:
            raise StateError(f"alarm {args.alarm_id} was already acknowledged "
                             f"(admin log {alarm.acked_admin_seq})")
    elif isinstance(args, AcceptStoreArgs):
        check = t.store.rollback
        if check is None or not t.store.locked:
            raise StateError("the store is not locked (no store_rolled_back to accept)")
        if args.device_counter != check.device:
            # the counter only goes up and every acceptance advances it: a request made
            # for an earlier rollback names a lower value and cannot accept this one
            raise StateError(f"the request accepts the store at device counter "
                             f"{args.device_counter}; the device is at {check.device}")
    elif isinstance(args, WhitelistArgs):
        trial = TrustedWhitelist(t.whitelist.policy)
        trial.current, trial.envelope = t.whitelist.current, t.whitelist.envelope
        trial.update(canonical(args.whitelist))


def effects(t: AdminTargets, args: Any, seq: int, now: float, *, request: bytes = b"",
            readmit: bytes | None = None) -> tuple[Sql, dict[str, Any]]:
    """SQL recording an accepted instruction (in the admin log's transaction), and the
    result returned to the inspectors.

    Args:
        request: the admin request's bytes as received (relayed to the gateways).
        readmit: the signed Readmit envelope for a ``readmit_gateway``.
    """
    sql, result = _effects(t, args, seq, now, readmit)
    instruction = next((i for i, a in ADMIN_ARGS.items() if isinstance(args, a)), "")
    if instruction in RELAYED_INSTRUCTIONS and request:
        gateways = sorted(d.device_id for d in t.ingest.devices.values() if d.kind == "gateway")
        # numbered per gateway: the gateway applies relays in this order only
        sql += [("INSERT INTO relays(gateway_id, admin_seq, instruction, envelope, time,"
                 " relay_seq) VALUES (?,?,?,?,?, (SELECT COALESCE(MAX(relay_seq), 0) + 1"
                 " FROM relays WHERE gateway_id = ?))",
                 (g, seq, instruction, request, now, g)) for g in gateways]
        result = {**result, "relayed_to": gateways}
    return sql, result


def _effects(t: AdminTargets, args: Any, seq: int, now: float,
             readmit: bytes | None) -> tuple[Sql, dict[str, Any]]:
    if isinstance(args, EnrolArgs):
        keyid = VerifyKey.from_hex(args.public_key).keyid
        return ([("INSERT INTO enrolments VALUES (?,?,?,?,?,?,?)",
                  (args.device_id, args.kind, args.public_key, keyid, args.url, now, seq))],
                {"device_id": args.device_id, "keyid": keyid, "kind": args.kind})
    if isinstance(args, RotateKeyArgs):
        keyid = VerifyKey.from_hex(args.public_key).keyid
        return ([("UPDATE enrolments SET public_key = ?, keyid = ?, admin_seq = ?"
                  " WHERE device_id = ?", (args.public_key, keyid, seq, args.device_id))],
                {"device_id": args.device_id, "keyid": keyid})
    if isinstance(args, WhitelistArgs):
        value = json.dumps(to_builtins(args.whitelist), sort_keys=True)
        return [("INSERT OR REPLACE INTO settings VALUES ('whitelist', ?)", (value,))], {}
    if isinstance(args, EpsilonArgs):
        if args.model_id is None:
            return ([("INSERT OR REPLACE INTO settings VALUES ('epsilon', ?)",
                      (json.dumps(args.epsilon),))], {"epsilon": args.epsilon})
        per_model = {**t.ingest.model_epsilon, args.model_id: args.epsilon}
        return ([("INSERT OR REPLACE INTO settings VALUES ('model_epsilon', ?)",
                  (json.dumps(per_model, sort_keys=True),))],
                {"epsilon": args.epsilon, "model_id": args.model_id})
    if isinstance(args, RebootArgs):
        return ([("INSERT OR REPLACE INTO settings VALUES ('reboot_interval', ?)",
                  (json.dumps(args.interval_s),))], {"interval_s": args.interval_s})
    if isinstance(args, AckAlarmArgs):
        return ([("UPDATE alarms SET acked_admin_seq = ? WHERE id = ?", (seq, args.alarm_id))],
                {"alarm_id": args.alarm_id})
    if isinstance(args, AcceptStoreArgs):
        # the effect is the commit itself: it binds the store to the device counter
        # again (Store.transaction(accept=True)); the acceptance acknowledges the alarm
        return ([("UPDATE alarms SET acked_admin_seq = ? WHERE kind = 'store_rolled_back'"
                  " AND acked_admin_seq IS NULL", (seq,))],
                {"device_counter": args.device_counter})
    if isinstance(args, ReadmitArgs):
        # the Readmit replaces the pending control message (delivered and retried like
        # a Shutdown); without one the gateway is only re-admitted on this side
        return ([("INSERT INTO gateways VALUES (?,?,?,?,?,?) ON CONFLICT(gateway_id) DO"
                  " UPDATE SET state = excluded.state, reason = excluded.reason,"
                  " time = excluded.time, shutdown_pending = excluded.shutdown_pending,"
                  " shutdown_envelope = COALESCE(excluded.shutdown_envelope,"
                  " gateways.shutdown_envelope)",
                  (args.gateway_id, "readmitted", "re-admitted by inspectors", now,
                   int(readmit is not None), readmit))],
                {"gateway_id": args.gateway_id, "state": "readmitted"})
    raise AssertionError(f"no effect for {type(args).__name__}")  # closed list exhausted


def apply(t: AdminTargets, args: Any, now: float | None = None) -> None:
    """Change the in-memory cores once the effect is durable."""
    if isinstance(args, EnrolArgs):
        t.ingest.enrol(args.device_id, args.kind, args.public_key, args.url)
    elif isinstance(args, RotateKeyArgs):
        t.ingest.rotate(args.device_id, args.public_key)
    elif isinstance(args, WhitelistArgs):
        t.whitelist.update(canonical(args.whitelist))
    elif isinstance(args, EpsilonArgs):
        if args.model_id is None:
            t.ingest.epsilon = args.epsilon
        else:
            t.ingest.model_epsilon[args.model_id] = args.epsilon
    elif isinstance(args, RebootArgs):
        t.ingest.reboot_interval = args.interval_s
    elif isinstance(args, ReadmitArgs):
        t.ingest.readmit(args.gateway_id, now)
        t.router.mark(args.gateway_id, True)
