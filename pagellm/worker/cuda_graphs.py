"""CUDA graphs for decode steps: one graph per bucketed batch size and staging slot, all in one
memory pool.

A decode step at batch b replays the graph of the smallest bucket >= b; the extra rows are
padding (slot -1, so nothing is written to the cache, and their outputs are ignored). A graph
reads its inputs from static buffers, so a replay is: fill the inputs, replay, read the outputs.

The inputs are packed by the host into a pinned byte buffer (DecodeInputLayout: typed regions at
fixed offsets). The GPU reads pinned memory directly, so no copy runs
between two replays (each copy costs a few microseconds of device time plus the switch from
kernels to the copy engine and back): the graph's first kernel (kernels/triton/decode_inputs.py)
loads the step's rows from the host buffer, spreads the block tables out to the fixed row stride
attention reads, and takes tokens that the previous step sampled and the host has not read from
that step's output on the device (their input_ids travel as -1, with the row to take; the header
carries the output tensor's address).

With a sampler, the graph ends in sampling too (greedy or temperature rows; the seed and the
temperatures are inputs like the rest), so the step's tokens come out of the graph with no launch
after it. Other steps sample its logits outside, as before.

Two pinned buffers alternate, and each has its own graphs (a graph reads a fixed address) and its
own sampled-token outputs: the host packs step N + 1 while step N runs, and step N's tokens are read
back while step N + 1 runs. A buffer and its outputs are reused only after the events the step that
last used them recorded (its replay, its tokens' read-back) have fired. The logits, read within
their step, share one buffer across all graphs.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from pagellm.layers.attention.backend import AttentionMetadata

if TYPE_CHECKING:
    from pagellm.kernels.triton.sampling_launch import Sample

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
    """Typed views of one packed host buffer (numpy arrays, or torch tensors of the same memory)."""

    header: torch.Tensor | np.ndarray        # [4] int64: previous sampled tokens' address (0: none), width,
    #                                          sampling seed in [0, 2**31), unused
    input_ids: torch.Tensor | np.ndarray     # [n] int64; -1: take previous_sampled[prev_rows[row]]
    positions: torch.Tensor | np.ndarray     # [n] int64
    slot_mapping: torch.Tensor | np.ndarray  # [n] int64; -1 on padding rows
    prev_rows: torch.Tensor | np.ndarray     # [n] int64; read only where input_ids is -1
    temperature: torch.Tensor | np.ndarray   # [n] float32; 0: greedy (also on padding rows)
    seq_lens: torch.Tensor | np.ndarray      # [n] int32; 1 on padding rows
    seq_order: torch.Tensor | np.ndarray     # [n] int32: rows longest first (attention's program order)
    tables: torch.Tensor | np.ndarray        # [n * max_blocks] int32; first size * width: [size, width]


class GraphInputs(NamedTuple):
    """The graphs' static device inputs, rows [0, max_batch), that the first kernel fills."""

    input_ids: torch.Tensor     # [n] int64
    positions: torch.Tensor     # [n] int64
    slot_mapping: torch.Tensor  # [n] int64
    temperature: torch.Tensor   # [n] float32
    seq_lens: torch.Tensor      # [n] int32
    seq_order: torch.Tensor     # [n] int32
    seed: torch.Tensor          # [1] int64


_REGIONS = (("header", torch.int64), ("input_ids", torch.int64), ("positions", torch.int64),
            ("slot_mapping", torch.int64), ("prev_rows", torch.int64), ("temperature", torch.float32),
            ("seq_lens", torch.int32), ("seq_order", torch.int32), ("tables", torch.int32))


