"""Physical attacks: interconnect, covert radio, sensors, guards, and tamper = brick.

The note's physical defences (seals, cameras, radio sensors, guards with a two-person
rule, the tamper mesh that destroys a device's UID) are hardware. Software can only
test their *alarm logic*: here a :class:`~ivp.recomputer.sensors.SensorSimulator`
plays enrolled, signing sensors and the recomputer's correlation rules decide. These
scenarios say nothing about the physics (placement, range, a sensor's own tamper
resistance); docs/THREATS.md says so for each. The tamper mesh is played by each
device's ``POST /tamper`` (``SoftDevice.tamper``: the UID secret is destroyed).
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from ivp.attacks.base import Context, Evidence, Result, Scenario, Victim, require
from ivp.protocol.keys import SigningKey
from ivp.recomputer.sensors import SealReading, SensorSimulator, SimSensor

SENSOR_LOGIC = ("sensor alarm logic (software only): enrolled sensors sign numbered "
                "readings; the recomputer's correlation rules raise the alarm")
HALL = ((0.0, 0.0), (20.0, 0.0), (0.0, 20.0), (20.0, 20.0))  # RF sensors at the corners, m


def simulator() -> SensorSimulator:
    """The session's sensors: wall-clock readings, 1 dB of RF noise (seeded)."""
    return SensorSimulator(noise_db=1.0, clock=time.time, rng=np.random.default_rng(7))


def _sims(ctx: Context) -> SensorSimulator:
    if ctx.sensors is None:
        raise RuntimeError("this session has no sensor simulator")
    return ctx.sensors


def sensor(ctx: Context, sensor_id: str, x: float = 0.0, y: float = 0.0) -> SimSensor:
    """The sensor called ``sensor_id``, enrolled by the inspectors on first use."""
    sims = _sims(ctx)
    new = sensor_id not in sims.sensors
    s = sims.sensor(sensor_id, x, y)
    if new:
        status, answer = ctx.dc.enrol_device(sensor_id, s.key.verify_key.hex, "sensor")
        if status != 200:
            raise RuntimeError(f"enrolment of sensor {sensor_id} refused: {answer}")
    return s


