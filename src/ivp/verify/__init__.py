"""Verification mathematics: scoring claimed outputs against reference replays."""

from ivp.verify.scoring import Judgement, Policy, Scores, score

__all__ = ["Judgement", "Policy", "Scores", "score"]
