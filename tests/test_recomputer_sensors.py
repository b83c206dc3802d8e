"""Sensor alarm logic, driven by the simulator. (Software tests the alarm logic here,
not any physical sensor.)"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from test_recomputer_support import Inspectors, run

from ivp.errors import ChainError, SignatureError
from ivp.protocol.keys import SigningKey
from ivp.recomputer.app import make_app
from ivp.recomputer.sensors import SensorHub, SensorRules, SensorSimulator, triangulate
from ivp.recomputer.service import Recomputer

T0 = 5_000.0

pytest_plugins = ("test_recomputer_support",)


@pytest.fixture
def sim() -> SensorSimulator:
    s = SensorSimulator()
    for i, (x, y) in enumerate(((0, 0), (20, 0), (0, 20), (20, 20))):
        s.sensor(f"rf-{i}", x, y)
    s.sensor("pwr-a")
    s.sensor("seal-1")
    s.sensor("door-1")
    return s


def keys(sim: SensorSimulator) -> dict[str, Any]:
    return {sid: s.key.verify_key for sid, s in sim.sensors.items()}


def feed(hub: SensorHub, sim: SensorSimulator, item: dict, now: float = T0) -> list[str]:
    reading, error, alarms = hub.admit(item, keys(sim), now)
    assert error is None, error
    assert reading is not None
    return [a.kind for a in alarms + hub.apply(reading, now)]


def test_rf_burst_from_three_sensors_is_located(sim: SensorSimulator) -> None:
    """Attack: covert radio link around the network tap; the hall's RF sensors find it."""
    hub = SensorHub()
    readings = sim.rf_emitter(7.0, 3.0)
    kinds = [feed(hub, sim, r, T0 + i * 0.1) for i, r in enumerate(readings)]
    assert kinds == [["rf_burst"]] * 4
    fix = hub.last_fix
    assert fix is not None and len(fix["sensors"]) == 4
    assert abs(fix["x"] - 7.0) < 0.01 and abs(fix["y"] - 3.0) < 0.01


def test_triangulation_with_noise_and_degenerate_layouts(sim: SensorSimulator) -> None:
    x, y, rms = triangulate([(0, 0, 5.0), (10, 0, 5.0), (5, 5, 5.0)])  # type: ignore[misc]
    assert (round(x, 6), round(y, 6), round(rms, 6)) == (5.0, 0.0, 0.0)
    sim.noise_db = 1.0  # 1 dB (standard deviation) of measurement noise on every sensor
    sim.rng = np.random.default_rng(7)
    hub = SensorHub()
    for r in sim.rf_emitter(12.0, 6.0):
        feed(hub, sim, r)
    assert hub.last_fix is not None
    assert abs(hub.last_fix["x"] - 12.0) < 4 and abs(hub.last_fix["y"] - 6.0) < 4
    assert triangulate([(0, 0, 1), (1, 1, 1), (2, 2, 1)]) is None  # collinear
    assert triangulate([(0, 0, 1), (1, 1, 1)]) is None


def test_weak_rf_is_not_an_alarm(sim: SensorSimulator) -> None:
    hub = SensorHub(SensorRules(rf_threshold_dbm=-60))
    far = sim.rf_emitter(500.0, 500.0)
    assert all(feed(hub, sim, r) == [] for r in far)


def test_unenrolled_or_replayed_sensor_readings_are_refused(sim: SensorSimulator) -> None:
    hub = SensorHub()
    rogue = SensorSimulator()
    rogue.sensors["seal-1"] = type(sim.sensors["seal-1"])("seal-1", key=SigningKey.generate())
    reading, error, alarms = hub.admit(rogue.seal("seal-1", "rack-1", intact=True), keys(sim), T0)
    assert reading is None and isinstance(error, SignatureError)
    assert [a.kind for a in alarms] == ["sensor_forged"]
    first = sim.seal("seal-1", "rack-1", intact=True)
    assert feed(hub, sim, first) == []
    reading, error, alarms = hub.admit(first, keys(sim), T0)
    assert isinstance(error, ChainError) and "replayed" in str(error)
    assert hub.heads["seal-1"] == 1


def test_sequence_gap_of_a_sensor_alarms(sim: SensorSimulator) -> None:
    """Attack: readings suppressed between the sensor and the recomputer."""
    hub = SensorHub()
    feed(hub, sim, sim.seal("seal-1", "rack-1", intact=True))
    sim.seal("seal-1", "rack-1", intact=False)  # suppressed
    assert feed(hub, sim, sim.seal("seal-1", "rack-1", intact=True)) == ["sensor_gap"]


def test_broken_seal_and_camera_alarm(sim: SensorSimulator) -> None:
    hub = SensorHub()
    assert feed(hub, sim, sim.seal("seal-1", "rack-1", intact=False)) == ["seal_broken"]
    assert feed(hub, sim, sim.camera("seal-1", "hall", ok=False, detail="lens covered")) == \
        ["seal_broken"]