@dataclass(frozen=True)
class DecodeInputLayout:
    """Where each decode input lives in the packed host buffer that the graphs' first kernel reads."""

    max_batch: int
    max_blocks_per_seq: int

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_blocks_per_seq < 1:
            raise ValueError(f"max_batch and max_blocks_per_seq must be >= 1; got {self.max_batch} and "
                             f"{self.max_blocks_per_seq}")

    def _numel(self, name: str) -> int:
        if name == "header":
            return 4
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

    def views(self, buffer: torch.Tensor) -> DecodeInputs:
        """Typed views into a uint8 buffer of nbytes; they share its memory."""
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
                       pending_sources: Sequence[int] = (), previous_address: int = 0,
                       temperature: Sequence[float] | None = None, seed: int = 0) -> None:
    """Writes a decode step of b = len(input_ids) rows, padded to `size`, into `host` (numpy views
    from layout.views).

    Rows in `pending_rows` take their token from the previous step's sampled tokens on the device
    (row `pending_sources[i]` of the int64 tensor at `previous_address`); their input_ids entries are
    ignored. `temperature` (default: all 0, greedy) and `seed` (masked to [0, 2**31)) feed a graph
    that samples. Padding rows get token 0, position 0, slot -1 (no cache write), seq_len 1,
    temperature 0 and an all-zero block table (block 0 exists), so they run harmlessly. Raises
    ValueError on bad shapes.
    """
    b = len(input_ids)
    if not 1 <= b <= size <= layout.max_batch:
        raise ValueError(f"need 1 <= batch ({b}) <= size ({size}) <= max_batch ({layout.max_batch})")
    for name, values in (("positions", positions), ("slot_mapping", slot_mapping), ("seq_lens", seq_lens),
                         ("block_tables", block_tables), ("temperature", temperature)):
        if values is not None and len(values) != b:
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
    host.temperature[:size] = 0.0
    if temperature is not None:
        host.temperature[:b] = temperature
    host.seq_lens[:b] = seq_lens
    host.seq_lens[b:size] = 1
    # Attention starts the longest sequences first (a stable sort; the padding rows stay last).
    host.seq_order[:b] = np.argsort(-host.seq_lens[:b], kind="stable")
    host.seq_order[b:size] = np.arange(b, size, dtype=np.int32)
    tables = host.tables[:size * width].reshape(size, width)
    tables.fill(0)
    for row, table in enumerate(block_tables):
        tables[row, :len(table)] = table
    host.header[:] = (previous_address, width, seed & 0x7FFFFFFF, 0)


class DecodeStep(NamedTuple):
    """A replayed graph's outputs (views of static buffers) and the staging slot it used."""

    logits: torch.Tensor           # [b, vocab]; valid until the next replay of any graph
    sampled: torch.Tensor | None   # [b] int64 when the graph samples; valid until the slot's next step
    slot: int


