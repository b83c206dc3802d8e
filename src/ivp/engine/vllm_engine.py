"""vLLM behind the server protocol: continuous batching, sampler spec v1, RAM-only weights.

``ivp server --engine vllm`` boots exactly like the reference server (manifest, then
the weight stream from its gateway). :meth:`VllmBackend.start` then puts the files in
a :class:`~ivp.engine.ramdir.RamModelDir` (memfds: RAM only, freed with the process),
starts vLLM's ``AsyncLLM`` on it and drops its own hold on the bytes once vLLM holds
the weights. vLLM never tokenises (``skip_tokenizer_init``): prompts reach it as
token ids, outputs leave as token ids, and the server keeps the whitelisted tokenizer
it built from the same bytes for text prompts and chat templates.

Every request is sent with temperature 0 and the gateway's seed and parameters in
``extra_args``; :mod:`ivp.engine.vllm_sampler` makes vLLM's greedy choice the spec v1
token. EOS handling is ours too: the stop ids are the reference engine's (tokenizer,
config and generation config), kept in the output, finish reason "stop".

Nothing here is CPU-specific: on a CUDA machine the same code runs vLLM's GPU build
(``device`` follows vLLM's platform).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from ivp.errors import StateError, ValidationError
from ivp.protocol.messages import Manifest, SamplingParams

if TYPE_CHECKING:
    from ivp.server.attacks import Attack

DEFAULT_MAX_MODEL_LEN = 4096
DEFAULT_KV_CACHE_MB = 1024
DEFAULT_MAX_NUM_SEQS = 64
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def _as_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, list | tuple) else {int(value)}


def _json(files: dict[str, bytes], name: str) -> dict[str, Any]:
    if name not in files:
        return {}
    try:
        value = json.loads(files[name])
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValidationError(f"{name}: not valid JSON ({exc})") from None
    return value if isinstance(value, dict) else {}


def model_facts(files: dict[str, bytes], tokenizer: Any) -> tuple[int, frozenset[int], int]:
    """(vocabulary size, EOS ids, context length) from the whitelisted files, by the
    reference engine's rules: EOS of the tokenizer, the config and the generation config."""
    config = _json(files, "config.json")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    vocab = int(text.get("vocab_size") or config.get("vocab_size") or 0)
    if vocab <= 0:
        raise ValidationError("config.json names no vocab_size")
    eos = _as_ids(tokenizer.eos_token_id) | _as_ids(text.get("eos_token_id")) \
        | _as_ids(config.get("eos_token_id")) \
        | _as_ids(_json(files, "generation_config.json").get("eos_token_id"))
    eos_ids = frozenset(i for i in eos if 0 <= i < vocab)
    if not eos_ids:
        raise ValidationError("the model names no EOS token (tokenizer and config)")
    context = int(text.get("max_position_embeddings") or 1 << 30)
    return vocab, eos_ids, context


