"""Accounting that cannot be outrun: withheld records, abandoned boots, rollbacks,
silence after the recomputer's own stall, and what each receipt says is held.

One test per attack of issue 12, on the pure ingest core: the exact alarm, and the
state that must (or must not) move.
"""

from __future__ import annotations

from typing import Any

import pytest
from msgspec.structs import replace
from test_recomputer_support import ScriptedGateway

from ivp.errors import ChainError, SignatureError
from ivp.protocol import envelope as env
from ivp.protocol.acks import NO_DIGEST, Heartbeat, payload_digest
from ivp.protocol.keys import SigningKey
from ivp.protocol.messages import BootClose, Manifest
from ivp.recomputer.ingest import Ingest, Outcome, Rules

NOW = 1_000_000.0
pytest_plugins = ("test_recomputer_support",)


def make(manifest: Manifest, gw: ScriptedGateway, rules: Rules | None = None) -> Ingest:
    ing = Ingest(lambda m: manifest if m == manifest.model_id else None,
                 rules or Rules(checkpoint_period=10), now=NOW - 100)
    ing.enrol(gw.gateway_id, "gateway", gw.key.verify_key.hex, gw.url)
    return ing


def admit(ing: Ingest, item: Any, now: float = NOW) -> Outcome:
    out = ing.admit(item, now)
    if out.effect is not None:
        ing.apply(out.effect)
    return out


def kinds(alarms: Any) -> list[str]:
    return [a.kind for a in (alarms.alarms if isinstance(alarms, Outcome) else alarms)]


@pytest.fixture
def booted(tiny_manifest: Manifest, gateway: ScriptedGateway) -> tuple[Ingest, ScriptedGateway]:
    ing = make(tiny_manifest, gateway)
    assert admit(ing, gateway.boot(), NOW).ok
    return ing, gateway


# --- class 1: audit_withheld counts from the first claim ----------------------------------------
def test_withheld_is_timed_from_the_first_claim_not_the_latest_checkpoint(booted) -> None:
    """Attack: the operator drops audit record 2 and lets the gateway keep
    checkpointing; timing from the latest checkpoint never tripped (19 audits claimed,
    0 received, no alarm)."""
    ing, gw = booted
    assert admit(ing, gw.audit(), NOW).ok
    gw.audit()  # record 2: dropped on the wire
    assert admit(ing, gw.checkpoint(), NOW + 1).ok  # first claims record 2
    for t in (5, 10, 15, 20):  # checkpoints keep coming, each claiming it again
        assert admit(ing, gw.checkpoint(), NOW + t).ok
        assert ing.tick(NOW + t) == []
    alarms = ing.tick(NOW + 22)  # grace is two periods (20 s) after the FIRST claim
    assert kinds(alarms) == ["audit_withheld"]
    assert "record 2 was first claimed 21 s ago and never came" in alarms[0].detail


def test_a_late_record_clears_the_withheld_claim(booted) -> None:
    ing, gw = booted
    late = gw.audit()
    assert admit(ing, gw.checkpoint(), NOW + 1).ok
    assert admit(ing, late, NOW + 15).ok
    assert "audit_withheld" not in kinds(ing.tick(NOW + 60))


# --- class 2: an abandoned boot is reconciled too -----------------------------------------------
def test_abandoned_boot_is_reconciled_against_its_closing_state(booted) -> None:
    """Attack: drop boot 1's audit record, then re-upload (boot 2): only the latest
    boot was checked, so boot 1's missing record was never alarmed."""
    ing, gw = booted
    gw.audit()  # boot-1's record 1: dropped; no checkpoint of boot-1 ever arrives
    out = admit(ing, gw.boot("boot-2"), NOW + 2)  # names boot-1 closed with 1 audit
    assert out.ok and kinds(out) == []
    assert ing.tick(NOW + 10) == []
    alarms = ing.tick(NOW + 23)
    assert [(a.kind, a.boot_id) for a in alarms] == [("audit_withheld", "boot-1")]
    assert "(the boot is closed)" in alarms[0].detail


