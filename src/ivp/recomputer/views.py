"""``GET /status`` of the recomputer: what it holds, per gateway and overall."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ivp.recomputer.service import Recomputer


async def status(rec: Recomputer) -> dict[str, Any]:
    """The recomputer's status document (docs/ARCHITECTURE.md)."""
    counts = await rec._db(rec.store.counts)
    per_gw = await rec._db(rec.store.verdict_counts_by_gateway)
    relays = await rec._db(rec.store.relay_counts)
    gateways: dict[str, Any] = {}
    for gw in sorted(rec.ingest.gateways.values(), key=lambda g: g.gateway_id):
        boot = rec.ingest.boots.get((gw.gateway_id, gw.boot_id)) if gw.boot_id else None
        cp = boot.checkpoint if boot else None
        gateways[gw.gateway_id] = {
            "gateway_id": gw.gateway_id, "state": gw.state, "reason": gw.reason,
            "healthy": gw.gateway_id not in rec.router.unhealthy,
            "health": rec.router.unhealthy.get(gw.gateway_id, "ok"),
            "url": rec.ingest.gateway_url(gw.gateway_id),
            "boot_id": gw.boot_id,
            "model_id": boot.record.model_id if boot else None,
            "whitelisted": boot.whitelisted if boot else None,
            "epsilon": boot.record.epsilon if boot else None,
            "audits_received": boot.audits_received if boot else 0,
            "pairs_served": cp.pairs_served if cp else None,
            "audits_claimed": cp.audits if cp else None,
            "last_checkpoint": boot.checkpoint_received if boot else None,
            "verdicts": per_gw.get(gw.gateway_id, {"passed": 0, "failed": 0}),
            "in_flight": rec.router.in_flight.get(gw.gateway_id, 0),
            "alarms_received": gw.next_alarm_seq - 1,
            "relays": relays.get(gw.gateway_id, {}),
        }
    wl = rec.whitelist.current
    return {
        "keyid": rec.device.public_key.keyid,
        "mode": rec.config.mode,
        "workers": {"kind": rec.pool.name, "size": rec.pool.size},
        "store": {"path": str(rec.store.path), "journal_mode": rec.store.journal_mode,
                  "sync_mode": rec.store.sync_mode},
        "whitelist": {"version": wl.version, "expires": wl.expires,
                      "models": [m.model_id for m in wl.manifests]} if wl else None,
        "models_loaded": [s.manifest.model_id for s in rec.sources],
        "gateways": gateways,
        "queue_depth": rec.queue_depth(),
        "in_flight": rec._in_flight,
        "unverifiable": len(rec._parked),
        "audits": counts["audits"],
        "verdicts": {"passed": counts["passed"], "failed": counts["failed"],
                     "total": counts["passed"] + counts["failed"]},
        "alarms": counts["alarms"],
        "open_alarms": counts["open_alarms"],
        "settings": {"epsilon": rec.ingest.epsilon,
                     "model_epsilon": rec.ingest.model_epsilon,
                     "reboot_interval": rec.ingest.reboot_interval,
                     "shutdown_on": sorted(rec.config.shutdown_on),
                     "shutdown_scope": rec.config.shutdown_scope},
        "admin_log": {"seq": rec.admin.seq, "head": rec.admin.head},
        "last_served": dict(rec.router.last_served),
        "sensors": rec.sensors.view(),
    }



__all__ = ["status"]
