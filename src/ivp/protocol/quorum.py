"""The quorum policy: one rule for every document inspectors sign.

A document passes when at least ``threshold`` distinct inspector keys signed it
validly *and* every party in ``required_parties`` (e.g. "US" and "CN") is among the
signers. :meth:`QuorumPolicy.check` returns a result that never raises;
:meth:`QuorumPolicy.verify` raises on failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from msgspec import Meta, Struct

from ivp.errors import QuorumError, ValidationError
from ivp.protocol.envelope import Envelope, valid_signers
from ivp.protocol.keys import PublicKeyText, VerifyKey


class InspectorKey(Struct, frozen=True, forbid_unknown_fields=True):
    keyid: str
    party: Annotated[str, Meta(min_length=1, max_length=64)]
    public_key: PublicKeyText
    name: str = ""


@dataclass(frozen=True)
class QuorumResult:
    signers: frozenset[str]
    parties: frozenset[str]
    threshold: int
    missing_parties: frozenset[str]

    @property
    def ok(self) -> bool:
        return len(self.signers) >= self.threshold and not self.missing_parties

    def __bool__(self) -> bool:
        return self.ok

    def explain(self) -> str:
        if self.ok:
            return f"quorum met by {len(self.signers)} signer(s)"
        parts = []
        if len(self.signers) < self.threshold:
            parts.append(f"{len(self.signers)} valid signature(s), {self.threshold} required")
        if self.missing_parties:
            parts.append("no signature from party " + ", ".join(sorted(self.missing_parties)))
        return "; ".join(parts)


class QuorumPolicy(Struct, frozen=True, forbid_unknown_fields=True):
    threshold: Annotated[int, Meta(ge=1)]
    keys: list[InspectorKey]
    required_parties: list[str] = []

    def __post_init__(self) -> None:
        ids = [k.keyid for k in self.keys]
        if len(set(ids)) != len(ids):  # e.g. one key under two parties: ambiguous
            raise ValueError("an inspector key is listed more than once")
        for k in self.keys:
            if VerifyKey.from_hex(k.public_key).keyid != k.keyid:
                raise ValueError(f"keyid {k.keyid} does not match its public key")
        if self.threshold > len(self.keys):
            raise ValueError("threshold exceeds the number of inspector keys")
        if not set(self.required_parties) <= {k.party for k in self.keys}:
            raise ValueError("a required party has no key")

    def verify_keys(self) -> dict[str, VerifyKey]:
        return {k.keyid: VerifyKey.from_hex(k.public_key) for k in self.keys}

    def check(self, envelope: Envelope) -> QuorumResult:
        """Count valid signatures by inspector keys. Never raises on bad signatures."""
        try:
            signers = valid_signers(envelope, self.verify_keys())
        except ValidationError:
            signers = set()
        party_of = {k.keyid: k.party for k in self.keys}
        parties = frozenset(party_of[s] for s in signers)
        return QuorumResult(
            signers=frozenset(signers),
            parties=parties,
            threshold=self.threshold,
            missing_parties=frozenset(self.required_parties) - parties,
        )

    def verify(self, envelope: Envelope, payload_type: str) -> bytes:
        """Return the payload bytes as received if quorum holds.

        Raises:
            ValidationError: wrong payload type.
            QuorumError: too few valid signatures, or a required party missing.
        """
        if envelope.payloadType != payload_type:
            raise ValidationError(
                f"expected payload type {payload_type!r}, got {envelope.payloadType!r}"
            )
        result = self.check(envelope)
        if not result:
            raise QuorumError(result.explain())
        return envelope.payload_bytes()
