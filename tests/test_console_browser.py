"""The console in a real browser: Debian's Chromium, headless, driven by Selenium.

* the fleet page lists both gateways of the shared live loopback datacenter;
* in a private datacenter (the attack shuts a gateway down), the rogue-model attack's
  ``verify_fail`` alarm appears in the open fleet page without a reload, within 10 s
  of the recomputer storing it, and the gateway's row turns to shutdown;
* the audit explorer renders that failed audit with its failing positions marked;
* no page logs a JavaScript error; a recomputer that goes away is said so on the page.

Each page is photographed; with ``IVP_SCREENSHOTS=docs/img`` (``make screenshots``)
the pictures go where docs/CONSOLE.md shows them, else into the test's temp folder.
Chromium and ChromeDriver come from Debian (``scripts/install-browser.sh``, run by
``make test``), never from a download of their own.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="Debian's chromium and chromium-driver are not installed "
           "(scripts/install-browser.sh, which make test runs, installs them as root)")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,900")
WIDTH = 1400


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One Chromium for every page test (a fresh profile, nothing downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = os.environ.get("IVP_SCREENSHOTS")
    if target:
        path = Path(target)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("console-screenshots")


def wait(what: str, probe: Callable[[], Any], timeout: float = 10.0,
         interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def js_errors(driver: Any) -> list[dict[str, Any]]:
    """Console entries at error level since the last call (reading the log clears it)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def photograph(driver: Any, folder: Path, name: str) -> Path:
    """The whole page, beyond the window's height, as ``console-<name>.png``."""
    import base64

    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": WIDTH, "height": min(size["height"], 4000),
                 "scale": 1}})
    path = folder / f"console-{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def rows(driver: Any, selector: str = "#fleet-body tr[data-gateway]") -> dict[str, str]:
    """gateway -> state of the fleet rows, read in one go (the live feed replaces rows)."""
    pairs = driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".map(e => [e.dataset.gateway, e.dataset.state])", selector)
    return dict(pairs)


def shown_at(driver: Any, selector: str) -> float | None:
    """When the page placed the first row matching ``selector`` (epoch s), or None."""
    ms = driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e && e.dataset.shownAt",
        selector)
    return None if ms is None else int(ms) / 1000


def test_fleet_lists_both_gateways_of_the_live_datacenter(browser: Any, datacenter: Any,
                                                          shots: Path) -> None:
    dc = datacenter
    answers = dc.send(48, max_tokens=12)
    assert all(a["status"] == 200 for a in answers)
    dc.drain()

    def counted() -> bool:  # a checkpoint after the traffic counts every audit received
        gateways = dc.recomputer_status()["gateways"]
        return all(gateways[g]["audits_claimed"] == gateways[g]["audits_received"]
                   for g in ("gw-a", "gw-b"))

    wait("checkpoints counting the traffic", counted, timeout=30, interval=0.5)
    browser.get(dc.console_url + "/")

    def serving() -> set[str]:
        states = rows(browser)
        return {g for g, s in states.items() if s == "serving"}

    wait("gw-a and gw-b listed as serving", lambda: {"gw-a", "gw-b"} <= serving())
    assert browser.title.endswith("Fleet · ivp console")
    wait("the live stream", lambda: browser.find_element("id", "live-state").text == "connected")
    photograph(browser, shots, "fleet-honest")
    browser.get(dc.console_url + "/health")
    assert len(browser.find_elements("css selector", "svg.chart")) >= 2
    assert browser.find_elements("css selector", "svg.chart circle.dot")  # a boot's audits
    photograph(browser, shots, "health")
    browser.get(dc.console_url + "/admin")
    assert browser.find_element("id", "admin-chain").text.startswith("hash chain intact")
    enrolments = [e.text for e in browser.find_elements("css selector", "table.admin td b")]
    assert enrolments.count("enrol_device") >= 2
    photograph(browser, shots, "admin")
    browser.get(dc.console_url + "/audits")
    assert browser.find_elements("css selector", "table.audits a.verdict-passed")
    photograph(browser, shots, "audits")
    assert js_errors(browser) == []


