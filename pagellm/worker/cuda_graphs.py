"""CUDA graphs for decode steps: one graph per bucketed batch size, all in one memory pool.

A decode step at batch b replays the graph of the smallest bucket >= b; the extra rows are
padding (slot -1, so nothing is written to the cache, and their outputs are ignored). A graph
reads its inputs from static buffers, so a replay is: copy inputs in, replay, read logits out.

The inputs go in with one host-to-device copy (each copy costs a few microseconds of device time
plus a gap, whatever its size). A step's inputs are packed into a pinned byte buffer laid out
exactly like the graphs' static device buffer (DecodeInputLayout), and the bytes the step uses are
copied at once. Two inputs cannot be copied straight into place, so the graph finishes them with a
one-program-per-row kernel (kernels/triton/decode_inputs.py) before the model runs:

- block tables: attention reads [max_batch, max_blocks_per_seq] with a fixed row stride, but a
  step's tables are only `width` blocks wide; they travel packed [size, width] and are spread out.
- tokens that the previous step sampled and the host has not read: their input_ids travel as -1,
  with the row of the previous step's output tensor holding them; the header carries that tensor's
  address (it lives on the device, in the same stream, so the graph reads it in order).

Two pinned buffers alternate (worker/staging.py), and one is refilled only after the event recorded
behind its last copy has fired: the host packs step N + 1 while step N's copy may still be reading.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from pagellm.layers.attention.backend import AttentionMetadata
from pagellm.worker.staging import StagingBuffers

logger = logging.getLogger(__name__)

_ALIGN = 256  # bytes; every region starts aligned, so typed views and vector loads are legal


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16, up to max_num_seqs."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, min(max_num_seqs, 64) + 1, 8))
    sizes += list(range(80, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeInputs(NamedTuple):
    """Typed views of one packed buffer (torch tensors on the device, numpy arrays on the host)."""

    header: torch.Tensor | np.ndarray        # [2] int64: previous sampled tokens' address (0: none), width
    input_ids: torch.Tensor | np.ndarray     # [n] int64; -1: take previous_sampled[prev_rows[row]]
    positions: torch.Tensor | np.ndarray     # [n] int64
    slot_mapping: torch.Tensor | np.ndarray  # [n] int64; -1 on padding rows
    prev_rows: torch.Tensor | np.ndarray     # [n] int64; read only where input_ids is -1
    seq_lens: torch.Tensor | np.ndarray      # [n] int32; 1 on padding rows
    seq_order: torch.Tensor | np.ndarray     # [n] int32: rows longest first (attention's program order)
    tables: torch.Tensor | np.ndarray        # [n * max_blocks] int32; first size * width: [size, width]


_REGIONS = (("header", torch.int64), ("input_ids", torch.int64), ("positions", torch.int64),
            ("slot_mapping", torch.int64), ("prev_rows", torch.int64), ("seq_lens", torch.int32),
            ("seq_order", torch.int32), ("tables", torch.int32))


@dataclass(frozen=True)
class DecodeInputLayout:
    """Where each decode input lives in the packed buffer: the same bytes on host and device."""

    max_batch: int
    max_blocks_per_seq: int

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_blocks_per_seq < 1:
            raise ValueError(f"max_batch and max_blocks_per_seq must be >= 1; got {self.max_batch} and "
                             f"{self.max_blocks_per_seq}")

    def _numel(self, name: str) -> int:
        if name == "header":
            return 2
        if name == "tables":
            return self.max_batch * self.max_blocks_per_seq
        return self.max_batch

    @functools.cached_property
    def offsets(self) -> dict[str, int]:
        """Region name -> byte offset; "end" -> the buffer's size in bytes."""
        offsets, at = {}, 0
        for name, dtype in _REGIONS:
            offsets[name] = at
            at += -(-self._numel(name) * dtype.itemsize // _ALIGN) * _ALIGN
        offsets["end"] = at
        return offsets

    @property
    def nbytes(self) -> int:
        return self.offsets["end"]

    def step_bytes(self, size: int, width: int) -> int:
        """Bytes a step of bucket `size` with tables `width` wide uses (a prefix of the buffer)."""
        return self.offsets["tables"] + size * width * 4

    def views(self, buffer: torch.Tensor) -> DecodeInputs:
        """Typed views into a uint8 buffer of nbytes (host or device); they share its memory."""
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < self.nbytes:
            raise ValueError(f"buffer must be uint8 [>= {self.nbytes}]; got {buffer.dtype} {tuple(buffer.shape)}")
        views = []
        for name, dtype in _REGIONS:
            start = self.offsets[name]
            views.append(buffer[start:start + self._numel(name) * dtype.itemsize].view(dtype))
        return DecodeInputs(*views)


def pack_decode_inputs(host: DecodeInputs, layout: DecodeInputLayout, size: int, input_ids: Sequence[int],
                       positions: Sequence[int], slot_mapping: Sequence[int], seq_lens: Sequence[int],
                       block_tables: Sequence[Sequence[int]], pending_rows: Sequence[int] = (),
                       pending_sources: Sequence[int] = (), previous_address: int = 0) -> int:
    """Writes a decode step of b = len(input_ids) rows, padded to `size`, into `host` (numpy views
    from layout.views); returns how many leading bytes of the buffer the step uses.

    Rows in `pending_rows` take their token from the previous step's sampled tokens on the device
    (row `pending_sources[i]` of the int64 tensor at `previous_address`); their input_ids entries are
    ignored. Padding rows get token 0, position 0, slot -1 (no cache write), seq_len 1 and an
    all-zero block table (block 0 exists), so they run harmlessly. Raises ValueError on bad shapes.
    """
    b = len(input_ids)
    if not 1 <= b <= size <= layout.max_batch:
        raise ValueError(f"need 1 <= batch ({b}) <= size ({size}) <= max_batch ({layout.max_batch})")
    for name, values in (("positions", positions), ("slot_mapping", slot_mapping), ("seq_lens", seq_lens),
                         ("block_tables", block_tables)):
        if len(values) != b:
            raise ValueError(f"{name} must have one entry per row ({b}); got {len(values)}")
    if len(pending_rows) != len(pending_sources):
        raise ValueError(f"pending_rows and pending_sources must match; got {len(pending_rows)} and "
                         f"{len(pending_sources)}")
    if len(pending_rows) and not 0 <= min(pending_rows) <= max(pending_rows) < b:
        raise ValueError(f"pending_rows must lie in [0, {b})")
    width = max(len(t) for t in block_tables)
    if width > layout.max_blocks_per_seq:
        raise ValueError(f"block tables must be at most {layout.max_blocks_per_seq} wide; got {width}")

    host.input_ids[:b] = input_ids
    host.input_ids[b:size] = 0
    if len(pending_rows):
        host.input_ids[pending_rows] = -1
        host.prev_rows[pending_rows] = pending_sources
    host.positions[:b] = positions
    host.positions[b:size] = 0
    host.slot_mapping[:b] = slot_mapping
    host.slot_mapping[b:size] = -1
    host.seq_lens[:b] = seq_lens
    host.seq_lens[b:size] = 1
    # Attention starts the longest sequences first (a stable sort; the padding rows stay last).
    host.seq_order[:b] = np.argsort(-host.seq_lens[:b], kind="stable")
    host.seq_order[b:size] = np.arange(b, size, dtype=np.int32)
    tables = host.tables[:size * width].reshape(size, width)
    tables.fill(0)
    for row, table in enumerate(block_tables):
        tables[row, :len(table)] = table
    host.header[0] = previous_address
    host.header[1] = width
    return layout.step_bytes(size, width)


class DecodeGraphs:
    """Captured decode graphs and their static input/output buffers; a step runs through
    `replay_from_host` (host lists in, one copy)."""

    def __init__(self, model: torch.nn.Module, max_batch: int, max_blocks_per_seq: int, max_model_len: int,
                 device: torch.device) -> None:
        self.model = model
        self.device = device
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        n = self.max_batch
        self.layout = DecodeInputLayout(n, max_blocks_per_seq)
        packed = torch.zeros(self.layout.nbytes, dtype=torch.uint8, device=device)
        self.inputs = self.layout.views(packed)  # the graphs' static inputs
        self.inputs.slot_mapping.fill_(-1)
        self.inputs.seq_lens.fill_(1)
        self._packed = packed
        self.input_ids, self.positions = self.inputs.input_ids, self.inputs.positions
        self.slot_mapping, self.seq_lens = self.inputs.slot_mapping, self.inputs.seq_lens
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        # Two pinned staging buffers that alternate (StagingBuffers waits before one is refilled),
        # and the numpy views of each, made once.
        self._staging = StagingBuffers(device)
        self._host_views: dict[int, DecodeInputs] = {}
        self._previous_sampled: torch.Tensor | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], query_start_loc=self.query_start_loc[:b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b], max_query_len=1,
            seq_order=self.inputs.seq_order[:b],
            # The bound, not this step's value: the graph keeps the grid it was captured with.
            max_seq_len=self.max_model_len, num_decodes=b, num_decode_tokens=b,
            query_lens_cpu=[1] * b, seq_lens_cpu=[1] * b)

    def finish_inputs(self, size: int) -> None:
        """Fills pending tokens and spreads the packed block tables into the static inputs of rows
        [0, size) (part of every graph; callable alone, e.g. to inspect the inputs)."""
        from pagellm.kernels.triton.decode_inputs import finish_decode_inputs
        finish_decode_inputs(self.inputs.header, self.inputs.input_ids, self.inputs.prev_rows, self.inputs.tables,
                             self.block_tables, size)

    def _run(self, b: int) -> torch.Tensor:
        self.finish_inputs(b)
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

    def stage(self, input_ids: Sequence[int], positions: Sequence[int], slot_mapping: Sequence[int],
              seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]], pending_rows: Sequence[int] = (),
              pending_sources: Sequence[int] = (), previous_sampled: torch.Tensor | None = None) -> int:
        """Packs a decode step's host inputs (see pack_decode_inputs) and enqueues their one copy to
        the static buffer; returns the bucket size. `previous_sampled` ([S'] tokens on this device,
        produced on the current stream) must be given when `pending_rows` is not empty."""
        size = self.bucket(len(input_ids))
        if size is None or len(input_ids) == 0:
            raise ValueError(f"a decode graph step needs 1 to {self.max_batch} rows; got {len(input_ids)}")
        address = 0
        if len(pending_rows):
            if previous_sampled is None or previous_sampled.dim() != 1 or previous_sampled.device.type != self.device.type:
                raise ValueError("previous_sampled must be a [S] tensor on the graphs' device when rows are pending")
            if not 0 <= min(pending_sources) <= max(pending_sources) < previous_sampled.numel():
                raise ValueError(f"pending_sources must lie in [0, {previous_sampled.numel()})")
            previous_sampled = previous_sampled.to(torch.int64).contiguous()  # the kernel reads int64 [S]
            address = previous_sampled.data_ptr()
        # The graph reads it by address: held until the next step, though the stream order that
        # guards any reuse of its memory would suffice.
        self._previous_sampled = previous_sampled
        self._staging.begin_step()  # the copy that last read this slot's buffer (two steps ago) is done
        host = self._staging.host_buffer("decode_inputs", self.layout.nbytes, torch.uint8)
        slot = self._staging.slot
        if slot not in self._host_views:
            self._host_views[slot] = DecodeInputs(*(v.numpy() for v in self.layout.views(host)))
        views = self._host_views[slot]
        nbytes = pack_decode_inputs(views, self.layout, size, input_ids, positions, slot_mapping, seq_lens,
                                    block_tables, pending_rows, pending_sources, address)
        self._packed[:nbytes].copy_(host[:nbytes], non_blocking=True)
        self._staging.end_step()
        return size

    def replay_from_host(self, input_ids: Sequence[int], positions: Sequence[int], slot_mapping: Sequence[int],
                         seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
                         pending_rows: Sequence[int] = (), pending_sources: Sequence[int] = (),
                         previous_sampled: torch.Tensor | None = None) -> torch.Tensor:
        """Runs a decode step of b = len(input_ids) sequences from host values with one copy; returns
        logits [b, vocab] (a view of the graph's output, valid until the next replay)."""
        size = self.stage(input_ids, positions, slot_mapping, seq_lens, block_tables, pending_rows,
                          pending_sources, previous_sampled)
        self.graphs[size].replay()
        return self.logits[size][:len(input_ids)]
