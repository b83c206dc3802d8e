"""Signed, chained notices and heartbeats (ivp.protocol.notices, recomputer.notices):
what an inspector's watch accepts, and each way an operator could suppress or forge
an alarm, refused with its exact error and the watcher's state unchanged."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from ivp.errors import ChainError, ExpiredError, SignatureError, ValidationError
from ivp.protocol import envelope as env
from ivp.protocol.encoding import canonical
from ivp.protocol.keys import P256, SigningKey
from ivp.protocol.notices import GENESIS, NOTICE, Notice, Watcher, notice_hash
from ivp.recomputer.notices import NoticeLog

KEY = SigningKey.from_seed(b"n" * 32)


def _log(tmp_path: Path, n: int = 3, key: SigningKey = KEY) -> NoticeLog:
    log = NoticeLog(tmp_path / "notices.sqlite", key)
    log.publish([("alarm", i, 100.0 + i, {"id": i, "kind": "verify_fail"})
                 for i in range(1, n + 1)])
    return log


def _state(w: Watcher) -> tuple[int, str, int]:
    return w.seq, w.head, len(w.seen)


@pytest.mark.parametrize("scheme", ["ed25519", P256])
def test_watcher_accepts_the_chain_and_a_fresh_heartbeat(tmp_path: Path, scheme: str) -> None:
    key = KEY if scheme == "ed25519" else SigningKey.generate(P256)
    log = _log(tmp_path, key=key)
    w = Watcher(key.verify_key, max_gap=10)
    for data in log.after(0):
        w.notice(data)
    assert [n.seq for n in w.seen] == [1, 2, 3] and w.seen[0].prev == GENESIS
    beat = w.heartbeat(log.heartbeat(now=500.0), now=505.0)
    assert beat.head_seq == 3 and beat.head == w.head == log.head()[1]
    assert w.silent_for(506.0) == 1.0


def test_publishing_is_once_per_stored_row(tmp_path: Path) -> None:
    log = _log(tmp_path)
    assert log.publish([("alarm", 2, 1.0, {}), ("verdict", 2, 1.0, {"passed": True})]) == 1
    assert log.cursor("alarm") == 3 and log.cursor("verdict") == 2 and log.head()[0] == 4
    with pytest.raises(Exception, match="append-only"):
        log._db.execute("DELETE FROM notices WHERE seq = 2")


def test_withheld_notice_is_a_gap(tmp_path: Path) -> None:
    """Attack: the operator drops notice 2 (the alarm about their cheat)."""
    feed = _log(tmp_path).after(0)
    w = Watcher(KEY.verify_key)
    w.notice(feed[0])
    before = _state(w)
    with pytest.raises(ChainError, match="notice 3 follows notice 1: missing"):
        w.notice(feed[2])
    assert _state(w) == before


def test_replayed_notice_is_refused(tmp_path: Path) -> None:
    feed = _log(tmp_path).after(0)
    w = Watcher(KEY.verify_key)
    w.notice(feed[0])
    w.notice(feed[1])
    with pytest.raises(ChainError, match="replayed"):
        w.notice(feed[0])


def test_rewritten_notice_breaks_the_chain(tmp_path: Path) -> None:
    """Attack: a whole alternative feed signed by some other key, or one notice whose
    body was changed: the signature or the link fails."""
    feed = _log(tmp_path).after(0)
    w = Watcher(KEY.verify_key)
    w.notice(feed[0])
    item = json.loads(feed[1])
    notice = json.loads(base64.b64decode(item["payload"]))
    notice["body"]["kind"] = "nothing_to_see"
    forged = env.sign(NOTICE, canonical(notice), [SigningKey.generate()]).to_bytes()
    with pytest.raises(SignatureError):
        w.notice(forged)
    relinked = Notice(seq=2, prev="ab" * 32, kind="alarm", time=1.0, body={})
    with pytest.raises(ChainError, match="does not link"):
        w.notice(env.sign(NOTICE, canonical(relinked), [KEY]).to_bytes())
    assert w.seq == 1


def test_stale_or_replayed_heartbeat_is_silence(tmp_path: Path) -> None:
    """Attack: the operator cuts the recomputer off and replays an old heartbeat."""
    log = _log(tmp_path)
    w = Watcher(KEY.verify_key, max_gap=30)
    for data in log.after(0):
        w.notice(data)
    old = log.heartbeat(now=1000.0)
    with pytest.raises(ExpiredError, match="silent or delayed"):
        w.heartbeat(old, now=1031.0)
    assert w.last_heartbeat is None


def test_heartbeat_naming_withheld_notices(tmp_path: Path) -> None:
    log = _log(tmp_path)
    w = Watcher(KEY.verify_key)
    w.notice(log.after(0)[0])
    with pytest.raises(ChainError, match="notices withheld"):
        w.heartbeat(log.heartbeat(now=10.0), now=10.0)


def test_heartbeat_from_a_rolled_back_or_other_feed(tmp_path: Path) -> None:
    log = _log(tmp_path)
    w = Watcher(KEY.verify_key)
    for data in log.after(0):
        w.notice(data)
    for name in ("short", "stranger"):
        (tmp_path / name).mkdir()
    other = _log(tmp_path / "short", n=2)  # the feed as it was two notices ago
    with pytest.raises(ChainError, match="rolled-back"):
        w.heartbeat(other.heartbeat(now=5.0), now=5.0)
    forked = NoticeLog(tmp_path / "forked.sqlite", KEY)
    forked.publish([("alarm", i, 1.0, {"other": i}) for i in range(1, 4)])
    with pytest.raises(ChainError, match="rewritten"):
        w.heartbeat(forked.heartbeat(now=5.0), now=5.0)
    with pytest.raises(SignatureError):
        w.heartbeat(_log(tmp_path / "stranger", key=SigningKey.generate()).heartbeat(
            now=5.0), now=5.0)
    with pytest.raises(ValidationError, match="payload type"):
        w.heartbeat(log.after(0)[0], now=5.0)  # a notice is not a heartbeat


def test_notice_hash_is_over_the_signed_payload(tmp_path: Path) -> None:
    feed = _log(tmp_path).after(0)
    payload = env.Envelope.from_bytes(feed[0]).payload_bytes()
    second = json.loads(env.Envelope.from_bytes(feed[1]).payload_bytes())
    assert second["prev"] == notice_hash(payload)
