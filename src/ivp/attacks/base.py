"""What a red-team scenario is, what it reports, and how it reads the live system.

A :class:`Scenario` is one attack of the note or on the protocol, played against a
running :class:`~ivp.datacenter.LoopbackDatacenter`. It acts as the attacker
would (a cheating server, the operator on the wire, a forged sensor, ...) and then
*asks the system* whether it noticed: the recomputer's ``/alarms`` and ``/verdicts``,
a gateway's ``/status`` and ``/alarms``, or the HTTP refusal of the endpoint it
attacked. ``detected`` in its :class:`Result` comes only from those answers — never
from what the scenario believes it did.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ivp.attacks.tap import ControlTap, UplinkTap
    from ivp.datacenter import LoopbackDatacenter
    from ivp.recomputer.sensors import SensorSimulator

#: what a scenario needs from the session: nothing of its own, a fresh gateway it may
#: break, or a whole datacenter of its own (it breaks the recomputer).
Needs = Literal["shared", "gateway", "datacenter"]


@dataclass(frozen=True)
class Victim:
    """The fresh gateway a scenario attacks.

    Attributes:
        server_attack: the cheat armed in its server (``ivp.server.attacks``), or None.
        tapped: its uplink crosses the operator's :class:`~ivp.attacks.tap.UplinkTap`.
        upload: boot it with the whitelisted weights before the scenario starts.
        gateway_args: more ``ivp gateway`` flags (a release policy, the tamper route).
        fronted: the URL enrolled for it is the operator's
            :class:`~ivp.attacks.tap.ControlTap` in front of it (SHUTDOWN, relays and
            INPUT from the recomputer cross a proxy the operator controls).
        isolated: its server runs under ``ivp gateway --isolate`` (root), whatever the
            session's ``isolate`` (the ``isolate`` knockout turns it off).
    """

    server_attack: str | None = None
    tapped: bool = False
    upload: bool = True
    gateway_args: tuple[str, ...] = ()  # more `ivp gateway` flags
    fronted: bool = False  # the recomputer reaches it through the operator's ControlTap
    isolated: bool = False  # ivp gateway --isolate for this victim


@dataclass(frozen=True)
class Evidence:
    """One answer of the live system that shows the attack was noticed."""

    time: float  # unix time the system noticed (alarm time, or when it was observed)
    source: str  # e.g. "recomputer /alarms", "gw-c /status", "POST /admin"
    text: str

    def __str__(self) -> str:
        return f"{self.source}: {self.text}"


@dataclass
class Result:
    """What one scenario measured. ``detected`` is True only with evidence."""

    name: str
    defence: str
    evidence: list[Evidence] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # expected evidence that never came
    notes: list[str] = field(default_factory=list)  # weaknesses seen on the way (leaks, ...)
    started: float = 0.0
    ended: float = 0.0
    detected_at: float | None = None  # when the system noticed (default: first evidence)
    requests_sent: int = 0
    requests_before_detection: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def detected(self) -> bool:
        return bool(self.evidence) and not self.missing and not self.error

    @property
    def seconds_to_detect(self) -> float:
        """Attack start → the moment the system noticed (``detected_at``, else the first
        evidence); when undetected, attack start → giving up."""
        if self.detected:
            at = self.detected_at or min(e.time for e in self.evidence)
            return round(max(0.0, at - self.started), 3)
        return round(max(0.0, self.ended - self.started), 3)

    def summary(self) -> dict[str, Any]:
        """The entry of ``ivp attack run --json``."""
        return {"name": self.name, "detected": self.detected,
                "seconds_to_detect": self.seconds_to_detect,
                "requests_before_detection": self.requests_before_detection,
                "defence": self.defence,
                "evidence": [str(e) for e in self.evidence]
                + [f"MISSING: {m}" for m in self.missing]
                + [f"NOTE: {n}" for n in self.notes]
                + ([f"ERROR: {self.error}"] if self.error else [])}


@dataclass(frozen=True)
class Scenario:
    """One attack: its name, what it is, which defence should stop it, and its play.

    ``run(ctx, result)`` performs the attack and appends :class:`Evidence` (or names
    what is ``missing``) to ``result``.
    """

    name: str
    family: Literal["note", "protocol"]
    summary: str
    defence: str
    run: Callable[[Context, Result], None]
    needs: Needs = "shared"
    victim: Victim | None = None
    background: bool = False  # mostly waiting: may run beside the others
    recomputer_args: tuple[str, ...] = ()  # its own datacenter's recomputer flags


# --- the live system, as a scenario sees it ----------------------------------------------
@dataclass
class Context:
    """What a running scenario can touch: the datacenter, its victim, the tap."""

    dc: LoopbackDatacenter
    victim: int | None = None  # index in dc.handles
    honest: int = 0  # the honest gateway every session has (gw-a), behind its own tap
    taps: dict[int, UplinkTap] = field(default_factory=dict)  # gateway index -> its tap
    fronts: dict[int, ControlTap] = field(default_factory=dict)  # gateway index -> proxy
    sensors: SensorSimulator | None = None  # the session's (ivp.attacks.physical)
    cap: int = 200  # most requests a scenario sends while waiting for detection
    patience: float = 60.0  # most seconds a scenario waits for a timed alarm
    say: Callable[[str], None] = lambda message: None
    scratch: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))  # attacker's files

    def tap(self, index: int) -> UplinkTap:
        """The operator's tap on gateway ``index``'s uplink."""
        if index not in self.taps:
            raise RuntimeError(f"{self.dc.handles[index].gateway_id}'s uplink is not tapped")
        return self.taps[index]

    @property
    def victim_id(self) -> str:
        assert self.victim is not None, "scenario has no victim gateway"
        return self.dc.handles[self.victim].gateway_id

    # --- reading the system ---------------------------------------------------------------
    def alarms(self) -> list[dict[str, Any]]:
        return self.dc.alarms()

    def alarm(self, kinds: Iterable[str], since: float, gateway_id: str | None = "*"
              ) -> Evidence | None:
        """The first recomputer alarm of ``kinds`` raised (or repeated) since ``since``.

        ``gateway_id``: "*" any, None only alarms naming no gateway (sensors), else that
        gateway.
        """
        wanted = set(kinds)
        for a in self.alarms():
            if a["kind"] not in wanted:
                continue
            if gateway_id != "*" and a.get("gateway_id") != gateway_id:
                continue
            when = a["time"] if a["time"] >= since else a.get("last_time") or a["time"]
            if when >= since:
                return Evidence(when, "recomputer /alarms",
                                f"{a['kind']} ({a.get('gateway_id') or '-'}): {a['detail']}")
        return None

    def gateway_alarm(self, index: int, kinds: Iterable[str], since: float) -> Evidence | None:
        """The first alarm of ``kinds`` in gateway ``index``'s own alarm log since ``since``."""
        h = self.dc.handles[index]
        try:
            rows = self.dc.get(h.url + "/alarms")
        except (OSError, ValueError):
            return None
        wanted = set(kinds)
        for a in sorted(rows, key=lambda r: r["time"]):
            if a["kind"] in wanted and a["time"] >= since:
                return Evidence(a["time"], f"{h.gateway_id} /alarms",
                                f"{a['kind']}: {a['message']}")
        return None

    def gateway_status(self, index: int) -> dict[str, Any]:
        """Gateway ``index``'s ``/status``, or ``{"state": "unreachable"}``."""
        try:
            return self.dc.gateway_status(index)
        except (OSError, ValueError):
            return {"state": "unreachable"}

    def leaks(self, index: int, marker: str, extra: dict[str, str] | None = None) -> list[str]:
        """Where ``marker`` (data the server tried to send out) can be read outside
        gateway ``index``: its /status, /alarms and /metrics (readable by anyone on the
        network, the operator included), the recomputer's /alarms and /status, and
        ``extra`` (what else the attacker received, by name)."""
        h = self.dc.handles[index]
        places = dict(extra or {})
        for name, url in ((f"{h.gateway_id} GET /status", h.url + "/status"),
                          (f"{h.gateway_id} GET /alarms", h.url + "/alarms"),
                          (f"{h.gateway_id} GET /metrics", h.url + "/metrics"),
                          ("recomputer GET /alarms", self.dc.recomputer_url + "/alarms"),
                          ("recomputer GET /status", self.dc.recomputer_url + "/status")):
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=10) as r:
                places[name] = r.read().decode(errors="replace")
        return sorted(where for where, text in places.items() if marker in text)

    def failed_verdicts(self, gateway_id: str, since: float) -> list[dict[str, Any]]:
        return [v for v in self.dc.verdicts()
                if v["gateway_id"] == gateway_id and not v["passed"] and v["time"] >= since]

    def wait_for(self, probe: Callable[[], Evidence | None], timeout: float,
                 interval: float = 0.25) -> Evidence | None:
        """Poll ``probe`` until it gives evidence or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            found = probe()
            if found is not None or time.monotonic() >= deadline:
                return found
            time.sleep(interval)

    def post(self, url: str, body: bytes) -> tuple[int, Any]:
        """POST and return (status, JSON answer); (0, error text) if unreachable."""
        try:
            return self.dc.post(url, body)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            return 0, str(exc)

    # --- traffic -----------------------------------------------------------------------------
    def drive(self, probe: Callable[[], Evidence | None], *, cap: int | None = None,
              timeout: float | None = None, pace: float = 0.0, batch: int = 4,
              result: Result | None = None) -> Evidence | None:
        """Send client traffic through the recomputer until ``probe`` finds evidence.

        Requests go as in normal service (the recomputer routes them). When ``result``
        is given, it counts the requests sent and those the victim answered before the
        evidence's time (``requests_before_detection``). After ``cap`` requests without
        evidence it waits for the audit queue to drain and probes once more, so a
        "not detected" is never an audit still in flight.
        """
        cap = self.cap if cap is None else cap
        timeout = self.patience if timeout is None else timeout
        victim = self.victim_id if self.victim is not None else None
        answered: list[float] = []  # when the victim's answers came back
        sent = 0
        found: Evidence | None = None
        deadline = time.monotonic() + timeout

        def on_done(_i: int, answer: dict[str, Any]) -> None:
            if answer["status"] == 200 and _tag_gateway(answer["body"]) == victim:
                answered.append(time.time())

        while found is None and sent < cap and time.monotonic() < deadline:
            n = min(batch, cap - sent)
            box: list[Evidence | None] = [None]

            def stop_when(box: list[Evidence | None] = box) -> bool:
                box[0] = probe()
                return box[0] is not None

            answers = self.dc.send(n, concurrency=min(4, n), max_tokens=16,
                                   stop_when=stop_when, on_done=on_done)
            sent += len(answers)
            found = box[0] or probe()
            if found is None and pace:
                time.sleep(pace)
        if found is None:
            try:
                self.dc.drain(timeout=min(60.0, timeout))
            except RuntimeError as exc:
                self.say(f"drain: {exc}")
            found = probe()
        if result is not None:
            result.requests_sent += sent
            cut = found.time if found is not None else float("inf")
            result.requests_before_detection += sum(1 for t in answered if t <= cut)
        return found


def _tag_gateway(body: Any) -> str | None:
    """The gateway that answered, from the ``ivp.tag`` the gateway puts in each answer."""
    if isinstance(body, dict):
        tag = (body.get("ivp") or {}).get("tag") or {}
        return tag.get("gateway_id")
    return None


def require(result: Result, what: str, evidence: Evidence | None) -> Evidence | None:
    """Record ``evidence``, or that ``what`` never came (the attack went unnoticed)."""
    if evidence is None:
        result.missing.append(what)
    else:
        result.evidence.append(evidence)
    return evidence


def refusal(source: str, status: int, answer: Any, expect_status: int,
            expect_type: str) -> Evidence | None:
    """Evidence from an HTTP refusal with the expected status and error type."""
    err = answer.get("error") if isinstance(answer, dict) else None
    etype = err.get("type") if isinstance(err, dict) else None
    if status == expect_status and etype == expect_type:
        message = err.get("message", "") if isinstance(err, dict) else ""
        return Evidence(time.time(), source, f"HTTP {status} {etype}: {message}")
    return None


def short(answer: Any, limit: int = 300) -> str:
    return json.dumps(answer)[:limit]


__all__ = ["Context", "Evidence", "Needs", "Result", "Scenario", "Victim", "refusal",
           "require", "short"]
