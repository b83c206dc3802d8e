"""Wire messages of ivp, versioned and validated on decode.

Every message is a frozen ``msgspec.Struct`` that rejects unknown fields (a field we
do not understand could carry meaning we would silently drop) and carries ``v``, the
message version. Constraints live on the types, so ``decode`` rejects out-of-range
values with a message naming the field. ``__post_init__`` adds cross-field checks and
runs on construction and on decode alike.

Versions are per message: a message whose shape changed says so in ``v`` and lists
the versions this build decodes in ``VERSIONS`` (a newer one is refused, never read
as an older one). Version 2 of ``BootRecord`` and ``Checkpoint`` adds the device's
monotonic counter, the previous boot's closing state and the pairs whose draw is
pending (docs/ARCHITECTURE.md, "Wire versions").
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta, Struct

from ivp.protocol.envelope import Envelope
from ivp.protocol.keys import PublicKeyText
from ivp.protocol.stops import MAX_STOP_CHARS, MAX_STOPS, REPLACEMENT

VERSION = 1

Hex256 = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
# msgspec cannot express an upper bound above int64 (it raises on *every* decode), so
# the < 2**64 half of a U64 is checked in __post_init__ by the messages that hold one.
U64 = Annotated[int, Meta(ge=0)]
U64_LIMIT = 2**64
I63 = 2**63 - 1  # counters fit a signed 64-bit column (SQLite INTEGER)
Count = Annotated[int, Meta(ge=0, le=I63)]
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Name = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:/@+-]+$")]
Probability = Annotated[float, Meta(gt=0.0, le=1.0)]
# An inference engine a manifest was calibrated for ("reference", "vllm", ...): a name,
# not a closed list, so a whitelist naming a newer engine still decodes everywhere.
EngineName = Annotated[str, Meta(min_length=1, max_length=40, pattern=r"^[a-z0-9][a-z0-9._-]*$")]
REFERENCE_ENGINE = "reference"
FinishReason = Literal["stop", "length"]
# A logged pair may also end "cut": a stream that ended before its finish (the client
# left, the server died, the power went): its tokens are the prefix it had sent, all of
# which are checked by replay like any others. A server never says "cut".
PairFinish = Literal["stop", "length", "cut"]


def _float_fields(cls: type) -> tuple[str, ...]:
    """Names of a struct's float fields (Annotated or plain), computed once per class."""
    cached = _FLOAT_FIELDS.get(cls)
    if cached is None:
        hints = typing.get_type_hints(cls)
        cached = tuple(
            name for name in cls.__struct_fields__  # type: ignore[attr-defined]
            if (typing.get_args(hints[name])[:1] or (hints[name],))[0] is float
        )
        _FLOAT_FIELDS[cls] = cached
    return cached


_FLOAT_FIELDS: dict[type, tuple[str, ...]] = {}


def _coerce_floats(msg: Struct) -> None:
    """Store ints given for float fields as floats.

    Construction does not convert types, but decoding does: without this a message
    built with ``temperature=0`` would encode as ``0`` on one side and ``0.0`` after a
    round trip, and every hash and signature over it would differ.
    """
    for name in _float_fields(type(msg)):
        value = getattr(msg, name)
        if type(value) is int:
            msgspec.structs.force_setattr(msg, name, float(value))


