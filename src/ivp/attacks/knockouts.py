"""Switch one defence off, to show an attack is stopped by it and nothing else.

FOR THE RED-TEAM SUITE'S OWN TESTS ONLY. A scenario that reports ``detected`` proves
little unless the same attack, with *its* defence switched off, goes through. This
module switches named checks off in its process, either for a whole recomputer
(``python -m ivp.attacks.knockouts --off audit,sequence recomputer --state ...``) or,
in a test, for the length of a ``with knocked_out("signed-ack"):`` block.

Knockouts (each disables exactly the named check, nothing else):

* ``audit`` — every verdict passes (the recomputation still runs; its result is
  ignored): the audit defence.
* ``sequence`` — the audit sequence check accepts any number (no ``replay``, no
  ``sequence_gap``, no ``pair_order``) and ``audit_withheld`` is never raised.
* ``checkpoint`` — ``checkpoint_missing`` is never raised.
* ``quorum`` — every admin request and whitelist counts as quorum-signed.
* ``signed-ack`` — the gateway believes an uplink answer's plain ``ok`` results, signed
  or not (issue 12, class 1).
* ``first-claim`` — ``audit_withheld`` is timed from the latest claim, as before (1).
* ``all-boots`` — only each gateway's latest boot is reconciled (2).
* ``gap-store`` — a record past a gap is refused, as before (3).
* ``counter`` — the gateway trusts its log whatever the device counter says (4).
* ``receipts`` — the recomputer counts any 200 from a gateway as delivered (5).
* ``relay-order`` — the gateway applies a relay whatever its number (5).
* ``uplink-caps`` — no cap on the items of an uplink batch (6).
* ``release`` — the gateway releases every response at once, whatever its policy (7).
* ``seal`` — the recomputer's store trusts every row it finds, sealed or not (issue 15).
* ``store-counter`` — the recomputer trusts its store whatever the device counter says
  (issue 15: a restored older copy of the store is not locked).
* ``isolate`` — a scenario's victim that asks for ``--isolate`` runs without it (the
  runner reads this one; nothing is patched in the recomputer) (issue 15).

``ivp attack run`` never uses this module.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

#: undo callables of the knockouts applied in this process, newest last
_UNDO: list[Callable[[], None]] = []


def _patch(owner: Any, name: str, value: Any) -> None:
    """Replace ``owner.name`` by ``value`` until :func:`restore` (an attribute a class
    inherits is shadowed, then the shadow removed)."""
    own = owner.__dict__ if isinstance(owner, type) else vars(owner)
    had, original = name in own, own.get(name)
    setattr(owner, name, value)
    _UNDO.append(lambda: setattr(owner, name, original) if had else delattr(owner, name))


def _audit_off() -> None:
    import msgspec

    from ivp.recomputer.workers import Verifier

    original = Verifier._verify_model

    def verify_model(self: Verifier, *args: Any, **kwargs: Any) -> list[Any]:
        verdicts = original(self, *args, **kwargs)
        return [msgspec.structs.replace(v, passed=True, reason="knocked out: audit off")
                for v in verdicts]

    _patch(Verifier, "_verify_model", verify_model)


def _without_tick_alarms(kinds: set[str]) -> None:
    from ivp.recomputer.ingest import Ingest

    original = Ingest.tick

    def tick(self: Ingest, now: float) -> list[Any]:
        return [a for a in original(self, now) if a.kind not in kinds]

    _patch(Ingest, "tick", tick)


def _sequence_off() -> None:
    from ivp.recomputer.fleet import Book
    from ivp.recomputer.ingest import Ingest

    original = Ingest._admit_audit

    def admit_audit(self: Ingest, r: Any, *args: Any) -> Any:
        boot = self.boots.get((r.gateway_id, r.boot_id))
        if boot is not None:  # expect whatever number comes, after whatever pair
            boot.sequence = Book(next_seq=r.audit_seq)
        return original(self, r, *args)

    _patch(Ingest, "_admit_audit", admit_audit)
    _without_tick_alarms({"audit_withheld"})


def _checkpoint_off() -> None:
    _without_tick_alarms({"checkpoint_missing"})


def _quorum_off() -> None:
    from ivp.protocol.quorum import QuorumResult

    _patch(QuorumResult, "ok", property(lambda self: True))


def _signed_ack_off() -> None:
    from ivp.gateway import core
    from ivp.gateway.answers import AckJudgement
    from ivp.protocol.encoding import decode
    from ivp.protocol.messages import Ack

    def judge_ack(raw: bytes, batch: list[Any], key: Any, gateway_id: str) -> AckJudgement:
        ack = decode(raw, Ack)  # the plain results, as before: anyone can write them
        out = AckJudgement()
        for item, r in zip(batch, ack.results, strict=False):
            (out.stored.append(item.id) if r.ok
             else out.refused.append((item.id, r.error)))
        return out

    _patch(core, "judge_ack", judge_ack)


def _first_claim_off() -> None:
    from ivp.recomputer.fleet import Boot

    original = Boot.first_missing_claim

    def latest(self: Boot) -> tuple[int, int, float] | None:  # as before: the latest
        found = original(self)  # checkpoint restarts the grace
        return None if found is None else (found[0], found[1],
                                           self.checkpoint_received or self.claims[-1][1])

    _patch(Boot, "first_missing_claim", latest)


def _all_boots_off() -> None:
    from ivp.recomputer.ingest import Ingest

    original = Ingest.tick

    def tick(self: Ingest, now: float) -> list[Any]:
        latest = {(g.gateway_id, g.boot_id) for g in self.gateways.values()}
        hidden = {k for k in self._claimed if k not in latest}
        self._claimed -= hidden
        try:
            return original(self, now)
        finally:
            self._claimed |= hidden

    _patch(Ingest, "tick", tick)


def _gap_store_off() -> None:
    from ivp.errors import ChainError
    from ivp.recomputer import ingest, records
    from ivp.recomputer.alarms import Alarm

    original = ingest.Ingest._admit_audit

    def admit_audit(self: ingest.Ingest, r: Any, auth: Any, now: float) -> Any:
        boot = self.boots.get((r.gateway_id, r.boot_id))
        if boot is not None and r.audit_seq > boot.sequence.next_seq:
            err = ChainError(f"audit sequence gap: got {r.audit_seq}, expected "
                             f"{boot.sequence.next_seq}")
            raise records.Refused(err, Alarm("sequence_gap", r.gateway_id, r.boot_id,
                                             str(err), now))
        return original(self, r, auth, now)

    _patch(ingest.Ingest, "_admit_audit", admit_audit)


def _counter_off() -> None:
    from ivp.gateway import rollback

    _patch(rollback, "judge", lambda log, device, history: rollback.CounterCheck(
        "ok", log, device))


def _receipts_off() -> None:
    from ivp.protocol.acks import ControlReceipt
    from ivp.recomputer.delivery import Delivery

    def receipt_of(self: Any, gateway_id: str, answer: str, data: bytes,
                   kind: str) -> ControlReceipt:  # any 200 will do, as before
        return ControlReceipt(gateway_id=gateway_id, kind=kind,  # type: ignore[arg-type]
                              digest="0" * 64, ref="", outcome="applied", state="",
                              time=0.0)

    _patch(Delivery, "receipt_of", receipt_of)


def _relay_order_off() -> None:
    from ivp.gateway import control
    from ivp.protocol.acks import Relay
    from ivp.protocol.encoding import decode
    from ivp.protocol.envelope import RELAY, Envelope, open_signed

    def open_relay(data: bytes, key: Any, gateway_id: str, settings: Any) -> Relay:
        return decode(open_signed(Envelope.from_bytes(data), RELAY, key), Relay)

    _patch(control, "open_relay", open_relay)


def _uplink_caps_off() -> None:
    from ivp.recomputer import batch

    _patch(batch, "MAX_ITEMS", 10**9)
    original = batch.batch_items
    _patch(batch, "batch_items", lambda body, max_items=10**9: original(body, max_items))
    from ivp.recomputer import uplink

    _patch(uplink, "batch_items", batch.batch_items)


def _release_off() -> None:
    from ivp.gateway.release import Release, ReleasePolicy

    _patch(ReleasePolicy, "release", lambda self, budget, ready: Release(ready, 0))


def _seal_off() -> None:
    from ivp.recomputer.seal import Sealer

    _patch(Sealer, "check", lambda self, db: [])


def _store_counter_off() -> None:
    from ivp.gateway.rollback import CounterCheck
    from ivp.recomputer.store import Store

    _patch(Store, "_judge", lambda self, device: CounterCheck(
        "ok", self.bound_counter(), device.counter()))


def _isolate_off() -> None:
    """Nothing to patch here: ``ivp.attacks.runner`` starts the victim without
    ``--isolate`` when this name is among the session's knockouts."""


_APPLY: dict[str, Callable[[], None]] = {
    "audit": _audit_off, "sequence": _sequence_off, "checkpoint": _checkpoint_off,
    "quorum": _quorum_off, "signed-ack": _signed_ack_off, "first-claim": _first_claim_off,
    "all-boots": _all_boots_off, "gap-store": _gap_store_off, "counter": _counter_off,
    "receipts": _receipts_off, "relay-order": _relay_order_off,
    "uplink-caps": _uplink_caps_off, "release": _release_off, "seal": _seal_off,
    "store-counter": _store_counter_off,
    "isolate": _isolate_off,
}
KNOCKOUTS = tuple(_APPLY)


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


def restore() -> None:
    """Switch every knockout of this process back on (newest first)."""
    while _UNDO:
        _UNDO.pop()()


@contextlib.contextmanager
def knocked_out(*names: str) -> Iterator[None]:
    """The named defences off for the length of the block (tests)."""
    depth = len(_UNDO)
    apply(names)
    try:
        yield
    finally:
        while len(_UNDO) > depth:
            _UNDO.pop()()


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
