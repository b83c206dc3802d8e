"""The Secure ReComputer (SRC): INPUT routing, audit ingestion, verification, admin.

Pure cores take bytes and values (``ingest.Ingest``, ``admin.AdminCore``,
``routing.Router``, ``workers.Verifier``); ``service.Recomputer`` is the thin
asynchronous shell that stores, verifies and talks HTTP (``app.make_app``).
"""

from ivp.recomputer.service import Config, Recomputer

__all__ = ["Config", "Recomputer"]
