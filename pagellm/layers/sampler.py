"""Turn one step's logits into next tokens (and their log-probabilities).

Per-row pipeline, in this order:

1. Raw log-probabilities (``log_softmax`` of the float32 logits) feed every logprob
   output, so users see the model's own distribution, not the processed one.
2. ``logit_bias``; ``min_tokens`` (stop/EOS ids set to -inf while the output is short);
   repetition, frequency and presence penalties. These apply to greedy rows too.
3. Greedy rows take the argmax. Random rows are divided by their temperature, then
   truncated by top-k, top-p and min-p, and sampled.

Sampling is exact and needs no sort and no host sync. Batches with a seeded row use the
exponential race, ``argmax(probs / q)`` with ``q = -log(u) ~ Exp(1)``, and each seeded row draws
its own ``u`` from its own generator, so its tokens do not depend on the other rows. Batches
without seeds invert the CDF with one uniform number per row, which is much cheaper.

:class:`SamplingBatch` is built on the host once per step; :class:`Sampler` then runs
only device ops and never syncs with the host (no ``.item()``, no boolean indexing).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pagellm.sampling_params import SamplingParams

__all__ = ["SamplingBatch", "SamplerOutput", "Sampler", "gather_logprobs", "make_generator", "samples_plainly"]


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``; one per seeded request, kept across steps."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def to_device(data: list, dtype: torch.dtype, device: torch.device,
              copy_stream: torch.cuda.Stream | None = None) -> Tensor:
    # Pinned source + non_blocking lets the copy overlap with the step instead of syncing. On a
    # copy stream it also stays out of the compute stream, where every switch between a kernel
    # and a copy costs microseconds; the caller makes the compute stream wait for that stream.
    pin = device.type == "cuda"
    source = torch.tensor(data, dtype=dtype, pin_memory=pin)
    if copy_stream is None or not pin:
        return source.to(device, non_blocking=pin)
    consumer = torch.cuda.current_stream(device)
    with torch.cuda.stream(copy_stream):
        out = source.to(device, non_blocking=True)
    out.record_stream(consumer)  # its memory is not reused before the consumer's reads are done
    return out


def uses_penalty(params: SamplingParams) -> bool:
    """Whether a repetition, frequency or presence penalty changes this request's logits."""
    return (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0)


def samples_plainly(params: SamplingParams, num_output_tokens: int) -> bool:
    """Whether a request's next token is a plain greedy or temperature draw: no logprobs, logit
    bias, penalties, active min_tokens, truncation (top-k, top-p, min-p) or seeded draws. A batch of
    such rows is what the Triton sampler (and a decode graph that samples) handles alone."""
    if (params.logprobs is not None or params.logit_bias or uses_penalty(params)
            or num_output_tokens < params.min_tokens):
        return False
    return params.is_greedy or (params.top_k == 0 and params.top_p == 1.0 and params.min_p == 0.0
                                and params.seed is None)


# Stands in for the history of a row without penalties; an array so the fast path holds.
_EMPTY = np.zeros(0, dtype=np.int64)


def _token_histogram(token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> Tensor:
    """Per-row token counts: [S, V] float32 from S ragged lists of token ids."""
    num_rows = len(token_lists)
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=num_rows)  # [S]
    if num_rows and all(isinstance(t, np.ndarray) for t in token_lists):
        # A caller that keeps per-request arrays skips the per-token Python loop below.
        tokens = np.concatenate(token_lists).astype(np.int64, copy=False)
    else:
        # numpy's fromiter is several times faster than torch.tensor on long Python lists.
        tokens = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=int(lengths.sum()))
    flat_index = np.repeat(np.arange(num_rows, dtype=np.int64) * vocab_size, lengths) + tokens  # [T]
    index = torch.from_numpy(flat_index)
    if device.type == "cuda":
        index = index.pin_memory().to(device, non_blocking=True)
    counts = torch.zeros(num_rows * vocab_size, dtype=torch.float32, device=device)  # [S*V]
    counts.index_add_(0, index, torch.ones(index.shape, dtype=torch.float32, device=device))
    return counts.view(num_rows, vocab_size)  # [S, V]


