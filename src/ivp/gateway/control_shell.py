"""The control shell: what a gateway obeys from outside its data path — Shutdown and
Readmit from the recomputer, the inspectors' relayed admin requests, whitelist
installs — and the persisted state they leave (sealed meta in the log).

Every check is a pure function of ``control`` (or ``TrustedWhitelist``) over the bytes
as received; this module runs them, persists what they accept *before* acting on it
(a crash never leaves an obeyed instruction unrecorded), and moves the gateway's mode.
Every refusal leaves the settings, the whitelist and the mode as they were. At start
it restores what was persisted, so a restart with other flags or an older whitelist
file undoes nothing the inspectors or the recomputer decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from ivp.errors import IvpError, PeerDataError, SignatureError
from ivp.gateway import control
from ivp.gateway.shared import State
from ivp.protocol.encoding import canonical, decode
from ivp.protocol.envelope import READMIT, WHITELIST, Envelope
from ivp.protocol.keys import VerifyKey
from ivp.protocol.messages import EpsilonArgs, RebootArgs, Shutdown, Whitelist, WhitelistArgs

if TYPE_CHECKING:
    from ivp.gateway.core import Gateway

META_SHUTDOWN = "shutdown"
META_WHITELIST = "whitelist"
META_SETTINGS = "settings"


class ControlShell:
    """Control, admin and whitelist for one :class:`~ivp.gateway.core.Gateway`."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self._settings_lock = asyncio.Lock()  # one settings change at a time (no lost update)

    # --- restored at start ----------------------------------------------------------------
    async def stored_shutdown(self) -> str | None:
        """The persisted shutdown's reason; fails closed on a record that does not open."""
        gw = self.gw
        try:
            stored = await gw._db(gw.log.get_meta, META_SHUTDOWN)
            return None if stored is None else decode(stored, Shutdown).reason
        except PeerDataError as exc:
            await gw.alarm("log_corrupt", f"shutdown record does not open: {exc}")
            return "a shutdown record that does not open (tampered log)"

    async def restore_settings(self) -> None:
        """The inspectors' settings this gateway last accepted (over the CLI flags).

        Blocks undoing an inspectors' instruction by restarting with other flags.
        """
        gw = self.gw
        try:
            stored = await gw._db(gw.log.get_meta, META_SETTINGS)
            if stored is not None:
                gw._settings = decode(stored, control.Settings)
        except PeerDataError as exc:
            await gw.alarm("log_corrupt", f"stored settings do not open: {exc}")
        if gw._settings.reboot_interval is not None:
            gw.config.reboot_interval = gw._settings.reboot_interval

    async def restore_whitelist(self) -> None:
        """Install the newest whitelist this gateway ever accepted.

        Blocks rollback by restart: an operator restarting the gateway with an older
        whitelist file (one that allowed more) still gets the newer stored version.
        """
        gw = self.gw
        try:
            stored = await gw._db(gw.log.get_meta, META_WHITELIST)
        except PeerDataError as exc:
            await gw.alarm("log_corrupt", f"stored whitelist does not open: {exc}")
            stored = None
        if stored is not None:
            with contextlib.suppress(IvpError):
                gw.whitelist.update(stored)  # only if newer than the file and unexpired
        if gw.whitelist.envelope is not None:
            current = gw.whitelist.envelope.to_bytes()
            if current != stored:
                await gw._db(gw.log.set_meta, META_WHITELIST, current)

    # --- Shutdown and Readmit -------------------------------------------------------------
    async def control(self, body: bytes) -> dict[str, Any]:
        """See :meth:`ivp.gateway.core.Gateway.control`."""
        gw = self.gw
        if gw._state is State.BRICKED or gw.device.bricked:
            gw._check_alive()
        if gw.recomputer_key is None:
            raise SignatureError("no recomputer key configured: control messages refused")
        envelope = Envelope.from_bytes(body)
        if envelope.payloadType == READMIT:
            async with self._settings_lock:
                return await self._readmit(envelope, gw.recomputer_key)
        message, payload = control.open_shutdown(envelope, gw.recomputer_key,
                                                 gw.gateway_id, gw._settings)
        if gw._state is State.SHUTDOWN:
            return {"state": State.SHUTDOWN.value, "reason": gw.shutdown_reason}
        await gw._db(gw.log.set_meta, META_SHUTDOWN, payload)  # persisted first
        gw.shutdown_reason = message.reason
        gw._set_state(State.SHUTDOWN)
        await gw.alarm("shutdown", f"shut down by the recomputer: {message.reason}")
        await gw._end_boot("shutdown")
        with contextlib.suppress(Exception):
            await gw.power.power_off()
        return {"state": State.SHUTDOWN.value, "reason": message.reason}

    async def _readmit(self, envelope: Envelope, key: VerifyKey) -> dict[str, Any]:
        """Re-admission (after the inspectors' quorum ``readmit_gateway``): lift the
        shutdown, power-cycle the server, back to UPLOAD. The recomputer routes to this
        gateway again only after a fresh upload's BOOT record.

        A Readmit whose nonce was obeyed before is answered and changes nothing (the
        recomputer resending after a lost answer). One that reaches a gateway that is
        not shut down (its Shutdown never arrived) still ends the current boot: the
        inspectors re-admitted it on the condition of a fresh upload.
        """
        gw = self.gw
        message = control.open_readmit(envelope, key, gw.gateway_id)
        was = gw._state
        if was is State.SHUTDOWN:
            control.check_readmit(message, await self._shutdown_nonce())
        elif message.nonce in gw._settings.readmits:
            return {"state": gw._state.value, "readmitted": False,
                    "reason": "this readmit was already obeyed"}
        settings = control.readmitted(gw._settings, message)
        await gw._db(gw.log.update_meta, {META_SETTINGS: canonical(settings)},
                     (META_SHUTDOWN,))  # persisted first, shutdown lifted with it
        gw._settings = settings
        await gw.alarm("readmitted", f"re-admitted by the recomputer: {message.reason}")
        if was is State.SHUTDOWN:
            gw.shutdown_reason = ""
            gw._set_state(State.UPLOAD)
            gw._operate()
            try:
                await gw.boot_shell.power_cycle()
            except IvpError as exc:
                await gw.alarm("server_power", f"server did not come up after re-admission: "
                               f"{exc}")
        elif was is State.SERVING:
            await gw.forced_reboot("re-admitted: a fresh upload is needed")
        return {"state": gw._state.value, "readmitted": True}

    async def _shutdown_nonce(self) -> str | None:
        """The nonce of the persisted Shutdown (None: none, or it does not open)."""
        gw = self.gw
        try:
            stored = await gw._db(gw.log.get_meta, META_SHUTDOWN)
            return None if stored is None else decode(stored, Shutdown).nonce
        except PeerDataError:
            return None

    # --- the inspectors' relayed admin requests -------------------------------------------
    async def admin(self, body: bytes) -> dict[str, Any]:
        """See :meth:`ivp.gateway.core.Gateway.admin`."""
        gw = self.gw
        if gw._state is State.BRICKED or gw.device.bricked:
            gw._check_alive()
        async with self._settings_lock:
            return await self._admin(body)

    async def _admin(self, body: bytes) -> dict[str, Any]:
        gw = self.gw
        now = time.time()
        relayed = control.check_relayed(body, gw.whitelist.policy, gw._settings, now)
        instruction = relayed.request.instruction
        if relayed.duplicate:
            return {"applied": False, "instruction": instruction,
                    "reason": "this request was already applied"}
        result: dict[str, Any] = {"applied": True, "instruction": instruction}
        if isinstance(relayed.args, WhitelistArgs):
            result.update(await self._relayed_whitelist(relayed.args))
        settings = control.apply(gw._settings, relayed, now)
        await gw._db(gw.log.set_meta, META_SETTINGS, canonical(settings))
        gw._settings = settings
        args = relayed.args
        if isinstance(args, EpsilonArgs):
            result.update(epsilon=args.epsilon, model_id=args.model_id, effective="next boot")
        elif isinstance(args, RebootArgs):
            gw.config.reboot_interval = args.interval_s
            result.update(interval_s=args.interval_s, effective="now")
        return result

    async def _relayed_whitelist(self, args: WhitelistArgs) -> dict[str, Any]:
        """Install a relayed whitelist; one not newer than the installed is no change
        (answered, not refused: a relay retried after it was installed)."""
        gw = self.gw
        data = canonical(args.whitelist)
        payload = gw.whitelist.policy.verify(args.whitelist, WHITELIST)
        offered = decode(payload, Whitelist)
        current = gw.whitelist.current
        if current is not None and offered.version <= current.version:
            return {"applied": False, "version": current.version,
                    "reason": f"whitelist version {offered.version} is not above the "
                              f"installed version {current.version}"}
        return await self._install_whitelist(data)

    # --- whitelist installs ---------------------------------------------------------------
    async def install_whitelist(self, body: bytes) -> dict[str, Any]:
        """See :meth:`ivp.gateway.core.Gateway.install_whitelist`."""
        self.gw._check_alive()
        return await self._install_whitelist(body)

    async def _install_whitelist(self, body: bytes) -> dict[str, Any]:
        gw = self.gw
        whitelist = gw.whitelist.update(body)
        await gw._db(gw.log.set_meta, META_WHITELIST, body)
        boot = gw._boot
        if boot is not None and whitelist.manifest(boot.manifest.model_id, boot.manifest.engine,
                                                   boot.manifest.dtype) is None:
            # the inspectors revoked the model being served: stop serving it now
            await gw.alarm("model_revoked", f"{boot.manifest.model_id} left the whitelist "
                           f"(version {whitelist.version}): forced reboot")
            await gw.forced_reboot("model removed from the whitelist")
        return {"version": whitelist.version,
                "models": [m.model_id for m in whitelist.manifests]}


__all__ = ["META_SETTINGS", "META_SHUTDOWN", "META_WHITELIST", "ControlShell"]
