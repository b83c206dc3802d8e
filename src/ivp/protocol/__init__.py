"""Wire messages, canonical encoding, DSSE signatures, hash chain, quorum, sampler spec."""

from ivp.protocol import envelope, messages, sampler
from ivp.protocol.chain import AuditSequence, genesis, link
from ivp.protocol.encoding import canonical, convert, decode, to_builtins
from ivp.protocol.keys import SigningKey, VerifyKey
from ivp.protocol.quorum import InspectorKey, QuorumPolicy, QuorumResult

__all__ = [
    "AuditSequence", "InspectorKey", "QuorumPolicy", "QuorumResult", "SigningKey",
    "VerifyKey", "canonical", "convert", "decode", "envelope", "genesis", "link",
    "messages", "sampler", "to_builtins",
]
