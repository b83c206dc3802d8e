"""What every part of the gateway shares: its settings, its modes, its answer shape.

* :class:`GatewayConfig` — the settings of one gateway (set by the inspectors'
  deployment, not the operator);
* :class:`State` — the gateway's modes (SNG property 2's UPLOAD → SERVING and
  POWER_KILL, and the two that override them: SHUTDOWN by the recomputer, BRICKED by
  the tamper mesh);
* :class:`Reply` — an answer of the datapath for the HTTP shell.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ivp.gateway.release import ReleasePolicy


class State(enum.Enum):
    UPLOAD = "upload"
    SERVING = "serving"
    POWER_KILL = "power_kill"
    SHUTDOWN = "shutdown"
    BRICKED = "bricked"


@dataclass
class GatewayConfig:
    """Settings of one gateway (all set by the inspectors' deployment, not the operator).

    Attributes:
        gateway_id: this gateway's name (in every tag and record).
        epsilon: probability ε that a served pair becomes an audit record.
        url: where this gateway serves INPUT (sent in BOOT records, for routing).
        checkpoint_interval: seconds between signed checkpoints while serving (0: off).
        reboot_interval: forced reboot period in seconds while serving (0: off): power
            flicker + memory wipe + fresh upload (bounds how long in-memory state lives).
        release: the release policy (``release.ReleasePolicy``): every response leaves
            at a time fixed by its request and the model's budget; its timing then
            carries at most ``log2(late_steps + 2)`` bits, and only when it is late
            (alarmed). None: the grid below, or at once.
        release_grid: release responses only at multiples of this many seconds
            (0: at once); lowers, but does not bound, what response timing can carry.
        server_timeout: seconds one inference may take on the server.
        boot_timeout: seconds a freshly powered server may take to answer /health.
        max_body: largest client request body in bytes.
        upload_queue: weight chunks buffered between the operator and the server.
        draw_linger: seconds a sampling draw may wait for the next request's commit to
            share its fsync (draws come after release: no response waits for this).
        engine: the inference engine the server runs ("reference", "vllm"), and
        dtype: the dtype it computes in ("" = the one whitelisted profile of the model
            for that engine): the upload boots only the manifest the whitelist names for
            (model, engine, dtype), so the recomputer judges under that profile's δ.
    """

    gateway_id: str
    epsilon: float = 0.2
    url: str = ""
    checkpoint_interval: float = 10.0
    reboot_interval: float = 0.0
    release: ReleasePolicy | None = None
    release_grid: float = 0.0
    server_timeout: float = 600.0
    boot_timeout: float = 120.0
    max_body: int = 1 << 20
    upload_queue: int = 8
    draw_linger: float = 0.02
    engine: str = "reference"
    dtype: str = ""

    def __post_init__(self) -> None:
        if not 0.0 < self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in (0, 1], got {self.epsilon}")
        if self.release_grid < 0 or self.checkpoint_interval < 0 or self.reboot_interval < 0:
            raise ValueError("intervals must be >= 0")


class Chunks(Protocol):
    """A streamed body: each piece may leave as soon as it is returned (it is durable)."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...


@dataclass
class Reply:
    """An answer for the HTTP shell. ``after_release`` runs once the bytes are sent (or
    the client left). ``chunks``: a streamed body, written piece by piece after
    ``body``; ``after_release`` then also ends the stream (a cut one is logged as cut)."""

    body: bytes
    content_type: str = "application/json"
    status: int = 200
    after_release: Callable[[], Awaitable[None]] | None = None
    chunks: Chunks | None = None

    async def read(self) -> bytes:
        """The whole body, as a client reading to the end gets it (tests, tools)."""
        if self.chunks is None:
            return self.body
        return self.body + b"".join([piece async for piece in self.chunks])


__all__ = ["GatewayConfig", "Reply", "State"]
