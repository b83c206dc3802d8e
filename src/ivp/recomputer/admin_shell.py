"""``POST /admin`` and ``GET /admin/log`` of the recomputer (the admin core's shell).

A mixin of :class:`~ivp.recomputer.service.Recomputer`: a request is decided by the
pure ``admin.AdminCore`` (and the state checks of ``admin_ops``), logged with its
effects in one durable transaction, applied, and what the gateways must get (a signed
READMIT, relays) is handed to ``delivery``. A body with no valid inspector signature
is refused without a log entry: junk anyone can send must not grow the log.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ivp.errors import IvpError, PeerDataError, StoreRolledBackError
from ivp.protocol import envelope as env
from ivp.protocol.encoding import canonical, to_builtins
from ivp.protocol.messages import AcceptStoreArgs, ReadmitArgs
from ivp.recomputer import admin as adm
from ivp.recomputer import admin_ops

if TYPE_CHECKING:
    from ivp.device import Device
    from ivp.recomputer.ingest import Ingest
    from ivp.recomputer.metrics import Metrics
    from ivp.recomputer.routing import Router
    from ivp.recomputer.store import Store
    from ivp.whitelist import TrustedWhitelist

log = logging.getLogger("ivp.recomputer")
MAX_REFUSED_KEPT = 64 * 1024  # bytes of a refused admin request kept beside its log entry


class AdminRefusedError(PeerDataError):
    """An admin request was refused (HTTP 403); it is in the admin log as ``log_seq``
    (None: it carried no valid inspector signature at all, and junk is not logged)."""

    def __init__(self, cause: IvpError, log_seq: int | None) -> None:
        super().__init__(str(cause))
        self.cause, self.log_seq = cause, log_seq


class AdminShell:
    """Admin requests (mixed into Recomputer)."""

    ingest: Ingest
    store: Store
    whitelist: TrustedWhitelist
    router: Router
    admin: adm.AdminCore
    device: Device
    metrics: Metrics
    _db: Callable[..., Awaitable[Any]]
    _spawn: Callable[[Awaitable[Any]], None]
    _locked: Callable[[], Any]
    _deliver: Callable[..., Awaitable[bool]]
    _relay_pending: Callable[[], Awaitable[None]]
    _readmit_envelope: Callable[..., Awaitable[bytes]]

    def check_alive(self) -> None: ...

    async def _store_accepted(self) -> None: ...

    # --- admin ------------------------------------------------------------------------------------
    async def handle_admin(self, body: bytes) -> dict[str, Any]:
        """Decide, log and apply one admin request.

        Raises:
            AdminRefusedError: refused (the reason names the failed check).
        """
        self.check_alive()
        first = self.admin.decide(body, time.time())  # pure: no lock, no store
        if self.store.locked and first.instruction != "accept_store":
            # a set-back store decides nothing (its burnt nonces are stale: an old
            # request would be taken again) and logs nothing (a log entry is a
            # trust-granting commit): only the inspectors' acceptance is decided
            raise AdminRefusedError(StoreRolledBackError(
                "the recomputer's store was set back (store_rolled_back): only a quorum "
                "accept_store is decided until then"), None)
        if not first.accepted and not first.signers:
            # no valid inspector signature at all: junk anyone can send, refused without
            # a permanent log entry (else each such POST would grow the append-only log)
            assert first.error is not None
            self.metrics.admin(first, logged=False)
            raise AdminRefusedError(first.error, None)
        async with self._locked():
            now = time.time()
            # decide runs on the store thread: state checks may read the store
            targets = admin_ops.AdminTargets(self.ingest, self.store, self.whitelist,
                                             self.router)
            d = await self._db(self.admin.decide, body, now,
                               lambda _i, args: admin_ops.check(targets, args))
            seq, entry, digest = self.admin.next_entry(d, now)
            effects: list[tuple[str, tuple[Any, ...]]] = []
            result: dict[str, Any] = {}
            readmit = None
            if d.accepted and isinstance(d.args, ReadmitArgs):
                readmit = await self._readmit_envelope(d.args.gateway_id, seq, now)
            if d.accepted:
                effects, result = admin_ops.effects(targets, d.args, seq, now, request=body,
                                                    readmit=readmit)
            # A refused request is kept whole only if small: a large one must not fill
            # the disk (its BLAKE3 digest is in the entry either way).
            kept = body if d.accepted or len(body) <= MAX_REFUSED_KEPT else b""
            accept = isinstance(d.args, AcceptStoreArgs) and d.accepted
            if self.store.locked and not accept:  # refused: not logged (see above)
                assert d.error is not None
                self.metrics.admin(d, logged=False)
                raise AdminRefusedError(d.error, None)
            await self._db(self.store.append_admin, seq, entry, digest, kept,
                           d.request.nonce if d.accepted and d.request else None, effects,
                           (), accept)
            # the answer leaves now: undoing this entry must cost two counted commits
            await self._db(self.store.confirm)
            self.admin.advance(seq, digest, d)
            if accept:
                await self._store_accepted()
            if d.accepted:
                admin_ops.apply(targets, d.args, now)
                if readmit is not None:
                    self._spawn(self._deliver(d.args.gateway_id, readmit))  # type: ignore[union-attr]
                if result.get("relayed_to"):
                    self._spawn(self._relay_pending())
            self.metrics.admin(d)
        if not d.accepted:
            assert d.error is not None
            log.warning("admin request refused (log %d): %s", seq, d.reason)
            raise AdminRefusedError(d.error, seq)
        log.info("admin request accepted (log %d): %s", seq, d.instruction)
        return {"accepted": True, "log_seq": seq, "instruction": d.instruction,
                "signers": sorted(d.signers), "result": result}

    async def admin_log(self) -> dict[str, Any]:
        """The admin log with its head signed by the recomputer's device key."""
        rows = await self._db(self.store.admin_log)
        head = adm.verify_log(rows)
        head_doc = {"seq": len(rows), "hash": head, "time": time.time()}
        signed = env.sign(adm.LOG_HEAD, canonical(head_doc), [self.device.signer()])
        return {"entries": [{**json.loads(raw), "hash": h} for _, raw, h in rows],
                "head": to_builtins(signed)}


__all__ = ["MAX_REFUSED_KEPT", "AdminRefusedError", "AdminShell"]