class _Msg(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    v: int = VERSION
    #: the versions of this message that this build decodes
    VERSIONS: ClassVar[tuple[int, ...]] = (VERSION,)

    def __post_init__(self) -> None:
        _coerce_floats(self)
        if self.v not in self.VERSIONS:
            raise ValueError(f"unsupported {type(self).__name__} version {self.v} (this build "
                             f"speaks {', '.join(map(str, self.VERSIONS))})")

    def _only_since(self, version: int, **fields: object) -> None:
        """Refuse fields (given as name=value) set in a version before ``version``."""
        if self.v < version:
            late = sorted(name for name, value in fields.items() if value)
            if late:
                raise ValueError(f"{', '.join(late)} not in {type(self).__name__} version "
                                 f"{self.v}")


# --- inference --------------------------------------------------------------------------
class SamplingParams(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The sampler parameters of sampler spec v1 (see ``protocol.sampler``)."""

    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] = 1.0
    top_k: Annotated[int, Meta(ge=0, le=2**31 - 1)] = 0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    max_tokens: Annotated[int, Meta(ge=1, le=65536)] = 16

    def __post_init__(self) -> None:
        _coerce_floats(self)


class Tag(Struct, frozen=True, forbid_unknown_fields=True):
    """Names one request for its whole life: which gateway, which boot, which pair."""

    gateway_id: Name
    boot_id: Name
    seq: Count


class ServerRequest(_Msg, frozen=True):
    """What the gateway sends its server: token ids in, under a seed the gateway chose."""

    tag: Tag
    prompt_token_ids: list[TokenId]
    params: SamplingParams
    seed: U64
    stream: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if self.seed >= U64_LIMIT:
            raise ValueError("seed must be a 64-bit unsigned integer")


class ServerResponse(_Msg, frozen=True):
    """What the server answers: only the token ids and why it stopped."""

    tag: Tag
    token_ids: list[TokenId]
    finish_reason: FinishReason


class PairRecord(_Msg, frozen=True):
    """One input/output pair, as the gateway logs it (the unit of audit)."""

    tag: Tag
    model_id: Name
    endpoint: Literal["completions", "chat.completions"]
    input: str  # the client's prompt, or its chat messages as JSON: for inspectors
    prompt_token_ids: list[TokenId]
    output_token_ids: list[TokenId]
    output_text: str
    finish_reason: PairFinish
    seed: U64
    params: SamplingParams
    t_request: float
    t_response: float
    # the client's stop strings: the gateway cut the output at the first one
    # (protocol.stops), and the recomputer checks the cut is exactly there
    stop: Annotated[list[Annotated[str, Meta(min_length=1, max_length=MAX_STOP_CHARS)]],
                    Meta(max_length=MAX_STOPS)] = []

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if any(REPLACEMENT in s for s in self.stop):
            raise ValueError("a stop string must not contain U+FFFD")
        if self.seed >= U64_LIMIT:
            raise ValueError("seed must be a 64-bit unsigned integer")
        if len(self.output_token_ids) > self.params.max_tokens:
            raise ValueError("more output tokens than max_tokens")


# --- gateway -> recomputer (all signed by the gateway's device key) ----------------------
class AuditRecord(_Msg, frozen=True):
    """A sampled pair, numbered without gaps per (gateway, boot), tied into the chain.

    ``chain_head == chain.link(chain_prev, pair)``; ``audit_seq`` counts from 1.
    """

    gateway_id: Name
    boot_id: Name
    audit_seq: Annotated[int, Meta(ge=1, le=I63)]
    chain_prev: Hex256
    chain_head: Hex256
    pair: PairRecord
    # the pair's position in its boot's chain, counting from 1 (``chain_head`` is the
    # head after ``chain_pos`` pairs, the one a checkpoint with pairs_served ==
    # chain_pos names); 0: not stated (records from builds before it existed)
    chain_pos: Count = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.pair.tag.gateway_id, self.pair.tag.boot_id) != (self.gateway_id, self.boot_id):
            raise ValueError("pair tag names another gateway or boot")


class BootClose(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How a gateway's previous boot ended, as its own sealed log holds it.

    A BOOT names it, so the recomputer reconciles the old boot against what it
    received (a boot abandoned with records withheld shows), and a gateway whose log
    was deleted or rolled back names another boot, or an older state, than the one
    the recomputer saw last."""

    boot_id: Name
    pairs_served: Count
    audits: Count
    chain_head: Hex256
    counter: Count = 0  # the device counter when the boot was closed


class BootRecord(_Msg, frozen=True, kw_only=True):
    """Sent when a gateway reaches SERVING: which model, under which manifest.

    Version 2 adds ``counter`` (the device's monotonic counter; it only goes up, so
    a BOOT from a restored device state repeats or lowers it) and ``previous``.
    """

    v: int = 2
    VERSIONS: ClassVar[tuple[int, ...]] = (1, 2)
    gateway_id: Name
    boot_id: Name
    model_id: Name
    manifest_digest: Hex256
    epsilon: Probability
    time: float
    url: str = ""  # where the gateway serves INPUT (for routing)
    counter: Count = 0  # v2: the device counter at this BOOT (0: a device without one)
    previous: BootClose | None = None  # v2: the previous boot (None: the first one)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._only_since(2, counter=self.counter, previous=self.previous)


class Checkpoint(_Msg, frozen=True, kw_only=True):
    """Periodic proof of life: how much was served and audited so far this boot.

    Version 2 adds ``counter`` (the device counter: never lower than the BOOT's) and
    ``undecided`` (pairs served whose sampling draw is still pending: the audit-rate
    test counts only pairs already drawn for).
    """

    v: int = 2
    VERSIONS: ClassVar[tuple[int, ...]] = (1, 2)
    gateway_id: Name
    boot_id: Name
    pairs_served: Count
    chain_head: Hex256
    audits: Count  # audit records made so far this boot (= last audit_seq)
    time: float
    counter: Count = 0  # v2
    undecided: Count = 0  # v2: pairs served whose draw has not happened yet

    def __post_init__(self) -> None:
        super().__post_init__()
        self._only_since(2, counter=self.counter, undecided=self.undecided)
        if self.audits + self.undecided > self.pairs_served:
            raise ValueError(f"{self.audits} audits and {self.undecided} pending draws of "
                             f"only {self.pairs_served} pairs")

    @property
    def drawn(self) -> int:
        """Pairs whose sampling draw has happened (what ``audits`` is a sample of)."""
        return self.pairs_served - self.undecided


# --- recomputer -> gateway ---------------------------------------------------------------
class Shutdown(_Msg, frozen=True):
    """Signed by the recomputer: the gateway stops all traffic until re-admitted."""

    gateway_id: Name
    reason: str
    time: float
    nonce: Annotated[str, Meta(min_length=16, max_length=128)]


Nonce = Annotated[str, Meta(min_length=16, max_length=128)]


class Readmit(_Msg, frozen=True):
    """Signed by the recomputer after a quorum ``readmit_gateway``: the gateway lifts
    the shutdown named by ``shutdown_nonce`` (and only that one), power-cycles its
    server and returns to UPLOAD; it is routed again only after a fresh BOOT."""

    gateway_id: Name
    shutdown_nonce: Nonce  # the nonce of the Shutdown this lifts
    reason: Annotated[str, Meta(max_length=1000)]
    time: float
    nonce: Nonce


class GatewayAlarm(_Msg, frozen=True):
    """One of a gateway's own alarms, signed by its device key and uplinked.

    Numbered 1, 2, 3, … per gateway without gaps, across boots and restarts, so the
    recomputer sees a withheld alarm as a gap.
    """

    gateway_id: Name
    seq: Annotated[int, Meta(ge=1, le=I63)]
    kind: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-z0-9_]+$")]
    message: Annotated[str, Meta(max_length=2000)]
    time: float
    boot_id: Name | None = None  # the boot it happened in, if serving


class UplinkCursor(_Msg, frozen=True, kw_only=True):
    """What the recomputer has stored of one gateway (and one of its boots).

    A gateway asks for it (``GET /uplink/cursor``) when it starts and after a
    transport failure, and drops the spooled records the cursor shows were stored
    although their acknowledgement was lost. Unsigned on purpose: a cursor that
    claims more than was stored makes the gateway drop records the recomputer never
    got, which the recomputer sees as a gap anyway.
    """

    v: int = 2
    VERSIONS: ClassVar[tuple[int, ...]] = (1, 2)
    gateway_id: Name
    next_alarm_seq: Annotated[int, Meta(ge=1, le=I63)] = 1  # every alarm below it is stored
    boot_id: Name | None = None
    boot_known: bool = False  # the BOOT record of ``boot_id`` is stored
    next_audit_seq: Annotated[int, Meta(ge=1, le=I63)] = 1  # every audit below it is stored
    checkpoint: Checkpoint | None = None  # the latest stored checkpoint of the boot
    # v2: numbers stored above the gap-free prefix (records that came after a gap)
    audits_above: Annotated[list[Annotated[int, Meta(ge=1, le=I63)]],
                            Meta(max_length=4096)] = []
    alarms_above: Annotated[list[Annotated[int, Meta(ge=1, le=I63)]],
                            Meta(max_length=4096)] = []

    def __post_init__(self) -> None:
        super().__post_init__()
        self._only_since(2, audits_above=self.audits_above, alarms_above=self.alarms_above)


class UplinkResult(Struct, frozen=True, forbid_unknown_fields=True):
    """Outcome for one uplinked envelope. ``ok`` only once it is stored durably."""

    ok: bool
    error: str = ""


class Ack(Struct, frozen=True, forbid_unknown_fields=True):
    """The recomputer's answer to an uplink batch: one result per envelope, in order.

    ``signed`` is the same answer as an ``UplinkAck`` envelope signed by the
    recomputer's device key (``ivp.protocol.acks``): the only part a gateway acts on.
    ``results`` is for people and tools; anyone on the wire can write it.
    """

    results: list[UplinkResult]
    signed: Envelope | None = None


# --- verdicts ------------------------------------------------------------------------------
class Verdict(_Msg, frozen=True):
    gateway_id: Name
    boot_id: Name
    audit_seq: Annotated[int, Meta(ge=1, le=I63)]
    model_id: Name
    passed: bool
    mode: Literal["exact", "tolerant"]
    reason: str
    tokens: Count
    failures: Count
    max_margin: float
    bound: float
    time: float
    # For inspectors (the console's audit explorer and verification health): δ*_t, the
    # smallest noise bound that explains output position t (1e300: none does), the
    # positions that failed, and the tolerance the record was judged at (τ(T) ≤ δ,
    # ivp.verify.tolerance). Empty when no replay ran (a check before replay failed)
    # and in verdicts of builds before they existed.
    position_delta: list[float] = []
    failed_positions: list[Count] = []
    delta: Annotated[float, Meta(ge=0.0)] = 0.0


# --- whitelist -----------------------------------------------------------------------------
class FileEntry(Struct, frozen=True, forbid_unknown_fields=True):
    """One file of a model, in upload order."""

    name: Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._-]+$")]
    role: Literal["config", "tokenizer", "weights"]
    size: Count
    digest: Hex256
    algo: Literal["blake3", "sha256"] = "blake3"


