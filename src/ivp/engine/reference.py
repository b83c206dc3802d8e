"""The reference engine: sampler spec v1 generation and replay by prefill.

One engine serves two roles that must agree to the last token:

* ``generate`` — what an honest server runs: incremental decoding with the KV cache,
  each position's float32 logits row handed to ``ivp.protocol.sampler.choose``.
* ``replay`` — what the recomputer runs: ONE forward pass over prompt + claimed
  output gives the logits that predicted every output token (DESIGN.md,
  "Verification"), far cheaper than generating again.

Both run the same float32 model on the same kernels, so for an honest pair the
spec's choice under the replayed logits equals every generated token (exact mode);
the residual difference between decode and prefill logits is measured in tests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from ivp.engine.head import BoundedHead, BoundedLogits, final_cap, soft_cap
from ivp.errors import ValidationError
from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import choose

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

FinishReason = Literal["stop", "length"]
# Rows x vocabulary of logits one replay_batch forward may hold (2^27 floats = 512 MiB).
REPLAY_BUDGET = 1 << 27
# Padded input tokens (batch x longest) one replay_batch forward may take.
REPLAY_TOKENS = 1 << 14


@dataclass(frozen=True)
class Generation:
    """One generation: the token ids (EOS included when it stopped), why, how long."""

    token_ids: list[int]
    finish_reason: FinishReason
    seconds: float


def _as_ids(value: int | list[int] | None) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, list | tuple) else {int(value)}


class ReferenceEngine:
    """A float32 transformers causal LM behind sampler spec v1. Not thread-safe:
    callers serialise use (the server holds one lock)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device  # inputs go where the weights are
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.eos_ids = self._eos_ids()
        if not self.eos_ids:
            raise ValidationError("the model names no EOS token (tokenizer and config)")
        self.max_positions = int(
            getattr(model.config.get_text_config(), "max_position_embeddings", 0) or 1 << 30
        )
        self._bounded_head: BoundedHead | bool | None = False  # False: not built yet

    #: Vocabularies below this replay with the plain float32 head: there the head is
    #: cheap and the pruned scoring's per-row work costs more than it saves.
    bounded_min_vocab = 16_384

    @property
    def bounded_head(self) -> BoundedHead | None:
        """The bf16 output head with its error bound (engine.head), built on first use;
        None for small vocabularies and for models whose head is not a plain linear
        layer on the hidden rows."""
        if self._bounded_head is False:
            usable = _head_only(self.model) and self.vocab_size >= self.bounded_min_vocab
            self._bounded_head = BoundedHead.of(self.model) if usable else None
        return self._bounded_head  # type: ignore[return-value]

    def _eos_ids(self) -> frozenset[int]:
        """EOS of the tokenizer, the config and the generation config (e.g. Gemma's
        <eos> and <end_of_turn>): generation stops after any of them."""
        ids = _as_ids(self.tokenizer.eos_token_id)
        ids |= _as_ids(getattr(self.model.config.get_text_config(), "eos_token_id", None))
        gen = getattr(self.model, "generation_config", None)
        ids |= _as_ids(getattr(gen, "eos_token_id", None))
        return frozenset(i for i in ids if 0 <= i < self.vocab_size)

    # --- checks ---------------------------------------------------------------------------
    def check_ids(self, ids: Sequence[int], what: str) -> None:
        """Token ids must lie in the model's vocabulary (the embedding would fail)."""
        bad = next((i for i in ids if not 0 <= int(i) < self.vocab_size), None)
        if bad is not None:
            raise ValidationError(f"{what}: token id {bad} outside the vocabulary "
                                  f"(0..{self.vocab_size - 1})")

    def _check_prompt(self, prompt_ids: Sequence[int], max_tokens: int) -> None:
        if not prompt_ids:
            raise ValidationError("the prompt must hold at least one token")
        self.check_ids(prompt_ids, "prompt")
        if len(prompt_ids) + max_tokens > self.max_positions:
            raise ValidationError(
                f"prompt of {len(prompt_ids)} tokens + max_tokens {max_tokens} exceeds the "
                f"model's context of {self.max_positions}"
            )

    def finish_reason(self, token_ids: Sequence[int]) -> FinishReason:
        """'stop' when the output ends with EOS, else 'length'."""
        return "stop" if token_ids and token_ids[-1] in self.eos_ids else "length"

    # --- generation -------------------------------------------------------------------------
    def generate_stream(
        self, prompt_ids: Sequence[int], params: SamplingParams, seed: int
    ) -> Iterator[int]:
        """Token ids one at a time, exactly those ``generate`` returns.

        The prompt is checked at the call (ValidationError before any token). Each step
        enters inference mode itself (torch's grad mode is per thread), so the server
        may resume this generator from a different worker thread each time.
        """
        self._check_prompt(prompt_ids, params.max_tokens)
        return self._tokens(list(prompt_ids), params, seed)

    def _tokens(self, prompt_ids: list[int], params: SamplingParams, seed: int
                ) -> Iterator[int]:
        row, cache = self._step(prompt_ids, None)
        for t in range(params.max_tokens):
            token = choose(row, seed, t, params)
            yield token
            if token in self.eos_ids or t + 1 == params.max_tokens:
                return
            row, cache = self._step([token], cache)

    def _step(self, new_ids: list[int], cache: object | None) -> tuple[np.ndarray, object]:
        """Feed ``new_ids`` after ``cache`` (None: a fresh prompt); the next logits row
        (V,) float32 and the updated KV cache."""
        import torch

        with torch.inference_mode():
            ids = torch.tensor([new_ids], dtype=torch.long, device=self.device)  # (1, n)
            out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            return out.logits[0, -1].float().cpu().numpy(), out.cache  # (V,)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, seed: int) -> Generation:
        """Generate under sampler spec v1 with ``seed`` (u64); EOS included if reached."""
        start = time.perf_counter()
        tokens = list(self.generate_stream(prompt_ids, params, seed))
        return Generation(tokens, self.finish_reason(tokens), time.perf_counter() - start)

    # --- replay -----------------------------------------------------------------------------
    def replay(self, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> np.ndarray:
        """(len(output_ids), V) float32: row t = logits at position len(prompt)+t-1,
        the ones that predicted output token t. One forward pass, no cache."""
        return self.replay_batch([(prompt_ids, output_ids)])[0]

    def replay_batch(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[np.ndarray]:
        """``replay`` for many pairs, batched: pairs of similar length share a forward
        (right padding), as few forwards as the logits budget allows, and the output
        head runs only on the rows a pair needs. Results in the order of ``pairs``."""
        return self._replay_all(pairs, bounded=False)  # type: ignore[return-value]

    def replay_bounded_batch(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[np.ndarray | BoundedLogits]:
        """``replay_batch`` with the output head in bf16 plus a proven error bound
        (:class:`BoundedLogits`) where the model's head allows it, plain float32 rows
        otherwise. What the recomputer replays: ``ivp.verify.score_replayed`` reads
        exact logits only where a verdict depends on them."""
        return self._replay_all(pairs, bounded=True)

    def _replay_all(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                    bounded: bool) -> list[np.ndarray | BoundedLogits]:
        for prompt, output in pairs:
            self._check_prompt(prompt, len(output))
            self.check_ids(output, "output")
        results: list[np.ndarray | BoundedLogits] = \
            [np.zeros((0, self.vocab_size), np.float32)] * len(pairs)
        for group in self._groups(pairs):
            for index, logits in zip(
                    group, self._replay_group([pairs[i] for i in group], bounded), strict=True):
                results[index] = logits
        return results

    def _groups(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[list[int]]:
        """Indices of the pairs with an output, by length (little padding per forward),
        split so each forward's logits (rows x vocabulary) fit REPLAY_BUDGET and its
        padded input REPLAY_TOKENS."""
        order = sorted((i for i, (_, o) in enumerate(pairs) if len(o)),
                       key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        groups: list[list[int]] = []
        current: list[int] = []
        rows = width = 0
        for i in order:
            prompt, output = pairs[i]
            length = len(prompt) + len(output) - 1  # the last token predicts nothing checked
            if current and ((rows + len(output)) * self.vocab_size > REPLAY_BUDGET
                            or (len(current) + 1) * max(width, length) > REPLAY_TOKENS):
                groups.append(current)
                current, rows, width = [], 0, 0
            current.append(i)
            rows, width = rows + len(output), max(width, length)
        if current:
            groups.append(current)
        return groups

    def _replay_group(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], bounded: bool = False
    ) -> list[np.ndarray | BoundedLogits]:
        """One forward over pairs that each have at least one output token.

        The input is prompt + output[:-1]: the last output token's own logits predict
        nothing that is checked. Right padding needs no attention mask: attention is
        causal, so no real token sees the padding after it.
        """
        import torch

        seqs = [list(p) + list(o[:-1]) for p, o in pairs]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, L) right-padded
        for b, seq in enumerate(seqs):
            ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        ids = ids.to(self.device)
        spans = [(len(p) - 1, len(o)) for p, o in pairs]  # first needed row, rows
        with torch.inference_mode():
            if _head_only(self.model):
                hidden = self.model.model(input_ids=ids, use_cache=False).last_hidden_state
                rows = torch.cat([hidden[b, s : s + n] for b, (s, n) in enumerate(spans)])
                ends = np.cumsum([n for _, n in spans])
                parts = [slice(end - n, end) for (_, n), end in zip(spans, ends, strict=True)]
                head = self.bounded_head if bounded else None
                if head is not None:
                    bits, norm = head.rows(rows)  # (sum n, V) bf16 patterns, (sum n,)
                    return [BoundedLogits(bits[p], norm[p], rows[p], head) for p in parts]
                logits = _head(self.model, rows).float().cpu().numpy()  # (sum n, V)
                return [logits[p] for p in parts]
            first = min(s for s, _ in spans)  # generic path: keep from the earliest row
            full = self.model(input_ids=ids, use_cache=False,
                              logits_to_keep=width - first).logits.float().cpu()
            return [full[b, s - first : s - first + n].numpy()
                    for b, (s, n) in enumerate(spans)]


#: Causal LMs whose logits are exactly ``lm_head(decoder(ids))`` (then soft-capped when
#: the config says so): replay runs the head on the rows it needs only.
_HEAD_ONLY = frozenset({"LlamaForCausalLM", "Gemma3ForCausalLM", "Gemma2ForCausalLM",
                        "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})


def _head_only(model: PreTrainedModel) -> bool:
    return type(model).__name__ in _HEAD_ONLY and hasattr(model, "lm_head") \
        and hasattr(model, "model")


def _head(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The model's output head on (N, H) hidden states: (N, V) logits."""
    return soft_cap(model.lm_head(hidden), final_cap(model))


def decode_prefill_gap(engine: ReferenceEngine, prompt_ids: Sequence[int],
                       params: SamplingParams, seed: int) -> float:
    """max |logits_decode - logits_prefill| over one generation: the engine's own
    nondeterminism between incremental decoding and replay (0 would be bit-exact)."""
    rows: list[np.ndarray] = []
    tokens: list[int] = []
    row, cache = engine._step(list(prompt_ids), None)
    for t in range(params.max_tokens):
        rows.append(row.copy())
        tokens.append(choose(row, seed, t, params))
        if tokens[-1] in engine.eos_ids:
            break
        row, cache = engine._step([tokens[-1]], cache)
    replayed = engine.replay(prompt_ids, tokens)
    return float(np.max(np.abs(np.stack(rows) - replayed)))


__all__ = ["Generation", "ReferenceEngine", "decode_prefill_gap"]