def test_two_person_rule(sim: SensorSimulator) -> None:
    hub = SensorHub(SensorRules(lone_grace=30))
    feed(hub, sim, sim.badge("door-1", "hall", "alice", "in"), T0)
    feed(hub, sim, sim.badge("door-1", "hall", "bob", "in"), T0 + 10)
    assert hub.tick(T0 + 100, {}) == []
    feed(hub, sim, sim.badge("door-1", "hall", "bob", "out"), T0 + 100)  # alice now alone
    assert hub.tick(T0 + 120, {}) == []
    assert [a.kind for a in hub.tick(T0 + 131, {})] == ["lone_entry"]
    assert hub.tick(T0 + 140, {}) == []  # once while it holds
    assert feed(hub, sim, sim.badge("door-1", "hall", "mallory", "out"), T0 + 150) == \
        ["badge_anomaly"]


def test_power_on_but_gateway_silent(sim: SensorSimulator) -> None:
    """Attack: a server powered and running while its gateway reports nothing."""
    hub = SensorHub(SensorRules(silence=60))
    feed(hub, sim, sim.power("pwr-a", "gw-a", on=True, watts=700), T0)
    assert hub.tick(T0 + 50, {"gw-a": ("serving", T0 + 40)}) == []
    assert [a.kind for a in hub.tick(T0 + 101, {"gw-a": ("serving", T0 + 40)})] == \
        ["power_silent"]
    assert hub.tick(T0 + 101, {"gw-a": ("shutdown", T0 + 40)}) == []


def test_traffic_after_power_off(sim: SensorSimulator) -> None:
    """Attack: records keep arriving in a gateway's name while its power is off."""
    hub = SensorHub()
    feed(hub, sim, sim.power("pwr-a", "gw-a", on=False), T0)
    assert hub.tick(T0 + 10, {"gw-a": ("serving", T0 - 5)}) == []
    assert [a.kind for a in hub.tick(T0 + 10, {"gw-a": ("serving", T0 + 9)})] == \
        ["traffic_power_off"]


def test_sensors_over_http_with_enrolment(config, inspectors: Inspectors,
                                          sim: SensorSimulator) -> None:
    async def main() -> None:
        rec = Recomputer(config)
        client = TestClient(TestServer(make_app(rec)))
        await client.start_server()
        for args in sim.enrolments():
            await rec.handle_admin(inspectors.request("enrol_device", args))
        items = sim.rf_emitter(15.0, 12.0)
        r = await client.post("/sensors", data=json.dumps({"envelopes": items}).encode())
        assert [x["ok"] for x in (await r.json())["results"]] == [True] * 4
        alarms = await (await client.get("/alarms")).json()
        assert [a["kind"] for a in alarms] == ["rf_burst"]
        assert alarms[0]["count"] == 4 and "located at (15.0, 12.0)" in alarms[0]["detail"]
        rogue = SensorSimulator()
        r = await client.post("/sensors", data=json.dumps(
            {"envelopes": [rogue.seal("seal-9", "rack", intact=False)]}).encode())
        assert (await r.json())["results"][0]["ok"] is False
        status = await (await client.get("/status")).json()
        assert status["sensors"]["rf_fix"]["x"] == pytest.approx(15.0, abs=0.01)
        await client.close()
        again = Recomputer(config)  # readings survive a restart
        assert again.sensors.heads == {f"rf-{i}": 1 for i in range(4)}
        again.store.close()
    run(main())


def test_a_silent_sensor_alarms_and_heartbeats_keep_it_quiet(sim: SensorSimulator) -> None:
    """Attack: cut or jam a sensor before doing what it would have seen."""
    hub = SensorHub(SensorRules(heartbeat=60.0))
    enrolled = list(sim.sensors)
    assert hub.tick(T0, {}, enrolled) == []
    feed(hub, sim, sim.heartbeat("seal-1"), T0 + 30)
    feed(hub, sim, sim.seal("seal-1", "rack-1", intact=True), T0 + 70)
    alarms = hub.tick(T0 + 61, {}, enrolled)
    # every sensor but seal-1 (heard at +30) has been silent since +0
    assert sorted(a.kind for a in alarms) == ["sensor_silent"] * (len(enrolled) - 1)
    assert {a.detail.split("'")[1] for a in alarms} == set(enrolled) - {"seal-1"}
    assert hub.tick(T0 + 62, {}, enrolled) == []  # raised once per silence
    for sid in enrolled:  # the sensors come back
        feed(hub, sim, sim.heartbeat(sid), T0 + 100)
    assert hub.tick(T0 + 120, {}, enrolled) == []
    [again] = [a for a in hub.tick(T0 + 200, {}, ["pwr-a"]) if "pwr-a" in a.detail]
    assert again.kind == "sensor_silent" and "silent for 100 s" in again.detail


def test_the_heartbeat_rule_can_be_turned_off_and_bad_rules_are_refused(
        sim: SensorSimulator) -> None:
    hub = SensorHub(SensorRules(heartbeat=0.0))
    assert hub.tick(T0, {}, list(sim.sensors)) == []
    assert hub.tick(T0 + 1e6, {}, list(sim.sensors)) == []
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="heartbeat"):
            SensorRules(heartbeat=bad)