class NoiseBound(Struct, frozen=True, forbid_unknown_fields=True):
    """The calibrated bound δ on honest logit differences, and how it was measured."""

    delta: Annotated[float, Meta(ge=0.0)]
    method: str
    samples: Count = 0

    def __post_init__(self) -> None:
        _coerce_floats(self)


class Manifest(_Msg, frozen=True):
    """Names a model: its files in upload order, total size S, sampler spec, δ.

    A manifest is also a serving profile: ``engine`` and ``dtype`` say what the server
    runs (the engine's compute dtype; the reference engine always computes in float32)
    and ``noise_bound`` is the δ calibrated for exactly that engine and dtype. One
    model may be whitelisted under several profiles (same files, one manifest each);
    the gateway's deployment picks one by (model_id, engine, dtype), and its BOOT
    names that manifest's digest, so the recomputer judges under that δ. Manifests
    from before engines existed decode as the reference engine.
    """

    model_id: Name
    architecture: str
    dtype: str
    files: list[FileEntry]
    total_size: Count
    sampler_spec: Literal["v1"] = "v1"
    noise_bound: NoiseBound | None = None
    engine: EngineName = REFERENCE_ENGINE

    @property
    def profile(self) -> str:
        """"model_id (engine, dtype)", for messages."""
        return f"{self.model_id} ({self.engine}, {self.dtype})"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not any(f.role == "weights" for f in self.files):
            raise ValueError("a manifest needs at least one weights file")
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):
            raise ValueError("file names in a manifest must be unique")
        if sum(f.size for f in self.files) != self.total_size:
            raise ValueError("total_size is not the sum of the file sizes")


