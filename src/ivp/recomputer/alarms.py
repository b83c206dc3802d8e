"""Alarms: the closed list of things the recomputer raises, and which may shut down.

An alarm is a stored fact ("gateway g, boot b: audit sequence gap at 7"), kept until
inspectors acknowledge it by quorum (admin instruction ``ack_alarm``). Some alarms are
*authenticated*: they rest on data the gateway itself signed (a failed verdict, a
sequence gap in signed records, a checkpoint saying more audits were made than
arrived). Others rest on data anyone could send (a forged or unenrolled record, a
malformed envelope, a byte-identical replay). Only authenticated kinds may trigger a
shutdown: otherwise anyone on the network could shut an honest gateway down by
sending garbage in its name.

A gateway's own alarms (upload exfiltration, unpaired output, power kills, …) arrive
signed over the uplink and are stored under the kind ``gateway:<its kind>``: they are
authenticated (only the enrolled gateway key signs them).
"""

from __future__ import annotations

from dataclasses import dataclass

# kind -> (authenticated, what it means)
KINDS: dict[str, tuple[bool, str]] = {
    "verify_fail": (True, "a recomputed audit record failed verification"),
    "sequence_gap": (True, "a signed audit record skipped sequence numbers (stored; the "
                           "missing ones are withheld until they arrive)"),
    "fork": (True, "two different signed records with the same audit sequence number"),
    "chain_link": (True, "an audit record's chain head is not link(chain_prev, pair)"),
    "chain_fork": (True, "two signed records of one boot name different chain heads at "
                         "one position (or the first pair does not chain from genesis)"),
    "chain_ahead": (True, "a checkpoint counts an audit record whose pair lies beyond the "
                          "pairs it counts"),
    "gateway_alarm_gap": (True, "a gateway's signed alarms skipped numbers (withheld)"),
    "pair_order": (True, "audited pairs of one boot are not in increasing pair order"),
    "audit_withheld": (True, "signed records (checkpoints, the next BOOT) claim audit "
                             "records that never arrived within the grace"),
    "audit_rate": (True, "audits per pairs served implausible for ε (binomial test)"),
    "checkpoint_missing": (True, "a serving gateway sent no checkpoint for too long"),
    "checkpoint_regress": (True, "a checkpoint counts less than an earlier one"),
    "boot_churn": (True, "a gateway booted too often within the churn window"),
    "boot_not_whitelisted": (True, "a BOOT names a manifest the whitelist does not hold"),
    "boot_conflict": (True, "two different BOOT records with the same boot id"),
    "epsilon_mismatch": (True, "a BOOT declares an ε other than the one inspectors set"),
    "reboot_overdue": (True, "a boot outlived the inspectors' reboot schedule"),
    "unknown_boot": (True, "a signed record names a boot the recomputer never saw"),
    "rollback": (True, "a gateway's signed records show its log or device state was set "
                       "back, deleted or replaced (device counter, previous boot, closing "
                       "state)"),
    "shutdown_silent": (True, "a shut-down gateway sent no heartbeat for too long"),
    "gateway_locked": (True, "a gateway shut itself down: its log was set back (a signed "
                             "heartbeat says so)"),
    "store_tampered": (False, "rows of the recomputer's store were written, edited or "
                              "deleted outside the recomputer (no valid seal): refused and "
                              "quarantined at start"),
    "store_rolled_back": (False, "the recomputer's store is behind its device counter (an "
                                 "older copy was put back, or it was deleted): no trust "
                                 "decision until the inspectors' accept_store"),
    "forged": (False, "a record with a bad signature by an enrolled key id"),
    "unenrolled": (False, "a record signed by no enrolled device key"),
    "replay": (False, "an audit record or gateway alarm already stored was sent again"),
    "malformed": (False, "an uplinked envelope or record does not decode"),
    "model_unavailable": (False, "the recomputer holds no whitelisted model for a boot"),
    "verifier_error": (False, "an audit record crashed the verification worker (parked)"),
    "shutdown_undelivered": (False, "a signed SHUTDOWN could not be delivered (retrying)"),
    "readmit_undelivered": (False, "a signed READMIT could not be delivered (retrying)"),
    "relay_undelivered": (False, "an inspectors' instruction could not be relayed to a "
                                 "gateway (retrying)"),
    "relay_refused": (False, "a gateway refused an inspectors' instruction relayed to it"),
    "recomputer_stalled": (False, "the recomputer was not listening for a while (uplinks "
                                  "waited): silence clocks restarted"),
    "sensor_forged": (False, "a sensor event with a bad or unknown signature"),
    "sensor_gap": (False, "a sensor skipped event sequence numbers"),
    "sensor_silent": (False, "an enrolled sensor sent nothing, not even a heartbeat, for "
                             "too long (cut, jammed or removed)"),
    "power_silent": (True, "power on but the gateway is silent"),
    "traffic_power_off": (True, "gateway traffic while its power is reported off"),
    "rf_burst": (True, "radio-frequency burst detected"),
    "seal_broken": (True, "a tamper seal or camera reported a breach"),
    "lone_entry": (True, "one person in the hall (two-person rule broken)"),
    "badge_anomaly": (True, "badge out without badge in, or unknown badge"),
}


GATEWAY_PREFIX = "gateway:"  # + the gateway's own alarm kind (signed by the gateway)


def known(kind: str) -> bool:
    return kind in KINDS or (kind.startswith(GATEWAY_PREFIX) and len(kind) > len(GATEWAY_PREFIX))


def authenticated(kind: str) -> bool:
    if kind.startswith(GATEWAY_PREFIX):
        return known(kind)
    return KINDS.get(kind, (False, ""))[0]


@dataclass(frozen=True)
class Alarm:
    """One alarm before it is stored. ``dedupe``: fold into an open alarm of the same
    (kind, gateway, boot) instead of adding a row."""

    kind: str
    gateway_id: str | None
    boot_id: str | None
    detail: str
    time: float
    dedupe: bool = True
    repeats: int = 1  # how many occurrences this one stands for (folded noise)

    def __post_init__(self) -> None:
        if not known(self.kind):
            raise ValueError(f"unknown alarm kind {self.kind!r}")


__all__ = ["GATEWAY_PREFIX", "KINDS", "Alarm", "authenticated", "known"]
