"""Prometheus metrics of one recomputer (its own registry: several may run in a process)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.uplink_total = Counter("ivp_uplink_envelopes_total",
                                    "Uplinked envelopes by outcome", ["result"], registry=r)
        self.verdicts_total = Counter("ivp_verdicts_total", "Verdicts stored", ["result"],
                                      registry=r)
        self.alarms_total = Counter("ivp_alarms_total", "Alarms raised", ["kind"], registry=r)
        self.admin_total = Counter("ivp_admin_requests_total", "Admin requests",
                                   ["instruction", "result"], registry=r)
        self.input_total = Counter("ivp_input_requests_total", "INPUT requests",
                                   ["model", "status"], registry=r)
        self.verify_seconds = Histogram("ivp_verify_batch_seconds",
                                        "Time to verify one batch", registry=r)
        self.queue_depth = Gauge("ivp_audit_queue_depth", "Audit records awaiting a verdict",
                                 registry=r)
        self.gateways = Gauge("ivp_gateways", "Gateways by state", ["state"], registry=r)
        self.open_alarms = Gauge("ivp_open_alarms", "Alarms not yet acknowledged by the "
                                 "inspectors", registry=r)
        self.open_alarms_by_kind = Gauge("ivp_open_alarms_by_kind", "Open alarms by kind",
                                         ["kind"], registry=r)

    def uplink(self, outcomes: Iterable[Any]) -> None:
        for o in outcomes:
            self.uplink_total.labels("ok" if o.ok else "refused").inc()

    def verdicts(self, verdicts: Iterable[Any]) -> None:
        for v in verdicts:
            self.verdicts_total.labels("passed" if v.passed else "failed").inc()

    def alarms(self, alarms: Iterable[Any]) -> None:
        for a in alarms:
            self.alarms_total.labels(a.kind).inc()

    def admin(self, decision: Any) -> None:
        self.admin_total.labels(decision.instruction or "unknown",
                                "accepted" if decision.accepted else "refused").inc()

    def render(self, queue_depth: int, states: Iterable[str],
               refresh: Callable[[], None] | None = None,
               open_alarms: Mapping[str, int] | None = None) -> bytes:
        """The exposition; ``open_alarms``: open alarms by kind (None: left as it was)."""
        self.queue_depth.set(queue_depth)
        if open_alarms is not None:
            self.open_alarms.set(sum(open_alarms.values()))
            self.open_alarms_by_kind.clear()  # kinds acknowledged since drop out
            for kind, n in open_alarms.items():
                self.open_alarms_by_kind.labels(kind).set(n)
        counts: dict[str, int] = {}
        for s in states:
            counts[s] = counts.get(s, 0) + 1
        for s in ("enrolled", "serving", "shutdown", "readmitted"):
            self.gateways.labels(s).set(counts.get(s, 0))
        return generate_latest(self.registry)
