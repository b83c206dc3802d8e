"""The operator's side of secure boot: stream a model's files through a gateway.

The operator is not trusted: the gateway checks every byte against the whitelisted
manifest it holds. This client only sends the files in manifest order (the order
:func:`ivp.whitelist.make_manifest` defines: config, tokenizer, shards) as one raw
body to ``POST <gateway>/upload?model_id=ID``, announced with ``Expect: 100-continue``
so that a refusal (a model the whitelist lacks) comes before any byte is sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

from ivp.whitelist import make_manifest

CHUNK = 1 << 20


def upload_order(model_dir: Path, model_id: str) -> list[tuple[Path, int]]:
    """(path, size) of each file in manifest order."""
    manifest = make_manifest(Path(model_dir), model_id)
    return [(Path(model_dir) / f.name, f.size) for f in manifest.files]


async def upload_model(gateway_url: str, model_dir: Path, model_id: str, *,
                       progress: Callable[[int], None] | None = None,
                       files: list[tuple[Path, int]] | None = None,
                       timeout: float = 3600.0) -> dict[str, Any]:
    """Stream ``model_dir`` to the gateway; return its JSON answer plus ``http_status``.

    ``progress`` is called with the byte count of every chunk sent. ``files`` overrides
    the manifest order (tests use it to send a modified copy).
    """
    order = files if files is not None else upload_order(model_dir, model_id)

    async def body() -> AsyncIterator[bytes]:
        for path, _size in order:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    if progress is not None:
                        progress(len(chunk))
                    yield chunk

    url = gateway_url.rstrip("/") + "/upload"
    timeouts = aiohttp.ClientTimeout(total=timeout)
    headers = {"Content-Type": "application/octet-stream"}
    # Expect: 100-continue: the gateway refuses a model its whitelist lacks before the
    # first byte of the weights is read (from disk or from the network)
    async with aiohttp.ClientSession(timeout=timeouts) as session, session.post(
        url, params={"model_id": model_id}, data=body(), headers=headers, expect100=True
    ) as resp:
        try:
            answer = await resp.json(content_type=None)
        except ValueError:
            answer = {"error": {"message": (await resp.text())[:500], "type": "HTTPError"}}
        if not isinstance(answer, dict):
            answer = {"answer": answer}
        answer["http_status"] = resp.status
        return answer


__all__ = ["upload_model", "upload_order"]