class VllmBackend:
    """A vLLM ``AsyncLLM`` serving one whitelisted model under sampler spec v1."""

    name: Literal["vllm"] = "vllm"

    def __init__(self, engine: Any, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int],
                 max_len: int, weights: dict[str, bytes] | None = None) -> None:
        self.engine = engine
        self.weights = weights  # kept only by a cheating server (``cheats``)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.max_len = max_len
        self._stop_ids = sorted(eos_ids)
        self._closed = False

    @classmethod
    async def start(cls, files: dict[str, Any], manifest: Manifest, *,
                    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
                    kv_cache_mb: int = DEFAULT_KV_CACHE_MB,
                    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
                    record_logits: str | None = None, cheats: bool = False) -> VllmBackend:
        """Start vLLM on ``files`` (consumed) in the manifest's dtype. ``cheats`` (a server
        started with ``--attack``) keeps a copy of the files and lets :meth:`fire` swap
        the weights vLLM serves.

        Raises:
            ValidationError: the files do not make a model vLLM can serve.
        """
        from ivp.engine.loading import load_tokenizer
        from ivp.engine.ramdir import RamModelDir

        dtype = _DTYPES.get(manifest.dtype.lower())
        if dtype is None:
            raise ValidationError(f"vLLM engine: unsupported dtype {manifest.dtype!r}")
        tokenizer = load_tokenizer(files)
        vocab, eos_ids, context = model_facts(files, tokenizer)
        max_len = min(max_model_len, context)
        kept = dict(files) if cheats else None
        ram = RamModelDir(files)  # empties ``files``
        try:
            engine = await asyncio.to_thread(_start_engine, str(ram.path), dtype, max_len,
                                             kv_cache_mb, max_num_seqs, record_logits)
        except Exception as exc:  # vLLM raises many kinds: say so in ivp's vocabulary
            raise ValidationError(f"vLLM did not start on the streamed model: "
                                  f"{type(exc).__name__}: {exc}") from None
        finally:
            ram.close()  # vLLM holds the weights in its own memory now
        return cls(engine, tokenizer, vocab, eos_ids, max_len, kept)

    # --- checks ---------------------------------------------------------------------------
    def check_ids(self, ids: Sequence[int], what: str) -> None:
        bad = next((i for i in ids if not 0 <= int(i) < self.vocab_size), None)
        if bad is not None:
            raise ValidationError(f"{what}: token id {bad} outside the vocabulary "
                                  f"(0..{self.vocab_size - 1})")

    def _check_prompt(self, prompt_ids: Sequence[int], max_tokens: int) -> None:
        if not prompt_ids:
            raise ValidationError("the prompt must hold at least one token")
        self.check_ids(prompt_ids, "prompt")
        if len(prompt_ids) + max_tokens > self.max_len:
            raise ValidationError(f"prompt of {len(prompt_ids)} tokens + max_tokens "
                                  f"{max_tokens} exceeds this server's context of "
                                  f"{self.max_len}")

    def finish_reason(self, token_ids: Sequence[int]) -> Literal["stop", "length"]:
        return "stop" if token_ids and token_ids[-1] in self.eos_ids else "length"

    # --- generation -------------------------------------------------------------------------
    def _request(self, prompt_ids: list[int], params: SamplingParams, seed: int, key: str,
                 stream: bool) -> tuple[Any, Any]:
        from vllm import SamplingParams as VllmParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        from ivp.engine.vllm_sampler import spec_args

        if self._closed:
            raise StateError("the vLLM engine was shut down")
        self._check_prompt(prompt_ids, params.max_tokens)
        sampling = VllmParams(
            temperature=0.0, max_tokens=params.max_tokens, stop_token_ids=self._stop_ids,
            detokenize=False, skip_special_tokens=False, extra_args=spec_args(seed, params, key),
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)
        return TokensPrompt(prompt_token_ids=list(prompt_ids)), sampling

    async def generate(self, prompt_ids: list[int], params: SamplingParams, seed: int,
                       key: str) -> list[int]:
        prompt, sampling = self._request(prompt_ids, params, seed, key, stream=False)
        tokens: list[int] = []
        async for out in self.engine.generate(prompt, sampling, _request_id(key)):
            tokens = list(out.outputs[0].token_ids)
        return tokens

    def stream(self, prompt_ids: list[int], params: SamplingParams, seed: int,
               key: str) -> AsyncIterator[int]:
        prompt, sampling = self._request(prompt_ids, params, seed, key, stream=True)
        return self._stream(prompt, sampling, key)

    async def _stream(self, prompt: Any, sampling: Any, key: str) -> AsyncIterator[int]:
        async for out in self.engine.generate(prompt, sampling, _request_id(key)):
            for token in out.outputs[0].token_ids:
                yield int(token)

    # --- cheats and shutdown --------------------------------------------------------------
    async def fire(self, attack: Attack) -> None:
        """Weight cheats: the attack alters a transformers copy of the whitelisted model
        (``ivp.server.attacks``: noise, int8, one training step), and vLLM's workers
        load the result in place of the weights they serve."""
        if attack.alter_model is None:
            return
        if attack.name not in WEIGHT_ATTACKS or self.weights is None:
            raise StateError(f"attack {attack.name} has no vLLM form (weight attacks: "
                             f"{', '.join(sorted(WEIGHT_ATTACKS))})")
        from ivp.engine.ramdir import RamModelDir

        altered = await asyncio.to_thread(_altered_weights, self.weights, attack)
        # vLLM's own in-place reload (its RL weight-sync path): loads checkpoint-format
        # tensors and redoes the CPU kernels' weight repacking
        with RamModelDir({"model.safetensors": altered}) as ram:
            await self.engine.collective_rpc("reload_weights",
                                             kwargs={"weights_path": str(ram.path)})
        await self.engine.reset_prefix_cache()  # no KV computed with the old weights

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self.engine.shutdown)


