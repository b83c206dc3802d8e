"""The inspectors' console over HTTP, in process: pages, read-only, access, events, metrics.

A recomputer (in process) with one scripted gateway behind a fake gateway app; the
console app is served beside it exactly as ``ivp recomputer --console`` serves it.
The real-browser tests (Chromium, a live loopback datacenter) are in
``test_console_browser.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from msgspec.structs import replace
from test_recomputer_service import FakeGateway, online, serving
from test_recomputer_support import Inspectors, ScriptedGateway, body, run

from ivp.errors import ValidationError
from ivp.recomputer.console import ConsoleSettings, make_console_app
from ivp.recomputer.console.app import STATE
from ivp.recomputer.service import Config, Recomputer

pytest_plugins = ("test_recomputer_support",)
TOKEN = "correct-horse-battery-staple-42"
PAGES = ("/", "/alarms", "/audits", "/audits?status=failed", "/health", "/admin")


@asynccontextmanager
async def console(rec: Recomputer, token: str | None = None) -> AsyncIterator[TestClient]:
    client = TestClient(TestServer(make_console_app(rec, ConsoleSettings(token=token))))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


def cheat(gateway: ScriptedGateway, tiny_engine: Any) -> tuple[dict, list[int]]:
    """An audit record whose output was altered at positions 2 and 4 (a rogue server)."""
    pair = gateway.pair(max_tokens=8, temperature=0.0, prompt="Tell me about the weather in")
    out = list(pair.output_token_ids)
    for t in (2, 4):
        out[t] = (out[t] + 7) % 500 + 3
    bad = replace(pair, output_token_ids=out,
                  output_text=tiny_engine.tokenizer.decode(out, skip_special_tokens=True))
    return gateway.audit(bad), [2, 4]


async def populated(rec: Recomputer, client: TestClient, inspectors: Inspectors,
                    gateway: ScriptedGateway, tiny_engine: Any, fake: FakeGateway
                    ) -> dict[str, Any]:
    """Boot gw-a, three honest audits, a checkpoint, one cheating audit, all verified."""
    await online(rec, client, inspectors, gateway, fake)
    honest = [gateway.audit(max_tokens=6, temperature=t) for t in (0.0, 0.7, 1.0)]
    bad, positions = cheat(gateway, tiny_engine)
    r = await client.post("/uplink", data=body(*honest, gateway.checkpoint(), bad))
    assert all(x["ok"] for x in (await r.json())["results"])
    await rec.drain()
    verdicts = await (await client.get("/verdicts")).json()
    return {"verdicts": verdicts, "positions": positions}


def store_digest(path: Path) -> str:
    """A digest of every row of every table: equal digests = nothing written."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    h = hashlib.sha256()
    for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                               "ORDER BY name"):
        # sorted in Python: some tables (the store's seals) are WITHOUT ROWID
        for row in sorted(repr(r) for r in db.execute(f"SELECT * FROM {table}")):
            h.update(row.encode())
    db.close()
    return h.hexdigest()


def test_verdicts_keep_per_position_delta_and_failing_positions(
        config: Config, inspectors: Inspectors, gateway: ScriptedGateway,
        tiny_engine: Any) -> None:
    async def main() -> None:
        fake = FakeGateway("gw-a")
        async with serving(config) as (rec, client):
            found = await populated(rec, client, inspectors, gateway, tiny_engine, fake)
        await fake.close()
        passed = [v for v in found["verdicts"] if v["passed"]]
        [failed] = [v for v in found["verdicts"] if not v["passed"]]
        for v in found["verdicts"]:
            assert len(v["position_delta"]) == v["tokens"]
        assert all(max(v["position_delta"]) <= v["delta"] for v in passed)
        # the altered positions fail (a later one may too: the history changed)
        assert failed["failed_positions"][:1] == [2]
        assert failed["failures"] == len(failed["failed_positions"])
        assert all(failed["position_delta"][t] > failed["delta"]
                   for t in failed["failed_positions"])
    run(main())


