"""The inspectors' console: the datacenter at a glance, in a browser (docs/CONSOLE.md).

Served by the recomputer beside its API (``ivp recomputer --console``), read-only:
``reader`` opens the store with SQLite's read-only mode, ``views`` computes what each
page shows from values, ``charts`` draws SVG, ``live`` streams alarms and fleet changes
as server-sent events, ``access`` decides who may look, ``app`` serves the pages.
"""

from ivp.recomputer.console.access import ConsoleSettings
from ivp.recomputer.console.app import make_console_app, start_console

__all__ = ["ConsoleSettings", "make_console_app", "start_console"]
