"""The Secure Network Gateway (SNG): secure boot, tagged and logged serving, sampling.

* :mod:`ivp.gateway.boot` — UPLOAD mode: the volatile counter and per-file digests
  (pure state machine over bytes; POWER_KILL at a bad file's end).
* :mod:`ivp.gateway.proxy` — strict request validation, whitelisted tokenisation,
  re-serialisation of answers from token ids (pure functions).
* :mod:`ivp.gateway.log` — sealed, hash-chained pair log and durable audit spool.
* :mod:`ivp.gateway.core` — :class:`Gateway`, the state machine that ties them to
  the device, the server's power and HTTP, and the uplink.
* :mod:`ivp.gateway.app`, :mod:`ivp.gateway.cli` — the thin aiohttp / typer shells.

docs/GATEWAY.md maps each physical component of the note's SNG onto this code.
"""

from ivp.gateway.boot import UploadMode
from ivp.gateway.core import Gateway, GatewayConfig, Reply, State

__all__ = ["Gateway", "GatewayConfig", "Reply", "State", "UploadMode"]
