"""The pair hash chain and the per-boot audit sequence.

Every pair a gateway serves is linked into a BLAKE3 chain that starts from a genesis
value bound to (gateway_id, boot_id):

    head_0 = BLAKE3("ivp/chain/v1" || 0x00 || gateway_id || 0x00 || boot_id)
    head_n = BLAKE3(head_{n-1} || canonical(pair_n))

The operator holds the gateway's disk, so the chain lets anyone holding a later head
(a checkpoint, an audit record) detect a deleted, changed or reordered record.
Audit records are numbered 1, 2, 3, ... per (gateway, boot) with no gaps: a gap means
a record was withheld, a repeat means a replay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import blake3

from ivp.errors import ChainError
from ivp.protocol.encoding import canonical
from ivp.protocol.messages import PairRecord


def genesis(gateway_id: str, boot_id: str) -> str:
    data = b"ivp/chain/v1\x00" + gateway_id.encode() + b"\x00" + boot_id.encode()
    return blake3.blake3(data).hexdigest()


def link(prev: str, pair: PairRecord) -> str:
    return link_bytes(prev, canonical(pair))


def link_bytes(prev: str, pair_bytes: bytes) -> str:
    """:func:`link` over a pair already in canonical bytes (as the gateway logs it)."""
    return blake3.blake3(bytes.fromhex(prev) + pair_bytes).hexdigest()


@dataclass
class AuditSequence:
    """The recomputer's view of one (gateway, boot)'s audit numbering. Pure state."""

    next_seq: int = 1
    seen: set[int] = field(default_factory=set)

    def check(self, seq: int) -> None:
        """Accept ``seq`` if it is the next one.

        Raises:
            ChainError: a replay (already seen) or a gap (a withheld record). State
                does not advance on error.
        """
        if seq in self.seen or seq < self.next_seq:
            raise ChainError(f"audit record {seq} replayed (next expected {self.next_seq})")
        if seq != self.next_seq:
            raise ChainError(
                f"audit sequence gap: got {seq}, expected {self.next_seq} "
                f"({seq - self.next_seq} record(s) withheld)"
            )
        self.seen.add(seq)
        self.next_seq = seq + 1
