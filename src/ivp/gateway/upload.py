"""The operator's side of secure boot: stream a model's files through a gateway.

The operator is not trusted: the gateway checks every byte against the whitelisted
manifest it holds. This client only sends the files in manifest order (the order
:func:`ivp.whitelist.make_manifest` defines: config, tokenizer, shards) as one body to
``POST <gateway>/upload?model_id=ID``: raw, or (``encrypt_to``, the gateway's KEM key)
HPKE-encrypted so that only that gateway can read the weights
(:mod:`ivp.protocol.hpke`, content type ``application/vnd.ivp.hpke-upload``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

from ivp.protocol.hpke import StreamSealer, upload_info
from ivp.whitelist import make_manifest

CHUNK = 1 << 20
HPKE_UPLOAD = "application/vnd.ivp.hpke-upload"


def upload_order(model_dir: Path, model_id: str) -> list[tuple[Path, int]]:
    """(path, size) of each file in manifest order."""
    manifest = make_manifest(Path(model_dir), model_id)
    return [(Path(model_dir) / f.name, f.size) for f in manifest.files]


async def upload_model(gateway_url: str, model_dir: Path, model_id: str, *,
                       progress: Callable[[int], None] | None = None,
                       files: list[tuple[Path, int]] | None = None,
                       timeout: float = 3600.0,
                       encrypt_to: bytes | None = None) -> dict[str, Any]:
    """Stream ``model_dir`` to the gateway; return its JSON answer plus ``http_status``.

    ``progress`` is called with the byte count of every chunk sent. ``files`` overrides
    the manifest order (tests use it to send a modified copy). ``encrypt_to``: the
    gateway's X25519 KEM public key (its ``--print-identity`` ``kem_public_key``).
    """
    order = files if files is not None else upload_order(model_dir, model_id)
    sealer = StreamSealer(encrypt_to, upload_info(model_id)) if encrypt_to else None

    async def plain() -> AsyncIterator[bytes]:
        for path, _size in order:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    if progress is not None:
                        progress(len(chunk))
                    yield chunk

    async def body() -> AsyncIterator[bytes]:
        if sealer is None:
            async for chunk in plain():
                yield chunk
            return
        yield sealer.header
        async for chunk in plain():
            for frame in sealer.push(chunk):
                yield frame
        yield sealer.close()

    url = gateway_url.rstrip("/") + "/upload"
    timeouts = aiohttp.ClientTimeout(total=timeout)
    headers = {"Content-Type": HPKE_UPLOAD if sealer else "application/octet-stream"}
    async with aiohttp.ClientSession(timeout=timeouts) as session, session.post(
        url, params={"model_id": model_id}, data=body(), headers=headers
    ) as resp:
        try:
            answer = await resp.json(content_type=None)
        except ValueError:
            answer = {"error": {"message": (await resp.text())[:500], "type": "HTTPError"}}
        if not isinstance(answer, dict):
            answer = {"answer": answer}
        answer["http_status"] = resp.status
        return answer


__all__ = ["HPKE_UPLOAD", "upload_model", "upload_order"]
