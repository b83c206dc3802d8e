"""The control shell: what a gateway obeys from outside its data path — Shutdown and
Readmit from the recomputer, the inspectors' relayed admin requests, whitelist
installs — and the persisted state they leave (sealed meta in the log).

Every check is a pure function of ``control`` (or ``TrustedWhitelist``) over the bytes
as received; this module runs them, persists what they accept *before* acting on it
(a crash never leaves an obeyed instruction unrecorded), and moves the gateway's mode.
Every refusal leaves the settings, the whitelist and the mode as they were. At start
it restores what was persisted, so a restart with other flags or an older whitelist
file undoes nothing the inspectors or the recomputer decided.

What the gateway did with a Shutdown, a Readmit or a Relay is answered with a
``ControlReceipt`` signed by its device key (``receipt`` in the answer): the
recomputer counts a control message as delivered only on that, so an operator who
answers ``POST /control`` with a 200 of its own delivers nothing. A gateway whose log
was set back shuts itself down (:meth:`ControlShell.lock_down`) until the recomputer's
own Shutdown and the inspectors' Readmit bring it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from ivp.errors import IvpError, PeerDataError, SignatureError, ValidationError
from ivp.gateway import control, rollback
from ivp.gateway.shared import State
from ivp.protocol.acks import LOCAL_NONCE, ControlReceipt, Heartbeat, digest_of
from ivp.protocol.encoding import canonical, decode, to_builtins
from ivp.protocol.envelope import (
    HEARTBEAT,
    READMIT,
    RECEIPT,
    RELAY,
    WHITELIST,
    Envelope,
    sign_message,
)
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

    # --- the log against the device counter, heartbeats -----------------------------------
    async def counter_check(self) -> rollback.CounterCheck:
        """The log's bound counter against the device's (``rollback``), before any
        commit of this start; a counter that does not open counts as a set-back log."""
        gw = self.gw
        try:
            bound = await gw._db(gw.log.bound_counter)
            history = await gw._db(gw.log.has_history)
            check = rollback.judge(bound, gw.device.counter(), history)
        except PeerDataError as exc:
            await gw.alarm("log_corrupt", f"the log's or the device's counter does not "
                             f"open: {exc}")
            return rollback.CounterCheck("rolled_back", None, 0)
        if check.verdict == "interrupted":
            await gw.alarm("commit_interrupted", check.explain())
        return check

    async def heartbeat(self) -> None:
        """Spool a signed heartbeat: alive but not serving (UPLOAD, SHUTDOWN), so a
        gateway that goes silent after a shutdown is an alarm at the recomputer."""
        gw = self.gw
        if gw._state in (State.SERVING, State.BRICKED) or gw.device.bricked:
            return
        nonce = await self.shutdown_nonce() if \
            gw._state is State.SHUTDOWN else None

        def sign(counter: int) -> bytes:
            return gw._sign(HEARTBEAT, Heartbeat(
                gateway_id=gw.gateway_id, state=gw._state.value, time=time.time(),
                counter=counter, shutdown_nonce=nonce or "",
                reason=gw.shutdown_reason[:500]))

        await gw._db(gw.log.heartbeat, sign)
        gw._wake_uplink()

    # --- receipts and the gateway's own lockdown ------------------------------------------
    def receipt(self, kind: str, data: bytes, ref: str, outcome: str,
                detail: str = "") -> dict[str, Any]:
        """A ``ControlReceipt`` for the message ``data`` as delivered, signed by the
        device key (what the recomputer counts as delivery)."""
        gw = self.gw
        message = ControlReceipt(gateway_id=gw.gateway_id, kind=kind,  # type: ignore[arg-type]
                                 digest=digest_of(data), ref=ref[:128],
                                 outcome=outcome,  # type: ignore[arg-type]
                                 state=gw._state.value, time=time.time(),
                                 detail=detail[:500], counter=gw.device.counter())
        return to_builtins(sign_message(RECEIPT, message, gw.device.signer()))

    async def lock_down(self, reason: str) -> None:
        """The log was set back (``rollback``): refuse all traffic from now on, across
        restarts, until the recomputer's Shutdown and a Readmit replace this one.

        The lockdown is a Shutdown the gateway records itself (its nonce starts with
        ``local-``); its heartbeats say so, and the recomputer answers with a Shutdown of
        its own, which replaces it (the inspectors' Readmit then names that one).
        """
        gw = self.gw
        own = Shutdown(gateway_id=gw.gateway_id, reason=reason[:1000], time=time.time(),
                       nonce=LOCAL_NONCE + gw.device.random(12).hex())
        await gw._db(gw.log.set_meta, META_SHUTDOWN, canonical(own))  # binds the counter
        gw.shutdown_reason = own.reason
        gw._set_state(State.SHUTDOWN)
        await gw.alarm("log_rollback", reason)

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
                result, nonce = await self._readmit(envelope, gw.recomputer_key)
            outcome = "applied" if result.get("readmitted") else "duplicate"
            return {**result, "receipt": self.receipt("readmit", body, nonce, outcome)}
        message, payload = control.open_shutdown(envelope, gw.recomputer_key,
                                                 gw.gateway_id, gw._settings)
        if gw._state is State.SHUTDOWN:
            current = await self._shutdown_message()
            if current is None or current.nonce == message.nonce or not (
                    current.nonce.startswith(LOCAL_NONCE) or message.time > current.time):
                return {"state": State.SHUTDOWN.value, "reason": gw.shutdown_reason,
                        "receipt": self.receipt("shutdown", body, message.nonce,
                                                "duplicate")}
            # the recomputer's own order replaces a lockdown, or an older order
            await gw._db(gw.log.set_meta, META_SHUTDOWN, payload)
            gw.shutdown_reason = message.reason
            await gw.heartbeat()
            return {"state": State.SHUTDOWN.value, "reason": message.reason,
                    "receipt": self.receipt("shutdown", body, message.nonce, "applied")}
        await gw._db(gw.log.set_meta, META_SHUTDOWN, payload)  # persisted first
        gw.shutdown_reason = message.reason
        gw._set_state(State.SHUTDOWN)
        await gw.alarm("shutdown", f"shut down by the recomputer: {message.reason}")
        await gw._end_boot("shutdown")
        with contextlib.suppress(Exception):
            await gw.power.power_off()
        await gw.heartbeat()
        return {"state": State.SHUTDOWN.value, "reason": message.reason,
                "receipt": self.receipt("shutdown", body, message.nonce, "applied")}

    async def _readmit(self, envelope: Envelope, key: VerifyKey
                       ) -> tuple[dict[str, Any], str]:
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
            control.check_readmit(message, await self.shutdown_nonce())
        elif message.nonce in gw._settings.readmits:
            return {"state": gw._state.value, "readmitted": False,
                    "reason": "this readmit was already obeyed"}, message.nonce
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
        await gw.heartbeat()  # replaces an unsent heartbeat that still says "shutdown"
        return {"state": gw._state.value, "readmitted": True}, message.nonce

    async def _shutdown_message(self) -> Shutdown | None:
        """The persisted Shutdown (None: none, or it does not open)."""
        gw = self.gw
        try:
            stored = await gw._db(gw.log.get_meta, META_SHUTDOWN)
            return None if stored is None else decode(stored, Shutdown)
        except PeerDataError:
            return None

    async def shutdown_nonce(self) -> str | None:
        """The nonce of the persisted Shutdown (None: none, or it does not open)."""
        message = await self._shutdown_message()
        return None if message is None else message.nonce

    # --- the inspectors' relayed admin requests -------------------------------------------
    async def admin(self, body: bytes) -> dict[str, Any]:
        """See :meth:`ivp.gateway.core.Gateway.admin`."""
        gw = self.gw
        if gw._state is State.BRICKED or gw.device.bricked:
            gw._check_alive()
        if gw.recomputer_key is None:
            raise SignatureError("no recomputer key configured: relayed requests refused")
        if Envelope.from_bytes(body).payloadType != RELAY:
            raise ValidationError("relayed instructions must come inside a numbered Relay "
                                  "signed by the recomputer (payload type "
                                  f"{RELAY!r}), not as a bare admin request")
        async with self._settings_lock:
            try:
                relay = control.open_relay(body, gw.recomputer_key, gw.gateway_id,
                                           gw._settings)
            except control.StaleRelayError as exc:  # a resend after a lost answer: answered
                return {"applied": False, "reason": str(exc),
                        "receipt": self.receipt("relay", body, "", "duplicate", str(exc))}
            ref = str(relay.relay_seq)
            try:
                result = await self._admin(canonical(relay.request), relay)
            except IvpError as exc:  # refused: the number is used, nothing else changes
                gw._settings = control.relayed(gw._settings, relay)
                await gw._db(gw.log.set_meta, META_SETTINGS, canonical(gw._settings))
                why = f"{type(exc).__name__}: {exc}"
                return {"applied": False, "instruction": relay.instruction, "reason": why,
                        "receipt": self.receipt("relay", body, ref, "refused", why)}
            outcome = "applied" if result.get("applied") else "duplicate"
            return {**result, "relay_seq": relay.relay_seq,
                    "receipt": self.receipt("relay", body, ref, outcome)}

    async def _admin(self, body: bytes, relay: Any) -> dict[str, Any]:
        gw = self.gw
        now = time.time()
        relayed = control.check_relayed(body, gw.whitelist.policy, gw._settings, now)
        instruction = relayed.request.instruction
        if relayed.duplicate:
            gw._settings = control.relayed(gw._settings, relay)
            await gw._db(gw.log.set_meta, META_SETTINGS, canonical(gw._settings))
            return {"applied": False, "instruction": instruction,
                    "reason": "this request was already applied"}
        result: dict[str, Any] = {"applied": True, "instruction": instruction}
        if isinstance(relayed.args, WhitelistArgs):
            result.update(await self._relayed_whitelist(relayed.args))
        settings = control.relayed(control.apply(gw._settings, relayed, now), relay)
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