@dataclass
class SamplingBatch:
    """Per-step sampling state of S rows, on the device. Built by :meth:`build`.

    Optional tensors are None when no row in the batch uses the feature, which lets the
    sampler skip that work entirely (the common case is plain temperature sampling).
    """

    temperature: Tensor  # [S] float32, 0 for greedy rows
    all_greedy: bool
    all_random: bool
    top_p: Tensor | None  # [S] float32 (1 = off)
    top_k: Tensor | None  # [S] int64 (0 = off)
    max_top_k: int  # largest top_k in use, clamped to V (host int, so no sync for torch.topk)
    min_p: Tensor | None  # [S] float32 (0 = off)
    # Penalties: the per-row values are None when every row is neutral.
    repetition_penalty: Tensor | None  # [S] float32 (1 = off)
    frequency_penalty: Tensor | None  # [S] float32 (0 = off)
    presence_penalty: Tensor | None  # [S] float32 (0 = off)
    prompt_token_mask: Tensor | None  # [S, V] bool, token occurs in the prompt (repetition only)
    output_token_counts: Tensor | None  # [S, V] float32, occurrences in the output so far
    # logit_bias as a sparse list of (row, token, bias) entries.
    bias_rows: Tensor | None  # [B] int64
    bias_tokens: Tensor | None  # [B] int64
    bias_values: Tensor | None  # [B] float32
    # (row, token) pairs to mask to -inf: stop ids of rows still short of min_tokens.
    min_tokens_rows: Tensor | None  # [M] int64
    min_tokens_tokens: Tensor | None  # [M] int64
    generators: dict[int, torch.Generator]  # row -> generator, random seeded rows only
    max_num_logprobs: int | None  # largest `logprobs` requested; None if no row asked

    @property
    def needs_logit_processing(self) -> bool:
        """Whether bias, min_tokens or penalties change any logit this step."""
        return (
            self.bias_rows is not None
            or self.min_tokens_rows is not None
            or self.repetition_penalty is not None
            or self.frequency_penalty is not None
            or self.presence_penalty is not None
        )

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        stop_ids_for_min_tokens: Sequence[set[int]],
        vocab_size: int,
        device: torch.device | str,
        copy_stream: torch.cuda.Stream | None = None,
        pending_rows: Sequence[int] = (),
        pending_tokens: Tensor | None = None,
    ) -> SamplingBatch:
        """Gather per-request state into device tensors (one row per request).

        Args:
            params: each row's SamplingParams (token ids already checked < vocab_size).
            prompt_token_ids / output_token_ids: each row's prompt and generated tokens
                (lists, or int numpy arrays, which are faster to gather); read only by
                rows that use a penalty (outputs also by rows with min_tokens).
            generators: each row's generator (on ``device``) or None; used only by
                random rows.
            stop_ids_for_min_tokens: ids masked while ``len(output) < min_tokens``
                (usually ``params.all_stop_token_ids``).
            vocab_size: V, the logits' last dimension.
            copy_stream: on CUDA, a stream for the host-to-device copies of the per-row values;
                the current stream waits for it before this returns.
            pending_rows: rows with one more generated token than output_token_ids holds (the
                previous step sampled it; the host has not read it yet). It counts for min_tokens.
            pending_tokens: [len(pending_rows)] int64 on ``device``, those tokens; needed when a
                pending row uses a penalty.
        """
        num_rows = len(params)
        for name, seq in (
            ("prompt_token_ids", prompt_token_ids),
            ("output_token_ids", output_token_ids),
            ("generators", generators),
            ("stop_ids_for_min_tokens", stop_ids_for_min_tokens),
        ):
            if len(seq) != num_rows:
                raise ValueError(f"{name} must have one entry per row ({num_rows}), got {len(seq)}")
        if len(set(pending_rows)) != len(pending_rows) or not all(0 <= r < num_rows for r in pending_rows):
            raise ValueError(f"pending_rows must be distinct rows in [0, {num_rows}), got {list(pending_rows)}")
        if pending_tokens is not None and tuple(pending_tokens.shape) != (len(pending_rows),):
            raise ValueError(f"pending_tokens must be [{len(pending_rows)}], got {tuple(pending_tokens.shape)}")
        device = torch.device(device)
        num_pending = [0] * num_rows
        for row in pending_rows:
            num_pending[row] = 1

        greedy = [p.is_greedy for p in params]
        temperature = [0.0 if g else p.temperature for p, g in zip(params, greedy)]
        # Greedy rows never truncate: an argmax is unchanged by top-k/top-p/min-p.
        top_k = [0 if g else min(p.top_k, vocab_size) for p, g in zip(params, greedy)]
        top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        min_p = [0.0 if g else p.min_p for p, g in zip(params, greedy)]

        def copied(values: list, dtype: torch.dtype) -> Tensor:
            return to_device(values, dtype, device, copy_stream)

        def optional(values: list, neutral: float | int, dtype: torch.dtype) -> Tensor | None:
            return None if all(v == neutral for v in values) else copied(values, dtype)

        rep = [p.repetition_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        rep_t = optional(rep, 1.0, torch.float32)
        freq_t = optional(freq, 0.0, torch.float32)
        pres_t = optional(pres, 0.0, torch.float32)

        # Only rows with a penalty contribute their history; the rest stay zero, which
        # is harmless because their penalty values are neutral.
        prompt_mask = None
        output_counts = None
        if rep_t is not None or freq_t is not None or pres_t is not None:
            uses = [uses_penalty(p) for p in params]
            outputs = [o if u else _EMPTY for o, u in zip(output_token_ids, uses)]
            output_counts = _token_histogram(outputs, vocab_size, device)  # [S, V]
            counted = [i for i, row in enumerate(pending_rows) if uses[row]]
            if counted:
                if pending_tokens is None:
                    raise ValueError("pending_tokens are needed: a pending row uses a penalty")
                # On the compute stream, in order behind whatever produced pending_tokens.
                rows = to_device([pending_rows[i] for i in counted], torch.int64, device)
                tokens = pending_tokens[to_device(counted, torch.int64, device)]
                output_counts.index_put_((rows, tokens), torch.ones(len(counted), device=device), accumulate=True)
            if rep_t is not None:
                prompts = [t if r != 1.0 else _EMPTY for t, r in zip(prompt_token_ids, rep)]
                prompt_mask = _token_histogram(prompts, vocab_size, device) > 0  # [S, V]

        bias_rows: list[int] = []
        bias_tokens: list[int] = []
        bias_values: list[float] = []
        for row, p in enumerate(params):
            for token, value in (p.logit_bias or {}).items():
                bias_rows.append(row)
                bias_tokens.append(token)
                bias_values.append(value)

        mask_rows: list[int] = []
        mask_tokens: list[int] = []
        for row, (p, out, stop_ids) in enumerate(zip(params, output_token_ids, stop_ids_for_min_tokens)):
            if len(out) + num_pending[row] < p.min_tokens:
                for token in stop_ids:
                    mask_rows.append(row)
                    mask_tokens.append(token)

        requested = [p.logprobs for p in params if p.logprobs is not None]

        batch = cls(
            temperature=copied(temperature, torch.float32),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            top_p=optional(top_p, 1.0, torch.float32),
            top_k=optional(top_k, 0, torch.int64),
            max_top_k=max(top_k, default=0),
            min_p=optional(min_p, 0.0, torch.float32),
            repetition_penalty=rep_t,
            frequency_penalty=freq_t,
            presence_penalty=pres_t,
            prompt_token_mask=prompt_mask,
            output_token_counts=output_counts,
            bias_rows=copied(bias_rows, torch.int64) if bias_rows else None,
            bias_tokens=copied(bias_tokens, torch.int64) if bias_rows else None,
            bias_values=copied(bias_values, torch.float32) if bias_rows else None,
            min_tokens_rows=copied(mask_rows, torch.int64) if mask_rows else None,
            min_tokens_tokens=copied(mask_tokens, torch.int64) if mask_rows else None,
            generators={
                row: g for row, (g, is_g) in enumerate(zip(generators, greedy)) if g is not None and not is_g
            },
            max_num_logprobs=max(requested) if requested else None,
        )
        if copy_stream is not None and device.type == "cuda":
            torch.cuda.current_stream(device).wait_stream(copy_stream)
        return batch


@dataclass
class SamplerOutput:
    """One step's result; all tensors stay on the logits' device."""

    sampled_token_ids: Tensor  # [S] int64
    sampled_logprobs: Tensor | None  # [S] float32, under the raw (unprocessed) distribution
    topk_token_ids: Tensor | None  # [S, K] int64, K = max_num_logprobs (None if K is 0/None)
    topk_logprobs: Tensor | None  # [S, K] float32, raw distribution, descending
    sampled_ranks: Tensor | None  # [S] int64, 1 = most likely; None unless logprobs requested


def gather_logprobs(logprobs: Tensor, token_ids: Tensor, k: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The chosen tokens' logprobs and each row's k most likely tokens.

    Args:
        logprobs: [N, V] log-softmaxed scores (any per-row constant shift carries through).
        token_ids: [N] int64, the token whose logprob to read in each row.
        k: how many top tokens to return; 0 returns None for both top-k outputs.

    Returns:
        (token_logprobs [N], topk_ids [N, k] int64, topk_logprobs [N, k] descending).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    token_logprobs = logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)  # [N]
    if k == 0:
        return token_logprobs, None, None
    topk_logprobs, topk_ids = logprobs.topk(k, dim=-1)  # [N, k], sorted descending
    return token_logprobs, topk_ids, topk_logprobs


def triton_sampling_module():
    """The Triton sampler of plain rows: inverse CDF (kernels/triton/inverse_cdf_sampling.py: one
    uniform per row, 3.8x faster than Gumbel-max at 256 rows on an H200, see benchmarks/RESULTS.md)
    or, with PAGELLM_SAMPLER_KERNEL=gumbel, Gumbel-max (kernels/triton/gumbel_sampling.py: a Philox word
    per logit). Both modules have `sample(logits, temperature, seed)` and `compile_all`."""
    kind = os.environ.get("PAGELLM_SAMPLER_KERNEL", "cdf")
    if kind not in ("gumbel", "cdf"):
        raise ValueError(f"PAGELLM_SAMPLER_KERNEL must be 'cdf' or 'gumbel'; got {kind!r}")
    if kind == "gumbel":
        from pagellm.kernels.triton import gumbel_sampling
        return gumbel_sampling
    from pagellm.kernels.triton import inverse_cdf_sampling
    return inverse_cdf_sampling


class Sampler:
    """Chooses the next token per row from logits [S, V]; see the module docstring.

    Does not modify ``logits``. Draws from the default torch RNG for unseeded rows and
    advances each seeded row's generator by V uniform draws per random step.

    With ``use_triton`` (CUDA), batches of plain temperature/greedy rows (no truncation, penalties,
    seeds or logprobs: the common case) are sampled by one Triton pass over the logits
    (triton_sampling_module), its seed drawn from the host's torch RNG.
    """

    def __init__(self, use_triton: bool = False) -> None:
        self.use_triton = use_triton
        self._triton_kernels = None

    @property
    def triton_kernels(self):
        """The Triton sampling module (triton_sampling_module), chosen on first use, not every step."""
        if self._triton_kernels is None:
            self._triton_kernels = triton_sampling_module()
        return self._triton_kernels

    @staticmethod
    def _plain(batch: SamplingBatch) -> bool:
        return (batch.max_num_logprobs is None and not batch.needs_logit_processing and batch.top_p is None
                and batch.top_k is None and batch.min_p is None and not batch.generators)

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        if self.use_triton and logits.is_cuda and self._plain(batch):
            seed = int(torch.randint(0, 2**31 - 1, (1,)))  # a CPU draw: no device sync
            return SamplerOutput(sampled_token_ids=self.triton_kernels.sample(logits, batch.temperature, seed),
                                 sampled_logprobs=None, topk_token_ids=None, topk_logprobs=None, sampled_ranks=None)
        raw = logits.float()  # [S, V]; may alias `logits`, so never written in place
        scores = self.process_logits(raw, batch)

        if batch.all_greedy:
            sampled = scores.argmax(dim=-1)  # [S]
        else:
            sampled = self._sample(scores, batch)
            if not batch.all_random:
                greedy_rows = batch.temperature == 0.0  # [S]
                sampled = torch.where(greedy_rows, scores.argmax(dim=-1), sampled)

        if batch.max_num_logprobs is None:
            # Nobody asked for logprobs: skip the extra passes over [S, V].
            return SamplerOutput(sampled_token_ids=sampled, sampled_logprobs=None, topk_token_ids=None,
                                 topk_logprobs=None, sampled_ranks=None)
        # logsumexp instead of a full log_softmax: every logprob output is raw - lse.
        lse = torch.logsumexp(raw, dim=-1)  # [S]
        token_lp, topk_ids, topk_lp = gather_logprobs(raw, sampled, batch.max_num_logprobs)
        token_lp = token_lp - lse  # [S]
        if topk_lp is not None:
            topk_lp = topk_lp - lse.unsqueeze(-1)  # [S, K]
        # Rank counts strictly larger logits, so ties share the better rank.
        ranks = (raw > raw.gather(-1, sampled.unsqueeze(-1))).sum(dim=-1) + 1  # [S]
        return SamplerOutput(
            sampled_token_ids=sampled,
            sampled_logprobs=token_lp,
            topk_token_ids=topk_ids,
            topk_logprobs=topk_lp,
            sampled_ranks=ranks,
        )

    def process_logits(self, logits: Tensor, batch: SamplingBatch) -> Tensor:
        """Float32 logits [S, V] after logit_bias, min_tokens and penalties (no temperature).

        Returns ``logits.float()`` itself when nothing applies, else a new tensor;
        ``logits`` is never modified.
        """
        scores = logits.float()
        if batch.needs_logit_processing:
            if scores is logits:  # .float() did not copy; edit a copy, not the caller's tensor
                scores = scores.clone()
            self._apply_logit_processing(scores, batch)
        return scores

    @staticmethod
    def _apply_logit_processing(scores: Tensor, batch: SamplingBatch) -> None:
        """logit_bias, min_tokens, then penalties; modifies ``scores`` [S, V] in place."""
        if batch.bias_rows is not None:
            scores.index_put_((batch.bias_rows, batch.bias_tokens), batch.bias_values, accumulate=True)
        if batch.min_tokens_rows is not None:
            neg_inf = torch.full_like(batch.min_tokens_rows, float("-inf"), dtype=scores.dtype)
            scores.index_put_((batch.min_tokens_rows, batch.min_tokens_tokens), neg_inf)
        counts = batch.output_token_counts  # [S, V] or None
        if batch.repetition_penalty is not None:
            seen = batch.prompt_token_mask | (counts > 0)  # [S, V]
            penalty = batch.repetition_penalty.unsqueeze(-1)  # [S, 1]
            # Dividing positive and multiplying negative logits both make the token less likely.
            penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
            scores.copy_(torch.where(seen, penalised, scores))
        if batch.frequency_penalty is not None:
            scores.sub_(batch.frequency_penalty.unsqueeze(-1) * counts)
        if batch.presence_penalty is not None:
            scores.sub_(batch.presence_penalty.unsqueeze(-1) * (counts > 0).float())

    def _sample(self, scores: Tensor, batch: SamplingBatch) -> Tensor:
        """Temperature, top-k, top-p, min-p, then an exact draw; returns [S] int64."""
        # Greedy rows divide by 1 here; their result is replaced by the argmax anyway.
        temperature = torch.where(batch.temperature == 0.0, 1.0, batch.temperature)  # [S]
        scores = scores / temperature.unsqueeze(-1)  # [S, V], a fresh tensor we may edit

        if batch.top_p is not None:
            self._apply_top_k_top_p(scores, batch.top_k, batch.top_p)
        elif batch.top_k is not None:
            self._apply_top_k(scores, batch.top_k, batch.max_top_k)
        if batch.min_p is not None:
            # p_i >= min_p * p_max  <=>  s_i >= s_max + log(min_p); log(0) = -inf keeps all.
            threshold = scores.amax(dim=-1, keepdim=True) + torch.log(batch.min_p).unsqueeze(-1)  # [S, 1]
            scores.masked_fill_(scores < threshold, float("-inf"))

        probs = scores.softmax(dim=-1)  # [S, V]
        if not batch.generators:
            # No seeded row: invert the CDF, one uniform number per row (V times cheaper in random
            # numbers than the race below). It is exact, but a seeded row must not use it: tiny
            # batch-dependent logit differences accumulate along the cumsum and could move its draw.
            cdf = probs.cumsum_(dim=-1)  # [S, V]
            u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]  # [S, 1], below the total
            # right=True: the first index whose cdf exceeds u, never a zero-probability token.
            return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)  # [S]
        # Exponential race: argmax(p / q), q = -log(u) ~ Exp(1). A flip needs two near-tied
        # candidates, so batch-dependent rounding rarely changes a seeded row's draw.
        u = torch.rand_like(probs)  # [S, V], shared RNG for unseeded rows
        for row, generator in batch.generators.items():
            u[row] = torch.rand(probs.shape[-1], generator=generator, device=probs.device)
        race = u.log_().neg_()  # Exp(1); u = 0 gives inf, which only makes that token lose
        return probs.div_(race).argmax(dim=-1)  # [S]

    @staticmethod
    def _apply_top_k(scores: Tensor, top_k: Tensor, max_top_k: int) -> None:
        """Keep each row's top_k highest scores (ties at the boundary kept); 0 = off."""
        top_values, _ = scores.topk(max_top_k, dim=-1)  # [S, max_k], descending
        kth = top_values.gather(-1, (top_k.clamp(min=1) - 1).unsqueeze(-1))  # [S, 1]
        kth = kth.masked_fill((top_k == 0).unsqueeze(-1), float("-inf"))
        scores.masked_fill_(scores < kth, float("-inf"))

    @staticmethod
    def _apply_top_k_top_p(scores: Tensor, top_k: Tensor | None, top_p: Tensor) -> None:
        """Top-k (if given) then top-p on the renormalised rest, with one ascending sort."""
        sorted_scores, order = scores.sort(dim=-1)  # [S, V] ascending
        vocab_size = scores.shape[-1]
        if top_k is not None:
            position = torch.arange(vocab_size, device=scores.device)  # [V]
            # Ascending order: the top k occupy the last k positions.
            first_kept = torch.where(top_k == 0, 0, vocab_size - top_k).unsqueeze(-1)  # [S, 1]
            sorted_scores.masked_fill_(position < first_kept, float("-inf"))
        # Drop the low tail while the mass left behind still reaches top_p: what remains
        # is the smallest top set with mass >= top_p.
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # [S, V]
        drop = cumulative <= (1.0 - top_p).unsqueeze(-1)  # [S, V]
        drop[:, -1] = False  # the most likely token always survives
        sorted_scores.masked_fill_(drop, float("-inf"))
        scores.scatter_(-1, order, sorted_scores)
