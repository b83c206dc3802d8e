"""SNG property 2's pure judgements of the server and of misuse, driven directly.

``boot.power_on_state``, ``boot.boot_answer`` and ``boot.booted`` judge the server's
answers during a boot on their bytes; ``UploadMode`` refuses misuse without changing
its counter. One test per attack or fault, named at its check.
"""

from __future__ import annotations

import copy

import blake3
import pytest

from ivp.errors import StateError
from ivp.gateway import boot
from ivp.gateway.boot import Complete, PowerKill, UploadMode
from ivp.protocol.messages import FileEntry, Manifest

DATA = b"weights!" * 16


def _manifest() -> Manifest:
    entry = FileEntry(name="w.safetensors", role="weights", size=len(DATA),
                      digest=blake3.blake3(DATA).hexdigest(), algo="blake3")
    return Manifest(model_id="m", architecture="x", dtype="float32", files=[entry],
                    total_size=len(DATA))


def _state(machine: UploadMode) -> dict[str, object]:
    return copy.deepcopy({"counter": machine.counter, "captured": machine.captured,
                          "verified": machine.verified, "done": machine.done})


# --- the server after a power cycle ---------------------------------------------------
def test_a_server_that_holds_a_model_after_power_on_is_not_memoryless() -> None:
    """Blocks weights surviving a power kill or forced reboot."""
    assert boot.power_on_state(200, b'{"state": "ready"}') == "holds_model"
    assert boot.power_on_state(200, b'{"state": "loading"}') == "holds_model"
    assert boot.power_on_state(200, b'{"state": "empty"}') == "empty"


@pytest.mark.parametrize("status, body", [
    (503, b'{"state": "empty"}'), (200, b"not json"), (200, b"[1, 2]"), (200, b"{}"),
    (200, b'{"state": "warming"}'),
])
def test_a_server_not_up_yet_is_asked_again(status: int, body: bytes) -> None:
    assert boot.power_on_state(status, body) == "not_up"


# --- what the server may say during UPLOAD -------------------------------------------
def test_a_boot_answer_carrying_data_of_its_own_is_outside_the_protocol() -> None:
    """Blocks upload exfiltration: anything beyond the state is dropped unread."""
    assert boot.boot_answer(b'{"state": "loading", "exfil": "IVP"}', "loading") == "outside"
    assert boot.boot_answer(b'{"error": "x", "exfil": "IVP"}', "loading") == "outside"


@pytest.mark.parametrize("body", [b'{"state": "ready"}', b"garbage", b'"loading"', b"{}",
                                  b'{"state": ["loading"]}'])
def test_a_boot_answer_that_is_not_the_expected_state_is_outside_the_protocol(
        body: bytes) -> None:
    assert boot.boot_answer(body, "loading") == "outside"


def test_the_expected_state_and_a_bare_error_are_inside_the_protocol() -> None:
    assert boot.boot_answer(b'{"state": "loading"}', "loading") == "ok"
    assert boot.boot_answer(b'{"error": {"message": "no"}}', "loading") == "error"


def test_a_server_that_did_not_become_ready_does_not_boot() -> None:
    """Blocks serving from a server that did not load the weights it was given."""
    assert boot.booted(200, b'{"state": "ready"}')
    assert not boot.booted(200, b'{"state": "loading"}')
    assert not boot.booted(500, b'{"state": "ready"}')
    assert not boot.booted(200, b"ready")


# --- misuse of a spent machine --------------------------------------------------------
def test_feeding_after_a_power_kill_is_refused_and_the_counter_stays() -> None:
    machine = UploadMode(_manifest())
    events = machine.feed(DATA + b"x")
    assert isinstance(events[-1], PowerKill) and events[-1].reason == "long"
    before = _state(machine)
    with pytest.raises(StateError) as err:
        machine.feed(b"more")
    assert str(err.value) == ("upload already ended (PowerKill); a new upload needs a fresh "
                              "power cycle")
    with pytest.raises(StateError):
        machine.finish()
    assert _state(machine) == before


def test_finishing_twice_is_refused_and_the_boot_stays_complete() -> None:
    machine = UploadMode(_manifest())
    machine.feed(DATA)
    assert machine.finish() == Complete(len(DATA))
    before = _state(machine)
    with pytest.raises(StateError) as err:
        machine.finish()
    assert str(err.value) == ("upload already ended (Complete); a new upload needs a fresh "
                              "power cycle")
    assert _state(machine) == before
