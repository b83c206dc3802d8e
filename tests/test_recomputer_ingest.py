"""The ingest core, one test per attack: exact error, the alarm, and state unchanged."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from msgspec.structs import replace
from test_recomputer_support import ScriptedGateway

from ivp.errors import ChainError, SignatureError, ValidationError
from ivp.protocol import envelope as env
from ivp.protocol.keys import SigningKey
from ivp.protocol.messages import Manifest, Shutdown
from ivp.recomputer.ingest import Ingest, Outcome, Rules, audit_rate_pvalue

NOW = 1_000_000.0

pytest_plugins = ("test_recomputer_support",)


def make_ingest(manifest: Manifest, gw: ScriptedGateway, rules: Rules | None = None) -> Ingest:
    ing = Ingest(lambda m: manifest if m == manifest.model_id else None, rules)
    ing.enrol(gw.gateway_id, "gateway", gw.key.verify_key.hex, gw.url)
    return ing


def admit(ing: Ingest, item: Any, now: float = NOW) -> Outcome:
    out = ing.admit(item, now)
    if out.effect is not None:
        ing.apply(out.effect)
    return out


@pytest.fixture
def booted(tiny_manifest: Manifest, gateway: ScriptedGateway) -> tuple[Ingest, ScriptedGateway]:
    ing = make_ingest(tiny_manifest, gateway)
    assert admit(ing, gateway.boot()).ok
    return ing, gateway


def seq_of(ing: Ingest, gw: ScriptedGateway) -> int:
    return ing.boots[(gw.gateway_id, gw.boot_id)].sequence.next_seq


def kinds(out: Outcome) -> list[str]:
    return [a.kind for a in out.alarms]


def test_honest_records_are_admitted_in_order(booted) -> None:
    ing, gw = booted
    for _ in range(3):
        out = admit(ing, gw.audit())
        assert out.ok and out.effect is not None and out.effect.kind == "audit", out.error
    assert seq_of(ing, gw) == 4
    assert admit(ing, gw.checkpoint()).ok
    assert ing.serving(gw.manifest.model_id) == [(gw.gateway_id, gw.url, gw.boot_id)]


def test_unenrolled_key_is_refused_and_alarmed(booted) -> None:
    """Attack: a rogue device (or the operator) signs records with its own key."""
    ing, gw = booted
    rogue = SigningKey.generate()
    record = gw.sign(env.AUDIT, _record(gw), key=rogue)
    out = ing.admit(record, NOW)
    assert isinstance(out.error, SignatureError)
    assert "no enrolled gateway key" in str(out.error) and "gw-a" in str(out.error)
    assert kinds(out) == ["unenrolled"]
    assert seq_of(ing, gw) == 1


def test_bad_signature_is_refused_and_alarmed(booted) -> None:
    """Attack: the operator alters a signed record in transit (here: its output text)."""
    ing, gw = booted
    item = gw.audit()
    payload = json.loads(base64.b64decode(item["payload"]))
    payload["pair"]["output_text"] = "something else"
    item = {**item, "payload": base64.b64encode(json.dumps(payload).encode()).decode()}
    out = ing.admit(item, NOW)
    assert isinstance(out.error, SignatureError)
    assert "bad signature" in str(out.error)
    assert kinds(out) == ["forged"]
    assert seq_of(ing, gw) == 1


def test_gateway_speaking_for_another_is_refused(booted, tiny_engine, tiny_manifest) -> None:
    """Attack: an enrolled gateway signs records that name another gateway."""
    ing, gw = booted
    other = ScriptedGateway("gw-b", tiny_engine, tiny_manifest)
    ing.enrol(other.gateway_id, "gateway", other.key.verify_key.hex, other.url)
    out = ing.admit(gw.sign(env.BOOT, _boot_record(other)), NOW)
    assert isinstance(out.error, SignatureError)
    assert "signed by the key of 'gw-a'" in str(out.error)
    assert kinds(out) == ["forged"]
    assert ("gw-b", other.boot_id) not in ing.boots


def test_record_after_a_gap_is_stored_and_the_gap_alarmed(booted) -> None:
    """Attack: the operator withholds audit record 2 (the cheating pair) and sends 3.

    Record 3 and every later one are stored and verified (one withheld record must not
    make the rest of the boot unauditable); the gap stays open until 2 arrives."""
    ing, gw = booted
    assert admit(ing, gw.audit()).ok
    late = gw.audit()  # record 2, held back
    out = admit(ing, gw.audit())
    assert out.ok and out.effect is not None and out.effect.kind == "audit"
    assert kinds(out) == ["sequence_gap"]
    assert out.alarms[0].detail.startswith("audit sequence gap: got 3, expected 2 (1 record(s) "
                                           "missing)")
    assert out.receipt is not None and out.receipt.status == "stored"
    assert admit(ing, gw.audit()).ok and seq_of(ing, gw) == 2  # 4: no second alarm
    out = admit(ing, late)  # the gap closes
    assert out.ok and kinds(out) == []
    assert seq_of(ing, gw) == 5
    assert ing.boots[(gw.gateway_id, gw.boot_id)].sequence.above == {}


def test_record_filling_a_gap_must_sit_between_its_neighbours(booted) -> None:
    """Attack: a late record for a hole carrying a pair from elsewhere in the boot."""
    ing, gw = booted
    p0, p1, p2 = gw.pair(), gw.pair(), gw.pair()
    assert admit(ing, gw.audit(p0)).ok
    gw.audit(p1)  # record 2 held back
    assert admit(ing, gw.audit(p2)).ok
    gw.audit_seq = 1  # a second record numbered 2, holding pair 2 again
    out = admit(ing, gw.audit(p2))
    assert isinstance(out.error, ChainError) and kinds(out) == ["pair_order"]
    assert "not before pair 2 of the record after" in str(out.error)
    assert out.receipt is not None and out.receipt.status == "refused"
    assert out.evidence is not None and out.evidence.n == 2
    assert seq_of(ing, gw) == 2


def test_replay_is_refused_and_alarmed(booted) -> None:
    """Attack: an old audit record is sent again (to stand in for a withheld one)."""
    ing, gw = booted
    first = gw.audit()
    assert admit(ing, first).ok
    out = admit(ing, first)
    assert isinstance(out.error, ChainError)
    assert "audit record 1 replayed" in str(out.error)
    assert kinds(out) == ["replay"]
    assert seq_of(ing, gw) == 2


def test_broken_chain_link_is_refused(booted) -> None:
    """Attack: a record whose pair is not the one the chain committed to."""
    ing, gw = booted
    pair = gw.pair()
    bad = gw.sign(env.AUDIT, replace(_record(gw, pair), chain_head="0" * 64))
    out = admit(ing, bad)
    assert isinstance(out.error, ChainError)
    assert "chain_head is not link(chain_prev, pair)" in str(out.error)
    assert kinds(out) == ["chain_link"]
    assert seq_of(ing, gw) == 1


def test_pairs_out_of_order_are_refused(booted) -> None:
    """Attack: a later audit record carries an earlier pair (a pair audited twice)."""
    ing, gw = booted
    pair = gw.pair()
    assert admit(ing, gw.audit(pair)).ok
    out = admit(ing, gw.audit(pair))
    assert isinstance(out.error, ChainError) and "not after pair 0" in str(out.error)
    assert kinds(out) == ["pair_order"]
    assert seq_of(ing, gw) == 2


def test_audit_for_unknown_boot_is_refused(tiny_manifest, gateway) -> None:
    """Attack: records of a boot that never announced itself (its manifest unknown)."""
    ing = make_ingest(tiny_manifest, gateway)
    out = admit(ing, gateway.audit())
    assert isinstance(out.error, ChainError) and "without a BOOT record" in str(out.error)
    assert kinds(out) == ["unknown_boot"]
    assert ing.boots == {}


def test_malformed_envelope_is_refused(booted) -> None:
    ing, _gw = booted
    out = admit(ing, {"payloadType": env.AUDIT, "payload": "!!", "signatures": []})
    assert isinstance(out.error, ValidationError)
    assert kinds(out) == ["malformed"]
    out = admit(ing, [1, 2, 3])
    assert isinstance(out.error, ValidationError)


def test_other_payload_types_are_refused_on_the_uplink(booted) -> None:
    """Attack: a gateway-signed document of another type presented as a record."""
    ing, gw = booted
    order = Shutdown(gateway_id="gw-a", reason="x", time=NOW, nonce="n" * 16)
    out = admit(ing, gw.sign(env.SHUTDOWN, order))
    assert isinstance(out.error, ValidationError) and "not accepted on the uplink" in str(
        out.error)
    assert seq_of(ing, gw) == 1


def test_boot_not_whitelisted_is_stored_but_not_routed(tiny_manifest, gateway) -> None:
    ing = make_ingest(tiny_manifest, gateway)
    out = admit(ing, gateway.boot(manifest_digest="ab" * 32))
    assert out.ok and kinds(out) == ["boot_not_whitelisted"]
    assert ing.serving(tiny_manifest.model_id) == []


def test_boot_resend_is_a_duplicate_and_conflict_is_refused(booted) -> None:
    _ing, gw = booted
    first = gw.boot()
    ing2 = make_ingest(gw.manifest, gw)
    assert admit(ing2, first).ok
    assert admit(ing2, first).effect.kind == "duplicate"  # type: ignore[union-attr]
    out = admit(ing2, gw.boot(epsilon=0.25))  # same boot id, other content
    assert isinstance(out.error, ChainError) and kinds(out) == ["boot_conflict"]
    assert ing2.boots[(gw.gateway_id, gw.boot_id)].record.epsilon == gw.epsilon


def test_boot_churn_and_epsilon_mismatch_alarm(tiny_manifest, gateway) -> None:
    ing = make_ingest(tiny_manifest, gateway, Rules(churn_max=2, churn_window=100))
    ing.epsilon = 0.5
    assert kinds(admit(ing, gateway.boot("b1"), NOW)) == []
    assert kinds(admit(ing, gateway.boot("b2"), NOW + 1)) == []
    assert kinds(admit(ing, gateway.boot("b3"), NOW + 2)) == ["boot_churn"]
    assert kinds(admit(ing, gateway.boot("b4", epsilon=0.1), NOW + 500)) == ["epsilon_mismatch"]


def test_checkpoint_regress_is_refused(booted) -> None:
    ing, gw = booted
    assert admit(ing, gw.checkpoint(pairs_served=10, audits=3)).ok
    out = admit(ing, gw.checkpoint(pairs_served=9, audits=3))
    assert isinstance(out.error, ChainError) and "went back" in str(out.error)
    assert kinds(out) == ["checkpoint_regress"]
    assert ing.boots[(gw.gateway_id, gw.boot_id)].checkpoint.pairs_served == 10  # type: ignore[union-attr]


def test_implausible_audit_rate_alarms(booted) -> None:
    """Attack: a subverted sampler keeps far fewer pairs than ε (cheats stay unaudited)."""
    ing, gw = booted  # ε = 0.5
    out = admit(ing, gw.checkpoint(pairs_served=400, audits=150))
    assert out.ok and kinds(out) == ["audit_rate"]
    assert kinds(admit(ing, gw.checkpoint(pairs_served=500, audits=251))) == []
    assert audit_rate_pvalue(250, 500, 0.5) > 0.5


def test_missing_checkpoints_alarm_once(tiny_manifest, gateway) -> None:
    """Attack: a silenced gateway (the operator cut its uplink while it serves)."""
    ing = make_ingest(tiny_manifest, gateway, Rules(checkpoint_period=10))
    admit(ing, gateway.boot(), NOW)
    assert ing.tick(NOW + 29) == []
    alarms = ing.tick(NOW + 31)
    assert [a.kind for a in alarms] == ["checkpoint_missing"]
    assert ing.tick(NOW + 32) == []  # raised once while it holds
    admit(ing, gateway.checkpoint(), NOW + 33)
    assert ing.tick(NOW + 34) == []


def test_withheld_audits_claimed_by_checkpoint_alarm(booted) -> None:
    """Attack: records dropped on the way although the gateway made them."""
    ing, gw = booted
    ing.rules = Rules(checkpoint_period=10)
    assert admit(ing, gw.audit(), NOW).ok
    gw.audit()  # made, never delivered
    assert admit(ing, gw.checkpoint(), NOW + 1).ok
    assert ing.tick(NOW + 15) == []  # in flight for up to two checkpoint periods
    assert [a.kind for a in ing.tick(NOW + 22)] == ["audit_withheld"]


def test_reboot_overdue_alarms(booted) -> None:
    ing, gw = booted
    ing.reboot_interval = 100.0
    admit(ing, gw.checkpoint(), NOW + 140)
    assert ing.tick(NOW + 140) == []
    assert [a.kind for a in ing.tick(NOW + 151)] == ["reboot_overdue"]


def test_rotated_key_refuses_the_old_one(booted) -> None:
    ing, gw = booted
    old = gw.key
    gw.key = SigningKey.generate()
    ing.rotate(gw.gateway_id, gw.key.verify_key.hex)
    out = admit(ing, gw.sign(env.AUDIT, _record(gw), key=old))
    assert isinstance(out.error, SignatureError) and kinds(out) == ["unenrolled"]
    assert admit(ing, gw.audit()).ok


def _record(gw: ScriptedGateway, pair: Any = None) -> Any:
    from ivp.protocol.chain import link
    from ivp.protocol.messages import AuditRecord

    pair = pair or gw.pair()
    return AuditRecord(gateway_id=gw.gateway_id, boot_id=gw.boot_id,
                       audit_seq=gw.audit_seq + 1, chain_prev=gw.head,
                       chain_head=link(gw.head, pair), pair=pair)


def _boot_record(gw: ScriptedGateway) -> Any:
    from ivp.protocol.messages import BootRecord, manifest_digest

    return BootRecord(gateway_id=gw.gateway_id, boot_id=gw.boot_id,
                      model_id=gw.manifest.model_id,
                      manifest_digest=manifest_digest(gw.manifest), epsilon=gw.epsilon,
                      time=NOW, url=gw.url)


# --- chain positions: checkpoints and audit records agree -----------------------------------
def _at(gw: ScriptedGateway, pair: Any, pos: int, prev: str) -> dict:
    """Audit record number ``gw.audit_seq + 1`` holding ``pair`` at chain position ``pos``."""
    from ivp.protocol.chain import link
    from ivp.protocol.messages import AuditRecord

    gw.audit_seq += 1
    return gw.sign(env.AUDIT, AuditRecord(
        gateway_id=gw.gateway_id, boot_id=gw.boot_id, audit_seq=gw.audit_seq,
        chain_prev=prev, chain_head=link(prev, pair), pair=pair, chain_pos=pos))


def test_honest_records_may_hold_chain_positions_out_of_order(booted) -> None:
    """Responses overtake: pair 1 commits first (position 1), pair 0 second (position 2);
    audit records follow tag order, so their positions go down — and are accepted."""
    from ivp.protocol.chain import genesis, link

    ing, gw = booted
    p0, p1 = gw.pair(), gw.pair()
    g = genesis(gw.gateway_id, gw.boot_id)
    h1 = link(g, p1)
    h2 = link(h1, p0)
    assert admit(ing, _at(gw, p0, 2, h1)).ok
    assert admit(ing, _at(gw, p1, 1, g)).ok
    out = admit(ing, gw.sign(env.CHECKPOINT, _checkpoint(gw, 2, 2, h2)))
    assert out.ok and kinds(out) == []


def test_two_heads_at_one_chain_position_are_a_fork(booted) -> None:
    """Attack: records cut from two different histories of one boot (e.g. a doctored
    log re-chained after a cheating pair was removed)."""
    from ivp.protocol.chain import genesis

    ing, gw = booted
    g = genesis(gw.gateway_id, gw.boot_id)
    assert admit(ing, _at(gw, gw.pair(), 1, g)).ok
    out = admit(ing, _at(gw, gw.pair(), 1, g))  # another pair at the same position
    assert isinstance(out.error, ChainError)
    assert str(out.error).startswith("audit record 2 at chain position 1: names ")
    assert "(a fork)" in str(out.error) and kinds(out) == ["chain_fork"]
    assert seq_of(ing, gw) == 2


def test_first_pair_must_chain_from_the_boots_genesis(booted) -> None:
    ing, gw = booted
    out = admit(ing, _at(gw, gw.pair(), 1, "ab" * 32))
    assert isinstance(out.error, ChainError) and "as genesis" in str(out.error)
    assert kinds(out) == ["chain_fork"]
    assert seq_of(ing, gw) == 1


def test_checkpoint_naming_another_head_is_a_fork(booted) -> None:
    ing, gw = booted
    assert admit(ing, gw.audit()).ok  # position 1
    out = admit(ing, gw.sign(env.CHECKPOINT, _checkpoint(gw, 1, 1, "cd" * 32)))
    assert isinstance(out.error, ChainError)
    assert str(out.error).startswith("checkpoint at 1 pairs: names cdcdcdcd")
    assert kinds(out) == ["chain_fork"]
    assert ing.boots[(gw.gateway_id, gw.boot_id)].checkpoint is None


def _three(gw: ScriptedGateway) -> tuple[Any, Any, str, str]:
    """Pairs at chain positions 1, 2, 3 (the second not audited): (p1, p3, genesis, h2)."""
    from ivp.protocol.chain import genesis, link

    p1, p2, p3 = gw.pair(), gw.pair(), gw.pair()
    g = genesis(gw.gateway_id, gw.boot_id)
    return p1, p3, g, link(link(g, p1), p2)


def test_checkpoint_counting_an_audit_beyond_its_pairs_is_refused(booted) -> None:
    """Attack: a checkpoint that under-counts pairs served (to make the audit rate look
    plausible) while an audit record it counts sits further down the chain."""
    ing, gw = booted
    p1, p3, g, h2 = _three(gw)
    assert admit(ing, _at(gw, p1, 1, g)).ok
    assert admit(ing, _at(gw, p3, 3, h2)).ok
    out = admit(ing, gw.sign(env.CHECKPOINT, _checkpoint(gw, 2, 2, h2)))
    assert isinstance(out.error, ChainError)
    assert str(out.error) == ("checkpoint counts 2 pairs and 2 audit records, but audit "
                              "record 2 holds the pair at chain position 3")
    assert kinds(out) == ["chain_ahead"]
    assert ing.boots[(gw.gateway_id, gw.boot_id)].checkpoint is None


def test_audit_arriving_after_its_checkpoint_must_lie_within_it(booted) -> None:
    ing, gw = booted
    p1, p3, g, h2 = _three(gw)
    assert admit(ing, _at(gw, p1, 1, g)).ok
    cp = gw.sign(env.CHECKPOINT, _checkpoint(gw, 2, 2, h2))  # record 2 still on its way
    assert admit(ing, cp).ok
    out = admit(ing, _at(gw, p3, 3, h2))
    assert isinstance(out.error, ChainError) and kinds(out) == ["chain_ahead"]
    assert str(out.error) == ("audit record 2 holds the pair at chain position 3, but the "
                              "checkpoint counting it counts 2 pairs")
    assert seq_of(ing, gw) == 2


def _checkpoint(gw: ScriptedGateway, pairs: int, audits: int, head: str | None) -> Any:
    from ivp.protocol.messages import Checkpoint

    gw.counter += 1
    return Checkpoint(gateway_id=gw.gateway_id, boot_id=gw.boot_id, pairs_served=pairs,
                      audits=audits, chain_head=head or gw.head, time=NOW, counter=gw.counter)


# --- the gateways' own alarms ---------------------------------------------------------------
def _alarm(gw: ScriptedGateway, seq: int, kind: str = "unpaired_output",
           key: SigningKey | None = None) -> dict:
    from ivp.protocol.messages import GatewayAlarm

    return gw.sign(env.ALARM, GatewayAlarm(gateway_id=gw.gateway_id, seq=seq, kind=kind,
                                           message="server output dropped", time=NOW,
                                           boot_id=gw.boot_id), key=key)


def test_gateway_alarm_is_stored_under_its_gateway_kind(booted) -> None:
    ing, gw = booted
    out = admit(ing, _alarm(gw, 1))
    assert out.ok and out.effect is not None and out.effect.kind == "alarm"
    [alarm] = out.alarms
    assert (alarm.kind, alarm.gateway_id, alarm.boot_id) == \
        ("gateway:unpaired_output", gw.gateway_id, gw.boot_id)
    assert alarm.detail == "server output dropped (gateway alarm 1)"
    from ivp.recomputer.alarms import authenticated
    assert authenticated(alarm.kind)
    assert ing.cursor(gw.gateway_id, None).next_alarm_seq == 2


def test_withheld_gateway_alarm_shows_as_a_gap_and_the_next_is_kept(booted) -> None:
    """Attack: the operator drops the gateway's alarm about its exfiltration attempt."""
    ing, gw = booted
    assert admit(ing, _alarm(gw, 1)).ok
    out = admit(ing, _alarm(gw, 3, "power_kill"))
    assert out.ok and kinds(out) == ["gateway_alarm_gap", "gateway:power_kill"]
    assert "1 alarm(s) withheld" in out.alarms[0].detail


def test_replayed_or_unsigned_gateway_alarm_is_refused(booted) -> None:
    ing, gw = booted
    assert admit(ing, _alarm(gw, 1)).ok
    out = admit(ing, _alarm(gw, 1))
    assert isinstance(out.error, ChainError) and kinds(out) == ["replay"]
    assert str(out.error) == "gateway alarm 1 replayed (already stored; next expected 2)"
    out = admit(ing, _alarm(gw, 2, key=SigningKey.generate()))
    assert isinstance(out.error, SignatureError) and kinds(out) == ["unenrolled"]
    assert ing.cursor(gw.gateway_id, None).next_alarm_seq == 2


def test_cursor_reports_what_is_stored(booted) -> None:
    ing, gw = booted
    assert admit(ing, gw.audit()).ok
    assert admit(ing, gw.checkpoint()).ok
    c = ing.cursor(gw.gateway_id, gw.boot_id)
    assert (c.boot_known, c.next_audit_seq, c.next_alarm_seq) == (True, 2, 1)
    assert c.checkpoint is not None and c.checkpoint.pairs_served == 1
    other = ing.cursor(gw.gateway_id, "boot-unknown")
    assert (other.boot_known, other.next_audit_seq, other.checkpoint) == (False, 1, None)
