"""What a gateway obeys from outside its data path, as pure checks (no I/O, no clock).

Three kinds of message reach a gateway other than inference and weights:

* ``Shutdown`` (``POST /control``), signed by the recomputer's device key: stop all
  traffic until re-admitted.
* ``Readmit`` (``POST /control``), signed by the recomputer's device key after the
  inspectors' quorum ``readmit_gateway``: lift exactly the shutdown it names.
* relayed admin requests (``POST /admin``): the inspectors' own quorum-signed
  ``set_epsilon``, ``reboot_schedule`` and ``whitelist_update`` envelopes, which the
  recomputer forwards unchanged inside a ``Relay`` it signs and numbers per gateway.
  The gateway checks the inspectors' quorum itself (it holds the same policy), so a
  recomputer — or an operator posing as one — cannot change a gateway's ε, reboot
  schedule or whitelist on its own; and it applies relays strictly in their number's
  order, so an old instruction delivered after a newer one (the operator holding one
  back) is refused as stale, never applied over it.

:class:`Settings` is what the inspectors set, as the gateway persists it (sealed meta):
it overrides the CLI flags, so an operator cannot undo an instruction by restarting
the gateway with other flags. Each function below names the attack its checks block;
every refusal leaves the settings as they were.
"""

from __future__ import annotations

import blake3
import msgspec

from ivp.errors import ChainError, ExpiredError, SignatureError, StateError, ValidationError
from ivp.protocol.acks import Relay
from ivp.protocol.encoding import convert, decode
from ivp.protocol.envelope import ADMIN, READMIT, RELAY, SHUTDOWN, Envelope, open_signed
from ivp.protocol.keys import VerifyKey
from ivp.protocol.messages import (
    ADMIN_ARGS,
    ADMIN_MAX_VALIDITY,
    RELAYED_INSTRUCTIONS,
    AdminArgs,
    AdminRequest,
    EpsilonArgs,
    Readmit,
    RebootArgs,
    Shutdown,
)
from ivp.protocol.quorum import QuorumPolicy