class Whitelist(_Msg, frozen=True):
    """The signed list of models a datacenter may serve. Versions only go up."""

    version: Annotated[int, Meta(ge=1)]
    expires: float  # unix time
    manifests: list[Manifest]

    def __post_init__(self) -> None:
        super().__post_init__()
        keys = [(m.model_id, m.engine, m.dtype) for m in self.manifests]
        if len(set(keys)) != len(keys):
            raise ValueError("(model id, engine, dtype) must be unique in a whitelist: one "
                             "manifest per serving profile")

    def manifests_for(self, model_id: str) -> list[Manifest]:
        """Every serving profile of ``model_id``, in whitelist order."""
        return [m for m in self.manifests if m.model_id == model_id]

    def manifest(self, model_id: str, engine: str | None = None,
                 dtype: str | None = None) -> Manifest | None:
        """The manifest of ``model_id`` for ``engine`` and ``dtype`` (None: any; the
        first listed, the reference engine's before others)."""
        found = [m for m in self.manifests_for(model_id)
                 if (engine is None or m.engine == engine) and (dtype is None or m.dtype == dtype)]
        found.sort(key=lambda m: m.engine != REFERENCE_ENGINE)
        return found[0] if found else None


def manifest_digest(manifest: Manifest) -> str:
    """BLAKE3 of the manifest's canonical bytes: what BOOT records name."""
    import blake3

    from ivp.protocol.encoding import canonical

    return blake3.blake3(canonical(manifest)).hexdigest()


