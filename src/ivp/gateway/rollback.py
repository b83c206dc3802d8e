"""Has the gateway's log been set back? The check at every start (pure).

The operator holds the gateway's disk: it can copy the sealed log before a cheating
request and put the copy back after (the kept audit record is erased), delete the log
while the gateway is off, or restore a copy taken before a SHUTDOWN (the gateway would
serve again). Sealing cannot stop any of that: the copy is genuine, only old.

What stops it is the device's monotonic counter (``Device.counter``; a TPM NV counter
in hardware). Every commit of the log advances the counter *first* and then records
the new value in that same commit (``log.PairLog``; the advance may be made just
ahead, while a stream is at its server or right after a commit with more queued,
``PairLog.reserve``, but never more than one value is advanced and unrecorded), so at
the next start:

=================  ==============================================  =======================
log's value L       meaning                                          the gateway
=================  ==============================================  =======================
L = device D        the log is the last one written                  starts normally
L = D − 1           the last commit was cut short (a crash between   starts; every pair
                    advancing the counter and committing, or before  awaiting its draw is
                    a value advanced ahead was recorded)             KEPT for audit (its
                                                                     draw's fate is unknown)
L < D − 1           commits the log does not hold happened: an       refuses to serve
                    older copy was put back                          (``rolled_back``)
no L, D > 0         the log was deleted (or replaced by a copy       refuses (``deleted``)
                    older than the first bound commit)
L > D               the device's counter is behind its own log: the  refuses
                    device state was restored (emulated devices)     (``device_behind``)
no L, D = 0         a new gateway, or a log from before counters     starts; binds from now
=================  ==============================================  =======================

Why one commit of slack is safe: erasing a released pair needs erasing at least two
commits (the pair's append, before its release, and its draw, after), so a restore
that erases a pair is always at least two behind. A copy one commit behind can only
miss the last draw batch, and its pairs are then all kept — the operator gains
nothing by cutting it.

What it does not catch: an operator who restores the *whole* state directory, the
emulated counter included, sets both back together (a hardware counter cannot be set
back); the recomputer still sees it when the BOOT after the restore states a counter
it has seen before (``rollback`` alarm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Verdict = Literal["fresh", "ok", "interrupted", "rolled_back", "deleted", "device_behind"]
_LOCKED = ("rolled_back", "deleted", "device_behind")


@dataclass(frozen=True)
class CounterCheck:
    """The log's counter against the device's, at start."""

    verdict: Verdict
    log: int | None
    device: int

    @property
    def locked(self) -> bool:
        """The log was set back: the gateway must not serve from it."""
        return self.verdict in _LOCKED

    @property
    def keep_undecided(self) -> bool:
        """The last draw batch's fate is unknown: keep every pair awaiting its draw."""
        return self.verdict == "interrupted"

    def explain(self) -> str:
        if self.verdict == "rolled_back":
            return (f"the log was set back: it was last committed under device counter "
                    f"{self.log}, the device is at {self.device} ({self.device - (self.log or 0)}"
                    " commits missing: an older copy of the log was put back)")
        if self.verdict == "deleted":
            return (f"the log holds no counter while the device is at {self.device}: the log "
                    "was deleted or replaced")
        if self.verdict == "device_behind":
            return (f"the device counter ({self.device}) is behind its own log ({self.log}): "
                    "the device state was restored")
        if self.verdict == "interrupted":
            return (f"the last commit (counter {self.device}) did not complete: pairs awaiting "
                    "their draw are kept for audit")
        return f"log and device agree (counter {self.device})"


def judge(log: int | None, device: int, has_history: bool) -> CounterCheck:
    """Compare the log's last bound counter ``log`` with the device's ``device``."""
    if log is None:
        verdict: Verdict = "deleted" if device > 0 else "fresh"
        if device == 0 and has_history:
            verdict = "fresh"  # a log from a build before counters: bound from now on
        return CounterCheck(verdict, log, device)
    if log == device:
        return CounterCheck("ok", log, device)
    if log == device - 1:
        return CounterCheck("interrupted", log, device)
    if log < device:
        return CounterCheck("rolled_back", log, device)
    return CounterCheck("device_behind", log, device)


__all__ = ["CounterCheck", "Verdict", "judge"]
