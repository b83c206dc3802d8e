"""Ed25519 keys and DSSE envelopes (ivp.protocol.keys / envelope)."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ivp.errors import SignatureError, ValidationError
from ivp.protocol import envelope as dsse
from ivp.protocol.encoding import canonical, decode
from ivp.protocol.envelope import Envelope, Signature
from ivp.protocol.keys import SigningKey, VerifyKey, key_id
from ivp.protocol.messages import Checkpoint

ALICE = SigningKey.from_seed(bytes(range(32)))
BOB = SigningKey.from_seed(bytes(range(1, 33)))
CP = Checkpoint(gateway_id="gw-1", boot_id="b1", pairs_served=5, chain_head="ab" * 32,
                audits=1, time=10.0)


# --- keys --------------------------------------------------------------------------------
def test_rfc8032_test_vector_1() -> None:
    """Ed25519 from a 32-byte seed, RFC 8032 section 7.1, TEST 1."""
    key = SigningKey.from_seed(bytes.fromhex(
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"))
    assert key.verify_key.hex == (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    sig = key.sign(b"")
    assert sig.hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bac"
        "c61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
    key.verify_key.verify(sig, b"")


def test_keyid_is_sha256_prefix_of_raw_public_key() -> None:
    raw = ALICE.verify_key.raw
    assert ALICE.keyid == key_id(raw) == hashlib.sha256(raw).hexdigest()[:32]
    assert len(ALICE.keyid) == 32 and ALICE.keyid != BOB.keyid


def test_verify_rejects_other_key_and_other_data() -> None:
    sig = ALICE.sign(b"data")
    ALICE.verify_key.verify(sig, b"data")
    with pytest.raises(SignatureError):
        BOB.verify_key.verify(sig, b"data")
    with pytest.raises(SignatureError):
        ALICE.verify_key.verify(sig, b"datA")
    with pytest.raises(SignatureError):
        ALICE.verify_key.verify(sig[:-1] + bytes([sig[-1] ^ 1]), b"data")


def test_verify_key_validation() -> None:
    assert VerifyKey.from_hex(ALICE.verify_key.hex) == ALICE.verify_key
    with pytest.raises(ValidationError):
        VerifyKey(b"\x00" * 31)
    with pytest.raises(ValidationError):
        VerifyKey.from_hex("zz" * 32)
    with pytest.raises(ValidationError):
        VerifyKey.from_hex("ab" * 33)


def test_save_load_encrypted(tmp_path: Path) -> None:
    """At rest a key is passphrase-encrypted: the file alone signs nothing."""
    path = tmp_path / "a.key"
    ALICE.save(path, passphrase=b"correct horse")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    assert data.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert SigningKey.is_encrypted(path)
    secret = bytes(range(32))  # ALICE's seed
    assert secret not in data and base64.b64encode(secret)[:20] not in data
    with pytest.raises(ValidationError, match="the key is encrypted"):
        SigningKey.load(path)
    with pytest.raises(ValidationError, match="wrong passphrase"):
        SigningKey.load(path, b"wrong horse")
    loaded = SigningKey.load(path, b"correct horse")
    assert loaded.verify_key == ALICE.verify_key
    assert loaded.sign(b"x") == ALICE.sign(b"x")  # Ed25519 is deterministic
    with pytest.raises(ValidationError, match="empty passphrase"):
        ALICE.save(path, passphrase=b"")


def test_save_load_plaintext_and_legacy_pem(tmp_path: Path) -> None:
    path = tmp_path / "a.key"
    ALICE.save(path, passphrase=None)  # plaintext, asked for by name
    assert not SigningKey.is_encrypted(path)
    assert SigningKey.load(path).keyid == ALICE.keyid
    assert SigningKey.load(path, b"ignored").keyid == ALICE.keyid
    legacy = ALICE._private.private_bytes(  # what earlier versions wrote: PEM PKCS#8
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    path.write_bytes(legacy)
    assert not SigningKey.is_encrypted(path) and SigningKey.load(path).keyid == ALICE.keyid
    path.write_bytes(ALICE._private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw")))
    assert SigningKey.is_encrypted(path)
    assert SigningKey.load(path, b"pw").keyid == ALICE.keyid
    with pytest.raises(ValidationError, match="encrypted"):
        SigningKey.load(path)


def test_load_rejects_garbage_and_other_algorithms(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(ValidationError, match="not a private key file"):
        SigningKey.load(bad)
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    bad.write_bytes(p384)
    with pytest.raises(ValidationError, match="secp384r1 is not P-256"):
        SigningKey.load(bad)
    from cryptography.hazmat.primitives.asymmetric import rsa

    bad.write_bytes(rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(ValidationError, match="not an Ed25519 or ECDSA P-256 key"):
        SigningKey.load(bad)


# --- DSSE ----------------------------------------------------------------------------------
def test_pae_matches_dsse_spec() -> None:
    """The example of the DSSE protocol document (secure-systems-lab/dsse, protocol.md)."""
    assert dsse.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world")
    assert dsse.pae("", b"") == b"DSSEv1 0  0 "
    # lengths are byte lengths, not character counts
    assert dsse.pae("t\u00e9", "\u00e9".encode()) == b"DSSEv1 3 t\xc3\xa9 2 \xc3\xa9"


def test_sign_and_open() -> None:
    env = dsse.sign_message(dsse.CHECKPOINT, CP, ALICE)
    assert env.payloadType == dsse.CHECKPOINT
    assert env.payload_bytes() == canonical(CP)
    assert [s.keyid for s in env.signatures] == [ALICE.keyid]
    payload = dsse.open_signed(env, dsse.CHECKPOINT, ALICE.verify_key)
    assert decode(payload, Checkpoint) == CP


def test_signature_is_over_pae_for_interop() -> None:
    """Any DSSE implementation can check our signatures: Ed25519 over PAE(type, body)."""
    env = dsse.sign_message(dsse.CHECKPOINT, CP, ALICE)
    sig = base64.b64decode(env.signatures[0].sig)
    Ed25519PublicKey.from_public_bytes(ALICE.verify_key.raw).verify(
        sig, dsse.pae(dsse.CHECKPOINT, canonical(CP)))


def test_envelope_wire_form_round_trip() -> None:
    env = dsse.sign(dsse.BOOT, b'{"x":1}', [ALICE, BOB])
    data = env.to_bytes()
    assert set(json.loads(data)) == {"payloadType", "payload", "signatures"}
    assert Envelope.from_bytes(data) == env
    obj = json.loads(data)
    obj["extra"] = 1
    with pytest.raises(ValidationError, match="extra"):
        Envelope.from_bytes(json.dumps(obj).encode())
    for junk in (b"", b"[]", b'{"payloadType": 1}', b"\xff\xfe"):
        with pytest.raises(ValidationError):
            Envelope.from_bytes(junk)


PAYLOAD_TYPES = [dsse.AUDIT, dsse.BOOT, dsse.CHECKPOINT, dsse.SHUTDOWN, dsse.WHITELIST,
                 dsse.ADMIN, dsse.SENSOR, dsse.ALARM]


def test_payload_types_are_distinct() -> None:
    assert len(set(PAYLOAD_TYPES)) == len(PAYLOAD_TYPES)


@pytest.mark.parametrize("other", [t for t in PAYLOAD_TYPES if t != dsse.AUDIT])
def test_signature_for_one_type_never_verifies_as_another(other: str) -> None:
    """Type confusion: an AUDIT signature relabelled as another type is worthless."""
    env = dsse.sign(dsse.AUDIT, canonical(CP), [ALICE])
    with pytest.raises(ValidationError, match="payload type"):
        dsse.open_signed(env, other, ALICE.verify_key)  # honest label, wrong expectation
    relabelled = Envelope(other, env.payload, env.signatures)
    with pytest.raises(SignatureError):
        dsse.open_signed(relabelled, other, ALICE.verify_key)
    assert dsse.valid_signers(relabelled, {ALICE.keyid: ALICE.verify_key}) == set()


def test_tampered_payload_fails() -> None:
    env = dsse.sign_message(dsse.CHECKPOINT, CP, ALICE)
    body = bytearray(env.payload_bytes())
    body[body.index(b"5")] = ord("6")  # pairs_served 5 -> 6
    forged = Envelope(env.payloadType, base64.b64encode(bytes(body)).decode(), env.signatures)
    with pytest.raises(SignatureError):
        dsse.open_signed(forged, dsse.CHECKPOINT, ALICE.verify_key)


def test_wrong_key_and_missing_signature_fail() -> None:
    env = dsse.sign_message(dsse.CHECKPOINT, CP, ALICE)
    with pytest.raises(SignatureError):
        dsse.open_signed(env, dsse.CHECKPOINT, BOB.verify_key)
    unsigned = Envelope(env.payloadType, env.payload, [])
    with pytest.raises(SignatureError):
        dsse.open_signed(unsigned, dsse.CHECKPOINT, ALICE.verify_key)
    # a signature by Bob that claims Alice's keyid does not count for Alice
    bob_sig = dsse.sign_message(dsse.CHECKPOINT, CP, BOB).signatures[0]
    impostor = Envelope(env.payloadType, env.payload, [Signature(ALICE.keyid, bob_sig.sig)])
    with pytest.raises(SignatureError):
        dsse.open_signed(impostor, dsse.CHECKPOINT, ALICE.verify_key)


def test_signature_checked_over_received_bytes() -> None:
    """Non-canonical bytes verify as signed and come back untouched; a re-serialised copy
    (same meaning, other bytes) does not verify: nothing is re-encoded before checking."""
    received = b'{ "v": 1, "time": 10.0, "gateway_id": "gw-1", "boot_id": "b1", ' \
               b'"pairs_served": 5, "audits": 1, "chain_head": "' + b"ab" * 32 + b'" }'
    env = dsse.sign(dsse.CHECKPOINT, received, [ALICE])
    payload = dsse.open_signed(env, dsse.CHECKPOINT, ALICE.verify_key)
    assert payload == received
    assert decode(payload, Checkpoint) == CP
    recoded = Envelope(env.payloadType, base64.b64encode(canonical(CP)).decode(),
                       env.signatures)
    with pytest.raises(SignatureError):
        dsse.open_signed(recoded, dsse.CHECKPOINT, ALICE.verify_key)


def test_malformed_base64() -> None:
    env = dsse.sign_message(dsse.CHECKPOINT, CP, ALICE)
    bad_payload = Envelope(env.payloadType, "not base64!!", env.signatures)
    with pytest.raises(ValidationError, match="base64"):
        dsse.open_signed(bad_payload, dsse.CHECKPOINT, ALICE.verify_key)
    bad_sig = Envelope(env.payloadType, env.payload, [Signature(ALICE.keyid, "%%%")])
    assert dsse.valid_signers(bad_sig, {ALICE.keyid: ALICE.verify_key}) == set()
    with pytest.raises(SignatureError):
        dsse.open_signed(bad_sig, dsse.CHECKPOINT, ALICE.verify_key)


def test_valid_signers_ignores_unknown_bad_and_duplicate() -> None:
    env = dsse.sign(dsse.WHITELIST, b"doc", [ALICE, BOB])
    keys = {ALICE.keyid: ALICE.verify_key}
    assert dsse.valid_signers(env, keys) == {ALICE.keyid}  # Bob unknown: ignored
    doubled = Envelope(env.payloadType, env.payload, env.signatures * 3)
    assert dsse.valid_signers(doubled, keys | {BOB.keyid: BOB.verify_key}) == {
        ALICE.keyid, BOB.keyid}
    garbled = Signature(BOB.keyid, base64.b64encode(b"\x00" * 64).decode())
    mixed = Envelope(env.payloadType, env.payload, [garbled, env.signatures[0]])
    assert dsse.valid_signers(mixed, keys | {BOB.keyid: BOB.verify_key}) == {ALICE.keyid}


def test_add_signature_countersigns_without_touching_payload() -> None:
    env = dsse.sign(dsse.WHITELIST, b'{"a": 1}', [ALICE])
    both = dsse.add_signature(env, BOB)
    assert both.payload == env.payload and both.payloadType == env.payloadType
    assert [s.keyid for s in both.signatures] == [ALICE.keyid, BOB.keyid]
    keys = {ALICE.keyid: ALICE.verify_key, BOB.keyid: BOB.verify_key}
    assert dsse.valid_signers(both, keys) == {ALICE.keyid, BOB.keyid}
    again = dsse.add_signature(both, ALICE)  # re-signing replaces, never duplicates
    assert sorted(s.keyid for s in again.signatures) == sorted([ALICE.keyid, BOB.keyid])
    assert dsse.valid_signers(again, keys) == {ALICE.keyid, BOB.keyid}
