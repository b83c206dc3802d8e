"""Planners: deployment cost and timeline, sampling coverage, the preparation phase."""

from ivp.plan.deploy import DeployAssumptions, cost_table, rollout, upload_plan
from ivp.plan.preparation import PreparationInputs
from ivp.plan.sampling import SamplingInputs, plan

__all__ = [
    "DeployAssumptions", "PreparationInputs", "SamplingInputs", "cost_table", "plan", "rollout",
    "upload_plan",
]
