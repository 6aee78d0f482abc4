"""Runs the model for one scheduled step: flattens it into tensors, runs the forward pass, samples.

The model runner decides nothing about policy; it turns a SchedulerOutput into input_ids,
positions, slot_mapping and block tables, and returns the sampled tokens and logprobs.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from pagellm.config import CacheConfig, ModelConfig
from pagellm.core.scheduler import ScheduledRequest, SchedulerOutput
from pagellm.layers.attention import AttentionMetadata, get_attention_backend
from pagellm.layers.attention.layer import PagedAttention
from pagellm.layers.sampler import (Sampler, SamplerOutput, SamplingBatch, gather_logprobs, samples_plainly, to_device,
                                    uses_penalty)
from pagellm.worker.cuda_graphs import DecodeGraphs, capture_sizes
from pagellm.worker.host_memory import keep_freed_memory
from pagellm.worker.pending_step import PendingStep, StepResult
from pagellm.worker.staging import StagingBuffers

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 4 << 30


def _enable_triton_kernels(model: torch.nn.Module) -> None:
    """Switches every layer that has a fused Triton kernel (RMSNorm, SiLU-and-mul, q/k norm + RoPE) to it."""
    for module in model.modules():
        enable = getattr(module, "enable_triton", None)
        if callable(enable):
            enable()


class ModelRunner:
    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, cache_config: CacheConfig,
                 device: torch.device, attention_backend: str | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048) -> None:
        if device.type == "cpu":
            keep_freed_memory()
        self.model = model
        self.model_config = model_config
        self.cache_config = cache_config
        self.device = device
        self.block_size = cache_config.block_size
        self.backend = get_attention_backend(attention_backend, device)
        self.sampler = Sampler()
        # Small host<->device copies of each step (sampling values in, sampled tokens out) run here,
        # beside the compute stream, which then never switches between kernels and copies for them.
        self.copy_stream = (torch.cuda.Stream(device) if device.type == "cuda"
                            and os.environ.get("PAGELLM_COPY_STREAM", "1") != "0" else None)
        self.generators: dict[str, torch.Generator] = {}
        self.max_num_seqs = max_num_seqs
        # See _padded_rows; PAGELLM_PAD_LOGIT_ROWS=0 turns it off.
        self.pad_logit_rows = device.type == "cuda" and os.environ.get("PAGELLM_PAD_LOGIT_ROWS", "1") != "0"
        self._logit_row_sizes = capture_sizes(max_num_seqs)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.attn_layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
        for layer in self.attn_layers:
            layer.backend = self.backend
        if self.backend.name == "triton":
            # The Triton path also fuses the small per-layer ops and samples in one pass; the torch
            # backend stays the plain-PyTorch reference.
            _enable_triton_kernels(model)
            self.sampler.use_triton = True
        self.graphs: DecodeGraphs | None = None
        self.staging = StagingBuffers(device)
        self.num_blocks = self._allocate_kv_cache()
        if device.type == "cuda" and self.backend.name == "triton":
            self._warm_up_mixed_steps()
        self.capture_cuda_graphs()
        spec = getattr(model, "spec", None)
        if self.sampler.use_triton and device.type == "cuda" and spec is not None:
            # Every row count's sampler variant now, not in the middle of the first big batch.
            self.sampler.triton_kernels.compile_all(self.max_num_seqs, spec.vocab_size,
                                                    next(model.parameters()).dtype, device)

    # ---- KV cache -------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        c = self.model_config
        itemsize = torch.empty(0, dtype=c.dtype).element_size()
        return 2 * len(self.attn_layers) * self.block_size * c.num_kv_heads * c.head_dim * itemsize

    def _allocate_kv_cache(self) -> int:
        c = self.model_config
        if self.cache_config.num_gpu_blocks_override is not None:
            num_blocks = self.cache_config.num_gpu_blocks_override
        else:
            budget = self.cache_config.kv_cache_memory or self._default_kv_budget()
            num_blocks = budget // self.kv_bytes_per_block()
        if num_blocks < 1:
            raise ValueError("kv_cache_memory is too small for even one KV block "
                             f"({self.kv_bytes_per_block()} bytes)")
        # [layers, 2 (k/v), blocks, block_size, kv heads, head_dim]. Empty, not zeroed: the torch
        # backend zeroes blocks as they are handed out (zeroing GiBs at start-up costs seconds).
        self.kv_cache = torch.empty(len(self.attn_layers), 2, num_blocks, self.block_size, c.num_kv_heads,
                                    c.head_dim, dtype=c.dtype, device=self.device)
        for i, layer in enumerate(self.attn_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB)", num_blocks, self.block_size,
                    num_blocks * self.block_size, self.kv_cache.numel() * self.kv_cache.element_size() / 2**30)
        return num_blocks

    def _default_kv_budget(self) -> int:
        if self.device.type != "cuda":
            return DEFAULT_CPU_KV_CACHE_BYTES
        peak_activations = self._profile_peak_activations()
        free, total = torch.cuda.mem_get_info(self.device)
        # What the card may hold for us, minus what is already taken (weights, other processes),
        # the largest step's activations and a reserve for CUDA graphs and the sampler.
        reserve = 1 << 30
        budget = int(total * self.cache_config.gpu_memory_utilization) - (total - free) - peak_activations - reserve
        logger.info("memory profile: %.2f GiB in use, %.2f GiB peak activations, %.2f GiB for the KV cache",
                    (total - free) / 2**30, peak_activations / 2**30, max(budget, 0) / 2**30)
        if budget <= 0:
            raise ValueError("no GPU memory left for the KV cache: raise gpu_memory_utilization or lower "
                             "max_num_batched_tokens / max_model_len")
        return budget

    @torch.inference_mode()
    def _profile_peak_activations(self) -> int:
        """Peak memory of the largest step (max_num_batched_tokens tokens, max_num_seqs logits rows)."""
        c = self.model_config
        tokens = self.max_num_batched_tokens
        seq_len = min(tokens, c.max_model_len)
        num_seqs = -(-tokens // seq_len)
        blocks_per_seq = -(-seq_len // self.block_size)
        tmp = torch.zeros(len(self.attn_layers), 2, blocks_per_seq * num_seqs + 1, self.block_size,
                          c.num_kv_heads, c.head_dim, dtype=c.dtype, device=self.device)
        for i, layer in enumerate(self.attn_layers):
            layer.k_cache, layer.v_cache = tmp[i, 0], tmp[i, 1]
        lens = [seq_len] * (tokens // seq_len) + ([tokens % seq_len] if tokens % seq_len else [])
        tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(len(lens))]
        meta, positions = self._made_up_step(lens, lens, tables, num_decodes=0)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        ids = torch.zeros(tokens, dtype=torch.int64, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, pos, meta)
        rows = min(self.max_num_seqs, tokens)
        logits = self.model.compute_logits(hidden[:rows]).float()
        probs = torch.softmax(logits, dim=-1)
        probs.exponential_()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del tmp, hidden, logits, probs, ids, pos, meta
        for layer in self.attn_layers:
            layer.k_cache = layer.v_cache = torch.empty(0)
        torch.cuda.empty_cache()
        return peak

    @torch.inference_mode()
    def _warm_up_mixed_steps(self) -> None:
        """Runs two small mixed steps (decodes and a prefill chunk) so their kernel variants compile
        now: a mixed step attends its decodes in a launch of its own, with PDL up to PDL_MAX_ROWS
        decodes and without it above. Uncompiled, the first such steps of a run took seconds."""
        from pagellm.kernels.triton.pdl import PDL_MAX_ROWS
        if self.num_blocks < 2:
            return
        for num_decodes in (1, PDL_MAX_ROWS + 1):
            # Decodes at position 0 of block 0, then a 2-token chunk in block 1.
            query_lens = [1] * num_decodes + [2]
            self.staging.begin_step()
            meta, positions = self._made_up_step(query_lens, query_lens, [[0]] * num_decodes + [[1]], num_decodes)
            ids = torch.zeros(len(positions), dtype=torch.int64, device=self.device)
            self.model(ids, self._to_device(positions, torch.int64, "positions"), meta)
            self.staging.end_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _made_up_step(self, query_lens: list[int], seq_lens: list[int], tables: list[list[int]],
                      num_decodes: int) -> tuple[AttentionMetadata, list[int]]:
        """Metadata and positions of a step that did not come from the scheduler: sequence i computes
        its last query_lens[i] of seq_lens[i] positions, in the blocks tables[i]."""
        bs = self.block_size
        spans = [(table, range(n - q, n)) for q, n, table in zip(query_lens, seq_lens, tables)]
        positions = [p for _, span in spans for p in span]
        slots = [table[p // bs] * bs + p % bs for table, span in spans for p in span]
        return self._metadata(query_lens, seq_lens, tables, slots, num_decodes), positions

    def zero_blocks(self, block_ids: list[int]) -> None:
        """Clears newly handed-out blocks so stale or uninitialised memory never reaches attention."""
        if block_ids and self.backend.name == "torch":
            index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
            self.kv_cache.index_fill_(2, index, 0)

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    # ---- inputs -----------------------------------------------------------------------------
    def _to_device(self, values, dtype: torch.dtype, name: str) -> torch.Tensor:
        return self.staging.put(name, values, dtype)

    def _block_table_tensor(self, tables: list[list[int]]) -> torch.Tensor:
        width = max(len(t) for t in tables)
        table = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(tables):
            table[i, :len(t)] = t
        return self.staging.put("block_tables", table, torch.int32)

    def _metadata(self, query_lens: list[int], seq_lens: list[int], tables: list[list[int]], slots: list[int],
                  num_decodes: int) -> AttentionMetadata:
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        return AttentionMetadata(
            slot_mapping=self._to_device(slots, torch.int64, "slots"),
            query_start_loc=self._to_device(qsl, torch.int32, "qsl"),
            seq_lens=self._to_device(seq_lens, torch.int32, "seq_lens"),
            block_tables=self._block_table_tensor(tables),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            num_decodes=num_decodes, num_decode_tokens=num_decodes,
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)

    # ---- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, previous: PendingStep | None = None) -> PendingStep:
        """Enqueues a step on the device. Decode tokens still pending in `previous` (sampled there,
        not yet read by the host) are taken from its device tensor, so no sync is needed."""
        self.staging.begin_step()
        prev_rows = ({rid: i for i, rid in enumerate(previous.request_ids)}
                     if previous is not None and previous.sampled is not None else {})
        pending_flat: list[int] = []  # flat token index filled from previous.sampled
        pending_rows: list[int] = []
        # Decodes (one new token) first: backends batch them together.
        # (The torch backend also wants them by length, to group similar contexts.)
        items = sorted(sched.scheduled, key=lambda s: (s.num_new_tokens != 1, s.request.num_computed_tokens))
        input_ids, positions, slots, query_lens, seq_lens, tables = [], [], [], [], [], []
        logits_rows: list[int] = []   # flat token index whose logits are sampled, per sampling request
        sampling: list[ScheduledRequest] = []
        prompt_lp: list[tuple[ScheduledRequest, int, int]] = []  # (item, first flat index, count)
        bs = self.block_size
        for item in items:
            r, start, n = item.request, item.request.num_computed_tokens, item.num_new_tokens
            flat_start = len(input_ids)
            blocks = r.block_ids
            if n == 1 and start == r.num_tokens:
                # Sampled by the previous step; its value is still on the device.
                pending_flat.append(len(input_ids))
                pending_rows.append(prev_rows[r.request_id])
                input_ids.append(0)
                positions.append(start)
                slots.append(blocks[start // bs] * bs + start % bs)
            elif n == 1:
                input_ids.append(r.token_id_at(start))
                positions.append(start)
                slots.append(blocks[start // bs] * bs + start % bs)
            else:
                input_ids.extend(r.all_token_ids[start:start + n])
                positions.extend(range(start, start + n))
                # Whole block runs at a time: one range per block instead of a Python step per token.
                for b in range(start // bs, (start + n - 1) // bs + 1):
                    base = blocks[b] * bs - b * bs
                    slots.extend(range(base + max(start, b * bs), base + min(start + n, (b + 1) * bs)))
            query_lens.append(n)
            seq_lens.append(start + n)
            tables.append(blocks)
            if item.samples:
                logits_rows.append(len(input_ids) - 1)
                sampling.append(item)
            if r.sampling_params.prompt_logprobs is not None and r.prompt_logprobs is not None:
                # Positions p predict token p + 1; only prompt tokens not yet scored.
                first = len(r.prompt_logprobs) - 1
                last = min(start + n, r.num_prompt_tokens - 1)
                if start <= first < last:
                    prompt_lp.append((item, flat_start + first - start, last - first))
        # Decodes lead (the sort above), so they are the first num_decodes sequences.
        num_decodes = sum(1 for q in query_lens if q == 1)
        num_seqs = len(query_lens)

        graph_step = None
        if (self.graphs is not None and num_decodes == num_seqs and not prompt_lp
                and self.graphs.bucket(num_seqs) is not None):
            # The graph reads the step's inputs from pinned memory; in a decode step flat index == row.
            # It samples too when every row is a plain greedy or temperature draw.
            params = [s.request.sampling_params for s in sampling]
            in_graph = (self.graphs.sample is not None and len(sampling) == num_seqs
                        and all(samples_plainly(p, len(s.request.output_token_ids)) for p, s in zip(params, sampling)))
            temperature = [0.0 if p.is_greedy else p.temperature for p in params] if in_graph else None
            seed = int(torch.randint(0, 2**31 - 1, (1,))) if in_graph else 0  # a CPU draw: no device sync
            graph_step = self.graphs.replay_from_host(
                input_ids, positions, slots, seq_lens, tables, pending_flat, pending_rows,
                previous.sampled if pending_flat else None, temperature, seed)
            logits = graph_step.logits
            if len(logits_rows) != num_seqs:  # a prompt's 1-token chunk that does not end it samples nothing
                logits = logits[self._to_device(logits_rows, torch.int64, "rows")]
            if not in_graph:
                graph_step = None
            hidden = None
        else:
            ids_t = self._to_device(input_ids, torch.int64, "ids")
            if pending_flat:
                index = self._to_device(pending_flat, torch.int64, "pending_flat")
                ids_t[index] = previous.sampled[self._to_device(pending_rows, torch.int64, "pending_rows")]
            meta = self._metadata(query_lens, seq_lens, tables, slots, num_decodes)
            pos_t = self._to_device(positions, torch.int64, "positions")
            hidden = self.model(ids_t, pos_t, meta)  # [T, hidden]
            logits = None
            if sampling:
                rows = self._to_device(self._padded_rows(logits_rows), torch.int64, "rows")
                logits = self.model.compute_logits(hidden[rows])[:len(logits_rows)]  # [S, V], the model's dtype

        self.staging.end_step()
        result = StepResult(sampled={}, logprobs={}, prompt_logprobs={})
        if graph_step is not None:
            sampled, logprobs = graph_step.sampled, None
        else:
            sampled, logprobs = self._sample(logits, sampling, previous, prev_rows) if sampling else (None, None)
        for item, first, count in prompt_lp:
            self._prompt_logprobs(hidden[first:first + count], item, result)
        pending = PendingStep([s.request.request_id for s in sampling], sampled, result, self.copy_stream, logprobs)
        if graph_step is not None and pending.copied is not None:
            self.graphs.hold(graph_step.slot, pending.copied)  # the graph's sampled tokens: not overwritten before
        return pending

    def _padded_rows(self, rows: list[int]) -> list[int]:
        """`rows`, repeated at the end up to the next decode-graph batch size when pad_logit_rows.

        On CUDA every new row count of an eager step's LM-head product can make cuBLAS pick a kernel
        it has not loaded yet: 4-19 ms of host time in the launch, with the GPU idle behind it, in
        each prefill step of the H200 gpu-thr profile. The graph sizes' kernels were loaded at capture.
        """
        if not self.pad_logit_rows:
            return rows
        size = next((s for s in self._logit_row_sizes if s >= len(rows)), len(rows))
        return rows + rows[-1:] * (size - len(rows))

    def capture_cuda_graphs(self) -> None:
        """Captures decode graphs when the device and backend allow it and enforce_eager is off."""
        if (self.device.type != "cuda" or self.model_config.enforce_eager
                or not getattr(self.backend, "supports_cuda_graphs", False)):
            return
        max_blocks = -(-self.model_config.max_model_len // self.block_size)
        # Graphs sample in place with a Triton sampler that reads its seed on the device.
        sample = getattr(self.sampler.triton_kernels, "sample_in_graph", None) if self.sampler.use_triton else None
        self.graphs = DecodeGraphs(self.model, min(self.max_num_seqs, 512), max_blocks,
                                   self.model_config.max_model_len, self.device, sample)
        self.graphs.capture()

    def _generator(self, item: ScheduledRequest) -> torch.Generator | None:
        r = item.request
        seed = r.sampling_params.seed
        if seed is None:
            return None
        gen = self.generators.get(r.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self.generators[r.request_id] = gen
        return gen

    def _sample(self, logits: torch.Tensor, sampling: list[ScheduledRequest], previous: PendingStep | None,
                prev_rows: dict[str, int]) -> tuple[torch.Tensor, tuple[list[int | None], SamplerOutput] | None]:
        """Samples on the device. Returns the tokens [S] there and, when a row asked for logprobs,
        each row's number of them with the sampler output that holds them (read back with the tokens).

        Rows whose last token `previous` sampled and the host has not read yet (`prev_rows`: request
        id -> row of previous.sampled) count it for min_tokens and, with a penalty, take its value
        from the device: such steps need no sync either.
        """
        reqs = [s.request for s in sampling]
        params = [r.sampling_params for r in reqs]
        pending = [(row, prev_rows[r.request_id]) for row, r in enumerate(reqs) if r.request_id in prev_rows]
        pending_rows = [row for row, _ in pending]
        pending_tokens = None
        if pending and any(uses_penalty(p) for p in params):
            sources = [source for _, source in pending]
            pending_tokens = previous.sampled[to_device(sources, torch.int64, self.device)]  # [P]
        batch = SamplingBatch.build(
            params=params,
            prompt_token_ids=[r.prompt_token_ids for r in reqs],
            output_token_ids=[r.output_token_ids for r in reqs],
            generators=[self._generator(s) for s in sampling],
            stop_ids_for_min_tokens=[self._min_tokens_stop_ids(r) for r in reqs],
            vocab_size=logits.shape[-1], device=self.device, copy_stream=self.copy_stream,
            pending_rows=pending_rows, pending_tokens=pending_tokens)
        out = self.sampler(logits, batch)
        logprobs = ([p.logprobs for p in params], out) if out.sampled_logprobs is not None else None
        return out.sampled_token_ids, logprobs

    @staticmethod
    def _min_tokens_stop_ids(r) -> set[int]:
        """Ids to mask while the request's output is short of min_tokens (SamplingBatch.build
        decides when, counting a pending token too); none once the output the host has is long enough."""
        p = r.sampling_params
        if len(r.output_token_ids) >= p.min_tokens:
            return set()
        ids = set(p.stop_token_ids or [])
        if not p.ignore_eos:
            ids |= r.eos_token_ids
        return ids

    def _prompt_logprobs(self, hidden: torch.Tensor, item: ScheduledRequest, result: StepResult) -> None:
        r = item.request
        k = r.sampling_params.prompt_logprobs
        first_pos = len(r.prompt_logprobs) - 1  # position whose logits predict the next prompt token
        count = hidden.shape[0]
        target_ids = r.prompt_token_ids[first_pos + 1:first_pos + 1 + count]
        targets = torch.tensor(target_ids, device=self.device)
        logits = self.model.compute_logits(hidden).float()  # [N, V]
        logprobs = torch.log_softmax(logits, dim=-1)
        token_lp, top_ids, top_lps = gather_logprobs(logprobs, targets, k)
        ranks = ((logprobs > token_lp[:, None]).sum(-1) + 1).tolist()
        token_lp = token_lp.tolist()
        top_ids = top_ids.tolist() if top_ids is not None else [[] for _ in range(count)]
        top_lps = top_lps.tolist() if top_lps is not None else [[] for _ in range(count)]
        result.prompt_logprobs[r.request_id] = [
            (target_ids[j], token_lp[j], ranks[j], list(zip(top_ids[j], top_lps[j]))) for j in range(count)]
