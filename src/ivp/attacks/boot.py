"""Attacks on secure boot (UPLOAD mode): the whitelist and the gateway's data path.

The operator streams the weights through the gateway; the gateway hashes each file
as it passes against the quorum-signed whitelist and power-kills the server at the
end of the first bad file. During UPLOAD nothing the server says may leave the
gateway (DESIGN.md: such traffic is dropped and alarmed).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ivp.attacks.base import Context, Evidence, Result, Scenario, Victim, require, short

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SECURE_BOOT = ("secure boot: the gateway hashes every file against the quorum-signed "
               "whitelist as it streams → POWER_KILL at the end of the first bad file; "
               "unlisted models are refused")

#: gateway alarm kinds that answer a server talking out of turn during UPLOAD
UPLOAD_ALARMS = ("server_outside_protocol", "server_state", "server_boot", "power_kill")


# --- the operator's weights ------------------------------------------------------------------
def rewritten_copy(model_dir: Path, out_dir: Path,
                   update: Callable[[PreTrainedModel], None]) -> Path:
    """A copy of ``model_dir`` whose weights files hold ``update(model)``'s weights.

    Same file names, tensor names, shapes, dtypes and header metadata, so the files
    have the same sizes as the whitelisted ones: only their digests tell them apart.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ivp.engine.loading import load_model

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(model_dir, out_dir)
    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    model = load_model(files)
    update(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for path in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            names = list(f.keys())
            dtypes = {k: f.get_slice(k).get_dtype() for k in names}
        tensors = {k: state[k].to(_torch_dtype(dtypes[k])) for k in names}
        size = path.stat().st_size
        save_file(tensors, str(path), metadata=metadata)
        if path.stat().st_size != size:
            raise RuntimeError(f"{path.name}: rewritten file changed size")
    return out_dir


def _torch_dtype(name: str) -> Any:
    """The torch dtype of a safetensors dtype name (the float types weights use)."""
    import torch

    known = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    if name not in known:
        raise ValueError(f"cannot rewrite tensors of dtype {name}")
    return known[name]


def refused_upload(ctx: Context, index: int, answer: dict[str, Any],
                   since: float) -> Evidence | None:
    """Evidence that gateway ``index`` power-killed an upload: its answer says
    ``power_kill`` and its own alarm log holds the POWER_KILL."""
    if answer.get("state") != "power_kill" or answer.get("http_status") not in (400, 502):
        return None
    alarm = ctx.gateway_alarm(index, ["power_kill"], since)
    if alarm is None:
        return None
    return Evidence(alarm.time, alarm.source,
                    f"{alarm.text} (upload answer HTTP {answer.get('http_status')}, "
                    f"file {answer.get('file')!r})")


def _not_routed(ctx: Context, index: int) -> bool:
    gid = ctx.dc.handles[index].gateway_id
    view = ctx.dc.recomputer_status().get("gateways", {}).get(gid, {})
    return view.get("state") != "serving"


# --- scenarios ----------------------------------------------------------------------------------
def model_swap(ctx: Context, result: Result) -> None:
    """Boot other weights under the whitelisted name, then an unlisted model."""
    from ivp.server.attacks import quantize_int8

    assert ctx.victim is not None
    h = ctx.dc.handles[ctx.victim]
    swapped = rewritten_copy(ctx.dc.model_dir, ctx.scratch / "model-swap", quantize_int8)
    t0 = time.time()
    result.started = t0
    answer = ctx.dc.upload(h, swapped)
    result.details["swap_answer"] = {k: answer.get(k) for k in ("http_status", "state",
                                                                "file", "reason")}
    require(result, f"{h.gateway_id} power-kills the int8 weights",
            refused_upload(ctx, ctx.victim, answer, t0))
    t1 = time.time()
    unlisted = ctx.dc.upload(h, swapped, model_id=ctx.dc.model_id + "-finetune")
    error = unlisted.get("error")
    err: dict[str, Any] = error if isinstance(error, dict) else {}
    found = None
    if unlisted.get("http_status") == 404 and err.get("type") == "UnknownModelError":
        found = Evidence(time.time(), f"POST {h.gateway_id}/upload",
                         f"HTTP 404 UnknownModelError: {err.get('message', '')}")
    require(result, f"{h.gateway_id} refuses an unlisted model id", found)
    result.details["unlisted_after_s"] = round(time.time() - t1, 3)
    result.details["gateway_state"] = ctx.gateway_status(ctx.victim).get("state")
    result.details["routed_by_recomputer"] = not _not_routed(ctx, ctx.victim)


def exfiltration(ctx: Context, result: Result) -> None:
    """The server talks during UPLOAD; nothing it says may leave, and it is alarmed."""
    from ivp.server.attacks import EXFIL_MARKER

    assert ctx.victim is not None
    index = ctx.victim
    h = ctx.dc.handles[index]
    t0 = time.time()
    result.started = t0
    ctx.dc.trigger_attack(index)  # armed from server start; answers carry data from now
    answer = ctx.dc.upload(h)
    received = {"the upload answer": json.dumps(answer)}
    if answer.get("state") == "serving":
        ctx.dc.wait_routable([index])
        answers = ctx.dc.send(6, concurrency=2, max_tokens=8)
        result.requests_sent += len(answers)
        received["client answers"] = json.dumps(answers)
    leaked = ctx.leaks(index, EXFIL_MARKER, received)
    result.details["upload_answer"] = short(answer, 200)
    result.details["leaked_via"] = leaked
    result.details["gateway_state"] = ctx.gateway_status(index).get("state")
    if leaked:
        result.notes.append("the server's data can be read outside the gateway via "
                            + ", ".join(leaked))
    require(result, f"{h.gateway_id} alarms on server data outside the protocol during "
            "UPLOAD (DESIGN.md: dropped and alarmed)",
            ctx.wait_for(lambda: ctx.gateway_alarm(index, UPLOAD_ALARMS, t0), 3.0))


SCENARIOS = (
    Scenario(
        "model-swap-at-upload", "protocol",
        "The operator boots other weights (int8-rounded: a cheaper model) under the "
        "whitelisted model's name, then tries a model id the whitelist does not hold.",
        SECURE_BOOT, model_swap, needs="gateway", victim=Victim(upload=False)),
    Scenario(
        "upload-exfiltration", "protocol",
        "While the weights stream in, the server adds data of its own to every answer it "
        "gives its gateway (health, manifest, stream), hoping it reaches the operator.",
        "UPLOAD mode: the gateway builds every answer itself from its own state; the "
        "server's bytes never leave, and out-of-protocol data is alarmed",
        exfiltration, needs="gateway",
        victim=Victim(server_attack="upload-exfiltration", upload=False)),
)

__all__ = ["SCENARIOS", "SECURE_BOOT", "refused_upload", "rewritten_copy"]
