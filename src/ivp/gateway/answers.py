"""What a gateway believes of the recomputer's answers (pure: bytes in, decisions out).

The operator owns the wire and can answer the gateway's uplink in the recomputer's
name. So the gateway deletes a spooled record only on the recomputer's *signed* word:

* :func:`judge_ack`: an uplink answer's ``signed`` part must be an ``UplinkAck`` signed
  by the recomputer key the gateway was given, for this gateway. Each receipt names
  the payload digest of a record it answers, and its kind, boot and number must be the
  spool row's. A record is deleted only on a receipt that says the recomputer holds
  it (``stored``, or ``refused`` — kept there as evidence); a record no receipt names,
  or named ``retry``, stays and is sent again. An answer that is not signed (or not
  signed by that key, or for another gateway) deletes nothing at all: a forged
  ``ok: true`` once made the gateway delete the audit record the operator withheld.
* :func:`judge_cursor`: the cursor that lets a gateway drop records whose Ack was lost
  is signed the same way; an unsigned one drops nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ivp.errors import SignatureError, ValidationError
from ivp.protocol.acks import UplinkAck, payload_digest
from ivp.protocol.encoding import decode
from ivp.protocol.envelope import ACK, CURSOR, Envelope, open_signed
from ivp.protocol.keys import VerifyKey
from ivp.protocol.messages import Ack, Checkpoint, UplinkCursor

KINDS = {"AUDIT": "audit", "CHECKPOINT": "checkpoint", "BOOT": "boot", "ALARM": "alarm",
         "HEARTBEAT": "heartbeat"}  # spool row kind -> receipt kind


@dataclass(frozen=True)
class Spooled:
    """One spooled envelope as the uplink sent it (the log's spool row)."""

    id: int
    kind: str  # the spool row's kind: AUDIT, CHECKPOINT, BOOT, ALARM, HEARTBEAT
    boot_id: str
    n: int  # audit_seq, pairs served, alarm seq; 0 for BOOT and HEARTBEAT
    envelope: bytes

    @property
    def digest(self) -> str:
        return payload_digest(Envelope.from_bytes(self.envelope).payload_bytes())


@dataclass
class AckJudgement:
    """What to do with each record of a batch after the recomputer's answer."""

    stored: list[int] = field(default_factory=list)  # held as records: delete
    refused: list[tuple[int, str]] = field(default_factory=list)  # held as evidence: delete
    kept: list[tuple[int, str]] = field(default_factory=list)  # not held: send again
    mismatched: list[str] = field(default_factory=list)  # receipts that name no row right


def judge_ack(raw: bytes, batch: list[Spooled], key: VerifyKey, gateway_id: str
              ) -> AckJudgement:
    """Judge one uplink answer for the batch it answers.

    Raises:
        ValidationError: not an Ack at all (garbage: nothing is deleted).
        SignatureError: no ``UplinkAck`` signed by ``key`` for ``gateway_id`` (a forged
            or unsigned answer: nothing is deleted).
    """
    ack = decode(raw, Ack)
    if ack.signed is None:
        raise SignatureError("the answer carries no signed acknowledgement")
    signed = decode(open_signed(ack.signed, ACK, key), UplinkAck)
    if signed.gateway_id != gateway_id:
        raise SignatureError(f"signed acknowledgement is for gateway {signed.gateway_id!r}")
    rows = {item.digest: item for item in batch}
    out = AckJudgement()
    answered: set[int] = set()
    for receipt in signed.results:
        row = rows.get(receipt.digest)
        if row is None:
            continue  # a receipt for something this batch did not send (a junk item)
        if (receipt.kind, receipt.boot_id or "", receipt.n) != \
                (KINDS.get(row.kind, "other"), _boot_of(row), row.n):
            out.mismatched.append(f"receipt for {row.kind} {row.boot_id}/{row.n} names "
                                  f"{receipt.kind} {receipt.boot_id}/{receipt.n}")
            continue
        answered.add(row.id)
        if receipt.status == "stored":
            out.stored.append(row.id)
        elif receipt.status == "refused":
            out.refused.append((row.id, receipt.error or "refused"))
        else:
            out.kept.append((row.id, receipt.error or "not held"))
    out.kept += [(item.id, "no signed receipt names it") for item in batch
                 if item.id not in answered and item.id not in {i for i, _ in out.kept}]
    return out


def _boot_of(row: Spooled) -> str:
    """The boot a receipt names for a row (an alarm: the boot it happened in, or none;
    a heartbeat: none)."""
    return "" if row.kind == "HEARTBEAT" else row.boot_id


def judge_cursor(raw: bytes, key: VerifyKey, gateway_id: str, boot_id: str | None
                 ) -> UplinkCursor:
    """The recomputer's signed cursor for ``gateway_id`` (and ``boot_id``).

    Raises:
        ValidationError: not a cursor envelope.
        SignatureError: not signed by ``key``, or for another gateway or boot (an
            unsigned or forged cursor drops nothing).
    """
    envelope = decode(raw, Envelope)
    cursor = decode(open_signed(envelope, CURSOR, key), UplinkCursor)
    if cursor.gateway_id != gateway_id or (cursor.boot_id or None) != (boot_id or None):
        raise SignatureError("signed cursor of another gateway or boot")
    return cursor


def already_stored(item: Spooled, cursor: UplinkCursor | None) -> bool:
    """Whether the recomputer's signed ``cursor`` shows a spooled record as stored.

    A checkpoint is stored when the latest stored checkpoint of its boot is it or a
    later one: a gateway's checkpoints of one boot never go back in pairs, audits or
    time. A heartbeat is never worth resending once a later one exists: it is dropped.
    """
    if cursor is None:
        return False
    kind, n = item.kind, item.n
    if kind == "ALARM":
        return n < cursor.next_alarm_seq or n in cursor.alarms_above
    if not cursor.boot_known:
        return False
    if kind == "BOOT":
        return True
    if kind == "AUDIT":
        return n < cursor.next_audit_seq or n in cursor.audits_above
    if kind == "CHECKPOINT" and cursor.checkpoint is not None:
        try:
            mine = decode(Envelope.from_bytes(item.envelope).payload_bytes(), Checkpoint)
        except ValidationError:
            return False
        last = cursor.checkpoint
        return (mine.boot_id == last.boot_id and mine.pairs_served <= last.pairs_served
                and mine.audits <= last.audits and mine.time <= last.time)
    return False


def describe(exc: Any) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


__all__ = ["AckJudgement", "Spooled", "already_stored", "describe", "judge_ack",
           "judge_cursor"]
