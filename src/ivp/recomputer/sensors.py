"""Datacenter sensors: signed telemetry and the rules that correlate it with gateways.

The note's physical security (analog power sensors, radio sensors, seals and
cameras, guards with entry/exit protocols) is hardware this software cannot build.
What software *can* do — and what this module does — is the alarm logic: accept
signed readings from enrolled sensors (``enrol_device`` with ``kind: sensor``),
keep per-sensor sequence numbers (a gap means lost or suppressed readings), and
correlate them with what the gateways report. **Tests drive these rules with the
simulator below; they test the alarm logic, not any physical sensor.**

Rules (each names what it catches):

* ``power_silent`` — a server's power is on but its gateway sent nothing for
  ``silence`` seconds: a server running outside its gateway (the SNG bypassed).
* ``traffic_power_off`` — uplink traffic from a gateway after its power was
  reported off: the readings or the traffic are fake (a replaying impostor).
* ``rf_burst`` — radio energy above the threshold: covert RF communication around
  the network tap. Three or more sensors hearing it within ``rf_window`` seconds
  locate it (least-squares multilateration from a log-distance path-loss model).
* ``seal_broken`` — a tamper seal or a camera reports a breach.
* ``lone_entry`` — exactly one person in a zone for more than ``lone_grace``
  seconds: the two-person rule is broken. ``badge_anomaly`` — out without in, in
  twice, or an unknown direction of travel.
* ``sensor_silent`` — an enrolled sensor sent nothing (not even a ``heartbeat``
  reading) for ``heartbeat`` seconds: cut, jammed, unplugged or stolen. Sensors send a
  heartbeat reading when they have had nothing else to say for a while; a sensor
  enrolled but never heard counts from when the hub first saw it enrolled.

:class:`SensorHub` is pure: readings and the time go in, alarms come out.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from msgspec import Meta, Struct

from ivp.errors import ChainError, IvpError, SignatureError, ValidationError
from ivp.protocol import envelope as env
from ivp.protocol.encoding import canonical, convert, decode, loads
from ivp.protocol.keys import SigningKey
from ivp.recomputer.alarms import Alarm
from ivp.recomputer.batch import MAX_ITEMS

_Name = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:/@+-]+$")]


class _Reading(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag_field="kind"):
    """One signed sensor reading. ``seq`` counts from 1 per sensor, without gaps."""

    v: int = 1
    sensor_id: _Name
    seq: Annotated[int, Meta(ge=1)]
    time: float  # the sensor's clock (rules use the recomputer's receive time)


class PowerReading(_Reading, frozen=True, tag="power"):
    target: _Name  # the gateway whose server this sensor meters
    on: bool
    watts: Annotated[float, Meta(ge=0.0)] = 0.0


class RfReading(_Reading, frozen=True, tag="rf"):
    x: float  # the sensor's position in the hall, metres
    y: float
    dbm: float  # received power
    frequency_mhz: Annotated[float, Meta(ge=0.0)] = 0.0


class SealReading(_Reading, frozen=True, tag="seal"):
    target: _Name  # a rack, a gateway, a cable tray
    intact: bool
    detail: Annotated[str, Meta(max_length=500)] = ""


class CameraReading(_Reading, frozen=True, tag="camera"):
    target: _Name
    ok: bool  # False: view blocked, camera moved, tamper seen
    detail: Annotated[str, Meta(max_length=500)] = ""


class BadgeReading(_Reading, frozen=True, tag="badge"):
    zone: _Name
    person: _Name
    direction: Literal["in", "out"]


class HeartbeatReading(_Reading, frozen=True, tag="heartbeat"):
    """Nothing to report, and still here (the ``sensor_silent`` rule's counterpart)."""


SensorReading = (PowerReading | RfReading | SealReading | CameraReading | BadgeReading
                 | HeartbeatReading)


@dataclass(frozen=True)
class SensorRules:
    silence: float = 180.0  # power on, gateway silent this long -> power_silent
    power_grace: float = 2.0  # traffic this long after power off -> traffic_power_off
    rf_threshold_dbm: float = -60.0
    rf_window: float = 5.0
    rf_ref_dbm: float = -30.0  # received power at 1 m from the emitter (path-loss model)
    rf_exponent: float = 2.0  # path-loss exponent (2 = free space)
    lone_grace: float = 30.0
    heartbeat: float = 600.0  # a sensor silent this long -> sensor_silent (0: rule off)

    def __post_init__(self) -> None:
        for name in ("silence", "power_grace", "rf_window", "lone_grace", "heartbeat"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"sensor rule {name} must be a finite number >= 0, "
                                 f"got {value!r}")


@dataclass
class _Power:
    on: bool
    since: float  # receive time of the reading that set the state


@dataclass
class SensorHub:
    """Sensor state and correlation rules. Pure: no I/O, no clock."""

    rules: SensorRules = field(default_factory=SensorRules)
    heads: dict[str, int] = field(default_factory=dict)  # sensor -> last seq
    power: dict[str, _Power] = field(default_factory=dict)  # gateway -> state
    zones: dict[str, dict[str, float]] = field(default_factory=dict)  # zone -> person -> in
    alone_since: dict[str, float] = field(default_factory=dict)
    rf: list[tuple[float, str, float, float, float]] = field(default_factory=list)
    last_fix: dict[str, Any] | None = None
    last_seen: dict[str, float] = field(default_factory=dict)  # sensor -> last receive time
    _raised: set[tuple[str, str]] = field(default_factory=set)

    def admit(self, item: Any, sensor_keys: Mapping[str, Any], now: float
              ) -> tuple[SensorReading | None, IvpError | None, list[Alarm]]:
        """Check one envelope: an enrolled sensor's valid signature, then the sequence.

        Returns (reading, error, alarms); never raises; state is unchanged (call
        :meth:`apply` with the reading).
        """
        try:
            envelope = convert(item, env.Envelope)
            if envelope.payloadType != env.SENSOR:
                raise ValidationError(f"expected payload type {env.SENSOR!r}")
            signer = next((sid for s in envelope.signatures
                           for sid, key in sensor_keys.items() if key.keyid == s.keyid), None)
            if signer is None or not env.valid_signers(
                    envelope, {sensor_keys[signer].keyid: sensor_keys[signer]}):
                raise SignatureError("sensor reading not signed by an enrolled sensor key")
            reading: Any = decode(envelope.payload_bytes(), SensorReading)  # type: ignore[arg-type]
            if reading.sensor_id != signer:
                raise SignatureError(f"reading of sensor {reading.sensor_id!r} signed by the "
                                     f"key of {signer!r}")
        except ValidationError as exc:
            return None, exc, [Alarm("malformed", None, None, f"sensor: {exc}"[:300], now)]
        except SignatureError as exc:
            return None, exc, [Alarm("sensor_forged", None, None, str(exc), now)]
        last = self.heads.get(reading.sensor_id, 0)
        if reading.seq <= last:
            err = ChainError(f"sensor {reading.sensor_id!r} reading {reading.seq} replayed "
                             f"(last {last})")
            return None, err, [Alarm("sensor_forged", None, None, str(err), now)]
        alarms = []
        if reading.seq != last + 1:
            alarms.append(Alarm("sensor_gap", None, None,
                                f"sensor {reading.sensor_id!r}: readings {last + 1}.."
                                f"{reading.seq - 1} missing", now))
        return reading, None, alarms

    def apply(self, r: SensorReading, now: float) -> list[Alarm]:
        """Advance the state with an admitted reading; alarms it raises at once."""
        self.heads[r.sensor_id] = r.seq
        self.last_seen[r.sensor_id] = now
        alarms: list[Alarm] = []
        if isinstance(r, PowerReading):
            prev = self.power.get(r.target)
            if prev is None or prev.on != r.on:
                self.power[r.target] = _Power(r.on, now)
        elif isinstance(r, SealReading) and not r.intact:
            alarms.append(Alarm("seal_broken", None, None,
                                f"seal on {r.target!r} broken (sensor {r.sensor_id}) "
                                f"{r.detail}".strip(), now))
        elif isinstance(r, CameraReading) and not r.ok:
            alarms.append(Alarm("seal_broken", None, None,
                                f"camera on {r.target!r} reports a breach (sensor "
                                f"{r.sensor_id}) {r.detail}".strip(), now))
        elif isinstance(r, BadgeReading):
            alarms += self._badge(r, now)
        elif isinstance(r, RfReading) and r.dbm >= self.rules.rf_threshold_dbm:
            alarms.append(self._rf(r, now))
        return alarms

    def _badge(self, r: BadgeReading, now: float) -> list[Alarm]:
        inside = self.zones.setdefault(r.zone, {})
        alarms = []
        if r.direction == "in":
            if r.person in inside:
                alarms.append(Alarm("badge_anomaly", None, None,
                                    f"{r.person!r} badged into {r.zone!r} twice", now))
            inside[r.person] = now
        else:
            if r.person not in inside:
                alarms.append(Alarm("badge_anomaly", None, None,
                                    f"{r.person!r} badged out of {r.zone!r} without badging in",
                                    now))
            inside.pop(r.person, None)
        if len(inside) == 1:
            self.alone_since.setdefault(r.zone, now)
        else:
            self.alone_since.pop(r.zone, None)
        return alarms

    def _rf(self, r: RfReading, now: float) -> Alarm:
        w = self.rules.rf_window
        self.rf = [d for d in self.rf if now - d[0] <= w and d[1] != r.sensor_id]
        self.rf.append((now, r.sensor_id, r.x, r.y, r.dbm))
        detail = (f"RF burst of {r.dbm:.1f} dBm at sensor {r.sensor_id} ({r.x:g}, {r.y:g})"
                  + (f", {r.frequency_mhz:g} MHz" if r.frequency_mhz else ""))
        if len(self.rf) >= 3:
            fix = triangulate([(x, y, self.distance(dbm)) for _, _, x, y, dbm in self.rf])
            if fix is not None:
                self.last_fix = {"x": fix[0], "y": fix[1], "rms_m": fix[2],
                                 "sensors": sorted(d[1] for d in self.rf), "time": now}
                detail = (f"RF burst located at ({fix[0]:.1f}, {fix[1]:.1f}) m ± {fix[2]:.1f} m "
                          f"by {len(self.rf)} sensors")
        return Alarm("rf_burst", None, None, detail, now)

    def distance(self, dbm: float) -> float:
        """Metres from the emitter, by the log-distance path-loss model."""
        return float(10 ** ((self.rules.rf_ref_dbm - dbm) / (10 * self.rules.rf_exponent)))

    def tick(self, now: float, gateways: Mapping[str, tuple[str, float | None]],
             sensors: Iterable[str] = ()) -> list[Alarm]:
        """Timed rules. ``gateways``: id -> (state, last uplink receive time or None);
        ``sensors``: the enrolled sensors' ids."""
        due: dict[tuple[str, str], Alarm] = {}
        if self.rules.heartbeat:
            for sid in sensors:  # enrolled but never heard: counted from now
                self.last_seen.setdefault(sid, now)
            for sid, seen in self.last_seen.items():
                if now - seen > self.rules.heartbeat:
                    due[("sensor_silent", sid)] = Alarm(
                        "sensor_silent", None, None,
                        f"sensor {sid!r} silent for {now - seen:.0f} s (cut, jammed, "
                        "unplugged or removed?)", now)
        for gw, p in self.power.items():
            state, seen = gateways.get(gw, ("unknown", None))
            if p.on and state not in ("shutdown", "unknown"):
                quiet = now - max(p.since, seen or 0.0)
                if quiet > self.rules.silence:
                    due[("power_silent", gw)] = Alarm(
                        "power_silent", gw, None,
                        f"power on but gateway {gw!r} silent for {quiet:.0f} s", now)
            if not p.on and seen is not None and seen > p.since + self.rules.power_grace:
                due[("traffic_power_off", gw)] = Alarm(
                    "traffic_power_off", gw, None,
                    f"gateway {gw!r} traffic {seen - p.since:.0f} s after its power was "
                    "reported off", now)
        for zone, since in self.alone_since.items():
            if now - since > self.rules.lone_grace:
                person = next(iter(self.zones.get(zone, {})), "?")
                due[("lone_entry", zone)] = Alarm(
                    "lone_entry", None, None,
                    f"{person!r} alone in {zone!r} for {now - since:.0f} s (two-person rule)",
                    now)
        fresh = [a for k, a in due.items() if k not in self._raised]
        self._raised = set(due)
        return fresh

    def view(self) -> dict[str, Any]:
        return {
            "sensors": dict(self.heads),
            "power": {g: {"on": p.on, "since": p.since} for g, p in self.power.items()},
            "zones": {z: sorted(p) for z, p in self.zones.items() if p},
            "rf_fix": self.last_fix,
        }


def triangulate(points: list[tuple[float, float, float]]) -> tuple[float, float, float] | None:
    """Least-squares position from >= 3 (x, y, distance) circles; (x, y, rms error).

    Subtracting the first circle's equation from the others makes the system linear:
    2(x_i - x_0) x + 2(y_i - y_0) y = d_0^2 - d_i^2 + x_i^2 - x_0^2 + y_i^2 - y_0^2.
    None if the sensors are (nearly) collinear.
    """
    if len(points) < 3:
        return None
    p = np.asarray(points, dtype=np.float64)  # (n, 3)
    x0, y0, d0 = p[0]
    a = 2 * (p[1:, :2] - p[0, :2])  # (n-1, 2)
    b = d0**2 - p[1:, 2] ** 2 + p[1:, 0] ** 2 - x0**2 + p[1:, 1] ** 2 - y0**2  # (n-1,)
    if np.linalg.matrix_rank(a, tol=1e-6) < 2:
        return None
    sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    err = np.hypot(p[:, 0] - sol[0], p[:, 1] - sol[1]) - p[:, 2]
    return float(sol[0]), float(sol[1]), float(math.sqrt(float(np.mean(err**2))))


def batch_items(body: bytes) -> list[Any]:
    """The ``envelopes`` list of a ``POST /sensors`` body.

    Raises:
        ValidationError: not ``{"envelopes": [...]}``.
    """
    value = loads(body, "sensor body")
    items = value.get("envelopes") if isinstance(value, dict) else None
    if not isinstance(items, list):
        raise ValidationError('sensor body must be {"envelopes": [...]}')
    if len(items) > MAX_ITEMS:
        raise ValidationError(f"sensor batch of {len(items)} envelopes; at most {MAX_ITEMS}")
    return items


# --- simulator ---------------------------------------------------------------------------------
@dataclass
class SimSensor:
    sensor_id: str
    key: SigningKey = field(default_factory=SigningKey.generate)
    seq: int = 0
    x: float = 0.0
    y: float = 0.0

    def sign(self, reading_type: type[_Reading], time: float, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        reading = reading_type(sensor_id=self.sensor_id, seq=self.seq, time=time, **fields)
        return msgspec.to_builtins(env.sign(env.SENSOR, canonical(reading), [self.key]))


@dataclass
class SensorSimulator:
    """Makes the signed readings a hall's sensors would send (tests, `ivp demo`).

    ``enrolments()`` gives the ``enrol_device`` arguments the inspectors would sign.
    """

    rules: SensorRules = field(default_factory=SensorRules)
    sensors: dict[str, SimSensor] = field(default_factory=dict)
    noise_db: float = 0.0
    clock: Callable[[], float] = field(default=lambda: 0.0)
    rng: np.random.Generator = field(
        default_factory=lambda: np.random.default_rng(secrets.randbits(64)))

    def sensor(self, sensor_id: str, x: float = 0.0, y: float = 0.0) -> SimSensor:
        return self.sensors.setdefault(sensor_id, SimSensor(sensor_id, x=x, y=y))

    def enrolments(self) -> list[dict[str, Any]]:
        return [{"device_id": s.sensor_id, "public_key": s.key.verify_key.hex,
                 "kind": "sensor"} for s in self.sensors.values()]

    def power(self, sensor_id: str, gateway_id: str, on: bool, watts: float = 0.0
              ) -> dict[str, Any]:
        return self.sensor(sensor_id).sign(PowerReading, self.clock(), target=gateway_id, on=on,
                                           watts=watts if on else 0.0)

    def seal(self, sensor_id: str, target: str, intact: bool, detail: str = "") -> dict:
        return self.sensor(sensor_id).sign(SealReading, self.clock(), target=target,
                                           intact=intact, detail=detail)

    def camera(self, sensor_id: str, target: str, ok: bool, detail: str = "") -> dict:
        return self.sensor(sensor_id).sign(CameraReading, self.clock(), target=target, ok=ok,
                                           detail=detail)

    def badge(self, sensor_id: str, zone: str, person: str, direction: str) -> dict:
        return self.sensor(sensor_id).sign(BadgeReading, self.clock(), zone=zone, person=person,
                                           direction=direction)

    def heartbeat(self, sensor_id: str) -> dict[str, Any]:
        return self.sensor(sensor_id).sign(HeartbeatReading, self.clock())

    def rf_emitter(self, x: float, y: float, tx_dbm_at_1m: float | None = None,
                   frequency_mhz: float = 2400.0) -> list[dict[str, Any]]:
        """Every RF sensor's reading of a transmitter at (x, y) (log-distance path loss,
        optional Gaussian noise of ``noise_db``)."""
        ref = self.rules.rf_ref_dbm if tx_dbm_at_1m is None else tx_dbm_at_1m
        out = []
        for s in self.sensors.values():
            if not s.sensor_id.startswith("rf"):
                continue
            d = max(0.1, math.hypot(s.x - x, s.y - y))
            dbm = ref - 10 * self.rules.rf_exponent * math.log10(d)
            if self.noise_db:
                dbm += float(self.rng.normal(0.0, self.noise_db))
            out.append(s.sign(RfReading, self.clock(), x=s.x, y=s.y, dbm=dbm,
                              frequency_mhz=frequency_mhz))
        return out


__all__ = [
    "BadgeReading", "CameraReading", "HeartbeatReading", "PowerReading", "RfReading",
    "SealReading", "SensorHub",
    "SensorReading", "SensorRules", "SensorSimulator", "triangulate",
]
