"""Load a whitelisted model from bytes in memory: the server never reads weights from disk.

The server receives a model as one byte stream (the manifest's files concatenated)
and holds it only in RAM (DESIGN.md, "Whitelist and secure boot"). These loaders
take ``files``: file name -> bytes, named as in the manifest (``FileEntry.name``),
and build the tokenizer and the model from those bytes alone — no file system, no
network, no remote code. ``load_from_dir`` reads a directory into that same mapping
and calls the same loaders, so tests and the recomputer exercise the server's path.

Every failure (missing file, bad JSON, tensor missing or extra, wrong shape) is a
:class:`~ivp.errors.ValidationError` naming what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ivp.errors import ValidationError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

# Files the loaders use; load_from_dir reads these (and every *.safetensors shard).
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                 "mask_token")
_PLAIN_KEYS = ("model_max_length", "clean_up_tokenization_spaces", "padding_side",
               "truncation_side")


def _json(files: dict[str, bytes], name: str, required: bool = True) -> dict[str, Any]:
    """Parse ``files[name]`` as a JSON object; {} when optional and absent."""
    if name not in files:
        if required:
            raise ValidationError(f"model files lack {name}")
        return {}
    try:
        value = json.loads(files[name].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationError(f"{name}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValidationError(f"{name}: expected a JSON object")
    return value


def _token_text(value: Any) -> str | None:
    """A special token as saved: a plain string or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _chat_template(files: dict[str, bytes], config: dict[str, Any]) -> str | dict | None:
    """The chat template: chat_template.jinja, else .json, else tokenizer_config's entry."""
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"].decode("utf-8")
    if "chat_template.json" in files:
        return _json(files, "chat_template.json").get("chat_template")
    return config.get("chat_template")


