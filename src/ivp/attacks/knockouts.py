"""Switch one defence of the recomputer off, to show a scenario depends on it.

FOR THE RED-TEAM SUITE'S OWN TESTS ONLY. A scenario that reports ``detected`` proves
little unless the same scenario, against the same live system with *its* defence
switched off, reports ``not detected``. This module starts a recomputer with chosen
checks disabled in its process::

    python -m ivp.attacks.knockouts --off audit,sequence recomputer --state ...

Knockouts (each disables exactly the named check, nothing else):

* ``audit`` — every verdict passes (the recomputation still runs; its result is
  ignored): the audit defence.
* ``sequence`` — the audit sequence check accepts any number (no ``replay``, no
  ``sequence_gap``, no ``pair_order``) and ``audit_withheld`` is never raised.
* ``checkpoint`` — ``checkpoint_missing`` is never raised.
* ``quorum`` — every admin request and whitelist counts as quorum-signed.

``ivp attack run`` never uses this module.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

KNOCKOUTS = ("audit", "sequence", "checkpoint", "quorum")


def _audit_off() -> None:
    import msgspec

    from ivp.recomputer.workers import Verifier

    original = Verifier._verify_model

    def verify_model(self: Verifier, *args: Any, **kwargs: Any) -> list[Any]:
        verdicts = original(self, *args, **kwargs)
        return [msgspec.structs.replace(v, passed=True, reason="knocked out: audit off")
                for v in verdicts]

    Verifier._verify_model = verify_model  # type: ignore[method-assign]


def _without_tick_alarms(kinds: set[str]) -> None:
    from ivp.recomputer.ingest import Ingest

    original = Ingest.tick

    def tick(self: Ingest, now: float) -> list[Any]:
        return [a for a in original(self, now) if a.kind not in kinds]

    Ingest.tick = tick  # type: ignore[method-assign]


def _sequence_off() -> None:
    from ivp.recomputer.fleet import Book
    from ivp.recomputer.ingest import Ingest

    original = Ingest._admit_audit

    def admit_audit(self: Ingest, r: Any, *args: Any) -> Any:
        boot = self.boots.get((r.gateway_id, r.boot_id))
        if boot is not None:  # expect whatever number comes, after whatever pair
            boot.sequence = Book(next_seq=r.audit_seq)
        return original(self, r, *args)

    Ingest._admit_audit = admit_audit  # type: ignore[method-assign,assignment]
    _without_tick_alarms({"audit_withheld"})


def _checkpoint_off() -> None:
    _without_tick_alarms({"checkpoint_missing"})


def _quorum_off() -> None:
    from ivp.protocol.quorum import QuorumResult

    QuorumResult.ok = property(lambda self: True)  # type: ignore[assignment,method-assign]


_APPLY: dict[str, Callable[[], None]] = {
    "audit": _audit_off, "sequence": _sequence_off, "checkpoint": _checkpoint_off,
    "quorum": _quorum_off,
}


def apply(names: Sequence[str]) -> None:
    """Switch the named defences off in this process.

    Raises:
        ValueError: an unknown knockout name.
    """
    unknown = sorted(set(names) - set(_APPLY))
    if unknown:
        raise ValueError(f"unknown knockout(s) {unknown}; known: {', '.join(KNOCKOUTS)}")
    for name in names:
        _APPLY[name]()


def main(argv: Sequence[str] | None = None) -> None:
    """``--off a,b <ivp arguments…>``: apply, then run ``ivp`` with the rest."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--off":
        raise SystemExit("usage: python -m ivp.attacks.knockouts --off NAME[,NAME] <ivp args>")
    apply([n for n in args[1].split(",") if n])
    print(f"ivp.attacks.knockouts: defences OFF: {args[1]}", file=sys.stderr, flush=True)
    sys.argv = ["ivp", *args[2:]]
    from ivp.cli import main as ivp_main

    ivp_main()


if __name__ == "__main__":
    main()
