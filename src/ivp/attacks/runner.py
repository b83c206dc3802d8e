"""Run scenarios against live loopback datacenters, as few as possible.

One :class:`AttackSession` is one datacenter: a recomputer and an honest gateway
(gw-a) whose uplink crosses an operator tap that passes everything. Scenarios that
break nothing share it. A scenario that shuts a gateway down, bricks it or poisons
its boot gets a fresh gateway of its own in the same datacenter (enrolled and powered
in the background while earlier scenarios run, booted just before it runs, stopped
after); a scenario that bricks the recomputer gets a datacenter of its own, run in a
thread beside the shared one. Scenarios that mostly wait (``background``) run in a
thread beside the others.

"Honest" audits are the verdicts of every gateway whose server carries no cheat;
the run passes only if none of them failed and every scenario was detected.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ivp.attacks.base import Context, Result, Scenario
from ivp.attacks.tap import ControlTap, UplinkTap
from ivp.protocol.messages import NoiseBound


@dataclass
class Settings:
    """How scenarios run (the same for every session of a run).

    Attributes:
        epsilon: audit probability ε of every gateway.
        checkpoint_interval: seconds between checkpoints (the recomputer raises
            checkpoint_missing after 3 silent periods).
        cap: most client requests one scenario sends while waiting for detection.
        patience: most seconds one scenario waits for a timed alarm.
        knockouts: defences switched off in the recomputer (``ivp.attacks.knockouts``;
            for the suite's own tests only).
        isolate: every gateway isolates its server (``ivp gateway --isolate``; root).
    """

    model: str = "tiny"
    epsilon: float = 0.2
    checkpoint_interval: float = 2.0
    cap: int = 200
    patience: float = 60.0
    knockouts: tuple[str, ...] = ()
    model_dir: Path | None = None
    isolate: bool = False
    say: Callable[[str], None] = field(default=lambda message: None)
    engine: str = "reference"  # the servers' engine (ivp.datacenter)
    noise_bound: NoiseBound | None = None  # δ of the whitelisted manifest


class AttackSession:
    """One live datacenter for scenarios. Use as a context manager."""

    def __init__(self, root: Path, settings: Settings, *, tamper_endpoint: bool = False,
                 workers: int = 1, recomputer_args: tuple[str, ...] = ()) -> None:
        from ivp.attacks import physical
        from ivp.datacenter import LoopbackDatacenter

        self.root = Path(root)
        self.settings = settings
        args = ["--allow-tamper-endpoint"] if tamper_endpoint else []
        args += list(recomputer_args)
        launcher: tuple[str, ...] = ("-m", "ivp.cli")
        if settings.knockouts:
            launcher = ("-m", "ivp.attacks.knockouts", "--off", ",".join(settings.knockouts))
        self.dc = LoopbackDatacenter(
            self.root, gateways=0, epsilon=settings.epsilon, model=settings.model,
            checkpoint_interval=settings.checkpoint_interval, workers=workers,
            log=settings.say, recomputer_args=args, recomputer_launcher=launcher,
            prebuilt_model=settings.model_dir, isolate=settings.isolate,
            engine=settings.engine, noise_bound=settings.noise_bound)
        self.taps: dict[int, UplinkTap] = {}
        self.fronts: dict[int, ControlTap] = {}
        self.cheaters: set[str] = set()  # gateways whose server carries a cheat
        self.sensors = physical.simulator()
        self.honest = 0
        self._ahead: dict[str, Future[int]] = {}  # scenario -> its gateway, starting
        self._plan: list[Scenario] = []
        self._pool: ThreadPoolExecutor | None = None

    # --- life cycle -------------------------------------------------------------------------
    def start(self) -> AttackSession:
        """Start the recomputer and the honest gateway gw-a (behind a passing tap)."""
        tap = UplinkTap(lambda: self.dc.recomputer_url).start()
        try:
            self.dc.start()
            self.honest = self.dc.add_gateway(uplink_url=tap.url)
        except BaseException:
            tap.stop()
            self.dc.stop()
            raise
        self.taps[self.honest] = tap
        return self

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.dc.stop()
        for tap in [*self.taps.values(), *self.fronts.values()]:
            tap.stop()
        self.taps.clear()
        self.fronts.clear()

    def __enter__(self) -> AttackSession:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- scenarios ----------------------------------------------------------------------------
    def plan(self, scenarios: Sequence[Scenario], lookahead: int = 2) -> None:
        """Scenarios about to run in this order: their gateways are started (powered,
        in UPLOAD, not routed) up to ``lookahead`` scenarios ahead, in the background."""
        self._plan = [s for s in scenarios if s.victim is not None]
        self._lookahead = lookahead
        if self._pool is None:
            self._pool = ThreadPoolExecutor(lookahead, thread_name_prefix="ivp-victim")

    def _start_ahead(self) -> None:
        assert self._pool is not None
        for s in self._plan[: self._lookahead]:
            if s.name not in self._ahead:
                self._ahead[s.name] = self._pool.submit(self._power_victim, s)

    def _power_victim(self, scenario: Scenario) -> int:
        """Enrol and start ``scenario``'s fresh gateway (and tap), in UPLOAD mode."""
        spec = scenario.victim
        assert spec is not None
        tap = UplinkTap(lambda: self.dc.recomputer_url).start() if spec.tapped else None
        behind: list[str] = []
        front = ControlTap(lambda: behind[0]).start() if spec.fronted else None

        def enrolled(url: str) -> str:
            behind.append(url)
            return front.url if front is not None else url

        isolate = None  # as the session
        if spec.isolated:  # the `isolate` knockout: the same victim, not isolated
            isolate = "isolate" not in self.settings.knockouts
        try:
            index = self.dc.add_gateway(spec.server_attack, upload=False,
                                        uplink_url=tap.url if tap else None,
                                        extra_args=spec.gateway_args, enrol_url=enrolled,
                                        isolate=isolate)
        except BaseException:
            for t in (tap, front):
                if t is not None:
                    t.stop()
            raise
        if tap is not None:
            self.taps[index] = tap
        if front is not None:
            self.fronts[index] = front
        if spec.server_attack:
            self.cheaters.add(self.dc.handles[index].gateway_id)
        return index

    def provision(self, scenario: Scenario) -> int | None:
        """The fresh gateway ``scenario`` attacks, booted if it asks so (None if it needs
        none)."""
        spec = scenario.victim
        if spec is None:
            return None
        self.settings.say(f"{scenario.name}: a fresh gateway"
                          + (f" (server cheat {spec.server_attack} armed)"
                             if spec.server_attack else ""))
        self._plan = [s for s in self._plan if s.name != scenario.name]
        pending = self._ahead.pop(scenario.name, None)
        if self._pool is not None:
            self._start_ahead()  # the next ones start while this one runs
        index = pending.result() if pending is not None else self._power_victim(scenario)
        if spec.upload:
            self.dc.boot(index)
        return index

    def context(self, victim: int | None) -> Context:
        scratch = self.root / "attacker"
        scratch.mkdir(parents=True, exist_ok=True)
        return Context(self.dc, victim=victim, honest=self.honest, taps=self.taps,
                       fronts=self.fronts,
                       sensors=self.sensors, cap=self.settings.cap,
                       patience=self.settings.patience, say=self.settings.say,
                       scratch=scratch)

    def run(self, scenario: Scenario, victim: int | None, *, retire: bool = True) -> Result:
        """Play ``scenario`` (its victim already provisioned); never raises."""
        result = Result(scenario.name, scenario.defence, started=time.time())
        self.settings.say(f"[bold]{scenario.name}[/bold]: {scenario.summary}")
        try:
            scenario.run(self.context(victim), result)
        except Exception as exc:  # a broken scenario is reported, never taken as detected
            result.error = f"{type(exc).__name__}: {exc}"
        result.ended = time.time()
        verdict = "DETECTED" if result.detected else "NOT DETECTED"
        self.settings.say(f"{scenario.name}: {verdict} in {result.seconds_to_detect:.1f} s"
                          + (f" (missing: {'; '.join(result.missing)})" if result.missing
                             else "") + (f" (error: {result.error})" if result.error else ""))
        if retire and victim is not None:
            self.retire(victim)
        return result

    def retire(self, index: int) -> None:
        """Stop a victim gateway (and its tap): it must not serve the next scenario."""
        self.dc.stop_gateway(index)
        for taps in (self.taps, self.fronts):
            tap = taps.pop(index, None)  # type: ignore[attr-defined]
            if tap is not None:
                tap.stop()

    def honest_counts(self) -> dict[str, Any]:
        """Verdict counts of the gateways whose server carries no cheat."""
        from ivp.datacenter import verdict_counts

        verdicts = [v for v in self.dc.verdicts() if v["gateway_id"] not in self.cheaters]
        counts: dict[str, Any] = verdict_counts(verdicts)
        counts["failures"] = [f"{v['gateway_id']}/{v['audit_seq']}: {v['reason']}"
                              for v in verdicts if not v["passed"]][:5]
        return counts


# --- a whole run ------------------------------------------------------------------------------
@dataclass
class Report:
    results: list[Result]
    honest: dict[str, Any]
    seconds: float

    @property
    def ok(self) -> bool:
        """Every scenario detected, no honest audit failed."""
        return all(r.detected for r in self.results) and self.honest.get("failed", 0) == 0

    def to_json(self) -> dict[str, Any]:
        return {"attacks": [r.summary() for r in self.results], "honest": {
            k: self.honest.get(k, 0) for k in ("audited", "passed", "failed")},
            "seconds": round(self.seconds, 1)}


def _merge(total: dict[str, Any], counts: dict[str, Any]) -> None:
    for key in ("audited", "passed", "failed"):
        total[key] = total.get(key, 0) + int(counts.get(key, 0))
    total.setdefault("failures", []).extend(counts.get("failures", []))


def run_scenarios(scenarios: Sequence[Scenario], root: Path, settings: Settings) -> Report:
    """Run ``scenarios`` on as few datacenters as possible; results in the given order.

    The shared datacenter runs the scenarios that need none of their own; each one that
    breaks the recomputer gets its own datacenter, run in a thread beside the shared
    one (both mostly wait on their processes).
    """
    t0 = time.monotonic()
    root = Path(root)
    done: dict[str, Result] = {}
    honest: dict[str, Any] = {}
    shared = [s for s in scenarios if s.needs != "datacenter"]
    own = [s for s in scenarios if s.needs == "datacenter"]
    aside = threading.Thread(target=_run_own, args=(own, root, settings, done, honest),
                             name="ivp-attack-own", daemon=True)
    if shared:
        with AttackSession(root / "datacenter", settings) as session:
            settings.model_dir = session.dc.model_dir
            aside.start()
            done.update(_run_shared(session, shared))
            try:
                session.dc.drain(timeout=60)
            except RuntimeError as exc:
                settings.say(f"drain: {exc}")
            _merge(honest, session.honest_counts())
    else:
        aside.start()
    aside.join()
    return Report([done[s.name] for s in scenarios], honest, time.monotonic() - t0)


def _run_own(scenarios: Sequence[Scenario], root: Path, settings: Settings,
             done: dict[str, Result], honest: dict[str, Any]) -> None:
    """Each scenario in a datacenter of its own (it breaks the recomputer)."""
    for i, scenario in enumerate(scenarios):
        try:
            with AttackSession(root / f"datacenter-{i + 2}", settings,
                               tamper_endpoint=True,
                               recomputer_args=scenario.recomputer_args) as session:
                settings.model_dir = settings.model_dir or session.dc.model_dir
                result = play(session, scenario)
                counts = result.details.get("honest")
                _merge(honest, counts if isinstance(counts, dict)
                       else session.honest_counts())
        except Exception as exc:  # its datacenter did not start
            now = time.time()
            result = Result(scenario.name, scenario.defence, started=now, ended=now,
                            error=f"its datacenter did not start: {type(exc).__name__}: {exc}")
        done[scenario.name] = result


def play(session: AttackSession, scenario: Scenario, *, retire: bool = True) -> Result:
    """Provision ``scenario``'s victim and run it; a failed start is reported as such."""
    try:
        victim = session.provision(scenario)
    except Exception as exc:
        now = time.time()
        return Result(scenario.name, scenario.defence, started=now, ended=now,
                      error=f"could not start its gateway: {type(exc).__name__}: {exc}")
    return session.run(scenario, victim, retire=retire)


def _run_shared(session: AttackSession, scenarios: Sequence[Scenario]) -> dict[str, Result]:
    done: dict[str, Result] = {}
    threads = []
    session.plan([s for s in scenarios if not s.background])
    for s in (s for s in scenarios if s.background and s.victim is None):
        def in_background(s: Scenario = s) -> None:
            done[s.name] = session.run(s, None)

        thread = threading.Thread(target=in_background, name=f"ivp-attack-{s.name}", daemon=True)
        thread.start()
        threads.append(thread)
    for s in scenarios:
        if s.name in done or (s.background and s.victim is None):
            continue
        done[s.name] = play(session, s)
    for thread in threads:
        thread.join()
    return done


__all__ = ["AttackSession", "Report", "Settings", "play", "run_scenarios"]
