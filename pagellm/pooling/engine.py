"""EmbeddingEngine: prompts -> one vector each, on an encoder model.

An encoder reads each prompt once and keeps nothing, so this path has no scheduler, KV cache
or decode loop: prompts are tokenized and checked, sorted by length (so a batch pads little),
cut into batches under a token budget, run through the model under inference_mode, and
pooled. Not thread-safe (the tokenizer is not): one caller at a time; the server's
AsyncEmbeddingEngine gives it one thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from pagellm.engine.args import EngineArgs
from pagellm.engine.input_processor import PromptType, check_token_ids
from pagellm.models.loader import open_model_source
from pagellm.outputs import EmbeddingOutput, EmbeddingRequestOutput
from pagellm.pooling.config import PoolerConfig, load_max_seq_length, load_pooler_config
from pagellm.pooling.pooler import pool_padded
from pagellm.pooling.registry import build_pooling_model, resolve_pooling_model_class

logger = logging.getLogger(__name__)


# Padded tokens per forward pass when max_num_batched_tokens is unset. Encoders are small and
# a batch is one pass, so the budget is larger than the decoder engine's per-step one.
_DEFAULT_BATCH_TOKENS = {"cuda": 32768, "cpu": 4096}


class PromptError(ValueError):
    """A bad prompt; `index` is its position among the prompts given."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


@dataclass(frozen=True)
class EmbeddingModelConfig:
    """What the embedding engine serves (the server reads model, max_model_len, hidden_size)."""

    model: str
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    vocab_size: int
    hidden_size: int  # the length of every embedding vector
    pooler: PoolerConfig
    max_num_seqs: int
    max_num_batched_tokens: int


