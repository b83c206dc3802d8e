"""Rebuild the ingest core from the store after a restart (``Ingest.restore``).

Replays what the store holds in the order it arrived: enrolments, BOOT records (which
re-apply the claims each BOOT made about its previous boot), the latest checkpoint of
every boot and every count of audit records a checkpoint claimed (with when it was
first claimed, so ``audit_withheld`` keeps its original deadline), the audit and alarm
numbers received (with their gaps), and when each gateway was last heard from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ivp.protocol import envelope as env
from ivp.protocol.encoding import decode
from ivp.protocol.keys import VerifyKey
from ivp.protocol.messages import BootRecord, Checkpoint
from ivp.recomputer.fleet import Book, Device, Gateway

if TYPE_CHECKING:
    from ivp.recomputer.ingest import Ingest


def restore(ing: Ingest, snap: Any, load_boot: Callable[[str, str], bytes]) -> None:
    from ivp.recomputer.ingest import Effect

    for e in snap.enrolments:
        key = VerifyKey.from_hex(e["public_key"])
        ing.devices[e["device_id"]] = Device(e["device_id"], e["kind"], key, e["url"])
        ing._by_keyid[key.keyid] = e["device_id"]
        if e["kind"] == "gateway":
            ing.gateways.setdefault(e["device_id"], Gateway(e["device_id"]))
    for b in snap.boots:
        payload = env.Envelope.from_bytes(load_boot(b["gateway_id"], b["boot_id"])) \
            .payload_bytes()
        rec = decode(payload, BootRecord)
        ing.apply(Effect("boot", rec, b"", payload, b["received"], url=b["url"],
                         whitelisted=bool(b["whitelisted"])))
    for g in snap.gateways:
        gw = ing.gateways.setdefault(g["gateway_id"], Gateway(g["gateway_id"]))
        if g["state"] == "readmitted":
            gw.readmitted_at = g["time"]
        booted_after = gw.boot_times and max(gw.boot_times) > g["time"]
        if g["state"] == "readmitted" and booted_after:
            gw.state, gw.reason = "serving", ""
        elif g["state"] != "serving" or not booted_after:
            gw.state, gw.reason = g["state"], g["reason"]
        if gw.state == "shutdown":
            gw.shutdown_at = g["time"]
    for c in snap.checkpoints:
        boot = ing.boots.get((c["gateway_id"], c["boot_id"]))
        if boot is None:
            continue
        cp = decode(c["payload"], Checkpoint)
        boot.checkpoint, boot.checkpoint_received = cp, c["received"]
        boot.remember(cp.pairs_served, cp.chain_head)
        gw = ing.gateways[c["gateway_id"]]
        gw.last_seen = max(gw.last_seen or 0.0, c["received"])
        gw.counter = max(gw.counter, cp.counter)
    for h in snap.audit_heads:
        boot = ing.boots.get((h["gateway_id"], h["boot_id"]))
        if boot is not None:
            boot.sequence = _book(h)
    for claim in snap.claims:  # in order of arrival per boot
        boot = ing.boots.get((claim["gateway_id"], claim["boot_id"]))
        if boot is not None:
            ing._claim(boot, int(claim["audits"]), float(claim["received"]))
    for h in snap.alarm_heads:
        gw = ing.gateways.setdefault(h["gateway_id"], Gateway(h["gateway_id"]))
        gw.alarms = _book(h)
    for gateway_id, (received, counter) in snap.heartbeats.items():
        gw = ing.gateways.setdefault(gateway_id, Gateway(gateway_id))
        gw.last_seen = max(gw.last_seen or 0.0, received)
        gw.counter = max(gw.counter, counter)


def _book(head: dict[str, Any]) -> Book:
    """The numbers received, from the store's summary: (n, max, the pair of the max)
    when there is no gap, else every (number, pair) pair of the boot."""
    book = Book()
    if head.get("numbers") is None:
        book.next_seq, book.last_pair_seq = int(head["last_seq"]) + 1, int(head["last_pair_seq"])
        return book
    for seq, pair_seq in sorted(head["numbers"]):
        book.add(int(seq), int(pair_seq))
    return book


__all__ = ["restore"]
