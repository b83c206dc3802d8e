"""Fleet simulator: many gateways, ε sampling, a finite recomputer, attackers, time."""

from ivp.sim.fleet import Attack, Fleet, SimConfig, SimResult, simulate, summarise

__all__ = ["Attack", "Fleet", "SimConfig", "SimResult", "simulate", "summarise"]