class EmbeddingEngine:
    """Loads an encoder (BertModel, ...) and embeds prompts with it.

    `args.max_model_len` defaults to sentence_bert_config.json's `max_seq_length` (what vLLM and
    sentence-transformers use; 256 for all-MiniLM-L6-v2), else max_position_embeddings; a larger
    value up to max_position_embeddings may be asked for. `pooler_config` overrides the pooling
    read from the folder (see pagellm/pooling/config.py).
    """

    def __init__(self, args: EngineArgs, pooler_config: PoolerConfig | Mapping[str, Any] | None = None) -> None:
        start = time.perf_counter()
        self.args = args
        self.device = device = args.resolve_device()
        source = open_model_source(args.model, args.tokenizer, args.load_format, args.trust_remote_code,
                                   skip_tokenizer_init=args.skip_tokenizer_init)
        architecture, cls = resolve_pooling_model_class(source.hf_config, source.model)
        spec = cls.spec_from_config(source.hf_config)
        folder = source.path if source.path.is_dir() else None
        pooler = PoolerConfig.coerce(pooler_config) or load_pooler_config(folder)
        trained_len = load_max_seq_length(folder)
        max_len = args.max_model_len or min(spec.max_position, trained_len or spec.max_position)
        if max_len > spec.max_position:
            raise ValueError(f"max_model_len ({max_len}) must be <= the model's max_position_embeddings "
                             f"({spec.max_position})")
        budget = args.max_num_batched_tokens or _DEFAULT_BATCH_TOKENS["cuda" if device.type == "cuda" else "cpu"]
        self.model_config = EmbeddingModelConfig(
            model=args.served_model_name or source.model, architecture=architecture,
            dtype=args.resolve_dtype(source.hf_config, device), max_model_len=max_len,
            vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, pooler=pooler,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=budget)
        torch.manual_seed(args.seed)
        self.model = build_pooling_model(cls, source, self.model_config.dtype, device, args.seed)
        self.tokenizer = source.tokenizer
        self._ids = itertools.count()
        self.num_batches = 0  # forward passes run so far (the server's batching is visible here)
        logger.info("embedding engine ready in %.2f s: %s (%s) on %s, %s, %s pooling%s, max_model_len %d",
                    time.perf_counter() - start, self.model_config.model, architecture, device,
                    self.model_config.dtype, pooler.pooling_type, " + normalize" if pooler.normalize else "",
                    max_len)

    @property
    def pooler_config(self) -> PoolerConfig:
        return self.model_config.pooler

    def new_request_id(self) -> str:
        return str(next(self._ids))

    # ---- inputs ----------------------------------------------------------------------------------
    def process_prompts(self, prompts: Sequence[PromptType], truncate_prompt_tokens: int | None = None,
                        add_special_tokens: bool = True) -> list[tuple[str | None, list[int]]]:
        """(prompt text or None, token ids, special tokens included) for each prompt: a string,
        a list of token ids, or a {"prompt": ...} / {"prompt_token_ids": [...]} dict. Text is
        tokenized in one call, which the Rust tokenizer spreads over its threads.

        truncate_prompt_tokens: None (a prompt longer than max_model_len is an error), k in
        [1, max_model_len] (keep k tokens), or -1 (keep max_model_len). Tokens are cut on the
        tokenizer's truncation side (the end, for BERT), text keeping its [CLS] and [SEP].
        add_special_tokens=False tokenizes text without [CLS] / [SEP].
        Raises ValueError naming the field (a PromptError, with the prompt's index, for a bad
        prompt: empty, too long or malformed).
        """
        limit = self._truncation_limit(truncate_prompt_tokens)
        unpacked = []
        for index, prompt in enumerate(prompts):
            try:
                unpacked.append(_unpack(prompt))
            except ValueError as exc:
                raise PromptError(index, str(exc)) from None
        to_tokenize = [i for i, (text, ids) in enumerate(unpacked) if ids is None and text]
        if to_tokenize and self.tokenizer is None:
            raise PromptError(to_tokenize[0], "prompt: text prompts need a tokenizer (skip_tokenizer_init=True); "
                                              "pass token ids")
        encoded = dict(zip(to_tokenize, self._encode([unpacked[i][0] for i in to_tokenize], limit,
                                                     add_special_tokens)))
        results = []
        for index, (text, ids) in enumerate(unpacked):
            try:
                if ids is None:
                    ids = self._checked_text_ids(text, encoded.get(index), limit)
                else:
                    ids = self._truncated(check_token_ids(ids, self.model_config.vocab_size), limit)
                if len(ids) > self.model_config.max_model_len:
                    raise ValueError(f"prompt is {len(ids)} tokens long, longer than max_model_len "
                                     f"({self.model_config.max_model_len}); pass truncate_prompt_tokens to "
                                     f"truncate it")
            except ValueError as exc:
                raise PromptError(index, str(exc)) from None
            results.append((text, ids))
        return results

    def process_prompt(self, prompt: PromptType, truncate_prompt_tokens: int | None = None,
                       add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        """`process_prompts` for one prompt."""
        return self.process_prompts([prompt], truncate_prompt_tokens, add_special_tokens)[0]

    def _truncation_limit(self, truncate_prompt_tokens: int | None) -> int | None:
        if truncate_prompt_tokens is None:
            return None
        max_len = self.model_config.max_model_len
        value = truncate_prompt_tokens
        if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or 1 <= value <= max_len):
            raise ValueError(f"truncate_prompt_tokens must be -1 (max_model_len) or in [1, {max_len}]; got {value!r}")
        return max_len if value == -1 else value

    def _encode(self, texts: list[str], limit: int | None, add_special_tokens: bool) -> list[list[int]]:
        if not texts:
            return []
        options: dict[str, Any] = {"add_special_tokens": add_special_tokens}
        if limit is not None:
            options.update(truncation=True, max_length=limit)
        return [list(ids) for ids in self.tokenizer(texts, **options)["input_ids"]]

    @staticmethod
    def _checked_text_ids(text: str | None, ids: list[int] | None, limit: int | None) -> list[int]:
        if not text:
            raise ValueError("prompt must not be empty")
        if not ids:
            raise ValueError("prompt must not be empty (it has no tokens)")
        # A limit below the number of special tokens is not honoured by the tokenizer.
        return ids[:limit]

    def _truncated(self, ids: list[int], limit: int | None) -> list[int]:
        if limit is None or len(ids) <= limit:
            return ids
        left = getattr(self.tokenizer, "truncation_side", "right") == "left"
        return ids[-limit:] if left else ids[:limit]

    # ---- running ---------------------------------------------------------------------------------
    def embed(self, prompts: Sequence[PromptType], truncate_prompt_tokens: int | None = None,
              use_tqdm: bool = False) -> list[EmbeddingRequestOutput]:
        """One EmbeddingRequestOutput per prompt, in order. Every prompt is checked before any
        runs, so a bad one raises ValueError and nothing is computed."""
        processed = self.process_prompts(prompts, truncate_prompt_tokens)
        bar = _progress_bar(len(processed)) if use_tqdm else None
        try:
            vectors = self.embed_token_ids([ids for _, ids in processed],
                                           on_batch=None if bar is None else bar.update)
        finally:
            if bar is not None:
                bar.close()
        # One tolist() for all: per-row calls cost more than the forward pass on a GPU.
        rows = torch.stack(vectors).tolist() if vectors else []
        return [EmbeddingRequestOutput(request_id=self.new_request_id(), outputs=EmbeddingOutput(embedding=row),
                                       prompt_token_ids=ids, prompt=text, finished=True)
                for (text, ids), row in zip(processed, rows)]

    def embed_token_ids(self, token_ids: Sequence[list[int]],
                        on_batch: Callable[[int], Any] | None = None) -> list[torch.Tensor]:
        """A float32 CPU vector [hidden_size] per (already checked) token list, in order.
        `on_batch(n)` is called after each forward pass with the number of prompts it embedded."""
        vectors: list[torch.Tensor | None] = [None] * len(token_ids)
        for batch in self.plan_batches([len(ids) for ids in token_ids]):
            pooled = self._run_batch([token_ids[i] for i in batch])  # [B, H]
            for row, index in enumerate(batch):
                vectors[index] = pooled[row]
            if on_batch is not None:
                on_batch(len(batch))
        return vectors  # type: ignore[return-value]  # every index is filled by one batch

    def plan_batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Prompt indices grouped into forward passes: longest first, each pass holding at most
        max_num_seqs prompts and max_num_batched_tokens padded tokens (a prompt alone may exceed it)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        budget, max_seqs = self.model_config.max_num_batched_tokens, self.model_config.max_num_seqs
        batches: list[list[int]] = []
        for index in order:
            # Sorted longest first: the batch's first prompt sets its padded length.
            if batches and len(batches[-1]) < max_seqs and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
                batches[-1].append(index)
            else:
                batches.append([index])
        return batches

    @torch.inference_mode()
    def _run_batch(self, token_ids: list[list[int]]) -> torch.Tensor:
        """token_ids: B lists, longest first -> pooled [B, H] float32 on the CPU."""
        lengths = [len(ids) for ids in token_ids]
        width = lengths[0]
        input_ids = torch.zeros(len(token_ids), width, dtype=torch.long)  # [B, T], 0-padded (masked out)
        for row, ids in enumerate(token_ids):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        lengths_t = torch.tensor(lengths, dtype=torch.long)  # [B]
        pin = self.device.type == "cuda"
        if pin:
            input_ids, lengths_t = input_ids.pin_memory(), lengths_t.pin_memory()
        input_ids = input_ids.to(self.device, non_blocking=True)
        lengths_t = lengths_t.to(self.device, non_blocking=True)
        padded = lengths[-1] != width
        key_mask = (torch.arange(width, device=self.device)[None, :] < lengths_t[:, None]) if padded else None  # [B, T]
        hidden = self.model(input_ids, key_mask)  # [B, T, H]
        pooled = pool_padded(hidden, lengths_t, self.model_config.pooler)  # [B, H] float32
        self.num_batches += 1
        return pooled.cpu()


def _unpack(prompt: PromptType) -> tuple[str | None, list[int] | None]:
    """(text, None) for a prompt still to tokenize; (text or None, token ids) for a tokenized one."""
    if isinstance(prompt, Mapping):
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)):
                raise ValueError(f"prompt_token_ids must be a list of ints; got {type(ids).__name__}")
            return prompt.get("prompt"), list(ids)
        if "prompt" not in prompt:
            raise ValueError("prompt dict must have 'prompt' or 'prompt_token_ids'")
        prompt = prompt["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string; got {type(prompt).__name__}")
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, (list, tuple)):
        return None, list(prompt)
    raise ValueError(f"prompt must be a string, a list of token ids or a dict; got {type(prompt).__name__}")


def _progress_bar(total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="Embedding prompts", dynamic_ncols=True)