# --- class 4 at the recomputer: a restored or deleted log shows at the next BOOT ----------------
def test_boot_naming_an_older_closing_state_is_a_rollback(booted) -> None:
    """Attack: copy the gateway's log, serve (the recomputer sees a checkpoint of 2
    pairs), restore the copy, restart: the next BOOT names boot 1 closed at 1 pair."""
    ing, gw = booted
    assert admit(ing, gw.audit(), NOW).ok
    copy = (gw.pos, gw.audit_seq, gw.head)
    assert admit(ing, gw.audit(), NOW + 1).ok
    assert admit(ing, gw.checkpoint(), NOW + 2).ok
    gw.pos, gw.audit_seq, gw.head = copy  # the restored log
    out = admit(ing, gw.boot("boot-2"), NOW + 3)
    assert out.ok  # the BOOT is genuine: stored, and alarmed
    assert kinds(out) == ["rollback"]
    assert "closed at 1 pairs and 1 audit records; its checkpoint had counted 2 and 2" in \
        out.alarms[0].detail


def test_boot_naming_no_previous_boot_after_one_is_a_deleted_log(booted) -> None:
    """Attack: delete the gateway's log while it is off: its next BOOT knows no previous
    boot, while the recomputer holds one."""
    ing, gw = booted
    gw.booted = False  # a fresh log remembers nothing
    out = admit(ing, gw.boot("boot-2"), NOW + 3)
    assert kinds(out) == ["rollback"]
    assert "names no previous boot" in out.alarms[0].detail


def test_boot_with_a_counter_not_above_the_last_is_a_restored_device(booted) -> None:
    """Attack: restore the whole state directory (the emulated counter with it)."""
    ing, gw = booted
    assert admit(ing, gw.checkpoint(), NOW + 1).ok  # counter 2
    gw.counter = 1  # the copy's counter
    out = admit(ing, gw.boot("boot-2"), NOW + 3)
    assert kinds(out) == ["rollback"]
    assert "states device counter 2; this gateway's records stated 2 before" in \
        out.alarms[0].detail
    assert admit(ing, gw.checkpoint(counter=1), NOW + 4).alarms[0].kind == "rollback"


def test_boot_naming_a_boot_never_seen_is_withheld(booted) -> None:
    ing, gw = booted
    gw.boot("boot-2")  # never delivered
    out = admit(ing, gw.boot("boot-3"), NOW + 3)
    assert kinds(out) == ["unknown_boot"]
    assert "'boot-2', of which the recomputer holds no BOOT record" in out.alarms[0].detail


def test_honest_reboots_raise_no_history_alarm(booted) -> None:
    ing, gw = booted
    for i in range(2, 5):
        assert admit(ing, gw.audit(), NOW + i).ok
        assert admit(ing, gw.checkpoint(), NOW + i).ok
        assert kinds(admit(ing, gw.boot(f"boot-{i}"), NOW + i)) == []
    assert kinds(ing.tick(NOW + 10)) == []


# --- class 6: no false audit_rate from pending draws; silence after a stall -----------------------
def test_pending_draws_are_not_counted_as_refused_audits(tiny_manifest, gateway) -> None:
    """At ε = 1 a checkpoint taken while one draw is pending says 9 audits of 10 pairs:
    the binomial test gave p = 0 (a false audit_rate); the pending draw is not a no."""
    gateway.epsilon = 1.0
    ing = make(tiny_manifest, gateway)
    admit(ing, gateway.boot(), NOW)
    cp = gateway.checkpoint(pairs_served=30, audits=29, undecided=1)
    assert kinds(admit(ing, cp, NOW + 1)) == []
    bad = gateway.checkpoint(pairs_served=40, audits=29, undecided=1)  # 10 really not kept
    assert kinds(admit(ing, bad, NOW + 2)) == ["audit_rate"]


