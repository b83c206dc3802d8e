"""The recomputer's trusted view of the fleet, as plain state (no I/O, no clock).

What :class:`~ivp.recomputer.ingest.Ingest` knows of each enrolled device, gateway and
boot, and the bookkeeping that makes withholding records visible however the operator
spaces it out:

* :class:`Book`: which numbers (audit records of a boot, alarms of a gateway) arrived.
  Numbers after a gap are stored, not refused: one withheld record must not make the
  rest of a boot unauditable. The gap stays open until the missing number arrives.
* :class:`Boot.claims`: when a checkpoint (or the next BOOT, naming this boot's closing
  state) first claimed each count of audit records. ``audit_withheld`` is timed from
  the *first* claim of a record that never arrived, so a gateway that keeps sending
  checkpoints cannot push the deadline forward, and an abandoned boot is reconciled
  like the current one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ivp.protocol.keys import VerifyKey
from ivp.protocol.messages import BootRecord, Checkpoint

GatewayState = Literal["enrolled", "serving", "shutdown", "readmitted"]
HEADS_KEPT = 8192  # chain heads remembered per boot (positions) for the agreement check
ABOVE_KEPT = 4096  # numbers kept above a gap (a record further out is refused)


@dataclass(frozen=True)
class Rules:
    """Thresholds of the timed and statistical alarms (configured by the operator of
    the recomputer; the inspectors set ε and the reboot schedule by admin request)."""

    checkpoint_period: float = 60.0  # the gateways' checkpoint period, seconds
    missing_factor: float = 3.0  # alarm after this many periods without a checkpoint
    withheld_grace: float | None = None  # default: two checkpoint periods
    churn_window: float = 3600.0
    churn_max: int = 6  # more boots than this within the window -> boot_churn
    binom_alpha: float = 1e-6  # two-sided binomial test level
    binom_min_pairs: int = 20
    reboot_grace: float = 1.5  # alarm when a boot lives grace x the reboot interval

    @property
    def grace(self) -> float:
        """Seconds a claimed record may be on its way before ``audit_withheld``."""
        return self.withheld_grace if self.withheld_grace is not None \
            else 2 * self.checkpoint_period

    @property
    def silence(self) -> float:
        """Seconds without a word before a gateway counts as silent."""
        return self.missing_factor * self.checkpoint_period


@dataclass
class Device:
    device_id: str
    kind: str  # "gateway" | "sensor"
    key: VerifyKey
    url: str = ""


@dataclass
class Book:
    """Which numbers (1, 2, 3, …) arrived; gaps allowed, repeats not.

    ``next_seq``: every number below it arrived. ``above``: numbers that arrived past
    the first gap, each with the pair tag it holds (audit records) or 0.
    """

    next_seq: int = 1
    above: dict[int, int] = field(default_factory=dict)
    last_pair_seq: int = -1  # the pair tag of record next_seq - 1 (audit records)

    def has(self, seq: int) -> bool:
        return seq < self.next_seq or seq in self.above

    @property
    def received(self) -> int:
        return self.next_seq - 1 + len(self.above)

    @property
    def highest(self) -> int:
        return max(self.above, default=self.next_seq - 1)

    def neighbours(self, seq: int) -> tuple[int, int | None]:
        """Pair tags of the nearest records below and above ``seq`` (-1 / None: none)."""
        below = [s for s in self.above if s < seq]
        lo = self.above[max(below)] if below else self.last_pair_seq
        over = [s for s in self.above if s > seq]
        return lo, self.above[min(over)] if over else None

    def add(self, seq: int, pair_seq: int = 0) -> None:
        if seq != self.next_seq:
            self.above[seq] = pair_seq
            return
        self.next_seq, self.last_pair_seq = seq + 1, pair_seq
        while self.next_seq in self.above:  # a late record closed the gap
            self.last_pair_seq = self.above.pop(self.next_seq)
            self.next_seq += 1


@dataclass
class Boot:
    """One (gateway, boot) as the recomputer tracks it."""

    record: BootRecord
    url: str
    received: float
    whitelisted: bool
    digest: str  # BLAKE3 of the BOOT payload as received (tells a duplicate from a conflict)
    sequence: Book = field(default_factory=Book)
    checkpoint: Checkpoint | None = None
    checkpoint_received: float | None = None
    # chain heads by position named by records of this boot (a sliding window)
    heads: dict[int, str] = field(default_factory=dict)
    # audit_seq -> chain_pos of records no checkpoint has counted yet
    uncounted: dict[int, int] = field(default_factory=dict)
    # (audits claimed, when first claimed), increasing: checkpoints, and the next BOOT
    claims: list[tuple[int, float]] = field(default_factory=list)
    closed: bool = False  # a later BOOT of the gateway named this boot's closing state

    @property
    def audits_received(self) -> int:
        return self.sequence.received

    @property
    def claimed(self) -> int:
        return self.claims[-1][0] if self.claims else 0

    def claim(self, audits: int, when: float) -> None:
        """A signed record says ``audits`` audit records were made by ``when``."""
        if audits > self.claimed:
            self.claims.append((audits, when))

    def first_missing_claim(self) -> tuple[int, int, float] | None:
        """(first missing number, audits claimed, when that number was first claimed),
        or None when every claimed record arrived. Claims met are forgotten."""
        missing = self.sequence.next_seq
        self.claims = [c for c in self.claims if c[0] >= missing]
        if not self.claims:
            return None
        return missing, self.claimed, self.claims[0][1]

    def remember(self, pos: int, head: str) -> None:
        """Keep ``head`` at ``pos`` (bounded: the oldest positions are forgotten first)."""
        self.heads[pos] = head
        if len(self.heads) > HEADS_KEPT:
            for old in sorted(self.heads)[:len(self.heads) - HEADS_KEPT // 2]:
                del self.heads[old]


@dataclass
class Gateway:
    gateway_id: str
    state: GatewayState = "enrolled"
    reason: str = ""
    boot_id: str | None = None  # the latest BOOT received
    boot_times: list[float] = field(default_factory=list)  # when each BOOT arrived
    last_seen: float | None = None  # when its last uplinked record arrived
    alarms: Book = field(default_factory=Book)  # its GatewayAlarm numbers
    readmitted_at: float | None = None  # when inspectors last re-admitted it
    shutdown_at: float | None = None  # when the recomputer shut it down
    counter: int = 0  # the highest device counter its signed records stated

    @property
    def next_alarm_seq(self) -> int:
        return self.alarms.next_seq


__all__ = ["ABOVE_KEPT", "HEADS_KEPT", "Book", "Boot", "Device", "Gateway", "GatewayState",
           "Rules"]