class DecodeGraphs:
    """Captured decode graphs and their static input/output buffers; a step runs through
    `replay_from_host` (host lists in, no copy)."""

    def __init__(self, model: torch.nn.Module, max_batch: int, max_blocks_per_seq: int, max_model_len: int,
                 device: torch.device, sample: Sample | None = None) -> None:
        """`sample(logits, temperature, seed)`: samples inside the graphs (seed: a [1] int64 device
        tensor, read when the graph runs); None: the graphs end at the logits."""
        self.model = model
        self.device = device
        self.max_model_len = max_model_len
        self.sample = sample
        self.sizes = capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        n = self.max_batch
        self.layout = DecodeInputLayout(n, max_blocks_per_seq)
        int64 = dict(dtype=torch.int64, device=device)
        self.inputs = GraphInputs(
            input_ids=torch.zeros(n, **int64), positions=torch.zeros(n, **int64),
            slot_mapping=torch.full((n,), -1, **int64), temperature=torch.zeros(n, device=device),
            seq_lens=torch.ones(n, dtype=torch.int32, device=device),
            seq_order=torch.arange(n, dtype=torch.int32, device=device), seed=torch.zeros(1, **int64))
        self.input_ids, self.positions = self.inputs.input_ids, self.inputs.positions
        self.slot_mapping, self.seq_lens = self.inputs.slot_mapping, self.inputs.seq_lens
        self.seed = self.inputs.seed
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        # Two pinned host buffers that the device reads directly, their numpy views, and per buffer
        # the events to wait for before it (and the outputs of its graphs) may be reused.
        pinned = device.type == "cuda"
        self._host = [torch.zeros(self.layout.nbytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(2)]
        self._host_views = [DecodeInputs(*(v.numpy() for v in self.layout.views(h))) for h in self._host]
        self._in_use: list[list[torch.cuda.Event]] = [[], []]
        self._slot = 1
        self._previous_sampled: list[torch.Tensor | None] = [None, None]
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        # Every graph writes its logits into rows [0, size) of one buffer (set at capture): they are
        # read within their step, before the next replay. Sampled tokens are per graph: they are read
        # back while the next step runs.
        self.logits: torch.Tensor | None = None   # [max_batch, vocab]
        self.sampled: dict[tuple[int, int], torch.Tensor | None] = {}
        self.pool = None

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], query_start_loc=self.query_start_loc[:b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b], max_query_len=1,
            seq_order=self.inputs.seq_order[:b],
            # The bound, not this step's value: the graph keeps the grid it was captured with.
            max_seq_len=self.max_model_len, num_decodes=b, num_decode_tokens=b,
            query_lens_cpu=[1] * b, seq_lens_cpu=[1] * b)

    def load_inputs(self, size: int, slot: int) -> None:
        """Loads rows [0, size) of host buffer `slot` into the static inputs (the first kernel of
        every graph; callable alone, e.g. to inspect the inputs)."""
        from pagellm.kernels.triton.decode_inputs import load_decode_inputs
        inputs = self.inputs
        load_decode_inputs(self._host[slot], self.layout.offsets, inputs.input_ids, inputs.positions,
                           inputs.slot_mapping, inputs.temperature, inputs.seq_lens, inputs.seq_order, self.seed,
                           self.block_tables, size)

    def _run(self, b: int, slot: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decode step of bucket b from host buffer `slot`: logits [b, vocab] (into the shared
        buffer once there is one) and, with a sampler, tokens [b]."""
        self.load_inputs(b, slot)
        hidden = self.model(self.input_ids[:b], self.positions[:b], self._meta(b))
        logits = self.model.compute_logits(hidden, out=self.logits[:b] if self.logits is not None else None)
        sampled = self.sample(logits, self.inputs.temperature[:b], self.seed) if self.sample is not None else None
        return logits, sampled

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        mem_before = torch.cuda.memory_allocated(self.device)
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool memory
            for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks kernels
                logits, _ = self._run(b, 0)
            if self.logits is None:
                self.logits = torch.empty_like(logits)  # outside the graphs' pool: [max_batch, vocab]
            for slot in (0, 1):
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.sampled[b, slot] = self._run(b, slot)[1]
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[b, slot] = graph
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode CUDA graphs (batch 1..%d, two staging slots) in %.1f s, %.2f GiB",
                    len(self.graphs), self.max_batch, time.perf_counter() - start,
                    (torch.cuda.memory_allocated(self.device) - mem_before) / 2**30)

    def bucket(self, b: int) -> int | None:
        for size in self.sizes:
            if size >= b:
                return size
        return None

    def stage(self, input_ids: Sequence[int], positions: Sequence[int], slot_mapping: Sequence[int],
              seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]], pending_rows: Sequence[int] = (),
              pending_sources: Sequence[int] = (), previous_sampled: torch.Tensor | None = None,
              temperature: Sequence[float] | None = None, seed: int = 0) -> tuple[int, int]:
        """Packs a decode step's host inputs (see pack_decode_inputs) into the next host buffer,
        once the step that last used it is done with it; returns (bucket size, slot).
        `previous_sampled` ([S'] tokens on this device, produced on the current stream) must be
        given when `pending_rows` is not empty."""
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
        self._slot ^= 1
        slot = self._slot
        for event in self._in_use[slot]:
            event.synchronize()  # the last replay from this buffer, and its outputs' read-back, are done
        self._in_use[slot] = []
        # The graph reads it by address: held until this slot's next step, though the stream order
        # that guards any reuse of its memory would suffice.
        self._previous_sampled[slot] = previous_sampled
        pack_decode_inputs(self._host_views[slot], self.layout, size, input_ids, positions, slot_mapping, seq_lens,
                           block_tables, pending_rows, pending_sources, address, temperature, seed)
        return size, slot

    def hold(self, slot: int, event: torch.cuda.Event) -> None:
        """Keeps host buffer `slot` and its graphs' outputs from reuse until `event` has fired
        (e.g. the read-back of the tokens its step sampled)."""
        self._in_use[slot].append(event)

    def replay_from_host(self, input_ids: Sequence[int], positions: Sequence[int], slot_mapping: Sequence[int],
                         seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
                         pending_rows: Sequence[int] = (), pending_sources: Sequence[int] = (),
                         previous_sampled: torch.Tensor | None = None, temperature: Sequence[float] | None = None,
                         seed: int = 0) -> DecodeStep:
        """Runs a decode step of b = len(input_ids) sequences from host values, with no copy; returns
        its outputs (see DecodeStep for how long they stay valid)."""
        size, slot = self.stage(input_ids, positions, slot_mapping, seq_lens, block_tables, pending_rows,
                                pending_sources, previous_sampled, temperature, seed)
        self.graphs[size, slot].replay()
        if self.device.type == "cuda":
            replayed = torch.cuda.Event()
            replayed.record()
            self.hold(slot, replayed)
        b, sampled = len(input_ids), self.sampled[size, slot]
        return DecodeStep(self.logits[:b], sampled[:b] if sampled is not None else None, slot)
