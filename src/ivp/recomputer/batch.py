"""An uplink batch before the trust logic sees it: caps, parsing, signature checks.

Nothing here is trusted and nothing here changes state. The caps come first, before
any per-item work: a body larger than :data:`MAX_BODY` is refused unread by the HTTP
layer, a batch of more than :data:`MAX_ITEMS` envelopes is refused whole (a gateway
sends at most 64), so one request can never make the recomputer do unbounded work
(a batch of 300,000 junk items once stalled it for 23 s).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ivp.errors import ValidationError
from ivp.protocol import envelope as env
from ivp.protocol.encoding import convert, loads

if TYPE_CHECKING:
    from ivp.recomputer.ingest import Ingest

MAX_ITEMS = 256  # envelopes per uplink batch (gateways send 64)
MAX_BODY = 16 * 1024 * 1024  # bytes of one uplink body (64 audit records fit many times)

#: One signature to check: (signed message, signature, raw public key, its scheme).
SignatureTask = tuple[bytes, bytes, bytes, str]


def batch_items(body: bytes, max_items: int = MAX_ITEMS) -> list[Any]:
    """The ``envelopes`` list of an uplink body, each item left undecoded.

    Raises:
        ValidationError: over :data:`MAX_BODY` bytes, not JSON, nested too deeply, no
            ``envelopes`` list, or more than ``max_items`` items.
    """
    if len(body) > MAX_BODY:
        raise ValidationError(f"uplink body of {len(body)} bytes is over the "
                              f"{MAX_BODY}-byte limit")
    value = loads(body, "uplink body")
    items = value.get("envelopes") if isinstance(value, dict) else None
    if not isinstance(items, list):
        raise ValidationError('uplink body must be {"envelopes": [...]}')
    if len(items) > max_items:
        raise ValidationError(f"uplink batch of {len(items)} envelopes; at most {max_items} "
                              "per batch")
    return items


def signature_tasks(ingest: Ingest, items: Sequence[Any]
                    ) -> list[tuple[int, str, SignatureTask]]:
    """Every (item index, keyid, task) whose signer is an enrolled gateway key: the
    signature checks of a batch, to run in parallel before ``Ingest.admit``.
    Malformed items are skipped (``admit`` refuses them); nothing here is trusted."""
    out: list[tuple[int, str, SignatureTask]] = []
    for i, item in enumerate(items):
        try:
            envelope = convert(item, env.Envelope)
            message = env.pae(envelope.payloadType, envelope.payload_bytes())
        except ValidationError:
            continue
        for sig in envelope.signatures:
            device = ingest.device_of_key(sig.keyid)
            if device is None or device.kind != "gateway":
                continue
            try:
                raw_sig = base64.b64decode(sig.sig, validate=True)
            except (binascii.Error, ValueError):
                continue
            out.append((i, sig.keyid, (message, raw_sig, device.key.raw, device.key.scheme)))
    return out


def verify_signatures(tasks: Sequence[SignatureTask]) -> list[bool]:
    """Signature checks, one bool each. Pure: runs in a worker process."""
    from ivp.errors import SignatureError
    from ivp.protocol.keys import VerifyKey

    keys: dict[tuple[bytes, str], VerifyKey] = {}
    out = []
    for message, signature, raw, scheme in tasks:
        try:
            key = keys.get((raw, scheme))
            if key is None:
                key = keys[raw, scheme] = VerifyKey(raw, scheme)  # type: ignore[arg-type]
            key.verify(signature, message)
            out.append(True)
        except (SignatureError, ValidationError):
            out.append(False)
    return out


def claimed_gateway(payload: bytes) -> str | None:
    """The gateway id an unauthenticated payload claims (for the alarm text only)."""
    try:
        value = loads(payload)
    except ValidationError:
        return None
    claim = value.get("gateway_id") if isinstance(value, dict) else None
    return claim[:200] if isinstance(claim, str) else None


def audit_rate_pvalue(audits: int, pairs: int, epsilon: float) -> float:
    """Two-sided binomial test of ``audits`` kept out of ``pairs`` at rate ε.

    Blocks a gateway whose sampler was subverted to keep fewer (or more) records than
    ε promises: an operator who keeps the cheating pairs out of the sample. ``pairs``
    must count only pairs already drawn for (a checkpoint's ``drawn``): a pair whose
    draw is still pending is neither kept nor deleted yet.
    """
    if pairs <= 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(audits, pairs, epsilon).pvalue)


__all__ = ["MAX_BODY", "MAX_ITEMS", "SignatureTask", "audit_rate_pvalue", "batch_items",
           "claimed_gateway", "signature_tasks", "verify_signatures"]
