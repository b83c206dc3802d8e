"""Prometheus metrics of one gateway (``GET /metrics``), in a registry of its own."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    generate_latest,
)

STATES = ["upload", "serving", "power_kill", "shutdown", "bricked"]
_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)


class GatewayMetrics:
    """Counters and histograms the gateway updates as it works."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.state = Enum("ivp_gateway_state", "Gateway state", states=STATES, registry=r)
        self.requests = Counter("ivp_gateway_requests", "Inference requests by outcome",
                                ["endpoint", "status"], registry=r)
        self.pairs = Counter("ivp_gateway_pairs", "Pairs committed to the log", registry=r)
        # audit records are counted once the recomputer holds them, and draws whatever
        # they decided: nothing here tells which pair was kept before its record is safe
        self.audits = Counter("ivp_gateway_audits", "Audit records the recomputer "
                              "acknowledged", registry=r)
        self.draws = Counter("ivp_gateway_draws", "Sampling draws made (kept or not)",
                             registry=r)
        self.uploads = Counter("ivp_gateway_uploads", "Uploads by outcome", ["outcome"],
                               registry=r)
        self.upload_bytes = Counter("ivp_gateway_upload_bytes", "Weight bytes hashed and "
                                    "forwarded", registry=r)
        self.power_kills = Counter("ivp_gateway_power_kills", "Server power kills", ["reason"],
                                   registry=r)
        self.alarms = Counter("ivp_gateway_alarms", "Alarms raised", ["kind"], registry=r)
        self.uplink = Counter("ivp_gateway_uplink_envelopes", "Uplinked envelopes by outcome",
                              ["outcome"], registry=r)
        self.spool_depth = Gauge("ivp_gateway_spool_depth", "Envelopes waiting for the "
                                 "recomputer after the last uplink round", registry=r)
        self.commit_batch = Histogram("ivp_gateway_commit_batch_pairs", "Pairs per group "
                                      "commit", buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                                      registry=r)
        self.commit_seconds = Histogram("ivp_gateway_commit_seconds", "Durable commit time",
                                        buckets=_LATENCY, registry=r)
        self.server_seconds = Histogram("ivp_gateway_server_seconds", "Server time per "
                                        "request", buckets=_LATENCY, registry=r)
        self.overhead_seconds = Histogram("ivp_gateway_overhead_seconds", "Gateway time per "
                                          "request, server time excluded (grid wait "
                                          "included)", buckets=_LATENCY, registry=r)
        self.late = Counter("ivp_gateway_release_late", "Responses ready after their release "
                            "budget, by the late step they were released at (or dropped)",
                            ["step"], registry=r)
        self.state.state("upload")

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["GatewayMetrics"]
