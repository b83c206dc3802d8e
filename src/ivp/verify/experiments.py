"""The report's experiments, each in resumable units (``report.Store``).

* :func:`honest_phase` — honest messages under every serving source and temperature,
  one stored unit per served batch;
* :func:`attack_phase` — every attack generator, one stored unit per chunk of messages
  (a generator is built only when one of its chunks is missing);
* :func:`covert_phase` — the stego-bounded encoder at the rule's tolerance and at the
  bf16 server's δ, and that δ itself.

Scores are policy-free (δ*_t per position), so nothing stored depends on δ except the
covert encoder, whose key carries its tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ivp.verify.report import (
    ATTACK_PARAMS,
    COVERT_PARAMS,
    AttackFigures,
    CovertFigures,
    Log,
    MessageFigures,
    Plan,
    Store,
    assign_sources,
    requests_for,
    score_claims,
)
from ivp.verify.serving import Request
from ivp.verify.tolerance import CHANNEL_GOAL, tolerance
from ivp.verify.traffic import TrafficRecorder

if TYPE_CHECKING:
    from ivp.verify.report import _Setup

REPLAY_GROUPS = (1, 2, 3, 4, 5, 6, 7, 8)  # the recomputer batches records like this
ATTACK_CHUNK = 64  # attack messages per stored unit


def honest_phase(plan: Plan, s: _Setup, store: Store, log: Log) -> list[MessageFigures]:
    """Honest messages, in request order; each served batch is one stored unit."""
    reqs = requests_for(s.eval_prompts, plan.honest_messages, plan.honest_params,
                        plan.honest_max_tokens, seed=1)
    source = assign_sources(len(reqs), len(plan.configs))
    out: list[MessageFigures | None] = [None] * len(reqs)
    done = 0
    for c, config in enumerate(plan.configs):
        idx = [int(i) for i in np.flatnonzero(source == c)]
        for b in range(0, len(idx), config.batch_size):
            chunk = idx[b : b + config.batch_size]
            batch = [reqs[i] for i in chunk]

            def serve(batch: list[Request] = batch, config: Any = config
                      ) -> list[MessageFigures]:
                recorder = TrafficRecorder()
                served = s.path.serve(batch, config, chooser=recorder)
                return score_claims(s.engine, batch,
                                    [(x.token_ids, x.finish_reason) for x in served],
                                    lambda _j: config.name, REPLAY_GROUPS,
                                    [recorder.stats(r) for r in batch])

            for i, f in zip(chunk, store.cached("honest", (plan.model, config, batch), serve),
                            strict=True):
                out[i] = f
        done += len(idx)
        if idx:
            log(f"honest: {done}/{len(reqs)} messages ({config.name})")
    return [f for f in out if f is not None]


def attack_phase(plan: Plan, s: _Setup, store: Store, honest: list[MessageFigures],
                 log: Log) -> list[AttackFigures]:
    from ivp.verify import attacks as attack_mod

    eos_id = int(s.tokenizer.eos_token_id if s.tokenizer.eos_token_id is not None
                 else min(s.engine.eos_ids))
    figures = []
    for k, name in enumerate(attack_mod.ATTACK_NAMES):
        asked = attack_mod.attack_params(name) or ATTACK_PARAMS
        reqs = requests_for(s.eval_prompts[k % 3 :], plan.attack_count(name), (asked,),
                            plan.attack_tokens(name), seed=100 + k)
        built: list[Any] = []

        def generator(name: str = name, built: list[Any] = built) -> Any:
            if not built:
                built.append(attack_mod.build(name, s.model, s.tokenizer, s.path, eos_id))
            return built[0]

        msgs: list[MessageFigures] = []
        for start in range(0, len(reqs), ATTACK_CHUNK):
            chunk = reqs[start : start + ATTACK_CHUNK]

            def serve(chunk: list[Request] = chunk, name: str = name,
                      generator: Callable[[], Any] = generator) -> list[MessageFigures]:
                claims = generator().serve(chunk)
                return score_claims(s.engine, chunk,
                                    [(c.token_ids, c.finish_reason) for c in claims],
                                    lambda _j: name, (4,))

            msgs.extend(store.cached("attack", (plan.model, name, chunk), serve))
            if len(reqs) > ATTACK_CHUNK:
                log(f"attack {name}: {len(msgs)}/{len(reqs)} messages")
        help_text = str(built[0].help) if built else _help(name, generator)
        figures.append(AttackFigures(name, help_text, tuple(msgs)))
        changed = sum(m.changed for m in msgs)
        log(f"attack {name}: {changed}/{len(msgs)} changed a token; {help_text}")
        built.clear()
    return figures


def _help(name: str, generator: Callable[[], Any]) -> str:
    """A generator's description without building it when it is cheap to say."""
    from ivp.verify import attacks as attack_mod

    static = {"other-weights": "same architecture, other weights",
              "int8": "int8 group-wise RTN (g = 128)", "int4": "int4 group-wise RTN (g = 32)",
              "prompt-tamper": attack_mod.PromptTamper.help,
              "seed-ignored": attack_mod.SeedIgnored.help, "truncate": attack_mod.Truncate.help,
              "stego": attack_mod.Stego.help}
    return static.get(name) or str(generator().help)


def covert_phase(plan: Plan, s: _Setup, store: Store, delta: float,
                 log: Log) -> tuple[CovertFigures, float]:
    """The stego-bounded encoder held to the rule's τ at T = 1, and at the bf16 δ."""
    from ivp.verify import covert
    from ivp.verify.report import measure_bf16

    bf16_req = requests_for(s.cal_prompts, plan.bf16_requests, (COVERT_PARAMS,), 16, seed=7)
    bf16_delta = store.cached("bf16", (plan.model, bf16_req),
                              lambda: measure_bf16(s.engine, bf16_req))
    log(f"bf16 server vs fp32 reference: max half-span {bf16_delta:.3g}")
    cov_req = requests_for(s.eval_prompts[1:], plan.covert_messages, (COVERT_PARAMS,),
                           plan.covert_max_tokens, seed=200)
    tau = tolerance(delta, 1.0, plan.covert_max_tokens, CHANNEL_GOAL)
    wide_req = cov_req[: max(1, len(cov_req) // 4)]

    def encode(reqs: list[Request], bound: float) -> tuple[int, int, int, int]:
        encoded = covert.BoundedStego(s.path, bound).serve(reqs)
        figs = score_claims(s.engine, reqs, [(e.token_ids, e.finish_reason) for e in encoded],
                            lambda _j: "stego-bounded")
        return (sum(len(e.bits) for e in encoded), sum(len(e.token_ids) for e in encoded),
                len(encoded), sum(not f.passed_at(bound) for f in figs))

    bits, toks, n, flagged = store.cached("covert", (plan.model, cov_req, tau),
                                          lambda: encode(cov_req, tau))
    wbits, wtoks, wn, wflagged = store.cached("covert-wide", (plan.model, wide_req, bf16_delta),
                                              lambda: encode(wide_req, bf16_delta))
    log(f"covert: encoder at τ(1) = {tau:.3g} hid {bits} bits in {toks} tokens, {flagged} "
        f"flagged; at the bf16 δ {wbits} bits in {wtoks} tokens, {wflagged} flagged")
    return CovertFigures(tau, bits, n, toks, flagged, bf16_delta, wbits, wtoks, wn,
                         wflagged), bf16_delta


__all__ = ["attack_phase", "covert_phase", "honest_phase"]
