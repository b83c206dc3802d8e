"""Signed answers: what one side tells the other it holds or has obeyed.

The operator owns the wire between gateways and recomputer, so an answer anyone can
write is an answer the operator can forge. Every answer that makes a party forget,
delete or stop retrying something is therefore a signed document:

* :class:`UplinkAck` (payload type ``ACK``), signed by the recomputer's device key:
  the fate of each envelope of an uplink batch, bound to the gateway, the boot, the
  record's number and the BLAKE3 digest of its payload. A gateway deletes a spooled
  record only on a receipt that names it and says ``stored`` or ``refused`` (the
  recomputer keeps refused records as evidence); ``retry`` (not held) keeps it.
* the signed ``UplinkCursor`` (payload type ``CURSOR``): what the recomputer holds of
  a gateway, so a gateway may drop records whose Ack was lost.
* :class:`Relay` (payload type ``RELAY``), signed by the recomputer: an inspectors'
  admin request as received, numbered per gateway (``relay_seq``) so the gateway
  applies relayed settings in admin-log order and never an old one after a newer.
* :class:`ControlReceipt` (payload type ``RECEIPT``), signed by the gateway's device
  key: a Shutdown, Readmit or Relay was obeyed (or refused, and why). The recomputer
  counts a control message as delivered only on such a receipt.
* :class:`Heartbeat` (payload type ``HEARTBEAT``), signed by the gateway: alive and
  not serving (a shut-down gateway keeps sending them; silence is an alarm).
"""

from __future__ import annotations

from typing import Annotated, Literal

import blake3
from msgspec import Meta, Struct

from ivp.protocol.envelope import Envelope
from ivp.protocol.messages import I63, Count, Hex256, Name, _Msg

NO_DIGEST = "0" * 64  # an item that names no payload (not an envelope)

ReceiptStatus = Literal["stored", "refused", "retry"]
RecordKind = Literal["boot", "checkpoint", "audit", "alarm", "heartbeat", "other"]
Seq = Annotated[int, Meta(ge=1, le=I63)]


def payload_digest(payload: bytes) -> str:
    """BLAKE3 of an envelope's payload bytes: how receipts name a record."""
    return blake3.blake3(payload).hexdigest()


class UplinkReceipt(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The fate of one uplinked envelope.

    ``stored``: held durably as the record it is. ``refused``: not accepted, but held
    durably as evidence (the refusal is alarmed). ``retry``: not held (unauthenticated,
    an unknown boot, the store failed): the sender must keep it and send it again.
    """

    digest: Hex256  # payload_digest of the envelope's payload as received
    status: ReceiptStatus
    kind: RecordKind = "other"
    boot_id: Name | None = None
    n: Count = 0  # audit_seq, pairs_served (checkpoint), alarm seq; 0 for BOOT, heartbeat
    error: Annotated[str, Meta(max_length=500)] = ""

    @property
    def held(self) -> bool:
        """The recomputer holds the record (as itself or as evidence): the sender may
        delete its copy."""
        return self.status != "retry"


class UplinkAck(_Msg, frozen=True):
    """Signed by the recomputer: one receipt per envelope of a batch, in order."""

    gateway_id: Name | None  # whose records the batch held (None: no enrolled signer)
    results: list[UplinkReceipt]
    time: float


class Relay(_Msg, frozen=True):
    """Signed by the recomputer: the inspectors' admin request ``request`` (as
    received; the gateway checks its quorum itself), the ``relay_seq``-th relayed to
    this gateway, from admin log entry ``admin_seq``."""

    gateway_id: Name
    relay_seq: Seq
    admin_seq: Seq
    instruction: Name
    request: Envelope


ControlKind = Literal["shutdown", "readmit", "relay"]
Outcome = Literal["applied", "duplicate", "refused"]


class ControlReceipt(_Msg, frozen=True):
    """Signed by a gateway's device key: what it did with a control message.

    ``digest`` is the BLAKE3 of the message's bytes as delivered, so a receipt cannot
    be taken for another message; ``ref`` is its nonce (Shutdown, Readmit) or relay
    number. ``state`` is the gateway's state after it.
    """

    gateway_id: Name
    kind: ControlKind
    digest: Hex256
    ref: Annotated[str, Meta(max_length=128)]
    outcome: Outcome
    state: Annotated[str, Meta(max_length=32)]
    time: float
    detail: Annotated[str, Meta(max_length=500)] = ""
    counter: Count = 0


class Heartbeat(_Msg, frozen=True):
    """Signed by a gateway that is alive but not serving (UPLOAD, SHUTDOWN)."""

    gateway_id: Name
    state: Annotated[str, Meta(max_length=32)]
    time: float
    counter: Count = 0
    shutdown_nonce: Annotated[str, Meta(max_length=128)] = ""  # the Shutdown in force
    reason: Annotated[str, Meta(max_length=500)] = ""  # why it is shut down

    @property
    def locked(self) -> bool:
        """Shut down by itself (its log was set back), not by the recomputer."""
        return self.state == "shutdown" and self.shutdown_nonce.startswith(LOCAL_NONCE)


LOCAL_NONCE = "local-"  # the nonce prefix of a shutdown a gateway imposed on itself


def digest_of(data: bytes) -> str:
    """BLAKE3 of a control message's bytes as delivered (what a receipt names)."""
    return blake3.blake3(data).hexdigest()


__all__ = ["LOCAL_NONCE", "NO_DIGEST", "ControlReceipt", "Heartbeat", "Relay", "UplinkAck",
           "UplinkReceipt", "digest_of", "payload_digest"]
