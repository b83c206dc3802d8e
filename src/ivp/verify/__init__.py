"""Verification mathematics: scoring claimed outputs against reference replays.

* ``scoring`` — per-position margins and δ*_t (raw figures) and ``Policy`` (pass/fail);
* ``bounds`` — the δ-robust top-k / top-p allowed-set bounds that keep tolerant mode sound;
* ``structure`` — checks replay cannot see (EOS placement, finish reason, text);
* ``serving`` — an honest batched, left-padded serving path (the nondeterminism sources);
* ``noise`` — honest noise as the half-span of logit differences; false-alarm cost;
* ``calibrate`` — δ from the serving path against replay (``ivp calibrate``);
* ``tolerance`` — the temperature rule τ(T) that keeps the covert channel below its goal;
* ``attacks`` / ``sampling_cheats`` / ``covert`` — cheating servers, and the covert channel;
* ``traffic`` — what honest traffic offers a covert encoder, recorded while it is served;
* ``report`` / ``experiments`` / ``views`` / ``stats`` / ``docs`` — ``ivp verify-report``
  and docs/VERIFICATION.md;
* ``pruned`` — the same figures from bf16 replay rows with a proven bound, reading exact
  logits only where they decide (what the recomputer runs).

The recomputer needs only ``score_replayed`` and
``Policy("tolerant", manifest.noise_bound.delta, channel_goal=CHANNEL_GOAL)``.
"""

from ivp.verify.pruned import score_replayed
from ivp.verify.scoring import Judgement, Policy, Scores, score
from ivp.verify.tolerance import CHANNEL_GOAL

__all__ = ["CHANNEL_GOAL", "Judgement", "Policy", "Scores", "score", "score_replayed"]
