"""The Secure Network Gateway (SNG): secure boot, tagged and logged serving, sampling.

Pure cores (no I/O) and the thin shells that do their waiting:

* :mod:`ivp.gateway.boot` — SNG property 2: the volatile counter and per-file digests
  of UPLOAD, and what the server's boot answers mean (POWER_KILL decisions);
  :mod:`ivp.gateway.boot_shell` streams the operator's bytes and holds the server's power.
* :mod:`ivp.gateway.serving` — SNG property 3: tags, pair records, chain links, the
  draw for each settled tag in tag order, audit records, checkpoints;
  :mod:`ivp.gateway.datapath` serves requests around it (server call, commit, release).
* :mod:`ivp.gateway.proxy` — strict request validation, whitelisted tokenisation,
  re-serialisation of answers from token ids (pure functions).
* :mod:`ivp.gateway.log` — the sealed, hash-chained pair log and durable audit spool
  (the only SQLite); :mod:`ivp.gateway.commit` — its group-commit writer.
* :mod:`ivp.gateway.control` — pure checks of Shutdown, Readmit and relayed admin
  requests; :mod:`ivp.gateway.control_shell` obeys them and installs whitelists.
* :mod:`ivp.gateway.uplink` — store-and-forward of the signed records to the recomputer.
* :mod:`ivp.gateway.core` — :class:`Gateway`: the modes and life cycle that tie them
  to the device, the server's power and HTTP, and the uplink.
* :mod:`ivp.gateway.app`, :mod:`ivp.gateway.cli` — the thin aiohttp / typer shells.

docs/GATEWAY.md maps each physical component of the note's SNG onto this code.
"""

from ivp.gateway.boot import UploadMode
from ivp.gateway.core import Gateway, GatewayConfig, Reply, State

__all__ = ["Gateway", "GatewayConfig", "Reply", "State", "UploadMode"]