def _special_tokens(files: dict[str, bytes], config: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad/... and extra special tokens, from tokenizer_config then the map file."""
    merged = {**_json(files, SPECIAL_TOKENS_FILE, required=False), **config}
    kwargs: dict[str, Any] = {}
    for key in _SPECIAL_KEYS:
        text = _token_text(merged.get(key))
        if text is not None:
            kwargs[key] = text
    extra = merged.get("additional_special_tokens") or merged.get("extra_special_tokens")
    if isinstance(extra, list):
        texts = [t for t in (_token_text(v) for v in extra) if t is not None]
        if texts:
            kwargs["additional_special_tokens"] = texts
    return kwargs


def load_tokenizer(files: dict[str, bytes]) -> PreTrainedTokenizerFast:
    """The whitelisted tokenizer, from tokenizer.json bytes plus its config files.

    Raises:
        ValidationError: tokenizer.json missing or unparsable, or a config file bad.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if TOKENIZER_FILE not in files:
        raise ValidationError(f"model files lack {TOKENIZER_FILE}")
    try:
        backend = Tokenizer.from_str(files[TOKENIZER_FILE].decode("utf-8"))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise ValidationError(f"{TOKENIZER_FILE}: cannot be parsed ({exc})") from None
    config = _json(files, TOKENIZER_CONFIG_FILE, required=False)
    kwargs = _special_tokens(files, config)
    kwargs.update({k: config[k] for k in _PLAIN_KEYS if k in config})
    kwargs.setdefault("clean_up_tokenization_spaces", False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    template = _chat_template(files, config)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def _state_dict(files: dict[str, bytes | Path]) -> dict[str, torch.Tensor]:
    """All tensors of all ``*.safetensors`` files, names unique across shards. A shard
    given as a ``Path`` (a file in the server's RAM-only mount) is memory-mapped: its
    tensors live in those pages, not in a copy."""
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import load_file

    shards = sorted(name for name in files if name.endswith(".safetensors"))
    if not shards:
        raise ValidationError("model files hold no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for name in shards:
        try:
            shard = files[name]
            part = (load_file(shard) if isinstance(shard, Path)
                    else load_safetensors(shard))
        except Exception as exc:  # safetensors raises SafetensorError and others
            raise ValidationError(f"{name}: not a valid safetensors file ({exc})") from None
        clash = tensors.keys() & part.keys()
        if clash:
            raise ValidationError(f"{name}: tensor {sorted(clash)[0]!r} also in another shard")
        tensors.update(part)
    return tensors


def _expected(skeleton: PreTrainedModel) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Shapes of every tensor the model's state dict holds, and which names share one
    tensor (tied parameters, e.g. Gemma's lm_head = embed_tokens): name -> group id."""
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    groups: dict[str, int] = {}
    named = [*skeleton.named_parameters(remove_duplicate=False),
             *skeleton.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if name in shapes:
            groups[name] = id(tensor)
    return shapes, groups


def _check_keys(skeleton: PreTrainedModel, tensors: dict[str, torch.Tensor]) -> None:
    """Strict: no extra tensor, no wrong shape; a missing one only if it is tied to a
    loaded one (tied parameters are stored once)."""
    shapes, groups = _expected(skeleton)
    extra = sorted(tensors.keys() - shapes.keys())
    if extra:
        raise ValidationError(f"weights hold tensors the model does not have: {extra[:5]}")
    loaded_groups = {groups.get(k, k) for k in tensors}
    missing = sorted(k for k in shapes.keys() - tensors.keys()
                     if groups.get(k, k) not in loaded_groups)
    if missing:
        raise ValidationError(f"weights lack tensors the model needs: {missing[:5]}")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != shapes[key]:
            raise ValidationError(
                f"tensor {key!r} has shape {tuple(tensor.shape)}, config wants {shapes[key]}"
            )


def _config(files: dict[str, bytes]):  # -> PretrainedConfig
    from transformers import AutoConfig

    config_dict = _json(files, CONFIG_FILE)
    model_type = config_dict.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ValidationError(f"{CONFIG_FILE}: no model_type")
    try:
        return AutoConfig.for_model(model_type, **config_dict)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValidationError(f"{CONFIG_FILE}: {exc}") from None


def load_model(files: dict[str, bytes | Path]) -> PreTrainedModel:
    """The whitelisted causal LM, float32, eval mode, from config.json + shards in memory.

    The architecture is built first on the meta device (no memory, no init) to check
    the tensors strictly; transformers then wraps the in-memory tensors without
    random initialisation (0.1 s for Gemma-3-270M instead of ~9 s).

    Raises:
        ValidationError: config.json missing or unknown, or weights that do not match
            the architecture exactly.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.utils import logging as hf_logging

    config = _config(files)
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ValidationError(f"{CONFIG_FILE}: {config.model_type} is not a causal LM") from None
    tensors = _state_dict(files)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _check_keys(skeleton, tensors)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(None, config=config, state_dict=tensors, dtype=torch.float32)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    _set_generation_config(model, files)
    return model.to(torch.float32).eval()


def _set_generation_config(model: PreTrainedModel, files: dict[str, bytes]) -> None:
    """generation_config.json, when shipped: it can name extra EOS ids (Gemma's
    <end_of_turn>) that the engine must stop after."""
    from transformers import GenerationConfig

    if GENERATION_CONFIG_FILE not in files:
        return
    try:
        model.generation_config = GenerationConfig.from_dict(
            _json(files, GENERATION_CONFIG_FILE))
    except (ValueError, TypeError) as exc:
        raise ValidationError(f"{GENERATION_CONFIG_FILE}: {exc}") from None


def read_dir(path: Path) -> dict[str, bytes]:
    """The files of a model directory the loaders use, name -> bytes."""
    path = Path(path)
    wanted = {CONFIG_FILE, GENERATION_CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
              SPECIAL_TOKENS_FILE, *CHAT_TEMPLATE_FILES}
    files = {
        p.name: p.read_bytes()
        for p in sorted(path.iterdir())
        if p.is_file() and (p.name in wanted or p.name.endswith(".safetensors"))
    }
    if CONFIG_FILE not in files:
        raise ValidationError(f"{path}: no {CONFIG_FILE}, not a model directory")
    return files


def load_from_dir(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """(model, tokenizer) of a model directory, through the same in-memory loaders."""
    files = read_dir(path)
    return load_model(files), load_tokenizer(files)


__all__ = ["load_from_dir", "load_model", "load_tokenizer", "read_dir"]
