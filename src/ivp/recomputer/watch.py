"""`ivp watch URL`: an inspector's watch over a recomputer's signed notices.

Long-polls ``GET URL/notices?after=N&wait=S``, verifies every notice and heartbeat
with :class:`ivp.protocol.notices.Watcher` against the recomputer key the inspectors
hold, prints each notice as one JSON line, and exits non-zero the moment something
does not add up: a bad signature, a gap or fork in the chain, a heartbeat older than
``--max-gap`` or naming notices the feed withheld, or no answer for ``--max-gap``
seconds. Silence is the alarm.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Annotated, Any

import typer

EXIT_ALARM = 3  # the watch saw a gap, a forgery or silence


def _fetch(url: str, after: int, wait: float, timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(f"{url.rstrip('/')}/notices?after={after}&wait={wait:g}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        value = json.loads(r.read())
    if not isinstance(value, dict) or not isinstance(value.get("notices"), list):
        raise ValueError("the answer is not {notices: [...], heartbeat: ...}")
    return value


def watch(
    url: Annotated[str, typer.Argument(help="The recomputer, e.g. http://src:8000")],
    recomputer_key: Annotated[str, typer.Option(
        help="The recomputer's public key as the inspectors recorded it (its "
             "--print-identity), never taken from the feed.")],
    max_gap: Annotated[float, typer.Option(
        help="Seconds without a fresh signed heartbeat before the watch raises the "
             "alarm (exit 3).")] = 30.0,
    after: Annotated[int, typer.Option(
        help="Start after this notice number (0: from the first; the chain is then "
             "checked from its genesis).")] = 0,
    head: Annotated[str, typer.Option(
        help="With --after N: the hash of notice N (printed with every notice), so "
             "the chain is checked from there.")] = "",
    duration: Annotated[float, typer.Option(
        help="Stop after this many seconds with exit 0 if all was well (0: forever).")
    ] = 0.0,
    poll: Annotated[float, typer.Option(help="Long-poll wait per request, seconds.")] = 5.0,
) -> None:
    """Verify a recomputer's signed alarms, verdicts and heartbeats from outside.

    Prints one JSON line per verified notice ({seq, hash, kind, time, body}). Exit 3
    on a bad signature, a missing or rewritten notice, a stale heartbeat or silence
    longer than --max-gap; exit 2 on bad options.
    """
    from ivp.errors import IvpError
    from ivp.protocol.encoding import canonical
    from ivp.protocol.keys import VerifyKey
    from ivp.protocol.notices import GENESIS, WATCH_ERRORS, Watcher

    try:
        key = VerifyKey.from_hex(recomputer_key)
    except IvpError as exc:
        typer.echo(f"ivp watch: --recomputer-key: {exc}", err=True)
        raise typer.Exit(2) from None
    if after and len(head) != 64:
        typer.echo("ivp watch: --after needs --head (the hash of that notice)", err=True)
        raise typer.Exit(2)
    watcher = Watcher(key, max_gap=max_gap, seq=after, head=head or GENESIS)
    start = last_answer = time.monotonic()

    def alarm(message: str) -> None:
        typer.echo(f"ivp watch: ALARM: {message}", err=True)
        raise typer.Exit(EXIT_ALARM)

    while not duration or time.monotonic() - start < duration:
        try:
            answer = _fetch(url, watcher.seq, poll, timeout=poll + max_gap)
        except (OSError, ValueError, urllib.error.URLError) as exc:
            if time.monotonic() - last_answer > max_gap:
                alarm(f"no answer from {url} for {max_gap:g} s ({exc})")
            time.sleep(min(1.0, max_gap / 4))
            continue
        last_answer = time.monotonic()
        try:
            for item in answer["notices"]:
                notice = watcher.notice(canonical(item))
                print(json.dumps({"seq": notice.seq, "hash": watcher.head,
                                  "kind": notice.kind, "time": notice.time,
                                  "body": notice.body}), flush=True)
            if len(answer["notices"]) == 0 or answer.get("more") is not True:
                watcher.heartbeat(canonical(answer.get("heartbeat")), time.time())
        except WATCH_ERRORS as exc:
            alarm(str(exc))
        silent = watcher.silent_for(time.time())
        if silent is None:  # none yet: counted from the start of the watch
            silent = time.monotonic() - start
        if silent > max_gap:
            alarm(f"no fresh heartbeat for {silent:.0f} s")
    sys.exit(0)


__all__ = ["EXIT_ALARM", "watch"]