#: The admin instructions a gateway applies itself (the rest concern the recomputer).
RELAYED: tuple[str, ...] = RELAYED_INSTRUCTIONS
MAX_READMITS_KEPT = 256


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The inspectors' settings as this gateway applies them (None: the CLI's value).

    Attributes:
        epsilon: ε for every model without its own (from the next BOOT on).
        model_epsilon: ε per model_id.
        reboot_interval: forced reboot period in seconds (applied at once).
        used: nonce → (expiry, BLAKE3 of the request) of every relayed request
            applied, until it expires (a replay is answered as a duplicate, changing
            nothing; an expired request is refused anyway).
        readmits: nonces of the Readmit messages obeyed (the newest few).
        lifted: nonces of the Shutdowns those Readmits lifted (a replayed lifted
            Shutdown is refused).
        relay_seq: the number of the last relay handled; the next must be one more.
    """

    epsilon: float | None = None
    model_epsilon: dict[str, float] = {}
    reboot_interval: float | None = None
    used: dict[str, tuple[float, str]] = {}
    readmits: list[str] = []
    lifted: list[str] = []
    relay_seq: int = 0  # the last relay number handled (applied or refused)

    def epsilon_for(self, model_id: str, default: float) -> float:
        """The ε a BOOT of ``model_id`` declares (the recomputer expects the same)."""
        if model_id in self.model_epsilon:
            return self.model_epsilon[model_id]
        return default if self.epsilon is None else self.epsilon


class Relayed(msgspec.Struct, frozen=True):
    """A relayed admin request that passed every check."""

    request: AdminRequest
    args: AdminArgs
    digest: str  # BLAKE3 of the request bytes as received
    duplicate: bool  # already applied (same nonce, same bytes): answer, change nothing


def open_shutdown(envelope: Envelope, key: VerifyKey, gateway_id: str,
                  settings: Settings) -> tuple[Shutdown, bytes]:
    """The Shutdown in ``envelope`` and its payload bytes as received.

    Raises:
        ValidationError: wrong payload type or a malformed Shutdown.
        SignatureError: not signed by the recomputer key (blocks an operator or a peer
            forging a shutdown), or meant for another gateway (blocks replaying one
            gateway's shutdown against another).
        ChainError: a Shutdown a Readmit already lifted (blocks the operator replaying
            it to shut a re-admitted gateway down behind the recomputer's back).
    """
    payload = open_signed(envelope, SHUTDOWN, key)
    message = decode(payload, Shutdown)
    if message.gateway_id != gateway_id:
        raise SignatureError(f"shutdown is for gateway {message.gateway_id!r}, not "
                             f"{gateway_id!r}")
    if message.nonce in settings.lifted:
        raise ChainError(f"shutdown {message.nonce!r} was already lifted by a readmit "
                         "(replayed): refused")
    return message, payload


def open_readmit(envelope: Envelope, key: VerifyKey, gateway_id: str) -> Readmit:
    """The Readmit in ``envelope``.

    Raises:
        ValidationError: wrong payload type or a malformed Readmit.
        SignatureError: not signed by the recomputer key (blocks the operator lifting a
            shutdown itself), or meant for another gateway.
    """
    payload = open_signed(envelope, READMIT, key)
    message = decode(payload, Readmit)
    if message.gateway_id != gateway_id:
        raise SignatureError(f"readmit is for gateway {message.gateway_id!r}, not "
                             f"{gateway_id!r}")
    return message


def check_readmit(message: Readmit, shutdown_nonce: str | None) -> None:
    """A Readmit lifts only the shutdown it names.

    Raises:
        ChainError: the gateway is shut down by another Shutdown than the one the
            Readmit names (blocks replaying an old Readmit, captured after an earlier
            re-admission, to lift a later shutdown).
    """
    if message.shutdown_nonce != shutdown_nonce:
        raise ChainError(f"readmit lifts shutdown {message.shutdown_nonce!r}, but the shutdown "
                         f"in force is {shutdown_nonce!r}: refused")


def open_relay(data: bytes, key: VerifyKey, gateway_id: str, settings: Settings) -> Relay:
    """The recomputer's numbered relay in ``data``, in order.

    Raises:
        ValidationError: not a relay envelope, or a malformed one.
        SignatureError: not signed by the recomputer key, or for another gateway (blocks
            the operator delivering inspectors' requests on its own, in an order of its
            choosing).
        StaleRelayError: a relay number already handled (a replay, or an old
            instruction held back and delivered after a newer one): nothing applies.
        RelayGapError: a number beyond the next (an earlier relay has not arrived yet:
            the recomputer delivers in order and retries).
    """
    payload = open_signed(Envelope.from_bytes(data), RELAY, key)
    relay = decode(payload, Relay)
    if relay.gateway_id != gateway_id:
        raise SignatureError(f"relay is for gateway {relay.gateway_id!r}, not {gateway_id!r}")
    if relay.relay_seq <= settings.relay_seq:
        raise StaleRelayError(f"relay {relay.relay_seq} (admin log {relay.admin_seq}) was "
                              f"handled already or is older than relay {settings.relay_seq}")
    if relay.relay_seq != settings.relay_seq + 1:
        raise RelayGapError(f"relay {relay.relay_seq} before relay {settings.relay_seq + 1}: "
                            "relays apply in order")
    return relay


class StaleRelayError(ChainError):
    """A relay number already handled: replayed, or older than one applied."""


class RelayGapError(StateError):
    """A relay ahead of the next expected one (HTTP 409: deliver the earlier first)."""


def relayed(settings: Settings, relay: Relay) -> Settings:
    """The settings after handling ``relay`` (applied or refused: its number is used)."""
    return msgspec.structs.replace(settings, relay_seq=relay.relay_seq)


def check_relayed(data: bytes, policy: QuorumPolicy, settings: Settings,
                  now: float) -> Relayed:
    """Check a relayed admin request on the bytes as received, in this order.

    Raises:
        ValidationError: not an admin envelope (a quorum signature over another
            document type never counts as an instruction), a malformed request, an
            instruction a gateway does not apply, or arguments of the wrong shape.
        QuorumError: too few valid inspector signatures or a required party missing
            (blocks the recomputer, or the operator, changing the gateway's ε, reboot
            schedule or whitelist without the inspectors).
        ExpiredError: expired, or valid for longer than requests may be (blocks a
            request captured now and delivered much later).
        ChainError: the nonce was used by another request (two requests must never
            share a nonce).
    """
    envelope = Envelope.from_bytes(data)
    payload = policy.verify(envelope, ADMIN)
    request = decode(payload, AdminRequest)
    if request.instruction not in RELAYED:
        raise ValidationError(f"instruction {request.instruction!r} is not one a gateway "
                              f"applies ({', '.join(RELAYED)})")
    if request.expires <= now:
        raise ExpiredError(f"request expired {now - request.expires:.0f} s ago")
    if request.expires - now > ADMIN_MAX_VALIDITY:
        raise ExpiredError(f"request valid for {request.expires - now:.0f} s; at most "
                           f"{ADMIN_MAX_VALIDITY:.0f} s allowed")
    digest = blake3.blake3(data).hexdigest()
    used = settings.used.get(request.nonce)
    if used is not None and used[1] != digest:
        raise ChainError(f"nonce {request.nonce!r} was already used by another request")
    args = convert(request.args, ADMIN_ARGS[request.instruction])
    return Relayed(request, args, digest, duplicate=used is not None)


def apply(settings: Settings, relayed: Relayed, now: float) -> Settings:
    """The settings after ``relayed`` (whose whitelist, if any, the caller installs).

    Used nonces that expired are forgotten: a replay of such a request is refused as
    expired before its nonce is looked at.
    """
    used = {n: v for n, v in settings.used.items() if v[0] > now}
    used[relayed.request.nonce] = (relayed.request.expires, relayed.digest)
    args = relayed.args
    if isinstance(args, EpsilonArgs):
        if args.model_id is None:
            return msgspec.structs.replace(settings, epsilon=args.epsilon, used=used)
        per_model = {**settings.model_epsilon, args.model_id: args.epsilon}
        return msgspec.structs.replace(settings, model_epsilon=per_model, used=used)
    if isinstance(args, RebootArgs):
        return msgspec.structs.replace(settings, reboot_interval=args.interval_s, used=used)
    return msgspec.structs.replace(settings, used=used)


def readmitted(settings: Settings, message: Readmit) -> Settings:
    """The settings after obeying ``message`` (its nonce remembered)."""
    kept = [*settings.readmits, message.nonce][-MAX_READMITS_KEPT:]
    lifted = [*settings.lifted, message.shutdown_nonce][-MAX_READMITS_KEPT:]
    return msgspec.structs.replace(settings, readmits=kept, lifted=lifted)


__all__ = ["RELAYED", "RelayGapError", "Relayed", "Settings", "StaleRelayError", "apply",
           "check_readmit", "check_relayed", "open_readmit", "open_relay", "open_shutdown",
           "readmitted", "relayed"]
