"""Every scenario by name, in the order of the note's table, then the protocol's."""

from __future__ import annotations

from ivp.attacks import admin, boot, evasions, physical, serving, trust, uplink
from ivp.attacks.base import Scenario

ORDER = (
    # the note's "Attack Vectors & Mitigations" table
    "interconnect", "internet-training", "expert-iteration", "rogue-model-persists",
    "covert-rf", "tamper-gateway", "tamper-recomputer",
    # attacks on the protocol itself
    "model-swap-at-upload", "upload-exfiltration", "unpaired-output", "forged-audit",
    "replayed-audit", "withheld-audit", "silenced-gateway", "seed-ignored", "stego",
    "admin-replay", "admin-no-quorum", "sensor-spoof", "lone-entry",
    # the operator who owns the wire, the disk and the power (issue 12)
    "forged-ack", "abandoned-boot", "gap-then-cheat", "log-rollback", "fake-control",
    "junk-uplink", "timing-channel", "small-holes",
    # the trust boundary made real: root on the recomputer's disk, the server's network
    "enrolment-bypass", "store-rollback", "direct-connection",
)

_ALL = {s.name: s for m in (serving, boot, uplink, admin, physical, evasions, trust)
        for s in m.SCENARIOS}
if set(_ALL) != set(ORDER):  # a scenario module and ORDER disagree
    raise RuntimeError(f"scenarios vs ORDER: {sorted(set(_ALL) ^ set(ORDER))}")
SCENARIOS: dict[str, Scenario] = {name: _ALL[name] for name in ORDER}


def resolve(names: list[str]) -> list[Scenario]:
    """Scenarios for ``names`` ("all" = every one), in registry order.

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    if "all" in names:
        return list(SCENARIOS.values())
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise KeyError(f"unknown attack(s) {', '.join(unknown)}; known: "
                       f"{', '.join(SCENARIOS)}")
    wanted = set(names)
    return [s for s in SCENARIOS.values() if s.name in wanted]


__all__ = ["ORDER", "SCENARIOS", "resolve"]
