"""Attacks on the admin protocol (docs/ADMIN.md): replayed and under-signed requests.

An ADMIN_REQUEST is accepted only with a quorum of inspector signatures (k distinct
keys, every required party), a fresh nonce and an unexpired expiry; every accepted
and refused request is an entry of the hash-chained admin log. The evidence here is
the recomputer's refusal (HTTP 403 with the failed check) and the log entry.
"""

from __future__ import annotations

import time
from typing import Any

from ivp.attacks.base import Context, Evidence, Result, Scenario, refusal, require
from ivp.protocol.keys import SigningKey

NONCE = ("nonces: a nonce used by an accepted request is refused for ever (stored "
         "durably); refusals go to the hash-chained admin log")
QUORUM = ("quorum: k valid signatures by distinct inspector keys including every required "
          "party (US and CN); other keys do not count; refusals go to the admin log")


def post_admin(ctx: Context, body: bytes) -> tuple[int, Any]:
    return ctx.post(ctx.dc.recomputer_url + "/admin", body)


def logged_refusal(ctx: Context, log_seq: Any) -> Evidence | None:
    """Evidence that admin log entry ``log_seq`` records a refusal."""
    try:
        entries = ctx.dc.get(ctx.dc.recomputer_url + "/admin/log")["entries"]
    except (OSError, ValueError, KeyError):
        return None
    for e in entries:
        if e.get("seq") == log_seq and e.get("accepted") is False:
            return Evidence(e.get("time", time.time()), "recomputer /admin/log",
                            f"entry {log_seq} refused: {str(e.get('reason'))[:160]}")
    return None


def replay(ctx: Context, result: Result) -> None:
    """Replay an accepted, quorum-signed request byte for byte."""
    sensor = SigningKey.generate()
    body = ctx.dc.inspectors.admin_envelope("enrol_device", {
        "device_id": f"seal-{sensor.keyid[:8]}", "public_key": sensor.verify_key.hex,
        "kind": "sensor"})
    status, answer = post_admin(ctx, body)
    if status != 200:
        result.error = f"the inspectors' own request was refused: {answer}"
        return
    t0 = time.time()
    result.started = t0
    status, answer = post_admin(ctx, body)
    require(result, "the replay is refused (403 ChainError)",
            refusal("POST /admin", status, answer, 403, "ChainError"))
    seq = answer.get("log_seq") if isinstance(answer, dict) else None
    require(result, "the refusal is in the admin log", logged_refusal(ctx, seq))


def no_quorum(ctx: Context, result: Result) -> None:
    """Lower ε for the served model with one party's signature, or with the
    operator's own key beside it, or with the operator's key alone."""
    us, operator = ctx.dc.inspectors.keys[0], SigningKey.generate()
    args = {"epsilon": 0.0001, "model_id": ctx.dc.model_id}
    t0 = time.time()
    result.started = t0
    for who, signers in (("US alone", [us]), ("US + operator key", [us, operator]),
                         ("operator key alone", [operator])):
        body = ctx.dc.inspectors.admin_envelope("set_epsilon", args, signers=signers)
        status, answer = post_admin(ctx, body)
        found = require(result, f"{who}: refused (403 QuorumError)",
                        refusal(f"POST /admin ({who})", status, answer, 403, "QuorumError"))
        if found is None:
            continue
        if signers == [operator]:  # no inspector signature at all: junk, not logged
            require(result, f"{who}: refused without a log entry",
                    Evidence(time.time(), "POST /admin", "log_seq null: not logged")
                    if answer.get("log_seq") is None else None)
        else:
            require(result, f"{who}: refusal logged",
                    logged_refusal(ctx, answer.get("log_seq")))
    settings = ctx.dc.recomputer_status().get("settings", {})
    result.details["model_epsilon_after"] = settings.get("model_epsilon")


SCENARIOS = (
    Scenario(
        "admin-replay", "protocol",
        "The operator replays an admin request the inspectors signed and the recomputer "
        "accepted (to have it applied again).",
        NONCE, replay),
    Scenario(
        "admin-no-quorum", "protocol",
        "One party alone (or the operator with a key of its own) asks the recomputer to "
        "lower the audit probability ε of the served model to 0.0001.",
        QUORUM, no_quorum),
)

__all__ = ["SCENARIOS", "logged_refusal", "post_admin"]