def test_rogue_model_alarm_appears_live_and_the_row_turns_shutdown(
        browser: Any, tmp_path: Path, tiny_model_dir: Path, shots: Path) -> None:
    from ivp.attacks.registry import SCENARIOS
    from ivp.attacks.runner import AttackSession, Settings

    scenario = SCENARIOS["rogue-model-persists"]
    settings = Settings(epsilon=1.0, model_dir=tiny_model_dir, cap=200, patience=90)
    with AttackSession(tmp_path / "dc", settings) as session:
        dc = session.dc
        victim = session.provision(scenario)
        assert victim is not None
        victim_id = dc.handles[victim].gateway_id
        dc.send(8, max_tokens=12)
        dc.drain()
        browser.get(dc.console_url + "/")
        wait("the live stream", lambda: browser.find_element("id", "live-state").text
             == "connected")
        assert rows(browser).get(victim_id) == "serving"
        browser.execute_script("window.ivpLoaded = 'this page, never reloaded'")

        outcome: list[Any] = []
        runner = threading.Thread(target=lambda: outcome.append(
            session.run(scenario, victim, retire=False)))
        started = time.time()
        runner.start()
        selector = f'tr.alarm[data-kind="verify_fail"][data-gateway="{victim_id}"]'
        shown = wait("the verify_fail alarm placed in the open page",
                     lambda: shown_at(browser, selector), timeout=120)
        seen_at = time.time()
        runner.join(timeout=180)
        assert outcome and outcome[0].detected, outcome and outcome[0].summary()
        alarm = min((a for a in dc.alarms() if a["kind"] == "verify_fail"
                     and a["gateway_id"] == victim_id), key=lambda a: a["id"])
        latency = shown - alarm["time"]
        print(f"\nconsole: verify_fail stored {alarm['time'] - started:.1f} s after the cheat "
              f"fired, shown in the open page {latency:.2f} s later (polled at "
              f"{seen_at - alarm['time']:.2f} s)")
        assert 0 <= latency < 10
        wait(f"{victim_id}'s row in state shutdown",
             lambda: rows(browser).get(victim_id) == "shutdown")
        assert browser.execute_script("return window.ivpLoaded") == \
            "this page, never reloaded"
        assert re.match(r"\(\d+\) Fleet · ivp console", browser.title), browser.title
        assert js_errors(browser) == []
        photograph(browser, shots, "fleet")

        browser.get(dc.console_url + "/alarms")
        assert browser.find_elements("css selector", selector)
        photograph(browser, shots, "alarms")

        failed = [v for v in dc.verdicts() if v["gateway_id"] == victim_id and not v["passed"]]
        browser.get(dc.console_url + f"/audits?gateway={victim_id}&status=failed")
        links = browser.find_elements("css selector", "table.audits tbody a.verdict-failed")
        assert len(links) == len(failed)
        links[-1].click()  # the oldest failed record: the one that raised the alarm
        seq = int(re.search(r"· (\d+)$", browser.find_element(
            "css selector", "dl.facts dd").text).group(1))
        [verdict] = [v for v in failed if v["audit_seq"] == seq]
        marked = [int(e.get_attribute("data-position")) for e in
                  browser.find_elements("css selector", "#output-tokens .tok.failed")]
        assert marked == verdict["failed_positions"] and marked
        bars = browser.find_elements("css selector", "svg.chart rect.bar.fail")
        assert [int(b.get_attribute("data-position")) for b in bars] == marked
        assert browser.find_element("id", "failing-positions").text == \
            ", ".join(map(str, marked))
        assert browser.find_element("id", "signature-status").text.startswith("✓ valid")
        assert browser.find_element("id", "chain-status").text.startswith("✓")
        assert "not explained by the whitelisted model" in browser.find_element(
            "id", "verdict-reason").text
        photograph(browser, shots, "audit")
        assert js_errors(browser) == []

        # The recomputer goes away: the open page says so instead of going stale silently.
        browser.get(dc.console_url + "/")
        wait("the live stream", lambda: browser.find_element("id", "live-state").text
             == "connected")
        dc.recomputer.stop()
        banner = wait("the unreachable banner", lambda: (
            (b := browser.find_element("id", "offline")).is_displayed() and b), timeout=15)
        assert "The recomputer is unreachable" in banner.text
        photograph(browser, shots, "offline")
