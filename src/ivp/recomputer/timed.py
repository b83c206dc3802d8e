"""The recomputer's timed rules (``Ingest.tick``): silence, withheld records, overdue
reboots. Pure: the fleet state and the time in, alarms out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ivp.recomputer.alarms import Alarm

if TYPE_CHECKING:
    from ivp.recomputer.ingest import Ingest


def due(self: Ingest, now: float) -> list[Alarm]:
    """Alarms due at ``now``: a silenced serving gateway (missing checkpoints) or
    shut-down one (missing heartbeats), audit records a signed claim counted that
    never arrived (withheld) — in every boot, not only the latest — and boots that
    outlived the reboot schedule. Each is raised once while its condition holds."""
    r = self.rules
    due: dict[tuple[str, str, str], str] = {}
    for gw in self.gateways.values():
        if gw.state == "shutdown":
            heard = max(gw.last_seen or 0.0, gw.shutdown_at or 0.0, self.resumed_at)
            if gw.shutdown_at is not None and now - heard > r.silence:
                due[("shutdown_silent", gw.gateway_id, "")] = (
                    f"shut down, and silent for {now - heard:.0f} s: no heartbeat (a "
                    f"shut-down gateway sends one every {r.checkpoint_period:g} s)")
        if gw.state != "serving" or gw.boot_id is None:
            continue
        boot = self.boots[(gw.gateway_id, gw.boot_id)]
        heard = max(boot.received, boot.checkpoint_received or 0.0, self.resumed_at)
        if now - heard > r.silence:
            due[("checkpoint_missing", gw.gateway_id, gw.boot_id)] = (
                f"no checkpoint for {now - heard:.0f} s (period {r.checkpoint_period:g} s)")
        if self.reboot_interval is not None and \
                now - boot.received > r.reboot_grace * self.reboot_interval:
            due[("reboot_overdue", gw.gateway_id, gw.boot_id)] = (
                f"boot is {now - boot.received:.0f} s old; reboot schedule is every "
                f"{self.reboot_interval:g} s")
    for key in list(self._claimed):
        boot = self.boots[key]
        missing = boot.first_missing_claim()
        if missing is None:
            self._claimed.discard(key)
            continue
        first, claimed, since = missing
        late = now - max(since, self.resumed_at)
        if late > r.grace:
            due[("audit_withheld", *key)] = (
                f"{claimed} audit record(s) claimed by signed records"
                f"{' (the boot is closed)' if boot.closed else ''}; "
                f"{boot.audits_received} arrived: record {first} was first claimed "
                f"{now - since:.0f} s ago and never came (grace {r.grace:g} s)")
    fresh = [Alarm(k, g, b or None, d, now) for (k, g, b), d in due.items()
             if (k, g, b) not in self._raised]
    self._raised = set(due)
    return fresh


__all__ = ["due"]
