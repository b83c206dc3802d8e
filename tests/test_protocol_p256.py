"""ECDSA P-256 keys beside Ed25519 (ivp.protocol.keys): the TPM device's scheme."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import given
from hypothesis import strategies as st

from ivp.errors import SignatureError, ValidationError
from ivp.protocol import envelope as dsse
from ivp.protocol.encoding import canonical, convert
from ivp.protocol.keys import P256, P256_ORDER, SigningKey, VerifyKey, key_id
from ivp.protocol.messages import Checkpoint, EnrolArgs
from ivp.protocol.quorum import InspectorKey, QuorumPolicy

# RFC 6979 appendix A.2.5: ECDSA, 256 bits (prime field), key pair and the SHA-256
# signature of the message "sample".
RFC_X = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
RFC_UX = 0x60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6
RFC_UY = 0x7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299
RFC_R = 0xEFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716
RFC_S = 0xF7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8

RFC_KEY = SigningKey(ec.derive_private_key(RFC_X, ec.SECP256R1()))
US = SigningKey.from_seed(b"u" * 32)
CN = SigningKey.generate(P256)
CP = Checkpoint(gateway_id="gw-1", boot_id="b1", pairs_served=5, chain_head="ab" * 32,
                audits=1, time=10.0)


def test_rfc6979_key_and_signature() -> None:
    """The published vector: its key's compressed point, and its signature verifies once
    in canonical low-S form; the published high-S form is refused as the malleable twin."""
    assert RFC_S > P256_ORDER // 2  # the vector happens to have a high S
    key = RFC_KEY.verify_key
    assert key.scheme == P256
    assert key.raw == bytes([2 + (RFC_UY & 1)]) + RFC_UX.to_bytes(32, "big")
    published = encode_dss_signature(RFC_R, RFC_S)
    with pytest.raises(SignatureError):
        key.verify(published, b"sample")
    key.verify(encode_dss_signature(RFC_R, P256_ORDER - RFC_S), b"sample")
    with pytest.raises(SignatureError):
        key.verify(encode_dss_signature(RFC_R, P256_ORDER - RFC_S), b"samplE")


def test_signatures_are_low_s_der_and_verify_anywhere() -> None:
    """Any ECDSA implementation checks them: DER over SHA-256 of the message."""
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), CN.verify_key.raw)
    for i in range(40):
        message = b"m%d" % i
        sig = CN.sign(message)
        r, s = decode_dss_signature(sig)
        assert s <= P256_ORDER // 2 and encode_dss_signature(r, s) == sig
        CN.verify_key.verify(sig, message)
        public.verify(sig, message, ec.ECDSA(hashes.SHA256()))


def test_non_canonical_encodings_are_refused() -> None:
    sig = CN.sign(b"x")
    r, s = decode_dss_signature(sig)
    for bad in (encode_dss_signature(r, P256_ORDER - s),  # the high-S twin
                sig + b"\x00",  # trailing bytes
                b"", b"\x30\x00", sig[:-1], bytes(64)):
        with pytest.raises(SignatureError):
            CN.verify_key.verify(bad, b"x")


def test_text_form_names_the_scheme() -> None:
    text = CN.verify_key.hex
    assert text.startswith("ecdsa-p256:") and len(text) == len("ecdsa-p256:") + 66
    assert VerifyKey.from_hex(text) == CN.verify_key
    assert len(US.verify_key.hex) == 64 and VerifyKey.from_hex(US.verify_key.hex).scheme == (
        "ed25519")
    assert CN.keyid == key_id(CN.verify_key.raw) == hashlib.sha256(
        CN.verify_key.raw).hexdigest()[:32]


@pytest.mark.parametrize("text, why", [
    ("ecdsa-p256:" + "02" + "ff" * 32, "not a point"),  # x beyond the field
    ("ecdsa-p256:" + "04" + "11" * 32, "compressed point"),
    ("ecdsa-p256:" + "02" + "11" * 31, "compressed point"),
    ("ecdsa-p256:zz", "not hex"),
    ("ED25519:" + "ab" * 32, "not hex"),
    ("AB" * 32, "lower-case"),
])
def test_bad_key_texts_are_refused(text: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        VerifyKey.from_hex(text)


def test_a_signature_never_verifies_under_the_other_scheme() -> None:
    """The scheme comes from the key record, not from the envelope: an Ed25519
    signature is worthless against a P-256 key and the other way round."""
    with pytest.raises(SignatureError):
        CN.verify_key.verify(US.sign(b"x"), b"x")
    with pytest.raises(SignatureError):
        US.verify_key.verify(CN.sign(b"x"), b"x")


def test_dsse_envelope_signed_by_p256() -> None:
    env = dsse.sign_message(dsse.CHECKPOINT, CP, CN)
    assert dsse.open_signed(env, dsse.CHECKPOINT, CN.verify_key) == canonical(CP)
    sig = base64.b64decode(env.signatures[0].sig)
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), CN.verify_key.raw).verify(
        sig, dsse.pae(dsse.CHECKPOINT, canonical(CP)), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(SignatureError):
        dsse.open_signed(env, dsse.CHECKPOINT, US.verify_key)


def test_quorum_of_mixed_schemes() -> None:
    policy = QuorumPolicy(threshold=2, required_parties=["US", "CN"], keys=[
        InspectorKey(keyid=US.keyid, party="US", public_key=US.verify_key.hex),
        InspectorKey(keyid=CN.keyid, party="CN", public_key=CN.verify_key.hex)])
    assert policy.check(dsse.sign(dsse.ADMIN, b"{}", [US, CN]))
    assert not policy.check(dsse.sign(dsse.ADMIN, b"{}", [CN]))
    with pytest.raises(ValidationError, match="does not match"):
        convert({"threshold": 1, "keys": [{"keyid": US.keyid, "party": "US",
                                           "public_key": CN.verify_key.hex}]}, QuorumPolicy)


def test_enrolment_accepts_both_key_texts_only() -> None:
    for key in (US, CN):
        args = convert({"device_id": "gw-a", "public_key": key.verify_key.hex}, EnrolArgs)
        assert VerifyKey.from_hex(args.public_key) == key.verify_key
    for bad in ("ecdsa-p256:" + "ab" * 33, "p256:02" + "ab" * 32, "ab" * 33, ""):
        with pytest.raises(ValidationError):
            convert({"device_id": "gw-a", "public_key": bad}, EnrolArgs)


@given(st.binary(max_size=90))
def test_any_bytes_as_signature_only_fail_cleanly(sig: bytes) -> None:
    for key in (US.verify_key, CN.verify_key):
        with pytest.raises(SignatureError):
            key.verify(sig, b"message")


@given(st.text(max_size=140))
def test_any_text_as_key_only_fails_cleanly(text: str) -> None:
    try:
        key = VerifyKey.from_hex(text)
    except ValidationError:
        return
    assert key.hex == text