#: Attacks of ``ivp.server.attacks`` whose alter_model changes only the weights (the
#: others rewrite a transformers model's forward, which vLLM does not run).
WEIGHT_ATTACKS = frozenset({"rogue-model-persists", "int8", "expert-iteration"})


def _altered_weights(files: dict[str, bytes], attack: Attack) -> bytes:
    """safetensors bytes of the model in ``files`` after ``attack.alter_model``."""
    from safetensors.torch import save

    from ivp.engine.loading import load_model

    model = load_model(dict(files))
    assert attack.alter_model is not None
    attack.alter_model(model)
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():  # tied tensors once (vLLM ties again)
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.detach().contiguous()
    return save(tensors)


# Runs beside a vLLM server in its process group: when the server dies (even by
# SIGKILL, e.g. its gateway's death signal), the kernel signals this process, which
# kills the whole group — vLLM's engine processes do not watch their parent.
_GROUP_GUARD = (
    "import ctypes, os, signal, sys, time\n"
    "ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, int(signal.SIGTERM))\n"
    "end = lambda *_: os.killpg(os.getpgrp(), signal.SIGKILL)\n"
    "signal.signal(signal.SIGTERM, end)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    end()\n"
    "while True:\n"
    "    time.sleep(3600)\n"
)


def guard_process_group() -> bool:
    """Make vLLM's processes die with this server: start the group guard above. Only
    for a process-group leader (as the gateway starts its server), so it never kills
    processes it does not own; call from the main thread (the death signal follows
    the creating thread). True when the guard runs."""
    import subprocess
    import sys

    if os.getpgrp() != os.getpid():
        return False
    subprocess.Popen([sys.executable, "-c", _GROUP_GUARD, str(os.getpid())],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True)
    return True


def _request_id(key: str) -> str:
    return key or secrets.token_hex(12)


def _start_engine(path: str, dtype: str, max_len: int, kv_cache_mb: int, max_num_seqs: int,
                  record_logits: str | None) -> Any:
    """vLLM's AsyncLLM on ``path`` (blocks while it loads: run in a thread)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from ivp.engine.vllm_sampler import PROCESSOR, RECORD_ENV, RECORDER

    if record_logits:
        os.environ[RECORD_ENV] = record_logits  # read by the engine's own processes
    args = AsyncEngineArgs(
        model=path, dtype=dtype, max_model_len=max_len, enforce_eager=True,
        skip_tokenizer_init=True, seed=0, max_num_seqs=max_num_seqs,
        kv_cache_memory_bytes=kv_cache_mb << 20,
        logits_processors=[RECORDER if record_logits else PROCESSOR],
        disable_log_stats=True)
    return AsyncLLM.from_engine_args(args)


__all__ = ["DEFAULT_KV_CACHE_MB", "DEFAULT_MAX_MODEL_LEN", "DEFAULT_MAX_NUM_SEQS",
           "VllmBackend", "guard_process_group", "model_facts"]