def test_pages_render_what_the_recomputer_holds_and_write_nothing(
        config: Config, inspectors: Inspectors, gateway: ScriptedGateway,
        tiny_engine: Any) -> None:
    async def main() -> None:
        fake = FakeGateway("gw-a")
        async with serving(config) as (rec, client), console(rec) as ui:
            found = await populated(rec, client, inspectors, gateway, tiny_engine, fake)
            for _ in range(200):  # the shutdown reaches the fake gateway
                if fake.controls:
                    break
                await asyncio.sleep(0.02)
            before = store_digest(rec.store.path)
            pages = {}
            for path in PAGES:
                r = await ui.get(path)
                assert r.status == 200, (path, await r.text())
                assert "default-src 'none'" in r.headers["Content-Security-Policy"]
                pages[path] = await r.text()
            fleet = pages["/"]
            assert 'id="gw-gw-a"' in fleet and 'data-state="shutdown"' in fleet
            assert "<title>(1) Fleet · ivp console</title>" in fleet  # one open alarm
            assert "verify_fail" in fleet and "verify_fail" in pages["/alarms"]
            failed_id = re.findall(r'href="/audits/(\d+)"', pages["/audits?status=failed"])[0]
            audit = await (await ui.get(f"/audits/{failed_id}")).text()
            marked = re.findall(r'class="tok [^"]*\bfailed\b[^"]*" data-position="(\d+)"', audit)
            [failed] = [v for v in found["verdicts"] if not v["passed"]]
            assert [int(p) for p in marked] == failed["failed_positions"]
            assert "✓ valid, by enrolled key" in audit and "✓ head = link(prev, pair)" in audit
            assert "Tell me about the weather in" in audit  # the prompt, as text
            assert audit.count('class="bar fail"') == len(failed["failed_positions"])
            assert "hash chain intact: 1 entries" in pages["/admin"]
            assert "us-1 <span class=\"party\">US</span>" in pages["/admin"]
            assert "<svg" in pages["/health"] and "tiny-llama" in pages["/health"]
            # read-only: nothing changed in the store, and SQLite refuses writes here
            assert store_digest(rec.store.path) == before
            reader = ui.server.app[STATE].reader
            with pytest.raises(sqlite3.OperationalError):
                reader._db.execute("DELETE FROM alarms")
            methods = {r.method for r in ui.server.app.router.routes()
                       if r.resource and r.resource.canonical not in ("/login", "/logout")}
            assert methods <= {"GET", "HEAD"}
        await fake.close()
    run(main())


def test_bad_requests_get_clear_error_pages(config: Config) -> None:
    async def main() -> None:
        async with serving(config) as (rec, _), console(rec) as ui:
            r = await ui.get("/audits/999")
            assert r.status == 404 and "no audit record 999 is stored" in await r.text()
            r = await ui.get("/audits/x")
            assert r.status == 400 and "an audit id is a number" in await r.text()
            r = await ui.get("/audits?status=bogus")
            assert r.status == 400 and "passed, failed or queued" in await r.text()
            r = await ui.get("/", headers={"Host": "evil.example:80"})  # DNS rebinding
            assert r.status == 421
    run(main())


def test_a_bricked_recomputer_shows_why_and_nothing_else(config: Config) -> None:
    async def main() -> None:
        async with serving(config) as (rec, _), console(rec) as ui:
            rec.tamper()
            for path in ("/", "/audits", "/events"):
                r = await ui.get(path)
                assert r.status == 503
                assert "bricked" in (await r.text())
    run(main())