def post(ctx: Context, readings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """POST readings to the recomputer; its per-reading results."""
    status, answer = ctx.dc.post_sensors(readings)
    if status != 200:
        raise RuntimeError(f"recomputer /sensors answered {status}: {answer}")
    return list(answer["results"])


# --- scenarios --------------------------------------------------------------------------------
def interconnect(ctx: Context, result: Result) -> None:
    """A cable appears between two racks: the tray's seal breaks, a camera sees it."""
    sensor(ctx, "seal-tray-1")
    sensor(ctx, "cam-hall-1")
    sims = _sims(ctx)
    t0 = time.time()
    result.started = t0
    answers = post(ctx, [
        sims.seal("seal-tray-1", "rack-1/cable-tray", False,
                  "seal cut; new cable from rack-1 to rack-2"),
        sims.camera("cam-hall-1", "rack-1/cable-tray", False,
                    "unregistered cable between rack-1 and rack-2"),
    ])
    result.details["readings_accepted"] = [a["ok"] for a in answers]
    found = require(result, "a seal_broken alarm",
                    ctx.wait_for(lambda: ctx.alarm(["seal_broken"], t0, None), 5.0))
    if found is not None:
        rows = [a for a in ctx.alarms() if a["kind"] == "seal_broken"]
        result.details["seal_broken_count"] = sum(int(a["count"]) for a in rows)


def covert_rf(ctx: Context, result: Result) -> None:
    """A transmitter in the hall bursts; every RF sensor hears it; it is located."""
    for i, (x, y) in enumerate(HALL, start=1):
        sensor(ctx, f"rf-{i}", x, y)
    sims = _sims(ctx)
    truth = (6.5, 13.0)
    t0 = time.time()
    result.started = t0
    post(ctx, sims.rf_emitter(*truth, frequency_mhz=2400.0))
    require(result, "an rf_burst alarm",
            ctx.wait_for(lambda: ctx.alarm(["rf_burst"], t0, None), 5.0))
    fix = ctx.dc.recomputer_status().get("sensors", {}).get("rf_fix") or {}
    if fix.get("time", 0) >= t0:
        error = math.hypot(fix["x"] - truth[0], fix["y"] - truth[1])
        result.details.update(true_position=truth, fix=(round(fix["x"], 2), round(fix["y"], 2)),
                              fix_error_m=round(error, 2), sensors=fix.get("sensors"))
        text = f"located at ({fix['x']:.1f}, {fix['y']:.1f}) m by {len(fix['sensors'])} sensors"
        require(result, "a position within 3 m of the transmitter",
                Evidence(fix["time"], "recomputer /status sensors.rf_fix", text)
                if error <= 3.0 else None)
    else:
        result.missing.append("a triangulated position (sensors.rf_fix)")


def sensor_spoof(ctx: Context, result: Result) -> None:
    """The operator feeds the recomputer calm readings: signed by a key of its own, or
    replayed from an earlier genuine reading."""
    genuine = sensor(ctx, "seal-rack-2")
    sims = _sims(ctx)
    first = sims.seal("seal-rack-2", "rack-2", True, "intact")
    if not post(ctx, [first])[0]["ok"]:
        result.error = "the genuine reading was refused"
        return
    impostor = SimSensor("seal-rack-2", key=SigningKey.generate(), seq=genuine.seq)
    forged = impostor.sign(SealReading, time.time(), target="rack-2", intact=True,
                           detail="intact")
    t0 = time.time()
    result.started = t0
    answers = post(ctx, [forged, first])
    for what, answer in zip(("forged reading", "replayed reading"), answers, strict=True):
        ok = not answer["ok"]
        require(result, f"the {what} is refused",
                Evidence(time.time(), "POST /sensors", f"{what} refused: {answer['error']}")
                if ok else None)
    require(result, "a sensor_forged alarm",
            ctx.wait_for(lambda: ctx.alarm(["sensor_forged"], t0, None), 5.0))


def lone_entry(ctx: Context, result: Result) -> None:
    """One person badges into the hall and stays alone (two-person rule broken)."""
    sensor(ctx, "badge-hall-1")
    sims = _sims(ctx)
    t0 = time.time()
    result.started = t0
    post(ctx, [sims.badge("badge-hall-1", "hall-1", "operator-7", "in")])
    grace = sims.rules.lone_grace
    require(result, "a lone_entry alarm",
            ctx.wait_for(lambda: ctx.alarm(["lone_entry"], t0, None), grace + ctx.patience,
                         interval=1.0))
    post(ctx, [sims.badge("badge-hall-1", "hall-1", "operator-7", "out")])
    result.details["lone_grace_s"] = grace


def _status_of(url: str) -> tuple[int, Any]:
    """GET ``url``: (HTTP status, JSON body); (0, error) if unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
    except OSError as e:
        return 0, str(e)


def _bricked(source: str, status: int, answer: Any) -> Evidence | None:
    """Evidence from an answer that says the device is bricked."""
    body: dict[str, Any] = answer if isinstance(answer, dict) else {}
    error = body.get("error")
    if status == 403 and isinstance(error, dict) and error.get("type") == "BrickedError":
        return Evidence(time.time(), source, f"HTTP 403 BrickedError: {error.get('message')}")
    if body.get("state") == "bricked":
        why = body.get("error") if isinstance(body.get("error"), str) else ""
        return Evidence(time.time(), source, f"HTTP {status}: state bricked {why}".strip())
    return None


def tamper_gateway(ctx: Context, result: Result) -> None:
    """Open the gateway's case: the tamper mesh fires."""
    assert ctx.victim is not None
    h = ctx.dc.handles[ctx.victim]
    t0 = time.time()
    result.started = t0
    ctx.post(h.url + "/tamper", b"")
    require(result, f"{h.gateway_id} /status says bricked",
            _bricked(f"{h.gateway_id} /status", *_status_of(h.url + "/status")))
    body = {"model": ctx.dc.model_id, "prompt": "hello", "max_tokens": 4}
    require(result, f"{h.gateway_id} refuses INPUT",
            _bricked(f"POST {h.gateway_id}/v1/completions",
                     *ctx.post(h.url + "/v1/completions", json.dumps(body).encode())))
    ctx.dc.stop_gateway(ctx.victim)  # power-cycle the box: the UID stays destroyed
    ctx.dc.start_gateway(h, ctx.dc.policy_path)
    ctx.dc.wait_http(h.url + "/status", h.gateway_id)
    require(result, f"{h.gateway_id} is still bricked after a restart",
            _bricked(f"{h.gateway_id} /status after restart", *_status_of(h.url + "/status")))
    result.details["gateway_state"] = ctx.gateway_status(ctx.victim).get("state")


def tamper_recomputer(ctx: Context, result: Result) -> None:
    """Open the recomputer's case (after some honest, verified traffic)."""
    from ivp.datacenter import verdict_counts

    answers = ctx.dc.send(12, concurrency=4, max_tokens=16)
    result.requests_sent += len(answers)
    ctx.dc.drain()
    result.details["honest"] = verdict_counts(ctx.dc.verdicts())
    url = ctx.dc.recomputer_url
    t0 = time.time()
    result.started = t0
    status, answer = ctx.post(url + "/tamper", b"")
    if status != 200:
        result.error = f"POST /tamper answered {status} {answer} (needs --allow-tamper-endpoint)"
        return
    require(result, "/status refused: bricked", _bricked("recomputer /status",
                                                          *_status_of(url + "/status")))
    body = b'{"model": "%s", "prompt": "hello", "max_tokens": 4}' % ctx.dc.model_id.encode()
    require(result, "INPUT refused: bricked",
            _bricked("POST recomputer /v1/completions", *ctx.post(url + "/v1/completions",
                                                                  body)))
    require(result, "admin refused: bricked",
            _bricked("POST recomputer /admin", *ctx.post(
                url + "/admin", ctx.dc.inspectors.admin_envelope("set_epsilon",
                                                                 {"epsilon": 0.5}))))
    proc = ctx.dc.restart_recomputer(wait=True, timeout=60.0)
    log = proc.log.read_text(errors="replace")[-2000:] if proc.log.exists() else ""
    refused = not proc.alive() and proc.popen.returncode not in (0, None) and "bricked" in log
    require(result, "the recomputer refuses to start again",
            Evidence(time.time(), "ivp recomputer restart",
                     f"exit status {proc.popen.returncode}: "
                     + next((ln for ln in log.splitlines() if "bricked" in ln), "")[:160])
            if refused else None)
    gw = ctx.gateway_status(ctx.honest)
    result.details["gateway_spool_depth"] = gw.get("spool_depth")
    result.details["gateway_uplink"] = gw.get("uplink")


SCENARIOS = (
    Scenario(
        "interconnect", "note",
        "A link between servers appears: someone cuts the cable tray's seal and lays a "
        "cable between two racks, in a camera's view.",
        "seals + cameras (" + SENSOR_LOGIC + ")", interconnect),
    Scenario(
        "covert-rf", "note",
        "A transmitter in the hall bursts data around the network tap; four radio "
        "sensors at the corners hear it.",
        "radio sensors + triangulation (" + SENSOR_LOGIC + ")", covert_rf),
    Scenario(
        "tamper-gateway", "note",
        "The operator opens a gateway (to read its key or log, or bypass it).",
        "tamper = brick: the mesh destroys the UID secret; every key, the sealed log and "
        "the I/O path stop working, for good", tamper_gateway, needs="gateway",
        victim=Victim(gateway_args=("--allow-tamper-endpoint",))),
    Scenario(
        "tamper-recomputer", "note",
        "The operator opens the recomputer (to forge verdicts or use its keys).",
        "tamper = brick: the recomputer refuses every request and never starts again; "
        "gateways keep their records spooled", tamper_recomputer, needs="datacenter"),
    Scenario(
        "sensor-spoof", "protocol",
        "The operator feeds the recomputer calm sensor readings: signed by a key of its "
        "own, or replayed from an earlier genuine reading.",
        "sensor enrolment + signatures + per-sensor sequence numbers", sensor_spoof),
    Scenario(
        "lone-entry", "protocol",
        "One person badges into the hall and stays alone (to tamper unwatched).",
        "two-person rule on badge readings (" + SENSOR_LOGIC + ")", lone_entry,
        background=True),
)

__all__ = ["HALL", "SCENARIOS", "post", "sensor", "simulator"]
