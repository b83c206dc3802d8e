"""INPUT routing: which gateway serves a request for ``model_id``. Pure state, no I/O.

The note's open question "what happens if no SNG is serving the requested model_id?"
is answered here: HTTP 503 with a reason naming the model and when it was last
served (or that it never was), so a client can tell "not here" from "down now".

Candidates come from the trusted fleet state (``Ingest.serving``: the latest BOOT
names the model under a whitelisted manifest and the gateway is not shut down);
health checks remove unhealthy ones; the rest share the load round-robin, skipping
the ones with the most requests in flight. Per-client token buckets bound what one
client can send (a flood from one client must not starve the others or the audit
path).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ivp.errors import NoRouteError, RateLimitedError


@dataclass(frozen=True)
class Route:
    gateway_id: str
    url: str
    boot_id: str
    model_id: str


def when(t: float | None) -> str:
    if t is None:
        return "never"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Router:
    """Load balancing over candidate gateways, with health and last-served memory."""

    unhealthy: dict[str, str] = field(default_factory=dict)  # gateway_id -> why
    in_flight: dict[str, int] = field(default_factory=dict)
    last_served: dict[str, float] = field(default_factory=dict)  # model_id -> time
    _turn: int = 0

    def choose(self, model_id: str, candidates: list[tuple[str, str, str]],
               exclude: frozenset[str] = frozenset()) -> Route:
        """A gateway for ``model_id`` among ``candidates`` (gateway_id, url, boot_id).

        Raises:
            NoRouteError: none is serving the model, healthy and not excluded.
        """
        healthy = sorted(c for c in candidates
                         if c[0] not in self.unhealthy and c[0] not in exclude)
        if not healthy:
            why = ""
            if candidates:
                down = ", ".join(f"{g}: {self.unhealthy.get(g, 'tried')}"
                                 for g, _, _ in sorted(candidates))
                why = f"; {len(candidates)} gateway(s) booted it but none is healthy ({down})"
            raise NoRouteError(
                f"model {model_id!r} is whitelisted but no gateway is serving it right now "
                f"(last served {when(self.last_served.get(model_id))}){why}; try again "
                "later"
            )
        least = min(self.in_flight.get(g, 0) for g, _, _ in healthy)
        fair = [c for c in healthy if self.in_flight.get(c[0], 0) == least]
        g, url, boot = fair[self._turn % len(fair)]
        self._turn += 1
        return Route(g, url, boot, model_id)

    def served(self, whitelisted: Iterable[str],
               serving: Callable[[str], list[tuple[str, str, str]]]) -> list[str]:
        """The ``whitelisted`` model ids that some healthy gateway serves, sorted
        (``serving``: the candidates of a model, as :meth:`choose` takes them)."""
        return sorted(m for m in set(whitelisted)
                      if any(g not in self.unhealthy for g, _, _ in serving(m)))

    def begin(self, route: Route) -> None:
        self.in_flight[route.gateway_id] = self.in_flight.get(route.gateway_id, 0) + 1

    def end(self, route: Route, served_at: float | None) -> None:
        self.in_flight[route.gateway_id] = max(0, self.in_flight.get(route.gateway_id, 1) - 1)
        if served_at is not None:
            self.last_served[route.model_id] = served_at

    def mark(self, gateway_id: str, healthy: bool, why: str = "") -> None:
        if healthy:
            self.unhealthy.pop(gateway_id, None)
        else:
            self.unhealthy[gateway_id] = why or "unhealthy"


def not_whitelisted(model_id: str, served: list[str]) -> str:
    """Why a model the whitelist lacks gets 404: what is served instead."""
    return (f"model {model_id!r} does not exist here: this datacenter serves only "
            f"whitelisted models (served now: {', '.join(served) or 'none'}; GET /v1/models "
            "lists them)")


@dataclass
class RateLimiter:
    """Token bucket per client: ``rate`` requests per second, bursts up to ``burst``.
    ``rate`` 0 or less disables limiting."""

    rate: float = 0.0
    burst: float = 20.0
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # tokens, time

    def take(self, client: str, now: float) -> None:
        """Raises:
        RateLimitedError: the client's bucket is empty (says when to retry).
        """
        if self.rate <= 0:
            return
        tokens, last = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            wait = math.ceil((1.0 - tokens) / self.rate * 1000) / 1000
            raise RateLimitedError(f"rate limit of {self.rate:g} requests/s exceeded for "
                                   f"client {client!r}; retry in {wait:g} s", retry_after=wait)
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > 100_000:  # forget idle clients (full buckets)
            self._buckets = {c: v for c, v in self._buckets.items() if v[0] < self.burst}


__all__ = ["NoRouteError", "RateLimitedError", "RateLimiter", "Route", "Router",
           "not_whitelisted", "when"]
