"""`ivp status URL` and `ivp alarms URL`: a recomputer's or a gateway's state for people.

Both read the service's own JSON (``GET /status``, ``GET /alarms``; docs/ARCHITECTURE.md)
and print it as tables that fit 80 columns, or as that JSON with ``--json``. Which
service answered is told by the shape of its status (a recomputer lists gateways).
The table builders are pure functions of the JSON, so tests check them directly.
"""

from __future__ import annotations

import json
import shutil
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

WIDTH = 80

UrlArg = Annotated[str, typer.Argument(help="A recomputer or a gateway, e.g. "
                                            "http://127.0.0.1:8000")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the service's JSON instead.")]


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("alarms")(alarms)


def status(url: UrlArg, as_json: JsonOpt = False) -> None:
    """The state of a recomputer (its gateways, verdicts, queue, alarms) or of a gateway
    (state, model, boot, pairs, audits, spool, uplink), as tables for people."""
    data = _get(url, "/status")
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    _print(recomputer_status(data) if "gateways" in data else gateway_status(data))


def alarms(url: UrlArg, as_json: JsonOpt = False) -> None:
    """The alarms of a recomputer (every alarm it raised or received, newest last) or of
    a gateway (its own alarm log, newest first), as a table for people."""
    data = _get(url, "/alarms")
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    _print([alarm_table(data)])


# --- tables (pure) --------------------------------------------------------------------------
def _when(t: Any) -> str:
    if not isinstance(t, int | float):
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%m-%d %H:%M:%S")


def _short(value: Any, n: int = 12) -> str:
    text = "-" if value is None else str(value)
    return text if len(text) <= n else text[: n - 1] + "…"


def recomputer_status(data: dict[str, Any]) -> list[Any]:
    verdicts = data.get("verdicts") or {}
    wl = data.get("whitelist") or {}
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("recomputer", _short(data.get("keyid"), 16) + f"  mode {data.get('mode')}")
    summary.add_row("whitelist", f"version {wl.get('version', '-')}: "
                    + ", ".join(wl.get("models", [])) if wl else "none installed")
    summary.add_row("verdicts", f"{verdicts.get('passed', 0)} passed, "
                    f"{verdicts.get('failed', 0)} failed; queue {data.get('queue_depth', 0)}")
    summary.add_row("alarms", f"{data.get('open_alarms', 0)} open of {data.get('alarms', 0)}")
    table = Table(title="gateways", title_justify="left")
    for col, justify in (("gateway", "left"), ("state", "left"), ("ok", "left"),
                         ("model", "left"), ("pairs", "right"), ("audits", "right"),
                         ("pass", "right"), ("fail", "right")):
        table.add_column(col, justify=justify, overflow="ellipsis")  # type: ignore[arg-type]
    for gid, g in sorted((data.get("gateways") or {}).items()):
        v = g.get("verdicts") or {}
        table.add_row(_short(gid, 14), _short(g.get("state"), 10),
                      "yes" if g.get("healthy") else "no", _short(g.get("model_id"), 16),
                      str(g.get("pairs_served") if g.get("pairs_served") is not None else "-"),
                      str(g.get("audits_received", 0)), str(v.get("passed", 0)),
                      str(v.get("failed", 0)))
    if not data.get("gateways"):
        table.add_row("(none enrolled)", "", "", "", "", "", "", "")
    return [summary, table]


def gateway_status(data: dict[str, Any]) -> list[Any]:
    table = Table(title=f"gateway {data.get('gateway_id', '?')}", title_justify="left",
                  show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    uplink = data.get("uplink") or {}
    rows = [
        ("state", str(data.get("state")) + (f" ({data['reason']})" if data.get("reason")
                                            else "")),
        ("model", str(data.get("model_id") or "-")),
        ("boot", str(data.get("boot_id") or "-")),
        ("pairs served", str(data.get("pairs_served", 0))),
        ("audits", f"{data.get('audits', 0)} (ε {data.get('epsilon')})"),
        ("spool depth", str(data.get("spool_depth", "-"))),
        ("server", str(data.get("server", "-"))),
        ("alarms", str(data.get("alarms", "-"))),
        ("whitelist", f"version {data.get('whitelist_version', '-')}"),
    ]
    if uplink:
        rows.append(("uplink", f"{uplink.get('acked', 0)} acked, {uplink.get('refused', 0)} "
                               f"refused, {uplink.get('failures', 0)} failures"))
    if data.get("upload"):
        up = data["upload"]
        rows.append(("upload", f"{up.get('model_id')}: {up.get('counter')} of "
                               f"{up.get('total')} bytes"))
    for key, value in rows:
        table.add_row(key, value)
    return [table]


def alarm_table(rows: list[dict[str, Any]]) -> Table:
    gateway_log = bool(rows) and "message" in rows[0]
    table = Table(title=f"{len(rows)} alarm(s)", title_justify="left")
    table.add_column("id", justify="right")
    table.add_column("time")
    table.add_column("kind", overflow="fold")
    if not gateway_log:
        table.add_column("gateway", overflow="ellipsis")
        table.add_column("n", justify="right")
        table.add_column("ack")
    table.add_column("detail", overflow="fold", ratio=1)
    for a in rows:
        if gateway_log:
            table.add_row(str(a.get("id")), _when(a.get("time")), str(a.get("kind")),
                          str(a.get("message", "")))
        else:
            table.add_row(str(a.get("id")), _when(a.get("time")), str(a.get("kind")),
                          _short(a.get("gateway_id"), 10), str(a.get("count", 1)),
                          "yes" if a.get("acknowledged") else "no", str(a.get("detail", "")))
    return table


# --- I/O ------------------------------------------------------------------------------------
def _get(url: str, path: str) -> Any:
    from ivp.gateway.cli import malformed_url

    why = malformed_url(url)
    if why:
        _fail(why)
    try:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        _fail(f"{url}{path} answered HTTP {exc.code}: {message}")
    except (OSError, ValueError) as exc:
        _fail(f"cannot read {url}{path}: {getattr(exc, 'reason', exc)}")


def _fail(message: str) -> None:
    typer.echo(f"ivp: {message}", err=True)
    raise typer.Exit(2)


def _print(parts: list[Any]) -> None:
    width = min(WIDTH, shutil.get_terminal_size((WIDTH, 24)).columns)
    console = Console(width=width, file=sys.stdout, highlight=False, soft_wrap=False)
    for part in parts:
        console.print(part)


__all__ = ["alarm_table", "gateway_status", "recomputer_status", "register"]
