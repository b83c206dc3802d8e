"""The trusted whitelist: a pure state machine that takes bytes (python-tuf style).

:class:`TrustedWhitelist` accepts a new signed whitelist only if it is signed under
the quorum policy, not expired, and of a higher version than the one it holds
(no rollback). On any refusal its state does not change.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from ivp.errors import ExpiredError
from ivp.protocol.encoding import canonical, decode
from ivp.protocol.envelope import WHITELIST, Envelope, sign
from ivp.protocol.keys import Signer
from ivp.protocol.messages import Manifest, Whitelist
from ivp.protocol.quorum import QuorumPolicy


def sign_whitelist(whitelist: Whitelist, keys: Iterable[Signer]) -> Envelope:
    return sign(WHITELIST, canonical(whitelist), keys)


class TrustedWhitelist:
    def __init__(self, policy: QuorumPolicy) -> None:
        self.policy = policy
        self.current: Whitelist | None = None
        self.envelope: Envelope | None = None

    def update(self, data: bytes, now: float | None = None) -> Whitelist:
        """Install the signed whitelist in ``data`` (an envelope's bytes).

        Raises:
            ValidationError: not an envelope of a whitelist.
            QuorumError: under-signed (blocks a whitelist forged by one party).
            ExpiredError: expired (blocks replay of an old list) or version not above
                the installed one (blocks rollback to a list that allowed more).
        """
        envelope = Envelope.from_bytes(data)
        payload = self.policy.verify(envelope, WHITELIST)
        whitelist = decode(payload, Whitelist)
        now = time.time() if now is None else now
        if whitelist.expires <= now:
            raise ExpiredError(f"whitelist version {whitelist.version} expired")
        if self.current is not None and whitelist.version <= self.current.version:
            raise ExpiredError(
                f"whitelist version {whitelist.version} is not above installed "
                f"version {self.current.version} (rollback refused)"
            )
        self.current, self.envelope = whitelist, envelope
        return whitelist

    def manifest(self, model_id: str, now: float | None = None, *, engine: str | None = None,
                 dtype: str | None = None) -> Manifest | None:
        """The manifest for ``model_id`` (under ``engine`` and ``dtype``, None: any) if
        the installed whitelist names it and is live."""
        if self.current is None:
            return None
        now = time.time() if now is None else now
        if self.current.expires <= now:
            return None
        return self.current.manifest(model_id, engine, dtype)

    def manifests_for(self, model_id: str, now: float | None = None) -> list[Manifest]:
        """Every serving profile (engine, dtype, δ) of ``model_id`` on the live whitelist."""
        if self.manifest(model_id, now) is None:
            return []
        assert self.current is not None
        return self.current.manifests_for(model_id)