__all__ = [
    "REFERENCE_ENGINE",
    "VERSION",
    "Ack",
    "AdminRequest",
    "AuditRecord",
    "BootClose",
    "BootRecord",
    "Checkpoint",
    "EngineName",
    "FileEntry",
    "GatewayAlarm",
    "Manifest",
    "NoiseBound",
    "PairRecord",
    "Readmit",
    "SamplingParams",
    "ServerRequest",
    "ServerResponse",
    "Shutdown",
    "Tag",
    "UplinkCursor",
    "UplinkResult",
    "Verdict",
    "Whitelist",
    "manifest_digest",
]


# --- admin (signed by inspectors under the quorum policy) ---------------------------------
ADMIN_MAX_VALIDITY = 7 * 86400.0  # seconds an admin request may be valid for, at most
#: Instructions the recomputer relays, inspector-signed as received, to every gateway,
#: which checks the quorum itself and applies them.
RELAYED_INSTRUCTIONS: tuple[str, ...] = ("set_epsilon", "reboot_schedule", "whitelist_update")

AdminInstruction = Literal[
    "enrol_device",  # args: {"device_id", "public_key", "kind": "gateway"|"sensor", "url"?}
    "whitelist_update",  # args: {"whitelist": <envelope as dict>}
    "set_epsilon",  # args: {"epsilon"}
    "reboot_schedule",  # args: {"interval_s"}
    "ack_alarm",  # args: {"alarm_id"}
    "readmit_gateway",  # args: {"gateway_id"}
    "rotate_key",  # args: {"device_id", "public_key"}
    "accept_store",  # args: {"device_counter", "note"?}: re-accept a set-back store
]


class AdminRequest(_Msg, frozen=True):
    """ADMIN_REQUEST of the note: one instruction from a closed list, used once."""

    instruction: AdminInstruction
    args: dict[str, Any]
    nonce: Annotated[str, Meta(min_length=16, max_length=128)]
    expires: float


# --- admin arguments: one exact shape per instruction (unknown fields refused) -------------
# Shared by the recomputer (which decides every request) and the gateways (which apply
# the relayed ε, reboot schedule and whitelist instructions themselves).
class AdminArgs(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class EnrolArgs(AdminArgs, frozen=True):
    device_id: Name
    public_key: PublicKeyText
    kind: Literal["gateway", "sensor"] = "gateway"
    url: Annotated[str, Meta(max_length=2000)] = ""


class WhitelistArgs(AdminArgs, frozen=True):
    whitelist: Envelope  # a signed whitelist envelope


class EpsilonArgs(AdminArgs, frozen=True):
    epsilon: Annotated[float, Meta(gt=0.0, le=1.0)]
    model_id: Name | None = None


class RebootArgs(AdminArgs, frozen=True):
    interval_s: Annotated[float, Meta(gt=0.0)]


class AckAlarmArgs(AdminArgs, frozen=True):
    alarm_id: Annotated[int, Meta(ge=1)]
    note: Annotated[str, Meta(max_length=2000)] = ""


class ReadmitArgs(AdminArgs, frozen=True):
    gateway_id: Name


class RotateKeyArgs(AdminArgs, frozen=True):
    device_id: Name
    public_key: PublicKeyText


class AcceptStoreArgs(AdminArgs, frozen=True):
    """Re-accept the recomputer's store as it now stands after ``store_rolled_back``.

    ``device_counter`` is the device counter the alarm names: the counter only goes up
    and every acceptance advances it, so a request signed for an earlier rollback can
    never accept a later one."""

    device_counter: Annotated[int, Meta(ge=0)]
    note: Annotated[str, Meta(max_length=2000)] = ""


ADMIN_ARGS: dict[str, type[AdminArgs]] = {
    "enrol_device": EnrolArgs,
    "whitelist_update": WhitelistArgs,
    "set_epsilon": EpsilonArgs,
    "reboot_schedule": RebootArgs,
    "ack_alarm": AckAlarmArgs,
    "readmit_gateway": ReadmitArgs,
    "rotate_key": RotateKeyArgs,
    "accept_store": AcceptStoreArgs,
}

__all__ += [
    "ADMIN_ARGS", "ADMIN_MAX_VALIDITY", "RELAYED_INSTRUCTIONS", "AcceptStoreArgs",
    "AckAlarmArgs", "AdminArgs",
    "AdminInstruction", "EnrolArgs", "EpsilonArgs", "ReadmitArgs", "RebootArgs", "RotateKeyArgs",
    "WhitelistArgs",
]