def test_silence_counts_from_the_recomputers_resumption(tiny_manifest, gateway) -> None:
    """The recomputer itself stalled (a junk batch, a restart): the gateways' checkpoints
    waited behind it; they are not silent gateways."""
    ing = make(tiny_manifest, gateway)
    admit(ing, gateway.boot(), NOW)
    ing.resume(NOW + 40)  # not listening from NOW + 5 to NOW + 40
    assert ing.tick(NOW + 41) == []
    assert kinds(ing.tick(NOW + 71)) == ["checkpoint_missing"]


def test_restart_does_not_make_gateways_look_silent(tiny_manifest, gateway) -> None:
    ing = make(tiny_manifest, gateway)
    ing.resumed_at = NOW + 500  # what restore() sets: the restart's time
    admit(ing, gateway.boot(), NOW)
    assert ing.tick(NOW + 501) == []


# --- class 5 at the recomputer: a shut-down gateway must keep talking -----------------------------
def test_silent_shut_down_gateway_alarms(booted) -> None:
    ing, gw = booted
    ing.shut_down(gw.gateway_id, "verify_fail", NOW)
    beat = gw.sign(env.HEARTBEAT, Heartbeat(gateway_id=gw.gateway_id, state="shutdown",
                                            time=NOW + 20, counter=gw.counter + 1))
    out = admit(ing, beat, NOW + 20)
    assert out.ok and out.effect is not None and out.effect.kind == "heartbeat"
    assert ing.tick(NOW + 45) == []
    alarms = ing.tick(NOW + 51)
    assert kinds(alarms) == ["shutdown_silent"] and alarms[0].gateway_id == gw.gateway_id


# --- receipts: what the gateway may delete ------------------------------------------------------
def test_receipts_say_stored_refused_or_retry(booted) -> None:
    """Stored and refused records are held (the gateway may delete its copy); refused
    ones are kept as evidence. Unauthenticated items and records of a boot not yet
    known are not held (retry)."""
    ing, gw = booted
    record = gw.audit()
    out = admit(ing, record)
    assert out.receipt is not None
    assert (out.receipt.status, out.receipt.kind, out.receipt.boot_id, out.receipt.n) == \
        ("stored", "audit", gw.boot_id, 1)
    import base64
    assert out.receipt.digest == payload_digest(base64.b64decode(record["payload"]))
    again = admit(ing, record)  # a replay: refused, and held (it is stored)
    assert isinstance(again.error, ChainError) and again.receipt is not None
    assert again.receipt.status == "refused" and again.receipt.held
    assert again.evidence is not None and again.evidence.kind == "audit"
    forged = gw.sign(env.AUDIT, _record_of(gw), key=SigningKey.generate())
    out = admit(ing, forged)
    assert isinstance(out.error, SignatureError) and out.receipt is not None
    assert out.receipt.status == "retry" and not out.receipt.held and out.evidence is None
    junk = admit(ing, {})
    assert junk.receipt is not None and junk.receipt.digest == NO_DIGEST
    assert junk.receipt.status == "retry"
    other = ScriptedGateway(gw.gateway_id, gw.engine, gw.manifest, key=gw.key,
                            boot_id="boot-unseen")
    out = admit(ing, other.audit())
    assert out.receipt is not None and out.receipt.status == "retry"
    assert kinds(out) == ["unknown_boot"]


def _record_of(gw: ScriptedGateway) -> Any:
    from ivp.protocol.chain import link
    from ivp.protocol.messages import AuditRecord

    pair = gw.pair()
    return AuditRecord(gateway_id=gw.gateway_id, boot_id=gw.boot_id,
                       audit_seq=gw.audit_seq + 1, chain_prev=gw.head,
                       chain_head=link(gw.head, pair), pair=pair)


def test_boot_close_in_a_v1_boot_is_refused() -> None:
    from ivp.protocol.messages import BootRecord

    close = BootClose(boot_id="b", pairs_served=1, audits=0, chain_head="ab" * 32)
    with pytest.raises(ValueError, match="previous not in BootRecord version 1"):
        BootRecord(v=1, gateway_id="g", boot_id="c", model_id="m",
                   manifest_digest="ab" * 32, epsilon=0.5, time=1.0, previous=close)
    assert replace(close, counter=3).counter == 3