def test_token_login_and_no_secret_on_any_page(config: Config, inspectors: Inspectors,
                                               gateway: ScriptedGateway,
                                               tiny_engine: Any) -> None:
    async def main() -> None:
        fake = FakeGateway("gw-a")
        async with serving(config) as (rec, client), console(rec, TOKEN) as ui:
            await populated(rec, client, inspectors, gateway, tiny_engine, fake)
            r = await ui.get("/", allow_redirects=False)
            assert r.status == 303 and r.headers["Location"] == "/login?next=/"
            assert (await ui.get("/events")).status == 401
            r = await ui.post("/login", data={"token": "wrong-token-wrong-token", "next": "/"},
                              allow_redirects=False)
            assert r.status == 401 and "not the console token" in await r.text()
            assert (await ui.get("/", allow_redirects=False)).status == 303
            r = await ui.post("/login", data={"token": TOKEN, "next": "//evil.example/"},
                              allow_redirects=False)
            assert r.status == 303 and r.headers["Location"] == "/"  # never off-site
            cookie = r.cookies["ivp_console"]
            assert cookie["httponly"] and cookie["samesite"] == "Strict"
            secret = (Path(config.state_dir) / "device" / "uid.secret").read_bytes()
            for path in (*PAGES, "/audits/1", "/audits/4"):
                page = await ui.get(path)
                assert page.status == 200, path
                text = await page.text()
                assert TOKEN not in text
                assert secret.hex() not in text and secret.decode("latin-1") not in text
            await ui.post("/logout")
            assert (await ui.get("/", allow_redirects=False)).status == 303
            r = await ui.get("/admin", headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status == 200  # scripts send the token instead of logging in
        await fake.close()
    run(main())


def test_remote_bind_needs_a_token() -> None:
    with pytest.raises(ValidationError, match="needs --console-token-file"):
        ConsoleSettings(host="0.0.0.0")
    with pytest.raises(ValidationError, match="at least 16"):
        ConsoleSettings(host="0.0.0.0", token="short")
    assert ConsoleSettings(host="0.0.0.0", token=TOKEN).token == TOKEN
    assert ConsoleSettings(host="::1").url == "http://[::1]:8001"


def test_cli_refuses_a_remote_console_without_token(tmp_path: Path,
                                                    inspectors: Inspectors) -> None:
    from typer.testing import CliRunner

    from ivp.cli import app
    from ivp.protocol.encoding import canonical

    policy = tmp_path / "policy.json"
    policy.write_bytes(canonical(inspectors.policy))
    result = CliRunner().invoke(app, ["recomputer", "--state", str(tmp_path / "rc"),
                                      "--policy", str(policy), "--console",
                                      "--console-host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "not a loopback address" in result.output and "--console-token-file" in result.output


async def _events(ui: TestClient, wanted: str, timeout: float = 10.0) -> dict[str, Any]:
    """Read the console's event stream until an event of kind ``wanted``."""
    async with ui.session.get(ui.make_url("/events?after=0&since=0")) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        event = ""
        async with asyncio.timeout(timeout):
            async for raw in r.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == wanted:
                    return json.loads(line[6:])
    raise AssertionError("stream ended")


def test_event_stream_carries_a_new_alarm(config: Config, inspectors: Inspectors,
                                          gateway: ScriptedGateway, tiny_engine: Any) -> None:
    async def main() -> None:
        fake = FakeGateway("gw-a")
        async with serving(config) as (rec, client), console(rec) as ui:
            await online(rec, client, inspectors, gateway, fake)
            listening = asyncio.create_task(_events(ui, "alarm"))
            await asyncio.sleep(0.8)  # the page is open before the cheat is caught
            bad, _ = cheat(gateway, tiny_engine)
            await client.post("/uplink", data=body(bad))
            data = await listening
            assert data["open"] == 1 and 'data-kind="verify_fail"' in data["html"]
            fleet = await _events(ui, "fleet")
            assert 'data-state="shutdown"' in fleet["html"]
        await fake.close()
    run(main())


def test_metrics_count_open_alarms(config: Config, inspectors: Inspectors,
                                   gateway: ScriptedGateway, tiny_engine: Any) -> None:
    async def main() -> None:
        fake = FakeGateway("gw-a")
        async with serving(config) as (rec, client):
            await online(rec, client, inspectors, gateway, fake)
            assert "ivp_open_alarms 0.0" in await (await client.get("/metrics")).text()
            bad, _ = cheat(gateway, tiny_engine)
            await client.post("/uplink", data=body(bad))
            await rec.drain()
            text = await (await client.get("/metrics")).text()
            assert "ivp_open_alarms 1.0" in text
            assert 'ivp_open_alarms_by_kind{kind="verify_fail"} 1.0' in text
            [alarm] = await rec.alarms()
            await rec.handle_admin(inspectors.request("ack_alarm", {"alarm_id": alarm["id"],
                                                                    "note": "seen"}))
            text = await (await client.get("/metrics")).text()
            assert "ivp_open_alarms 0.0" in text and "ivp_open_alarms_by_kind{" not in text
        await fake.close()
    run(main())


def test_templates_and_static_files_ship_with_the_package() -> None:
    """Every console file is covered by pyproject's package-data globs (a wheel has them)."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["ivp.recomputer.console"]
    here = root / "src" / "ivp" / "recomputer" / "console"
    files = [p.relative_to(here).as_posix() for d in ("templates", "static")
             for p in (here / d).iterdir()]
    assert files
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []
