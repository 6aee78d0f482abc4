"""CUDA graphs for decode steps: one graph per bucketed batch size, all in one memory pool.

A decode step at batch b replays the graph of the smallest bucket >= b; the extra rows are
padding (slot -1, so nothing is written to the cache, and their outputs are ignored). A graph
reads its inputs from static buffers, so a replay is: copy inputs in, replay, read logits out.
"""

from __future__ import annotations

import logging
import time

import torch

from pagellm.layers.attention.backend import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16, up to max_num_seqs."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, min(max_num_seqs, 64) + 1, 8))
    sizes += list(range(80, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    """Captured decode graphs and their static input/output buffers."""

    def __init__(self, model: torch.nn.Module, max_batch: int, max_blocks_per_seq: int, max_model_len: int,
                 device: torch.device) -> None:
        self.model = model
        self.device = device
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], query_start_loc=self.query_start_loc[:b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b], max_query_len=1,
            # The bound, not this step's value: the graph keeps the grid it was captured with.
            max_seq_len=self.max_model_len, num_decodes=b, num_decode_tokens=b,
            query_lens_cpu=[1] * b, seq_lens_cpu=[1] * b)

    def _run(self, b: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:b], self.positions[:b], self._meta(b))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        mem_before = torch.cuda.memory_allocated(self.device)
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool memory
            for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks kernels
                self._run(b)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[b] = self._run(b)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s, %.2f GiB", len(self.graphs),
                    self.max_batch, time.perf_counter() - start,
                    (torch.cuda.memory_allocated(self.device) - mem_before) / 2**30)

    def bucket(self, b: int) -> int | None:
        for size in self.sizes:
            if size >= b:
                return size
        return None

    def replay(self, b: int, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
               seq_lens: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """Runs a decode step of b sequences (device tensors); returns logits [b, vocab]."""
        size = self.bucket(b)
        self.input_ids[:b].copy_(input_ids, non_blocking=True)
        self.positions[:b].copy_(positions, non_blocking=True)
        self.slot_mapping[:b].copy_(slot_mapping, non_blocking=True)
        self.slot_mapping[b:size].fill_(-1)
        self.seq_lens[:b].copy_(seq_lens, non_blocking=True)
        self.seq_lens[b:size].fill_(1)
        width = block_tables.shape[1]
        self.block_tables[:b, :width].copy_(block_tables, non_blocking=True)
        self.graphs[size].replay()
        return self.logits[size][:b]
