"""The quorum policy: k distinct valid inspector signatures including every required party."""

from __future__ import annotations

import base64
import json

import pytest

from ivp.errors import QuorumError, ValidationError
from ivp.protocol import envelope as dsse
from ivp.protocol.encoding import canonical, decode
from ivp.protocol.envelope import Envelope, Signature
from ivp.protocol.keys import SigningKey
from ivp.protocol.quorum import InspectorKey, QuorumPolicy

US1 = SigningKey.from_seed(b"\x01" * 32)
US2 = SigningKey.from_seed(b"\x02" * 32)
CN1 = SigningKey.from_seed(b"\x03" * 32)
OUTSIDER = SigningKey.from_seed(b"\x04" * 32)


def ikey(k: SigningKey, party: str, name: str = "") -> InspectorKey:
    return InspectorKey(keyid=k.keyid, party=party, public_key=k.verify_key.hex, name=name)


POLICY = QuorumPolicy(
    threshold=2,
    keys=[ikey(US1, "US", "us-1"), ikey(US2, "US", "us-2"), ikey(CN1, "CN", "cn-1")],
    required_parties=["US", "CN"],
)
DOC = b'{"version":1}'


def signed(*keys: SigningKey) -> Envelope:
    return dsse.sign(dsse.WHITELIST, DOC, keys)


def test_quorum_met() -> None:
    r = POLICY.check(signed(US1, CN1))
    assert r.ok and bool(r)
    assert r.signers == {US1.keyid, CN1.keyid}
    assert r.parties == {"US", "CN"}
    assert r.missing_parties == frozenset()
    assert r.explain() == "quorum met by 2 signer(s)"
    assert POLICY.verify(signed(US1, CN1), dsse.WHITELIST) == DOC
    assert POLICY.check(signed(US1, US2, CN1)).ok


def test_threshold_not_met() -> None:
    r = POLICY.check(signed(CN1))
    assert not r
    assert r.explain() == "1 valid signature(s), 2 required; no signature from party US"
    with pytest.raises(QuorumError, match="1 valid signature"):
        POLICY.verify(signed(CN1), dsse.WHITELIST)


def test_missing_required_party() -> None:
    """Two US inspectors cannot whitelist without China (one party's forgery)."""
    r = POLICY.check(signed(US1, US2))
    assert len(r.signers) == 2 >= r.threshold
    assert not r.ok
    assert r.missing_parties == {"CN"}
    assert r.explain() == "no signature from party CN"
    with pytest.raises(QuorumError, match="no signature from party CN"):
        POLICY.verify(signed(US1, US2), dsse.WHITELIST)


def test_no_signatures() -> None:
    r = POLICY.check(signed())
    assert not r and r.signers == frozenset()
    assert r.explain() == "0 valid signature(s), 2 required; no signature from party CN, US"


def test_duplicate_signer_counted_once() -> None:
    env = signed(US1)
    doubled = Envelope(env.payloadType, env.payload, env.signatures * 2)
    r = POLICY.check(doubled)
    assert r.signers == {US1.keyid} and not r
    policy = QuorumPolicy(threshold=2, keys=POLICY.keys)  # no required parties
    assert not policy.check(doubled)


def test_unknown_key_ignored() -> None:
    r = POLICY.check(signed(US1, OUTSIDER))
    assert r.signers == {US1.keyid}
    assert not r


def test_bad_signature_ignored() -> None:
    env = signed(US1)
    forged = Signature(CN1.keyid, base64.b64encode(OUTSIDER.sign(b"whatever")).decode())
    junk = Signature(CN1.keyid, "!!")
    r = POLICY.check(Envelope(env.payloadType, env.payload, [*env.signatures, forged, junk]))
    assert r.signers == {US1.keyid}
    assert not r


def test_signature_over_other_payload_ignored() -> None:
    other = signed(US1, CN1)
    env = Envelope(other.payloadType, base64.b64encode(b'{"version":2}').decode(),
                   other.signatures)
    assert not POLICY.check(env)


def test_verify_wrong_payload_type() -> None:
    env = dsse.sign(dsse.ADMIN, DOC, [US1, CN1])
    assert POLICY.check(env)  # quorum holds for what it is: an admin request
    with pytest.raises(ValidationError, match="payload type"):
        POLICY.verify(env, dsse.WHITELIST)


def test_malformed_payload_gives_no_signers() -> None:
    env = signed(US1, CN1)
    r = POLICY.check(Envelope(env.payloadType, "***", env.signatures))
    assert not r and r.signers == frozenset()


def test_policy_round_trip() -> None:
    assert decode(canonical(POLICY), QuorumPolicy) == POLICY


@pytest.mark.parametrize(("mutate", "text"), [
    (lambda o: o.update(threshold=4), "threshold exceeds"),
    (lambda o: o.update(threshold=0), "threshold"),
    (lambda o: o.update(required_parties=["US", "EU"]), "required party has no key"),
    (lambda o: o["keys"][0].update(keyid="0" * 32), "does not match"),
    (lambda o: o["keys"][0].update(public_key="xy" * 32), "public_key"),
    (lambda o: o["keys"][0].update(party=""), "party"),
    (lambda o: o["keys"].append(dict(o["keys"][0], party="CN")), "more than once"),
    (lambda o: o.update(extra=1), "extra"),
])
def test_bad_policy_rejected(mutate, text: str) -> None:  # type: ignore[no-untyped-def]
    obj = json.loads(canonical(POLICY))
    mutate(obj)
    with pytest.raises(ValidationError, match=text):
        decode(json.dumps(obj).encode(), QuorumPolicy)
