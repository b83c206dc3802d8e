"""The red-team suite: every attack of the note, and on the protocol, run live.

``ivp attack list`` names the scenarios; ``ivp attack run NAME|all`` plays them
against loopback datacenters (``ivp.datacenter``) and reports, for each, whether
the live system noticed — from its alarms, verdicts, status and refusals only — how
fast, after how many requests, and which defence did it. docs/THREATS.md describes
each attack, its defence, the measured figure and what remains open.
"""

from ivp.attacks.base import Evidence, Result, Scenario, Victim
from ivp.attacks.registry import SCENARIOS, resolve
from ivp.attacks.runner import AttackSession, Report, Settings, run_scenarios

__all__ = ["SCENARIOS", "AttackSession", "Evidence", "Report", "Result", "Scenario",
           "Settings", "Victim", "resolve", "run_scenarios"]
