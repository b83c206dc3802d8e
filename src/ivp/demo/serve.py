"""`ivp demo --serve`: a loopback datacenter that stays up for a person to use.

The recomputer is an OpenAI-compatible endpoint: this prints its base URL and a
snippet for the ``openai`` package, then waits. Ctrl-C (or SIGTERM) stops every
process of the datacenter and removes its temporary directory.
"""

from __future__ import annotations

import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ivp.attacks.runner import Settings

SNIPPET = '''from openai import OpenAI

client = OpenAI(base_url="{base}", api_key="ivp")
answer = client.chat.completions.create(
    model="{model}", messages=[{{"role": "user", "content": "Hello"}}], max_tokens=24)
print(answer.choices[0].message.content)'''


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def busy_port_message(port: int) -> str | None:
    """The one-line refusal when ``port`` is taken (checked before any work starts)."""
    if port and not port_free(port):
        return (f"ivp demo: port {port} is already in use: stop what holds it, or pass "
                "--port 0 for any free port")
    return None


def serve(settings: Settings, *, gateways: int, port: int, root: Path, keep: bool) -> int:
    """Start the datacenter, print how to use it, wait for Ctrl-C; the exit status.

    ``settings``: the demo's model, ε, engine, δ and isolation; ``keep``: leave ``root``
    (keys, state, logs) behind instead of removing it.
    """
    from ivp.datacenter import LoopbackDatacenter

    say = settings.say
    dc = LoopbackDatacenter(root, gateways=gateways, epsilon=settings.epsilon,
                            model=settings.model, recomputer_port=port, log=say,
                            prebuilt_model=settings.model_dir, engine=settings.engine,
                            noise_bound=settings.noise_bound, isolate=settings.isolate)

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    # SIGTERM stops it like Ctrl-C: every child process is stopped on the way out
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        say("starting the datacenter (a minute on a small machine)")
        dc.start()
        _announce(dc, settings.model, root if keep else None)
        while dc.recomputer.alive():
            time.sleep(0.5)
        print(f"ivp demo: the recomputer exited; see {dc.recomputer.log}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        say("stopping the datacenter")
        return 0
    except RuntimeError as exc:
        print(f"ivp demo: the datacenter did not come up: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in previous:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        dc.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _announce(dc: Any, model: str, kept: Path | None) -> None:
    base = dc.recomputer_url + "/v1"
    gibberish = (" (random weights: it answers gibberish; `ivp demo --serve --model "
                 "gemma-3-270m` for real text)" if model == "tiny" else "")
    lines = [
        f"ivp demo: a datacenter is up: a recomputer and {len(dc.handles)} gateway(s) "
        f"serving {dc.model_id}{gibberish}, ε = {dc.epsilon}.",
        f"base URL: {base}",
        f"gateways: {', '.join(h.url for h in dc.handles)}",
        "",
        "Paste into Python (pip install openai):",
        "",
        SNIPPET.format(base=base, model=dc.model_id),
        "",
        f"or: curl -s {base}/models",
        f"state: ivp status {dc.recomputer_url}    alarms: ivp alarms {dc.recomputer_url}",
    ]
    if getattr(dc, "console_url", ""):
        lines.append(f"inspectors' console (read-only): {dc.console_url}")
    if kept is not None:
        lines.append(f"keys, state and logs: {kept}")
    lines.append("Ctrl-C stops it.")
    print("\n".join(lines), flush=True)


__all__ = ["serve"]
