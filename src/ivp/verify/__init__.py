"""Verification mathematics: scoring claimed outputs against reference replays.

* ``scoring`` — per-position margins and δ*_t (raw figures) and ``Policy`` (pass/fail);
* ``bounds`` — the δ-robust top-k / top-p allowed-set bounds that keep tolerant mode sound;
* ``structure`` — checks replay cannot see (EOS placement, finish reason, text);
* ``serving`` — an honest batched, left-padded serving path (the nondeterminism sources);
* ``calibrate`` — δ from the serving path against replay (``ivp calibrate``);
* ``attacks`` / ``covert`` — cheating servers, and the covert channel left within δ;
* ``report`` / ``docs`` — ``ivp verify-report`` and docs/VERIFICATION.md;
* ``pruned`` — the same figures from bf16 replay rows with a proven bound, reading exact
  logits only where they decide (what the recomputer runs).

The recomputer needs only ``score_replayed`` and
``Policy("tolerant", manifest.noise_bound.delta)``.
"""

from ivp.verify.pruned import score_replayed
from ivp.verify.scoring import Judgement, Policy, Scores, score

__all__ = ["Judgement", "Policy", "Scores", "score", "score_replayed"]
