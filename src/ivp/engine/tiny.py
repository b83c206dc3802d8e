"""A tiny random-weight Llama with a real byte-level BPE tokenizer, built offline.

Tests, the demo and the simulator need a whitelisted model that builds in a second
with no network, yet exercises every real path: a trained tokenizer with special
tokens and a chat template, a config, and safetensors weights split into several
shards (so per-shard digests and POWER_KILL at a shard's end are exercised).

The build is a pure function of ``seed``: weights come from a seeded
``torch.Generator`` in parameter-name order (not from transformers' initialisers,
which may change between versions) and the tokenizer is trained on the embedded
text below, so two builds give byte-identical files and equal manifest digests.

The logits are made peaked (lm_head scaled up) so that greedy and sampled decoding
follow the context, and the EOS row is scaled further so that EOS wins in some
contexts and not others: both finish reasons ("stop" and "length") occur.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Public-domain style English used to train the BPE tokenizer. Its content does
# not matter; its variety gives the tokenizer a few hundred merges.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A wizard's job is to vex chumps quickly in fog.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the
age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the
season of light, it was the season of darkness, it was the spring of hope, it was the winter
of despair. We had everything before us, we had nothing before us.
Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in
my purse, and nothing particular to interest me on shore, I thought I would sail about a
little and see the watery part of the world. It is a way I have of driving off the spleen
and regulating the circulation.
In the beginning the town was small, and the river ran slowly past the mill. Children
played in the fields while their parents worked, and in the evening the whole village
gathered in the square to talk about the weather, the harvest and the news from the city.
Verification is the process of checking that a system does what it claims to do. An
inspector reads the logs, recomputes a random sample of the answers, and compares them
with what the server returned. If the numbers agree, the record passes; if they differ,
an alarm is raised and the gateway shuts the server down until people look into it.
Machine learning models turn text into numbers called tokens, predict the next token from
the ones before it, and repeat. A tokenizer splits words into pieces: common words become
one piece, rare words become several. The model reads the pieces and writes new ones.
Please answer the question below in one short sentence. What is the capital of France?
The capital of France is Paris. What is two plus two? Two plus two is four. How many days
are there in a week? There are seven days in a week: Monday, Tuesday, Wednesday, Thursday,
Friday, Saturday and Sunday. The months are January, February, March, April, May, June,
July, August, September, October, November and December.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 42 100 256 1000 2024 3.14 1e-6 (x + y) * z = 7;
Punctuation and symbols: , . ; : ! ? ' " - _ / \\ | @ # $ % ^ & * ( ) [ ] { } < > = + ~ `
She sells sea shells by the sea shore. Peter Piper picked a peck of pickled peppers. How
much wood would a woodchuck chuck if a woodchuck could chuck wood? Red lorry, yellow lorry.
Hello, world! Good morning. Thank you very much. You are welcome. See you tomorrow.
The weather today is sunny with a light breeze from the west; tomorrow it will rain.
Water boils at one hundred degrees and freezes at zero. The sun rises in the east.
def main():
    print("hello")
    return 0
for i in range(10): total += i
"""

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
VOCAB_SIZE = 640
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
LOGIT_SCALE = 12.0  # lm_head gain: peaked, context-dependent next-token distributions
EOS_SCALE = 2.2  # extra gain on the EOS row: EOS wins in some contexts only
MAX_SHARD_SIZE = "200KB"  # the ~0.6 MB model splits into several shards
HEAD_DIM = 16  # 4 heads of 16: hidden size 64
VLLM_HEAD_DIM = 32  # the smallest head size vLLM's CPU attention kernels take


def _train_tokenizer():  # -> tokenizers.Tokenizer
    """Byte-level BPE trained on CORPUS; adds <s> in front of every encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def _fast_tokenizer(tok):  # -> transformers.PreTrainedTokenizerFast
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,  # decode(encode(x)) must give back x
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _config(vocab_size: int, head_dim: int = HEAD_DIM):  # -> transformers.LlamaConfig
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=4 * head_dim,
        intermediate_size=8 * head_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def _fill_weights(model, seed: int) -> None:
    """Seeded weights, parameter by parameter in name order (version-proof)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            fan_in = p.shape[-1]
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)  # (out, in)
        head = model.lm_head.weight  # (V, hidden)
        head.mul_(LOGIT_SCALE / head.shape[1] ** 0.5)
        head[model.config.eos_token_id].mul_(EOS_SCALE)


def build_tiny_model(out_dir: Path, seed: int = 0, head_dim: int = HEAD_DIM) -> Path:
    """Write a tiny Llama (config, tokenizer, sharded safetensors) to ``out_dir``.

    Deterministic for a given ``seed`` and ``head_dim``: the same files, byte for
    byte. Returns ``out_dir``. Takes about a second on a laptop CPU; needs no network.
    ``head_dim`` sets the width (4 heads of it); vLLM's CPU attention needs at least
    32 (:data:`VLLM_HEAD_DIM`).
    """
    import torch
    from transformers import LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fast = _fast_tokenizer(_train_tokenizer())
    config = _config(len(fast), head_dim)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    _fill_weights(model, seed)
    model.generation_config.do_sample = False
    with _quiet():
        model.save_pretrained(out_dir, max_shard_size=MAX_SHARD_SIZE, safe_serialization=True)
    fast.save_pretrained(out_dir)
    _write_info(out_dir, seed)
    return out_dir


@contextmanager
def _quiet() -> Iterator[None]:
    """No transformers progress bars for a sub-second save (tests and demo logs)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _write_info(out_dir: Path, seed: int) -> None:
    """A README-like note, not part of the manifest (its name has no role)."""
    info = {"ivp_tiny_model": True, "seed": seed, "note": "random weights; for tests only"}
    (out_dir / "ivp_tiny.json").write_text(json.dumps(info, sort_keys=True) + "\n")


__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "VLLM_HEAD_DIM", "build_tiny_model"]
