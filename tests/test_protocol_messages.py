"""Canonical encoding and wire-message validation (ivp.protocol.encoding / messages).

Policy under test: every wire message rejects unknown fields, any version but 1, and
out-of-range values, always with ValidationError naming what was wrong; nothing a peer
sends can make ``decode`` raise anything else.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivp.errors import ValidationError
from ivp.protocol.acks import (
    NO_DIGEST,
    ControlReceipt,
    Heartbeat,
    Relay,
    UplinkAck,
    UplinkReceipt,
)
from ivp.protocol.encoding import canonical, convert, decode, to_builtins
from ivp.protocol.envelope import Envelope, Signature
from ivp.protocol.messages import (
    Ack,
    AdminRequest,
    AuditRecord,
    BootClose,
    BootRecord,
    Checkpoint,
    FileEntry,
    Manifest,
    NoiseBound,
    PairRecord,
    SamplingParams,
    ServerRequest,
    ServerResponse,
    Shutdown,
    Tag,
    UplinkCursor,
    UplinkResult,
    Verdict,
    Whitelist,
    manifest_digest,
)
from ivp.protocol.quorum import InspectorKey, QuorumPolicy

H = "ab" * 32  # a valid Hex256
TAG = Tag(gateway_id="gw-1", boot_id="boot-7", seq=3)
PARAMS = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, max_tokens=8)


def pair(**kw: Any) -> PairRecord:
    fields: dict[str, Any] = dict(
        tag=TAG, model_id="tiny-llama", endpoint="completions", input="Hello",
        prompt_token_ids=[1, 2, 3], output_token_ids=[4, 5], output_text="ab",
        finish_reason="stop", seed=2**64 - 1, params=PARAMS, t_request=1.5, t_response=2.5,
    )
    fields.update(kw)
    return PairRecord(**fields)


def manifest(model_id: str = "tiny-llama") -> Manifest:
    return Manifest(
        model_id=model_id, architecture="LlamaForCausalLM", dtype="float32",
        files=[
            FileEntry(name="config.json", role="config", size=10, digest=H),
            FileEntry(name="tokenizer.json", role="tokenizer", size=20, digest=H, algo="sha256"),
            FileEntry(name="model.safetensors", role="weights", size=30, digest=H),
        ],
        total_size=60, noise_bound=NoiseBound(delta=0.01, method="batch sweep", samples=64),
    )


SAMPLES: list[msgspec.Struct] = [
    TAG,
    PARAMS,
    ServerRequest(tag=TAG, prompt_token_ids=[1, 2], params=PARAMS, seed=12345),
    ServerResponse(tag=TAG, token_ids=[7, 8, 2], finish_reason="length"),
    pair(),
    AuditRecord(gateway_id="gw-1", boot_id="boot-7", audit_seq=1, chain_prev=H,
                chain_head="cd" * 32, pair=pair()),
    BootRecord(gateway_id="gw-1", boot_id="boot-7", model_id="tiny-llama",
               manifest_digest=H, epsilon=0.2, time=1.0, url="http://127.0.0.1:8001"),
    Checkpoint(gateway_id="gw-1", boot_id="boot-7", pairs_served=10, chain_head=H, audits=2,
               time=3.25),
    Shutdown(gateway_id="gw-1", reason="audit failed", time=4.0, nonce="0123456789abcdef"),
    Ack(results=[UplinkResult(ok=True), UplinkResult(ok=False, error="sequence gap")]),
    Verdict(gateway_id="gw-1", boot_id="boot-7", audit_seq=1, model_id="tiny-llama",
            passed=False, mode="exact", reason="1 of 2 tokens", tokens=2, failures=1,
            max_margin=0.5, bound=0.0, time=5.0),
    FileEntry(name="a.safetensors", role="weights", size=1, digest=H),
    manifest(),
    Whitelist(version=3, expires=2e9, manifests=[manifest("a"), manifest("b")]),
    AdminRequest(instruction="set_epsilon", args={"epsilon": 0.1}, nonce="n" * 16,
                 expires=2e9),
    # version 2 and the signed answers (ivp.protocol.acks)
    BootRecord(gateway_id="gw-1", boot_id="boot-8", model_id="tiny-llama",
               manifest_digest=H, epsilon=0.2, time=6.0, counter=41,
               previous=BootClose(boot_id="boot-7", pairs_served=10, audits=2, chain_head=H,
                                  counter=40)),
    UplinkCursor(gateway_id="gw-1", boot_id="boot-7", boot_known=True, next_audit_seq=3,
                 audits_above=[5, 6], alarms_above=[9]),
    UplinkAck(gateway_id="gw-1", time=7.0, results=[
        UplinkReceipt(digest=H, status="stored", kind="audit", boot_id="boot-7", n=3),
        UplinkReceipt(digest=NO_DIGEST, status="retry", error="SignatureError: unenrolled")]),
    Relay(gateway_id="gw-1", relay_seq=2, admin_seq=17, instruction="set_epsilon",
          request=Envelope(payloadType="t", payload="", signatures=[])),
    ControlReceipt(gateway_id="gw-1", kind="shutdown", digest=H, ref="n" * 16,
                   outcome="applied", state="shutdown", time=8.0, counter=42),
    Heartbeat(gateway_id="gw-1", state="shutdown", time=9.0, counter=43,
              shutdown_nonce="n" * 16),
]


def test_canonical_is_sorted_compact_json() -> None:
    assert canonical({"b": 1, "a": [1, {"d": 2, "c": None}]}) == (
        b'{"a":[1,{"c":null,"d":2}],"b":1}'
    )
    assert canonical(TAG) == b'{"boot_id":"boot-7","gateway_id":"gw-1","seq":3}'
    assert canonical({"x": "é\n"}) == '{"x":"é\\n"}'.encode()  # UTF-8, escapes only controls


def test_canonical_ignores_dict_insertion_order() -> None:
    a = AdminRequest(instruction="set_epsilon", args={"x": 1, "y": 2}, nonce="n" * 16,
                     expires=1.0)
    b = AdminRequest(instruction="set_epsilon", args={"y": 2, "x": 1}, nonce="n" * 16,
                     expires=1.0)
    assert canonical(a) == canonical(b)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: msgspec.Struct) -> None:
    data = canonical(msg)
    back = decode(data, type(msg))
    assert back == msg
    assert canonical(back) == data  # stable: re-encoding gives the same bytes
    assert decode(data.decode(), type(msg)) == msg  # str input too
    assert convert(to_builtins(msg), type(msg)) == msg
    # non-canonical input (whitespace, other key order) decodes to the same message
    pretty = json.dumps(json.loads(data), indent=2, sort_keys=False)[::1]
    assert decode(pretty.encode(), type(msg)) == msg


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_unknown_field_rejected(msg: msgspec.Struct) -> None:
    obj = json.loads(canonical(msg))
    obj["surprise"] = 1
    with pytest.raises(ValidationError, match="surprise"):
        decode(json.dumps(obj).encode(), type(msg))
    with pytest.raises(ValidationError, match="surprise"):
        convert(obj, type(msg))


def test_unknown_nested_field_rejected() -> None:
    obj = json.loads(canonical(SAMPLES[2]))
    obj["params"]["logit_bias"] = {"1": 5}
    with pytest.raises(ValidationError, match="logit_bias"):
        decode(json.dumps(obj).encode(), ServerRequest)
    obj = json.loads(canonical(pair()))
    obj["tag"]["extra"] = 0
    with pytest.raises(ValidationError, match="extra"):
        decode(json.dumps(obj).encode(), PairRecord)


VERSIONED = [m for m in SAMPLES if "v" in msgspec.structs.asdict(m)]


def test_all_top_level_messages_are_versioned() -> None:
    names = {type(m).__name__ for m in VERSIONED}
    assert {"ServerRequest", "ServerResponse", "PairRecord", "AuditRecord", "BootRecord",
            "Checkpoint", "Shutdown", "Verdict", "Manifest", "Whitelist",
            "AdminRequest"} <= names


@pytest.mark.parametrize("msg", VERSIONED, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("v", [0, "next", -1, 10**6])
def test_wrong_version_rejected(msg: msgspec.Struct, v: Any) -> None:
    obj = json.loads(canonical(msg))
    obj["v"] = max(type(msg).VERSIONS) + 1 if v == "next" else v  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match="version"):
        decode(json.dumps(obj).encode(), type(msg))


@pytest.mark.parametrize("msg", VERSIONED, ids=lambda m: type(m).__name__)
def test_missing_version_means_the_current_one(msg: msgspec.Struct) -> None:
    obj = json.loads(canonical(msg))
    del obj["v"]
    assert decode(json.dumps(obj).encode(), type(msg)) == msg


def test_version_1_boot_and_checkpoint_still_decode_without_the_new_fields() -> None:
    """A v1 record (before the monotonic counter) reads as v1; one that carries a
    field v1 does not have is refused (it would be a v2 record mislabelled)."""
    boot = json.loads(canonical(SAMPLES[6]))
    boot["v"] = 1
    assert decode(json.dumps(boot).encode(), BootRecord).v == 1
    boot["counter"] = 5
    with pytest.raises(ValidationError, match="counter not in BootRecord version 1"):
        decode(json.dumps(boot).encode(), BootRecord)
    cp = json.loads(canonical(SAMPLES[7]))
    cp["v"] = 1
    assert decode(json.dumps(cp).encode(), Checkpoint).drawn == 10
    cp["undecided"] = 1
    with pytest.raises(ValidationError, match="undecided not in Checkpoint version 1"):
        decode(json.dumps(cp).encode(), Checkpoint)


def test_checkpoint_pending_draws_are_bounded_by_pairs() -> None:
    with pytest.raises(ValueError, match="2 audits and 9 pending draws of only 10 pairs"):
        Checkpoint(gateway_id="g", boot_id="b", pairs_served=10, chain_head=H, audits=2,
                   time=1.0, undecided=9)
    cp = Checkpoint(gateway_id="g", boot_id="b", pairs_served=10, chain_head=H, audits=2,
                    time=1.0, undecided=3, counter=7)
    assert cp.drawn == 7


def _with(msg: msgspec.Struct, path: str, value: Any) -> bytes:
    obj = json.loads(canonical(msg))
    *parents, last = path.split(".")
    target = obj
    for p in parents:
        target = target[int(p)] if p.isdigit() else target[p]
    if value is _DELETE:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return json.dumps(obj).encode()


_DELETE = object()

BAD: list[tuple[msgspec.Struct, str, Any, str]] = [
    # (message, field path, bad value, text the error must contain)
    (PARAMS, "temperature", -0.1, "temperature"),
    (PARAMS, "temperature", 100.5, "temperature"),
    (PARAMS, "temperature", "hot", "temperature"),
    (PARAMS, "top_k", -1, "top_k"),
    (PARAMS, "top_k", 1.5, "top_k"),
    (PARAMS, "top_p", 0.0, "top_p"),
    (PARAMS, "top_p", 1.01, "top_p"),
    (PARAMS, "max_tokens", 0, "max_tokens"),
    (PARAMS, "max_tokens", 65537, "max_tokens"),
    (TAG, "seq", -1, "seq"),
    (TAG, "gateway_id", "", "gateway_id"),
    (TAG, "gateway_id", "gw 1", "gateway_id"),
    (TAG, "gateway_id", "g\u0000w", "gateway_id"),
    (TAG, "boot_id", "x" * 201, "boot_id"),
    (TAG, "boot_id", _DELETE, "boot_id"),
    (SAMPLES[2], "seed", 2**64, "seed"),
    (SAMPLES[2], "seed", -1, "seed"),
    (SAMPLES[2], "prompt_token_ids", [], "prompt_token_ids"),
    (SAMPLES[2], "prompt_token_ids", [1, -2], "prompt_token_ids"),
    (SAMPLES[2], "prompt_token_ids", [2**31], "prompt_token_ids"),
    (SAMPLES[2], "stream", "yes", "stream"),
    (SAMPLES[3], "finish_reason", "eos", "finish_reason"),
    (SAMPLES[3], "token_ids", None, "token_ids"),
    (SAMPLES[4], "endpoint", "embeddings", "endpoint"),
    (SAMPLES[4], "output_token_ids", list(range(9)), "max_tokens"),
    (SAMPLES[4], "params.top_p", 2.0, "top_p"),
    (SAMPLES[5], "audit_seq", 0, "audit_seq"),
    (SAMPLES[5], "chain_prev", "AB" * 32, "chain_prev"),
    (SAMPLES[5], "chain_head", "ab" * 31, "chain_head"),
    (SAMPLES[5], "pair.tag.gateway_id", "gw-2", "another gateway"),
    (SAMPLES[5], "boot_id", "boot-8", "another gateway or boot"),
    (SAMPLES[6], "epsilon", 0.0, "epsilon"),
    (SAMPLES[6], "epsilon", 1.5, "epsilon"),
    (SAMPLES[6], "manifest_digest", "zz" * 32, "manifest_digest"),
    (SAMPLES[7], "pairs_served", -3, "pairs_served"),
    (SAMPLES[7], "pairs_served", 2**63, "pairs_served"),
    (SAMPLES[7], "time", "noon", "time"),
    (SAMPLES[8], "nonce", "short", "nonce"),
    (SAMPLES[9], "results.0.ok", "true", "ok"),
    (SAMPLES[10], "mode", "lenient", "mode"),
    (SAMPLES[11], "name", "../etc/passwd", "name"),
    (SAMPLES[11], "name", "a/b.safetensors", "name"),
    (SAMPLES[11], "role", "code", "role"),
    (SAMPLES[11], "algo", "md5", "algo"),
    (SAMPLES[12], "total_size", 61, "total_size"),
    (SAMPLES[12], "files.2.role", "tokenizer", "weights file"),
    (SAMPLES[12], "files.1.name", "config.json", "unique"),
    (SAMPLES[12], "sampler_spec", "v2", "sampler_spec"),
    (SAMPLES[12], "noise_bound.delta", -0.1, "delta"),
    (SAMPLES[13], "version", 0, "version"),
    (SAMPLES[13], "manifests.1.model_id", "a", "unique"),
    (SAMPLES[14], "instruction", "format_disk", "instruction"),
]


@pytest.mark.parametrize(("msg", "path", "value", "text"), BAD,
                         ids=[f"{type(b[0]).__name__}.{b[1]}={b[2]!r}"[:60] for b in BAD])
def test_out_of_range_rejected(msg: msgspec.Struct, path: str, value: Any, text: str) -> None:
    with pytest.raises(ValidationError, match=text):
        decode(_with(msg, path, value), type(msg))


def test_manifest_digest_is_blake3_of_canonical() -> None:
    import blake3

    m = manifest()
    assert manifest_digest(m) == blake3.blake3(canonical(m)).hexdigest()
    assert manifest_digest(m) != manifest_digest(manifest("other"))
    assert manifest_digest(decode(canonical(m), Manifest)) == manifest_digest(m)


def test_whitelist_lookup() -> None:
    wl = SAMPLES[13]
    assert isinstance(wl, Whitelist)
    assert wl.manifest("b") == manifest("b")
    assert wl.manifest("c") is None


# --- fuzzing: a peer's bytes never raise anything but ValidationError --------------------
WIRE_TYPES: list[type] = sorted(
    {type(m) for m in SAMPLES} | {Envelope, Signature, InspectorKey, QuorumPolicy},
    key=lambda t: t.__name__,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


def _decode_only_validation_errors(data: bytes | str, type_: type) -> None:
    with contextlib.suppress(ValidationError):
        decode(data, type_)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(WIRE_TYPES))
def test_fuzz_bytes(data: bytes, type_: type) -> None:
    _decode_only_validation_errors(data, type_)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=100), st.sampled_from(WIRE_TYPES))
def test_fuzz_text(data: str, type_: type) -> None:
    _decode_only_validation_errors(data, type_)


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from(WIRE_TYPES))
def test_fuzz_json(value: Any, type_: type) -> None:
    _decode_only_validation_errors(json.dumps(value).encode(), type_)


def _paths(obj: Any, prefix: str = "") -> list[str]:
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(
        obj, list) else []
    for k, v in items:
        p = f"{prefix}.{k}" if prefix else str(k)
        out.append(p)
        out.extend(_paths(v, p))
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_valid_messages(data: st.DataObject) -> None:
    """Replace one field anywhere in a valid message by arbitrary JSON."""
    msg = data.draw(st.sampled_from(SAMPLES))
    obj = json.loads(canonical(msg))
    path = data.draw(st.sampled_from(_paths(obj)))
    value = data.draw(json_values)
    *parents, last = path.split(".")
    target = obj
    for p in parents:
        target = target[int(p)] if isinstance(target, list) else target[p]
    target[int(last) if isinstance(target, list) else last] = value
    try:
        back = decode(json.dumps(obj).encode(), type(msg))
    except ValidationError:
        return
    # whatever was accepted must re-encode and decode to itself, byte-stable
    again = decode(canonical(back), type(msg))
    assert again == back
    assert canonical(again) == canonical(back)
