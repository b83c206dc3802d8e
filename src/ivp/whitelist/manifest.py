"""Make a manifest from a model directory: every file in upload order, with digests.

Upload order is config files, then tokenizer files, then the safetensors shards in
name order. Only safetensors weights are accepted: a model that ships in another
format is converted once, when its manifest is made, never by the server.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import blake3

from ivp.errors import DigestError, ValidationError
from ivp.protocol.encoding import canonical, decode
from ivp.protocol.messages import REFERENCE_ENGINE, FileEntry, Manifest, NoiseBound

_CONFIG = {"config.json", "generation_config.json", "model.safetensors.index.json"}
_TOKENIZER = {
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model", "added_tokens.json",
}
_ROLE_ORDER = {"config": 0, "tokenizer": 1, "weights": 2}


def role_of(name: str) -> str | None:
    if name in _CONFIG:
        return "config"
    if name in _TOKENIZER:
        return "tokenizer"
    if name.endswith(".safetensors"):
        return "weights"
    return None


def file_digest(path: Path, algo: str = "blake3") -> str:
    if algo == "blake3":
        return blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path).hexdigest()
    if algo == "sha256":
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()
    raise ValidationError(f"unknown digest algorithm {algo!r} (blake3 or sha256)")


def make_manifest(
    model_dir: Path,
    model_id: str,
    *,
    algo: str = "blake3",
    noise_bound: NoiseBound | None = None,
    engine: str = REFERENCE_ENGINE,
    dtype: str | None = None,
) -> Manifest:
    """Build the manifest of ``model_dir`` for ``engine`` computing in ``dtype``
    (default: the config's ``torch_dtype``, else float32).

    Raises:
        ValidationError: no config.json (or not a JSON object), no safetensors weights,
            a pickle checkpoint (``.bin``/``.pt``) that ivp refuses to boot, or a model
            id or file name the manifest format does not allow.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValidationError(f"{model_dir}: no config.json, not a model directory")
    pickles = [p.name for p in model_dir.iterdir() if p.suffix in {".bin", ".pt", ".pth"}]
    if pickles and not any(p.suffix == ".safetensors" for p in model_dir.iterdir()):
        raise ValidationError(f"{model_dir}: only pickle weights {pickles}; convert to safetensors")
    entries = []
    for p in sorted(model_dir.iterdir(), key=lambda p: p.name):
        role = role_of(p.name) if p.is_file() else None
        if role is None:
            continue
        entries.append(FileEntry(name=p.name, role=role, size=p.stat().st_size,  # type: ignore[arg-type]
                                 digest=file_digest(p, algo), algo=algo))  # type: ignore[arg-type]
    entries.sort(key=lambda e: (_ROLE_ORDER[e.role], e.name))
    if not any(e.role == "weights" for e in entries):
        raise ValidationError(f"{model_dir}: no .safetensors weights")
    import json

    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationError(f"{model_dir}/config.json: not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValidationError(f"{model_dir}/config.json: not a JSON object")
    arch = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    if dtype is None:
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    manifest = Manifest(
        model_id=model_id, architecture=str(arch), dtype=dtype, files=entries,
        total_size=sum(e.size for e in entries), noise_bound=noise_bound, engine=engine,
    )
    # Struct construction does not check field constraints (model id, file names):
    # decoding the canonical bytes does, so a manifest we return always decodes.
    return decode(canonical(manifest), Manifest)


def read_model_files(model_dir: Path, manifest: Manifest) -> dict[str, bytes]:
    """Read a model's files and check each against the manifest (recomputer side).

    Raises:
        DigestError: a file is missing, has the wrong size, or the wrong digest.
    """
    out: dict[str, bytes] = {}
    for entry in manifest.files:
        path = Path(model_dir) / entry.name
        if not path.is_file():
            raise DigestError(f"{path}: missing (named by manifest {manifest.model_id})")
        data = path.read_bytes()
        h = blake3.blake3(data, max_threads=blake3.blake3.AUTO) if entry.algo == "blake3" \
            else hashlib.sha256(data)
        if len(data) != entry.size or h.hexdigest() != entry.digest:
            raise DigestError(f"{path}: does not match manifest {manifest.model_id}")
        out[entry.name] = data
    return out
