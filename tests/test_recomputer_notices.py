"""The recomputer's signed notice feed (GET /notices) and `ivp watch`, live: an alarm
reaches the inspectors' watch signed and chained; a feed the operator edits, or a
recomputer that falls silent, makes the watch exit non-zero."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from typing import Any

from ivp.protocol.encoding import canonical
from ivp.protocol.envelope import AUDIT, sign
from ivp.protocol.keys import SigningKey
from ivp.protocol.notices import Watcher
from ivp.recomputer.service import Recomputer

pytest_plugins = ("test_recomputer_support",)


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return dict(json.loads(r.read()))


def _unenrolled_record(url: str) -> None:
    """Something that raises an alarm: a record signed by no enrolled key."""
    body = json.dumps({"envelopes": [json.loads(
        sign(AUDIT, b'{"gateway_id":"gw-x"}', [SigningKey.generate()]).to_bytes())]})
    req = urllib.request.Request(url + "/uplink", data=body.encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()


def _watch(url: str, key: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ivp.cli", "watch", url, "--recomputer-key",
                           key, *args], capture_output=True, text=True, timeout=timeout)


def test_alarm_reaches_the_watch_signed_and_chained(live: tuple[str, Recomputer]) -> None:
    url, rec = live
    key = rec.identity()["public_key"]
    _unenrolled_record(url)
    feed = _get(url + "/notices?after=0&wait=5")
    watcher = Watcher(rec.device.public_key)
    notices = [watcher.notice(canonical(n)) for n in feed["notices"]]
    assert [n.kind for n in notices] == ["alarm"]
    assert notices[0].body["kind"] == "unenrolled"
    watcher.heartbeat(canonical(feed["heartbeat"]), time.time())
    done = _watch(url, key, "--duration", "3", "--poll", "1", "--max-gap", "10")
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    assert json.loads(line)["body"]["kind"] == "unenrolled"
    # The feed does not change when read again; a long poll with nothing new waits.
    t0 = time.monotonic()
    again = _get(url + "/notices?after=1&wait=1")
    assert again["notices"] == [] and time.monotonic() - t0 >= 0.9


def test_watch_exits_non_zero_when_the_feed_was_edited(live: tuple[str, Recomputer]) -> None:
    """Attack: the operator rewrites the stored notice of their alarm (here straight in
    notices.sqlite, past its append-only triggers): the signature no longer holds."""
    url, rec = live
    _unenrolled_record(url)
    assert _get(url + "/notices?after=0")["notices"]
    db = rec.notices._db
    db.execute("DROP TRIGGER notices_no_update")
    row = db.execute("SELECT envelope FROM notices WHERE seq = 1").fetchone()[0]
    db.execute("UPDATE notices SET envelope = ? WHERE seq = 1",
               (bytes(row).replace(b'"payload":"', b'"payload":"eyJ4Ijox', 1),))
    done = _watch(url, rec.identity()["public_key"], "--duration", "5", "--poll", "1")
    assert done.returncode == 3 and "ALARM" in done.stderr, (done.stdout, done.stderr)


def test_watch_exits_non_zero_on_silence(live: tuple[str, Recomputer]) -> None:
    """Attack: the operator cuts the recomputer off from the inspectors."""
    url, rec = live
    key = rec.identity()["public_key"]
    dead = "http://127.0.0.1:9"  # nothing listens: the inspectors hear nothing at all
    t0 = time.monotonic()
    done = _watch(dead, key, "--max-gap", "2", "--poll", "1")
    assert done.returncode == 3 and "no answer" in done.stderr, done.stderr
    assert 2 <= time.monotonic() - t0 < 30
    bad = _watch(url, "ab" * 32, "--duration", "3", "--poll", "1")  # not its key
    assert bad.returncode == 3 and "signature" in bad.stderr, bad.stderr
