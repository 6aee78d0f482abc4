"""Triton kernel that loads a decode graph's inputs from the host's packed buffer, inside the graph.

The host packs a step's inputs into pinned memory (pagellm/worker/cuda_graphs.py), which the GPU
reads directly (pinned memory is mapped into the device's address space: same pointer on both
sides). So no copy runs between two graph replays; the graph's first kernel pulls the few bytes
it needs and writes the static device inputs the model reads. On the way it finishes two inputs:

- block tables travel [size, width] but attention reads them with the fixed row stride of
  [max_batch, max_blocks_per_seq];
- tokens the previous step sampled are still on the device: their input id travels as -1, with the
  row of the previous step's sampled tensor to take, whose address is in the header.

One program per padded row. Program 0 also copies the header's sampling seed to the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TABLE_BLOCK = 128  # block-table columns a program moves per iteration


@triton.jit
def _load_decode_inputs_kernel(source, input_ids_ptr, positions_ptr, slot_mapping_ptr, temperature_ptr,
                               seq_lens_ptr, seq_order_ptr, seed_ptr, block_tables_ptr, stride_bt,
                               IDS: tl.constexpr, POSITIONS: tl.constexpr, SLOTS: tl.constexpr,
                               PREV_ROWS: tl.constexpr, TEMPERATURE: tl.constexpr, SEQ_LENS: tl.constexpr,
                               SEQ_ORDER: tl.constexpr, TABLES: tl.constexpr, BLOCK: tl.constexpr):
    # `source`: the packed buffer's address (int64); the region offsets are the layout's, in bytes.
    # Every read of host memory crosses PCIe (~1 us), so they are all issued at once; only the
    # block table, whose row offset needs the header's width, waits for a first answer.
    row = tl.program_id(0)
    fields = tl.arange(0, 4)
    header = tl.load(source.to(tl.pointer_type(tl.int64)) + fields)  # [previous sampled address, width, seed, 0]
    token = tl.load((source + IDS).to(tl.pointer_type(tl.int64)) + row)
    prev_row = tl.load((source + PREV_ROWS).to(tl.pointer_type(tl.int64)) + row)  # meaningful where token < 0
    position = tl.load((source + POSITIONS).to(tl.pointer_type(tl.int64)) + row)
    slot = tl.load((source + SLOTS).to(tl.pointer_type(tl.int64)) + row)
    temperature = tl.load((source + TEMPERATURE).to(tl.pointer_type(tl.float32)) + row)
    seq_len = tl.load((source + SEQ_LENS).to(tl.pointer_type(tl.int32)) + row)
    order = tl.load((source + SEQ_ORDER).to(tl.pointer_type(tl.int32)) + row)
    previous = tl.sum(tl.where(fields == 0, header, 0), axis=0).to(tl.pointer_type(tl.int64))
    width = tl.sum(tl.where(fields == 1, header, 0), axis=0).to(tl.int32)
    pending = token < 0
    token = tl.where(pending, tl.load(previous + prev_row, mask=pending, other=0), token)
    tl.store(input_ids_ptr + row, token)
    tl.store(positions_ptr + row, position)
    tl.store(slot_mapping_ptr + row, slot)
    tl.store(temperature_ptr + row, temperature)
    tl.store(seq_lens_ptr + row, seq_len)
    tl.store(seq_order_ptr + row, order)
    if row == 0:
        tl.store(seed_ptr, tl.sum(tl.where(fields == 2, header, 0), axis=0))
    src = (source + TABLES).to(tl.pointer_type(tl.int32)) + row * width
    dst = block_tables_ptr + row.to(tl.int64) * stride_bt
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < width
        tl.store(dst + cols, tl.load(src + cols, mask=mask), mask=mask)


def load_decode_inputs(source: torch.Tensor, offsets: dict[str, int], input_ids: torch.Tensor,
                       positions: torch.Tensor, slot_mapping: torch.Tensor, temperature: torch.Tensor,
                       seq_lens: torch.Tensor, seq_order: torch.Tensor, seed: torch.Tensor,
                       block_tables: torch.Tensor, size: int) -> None:
    """Fills rows [0, size) of a decode graph's static inputs from the packed buffer `source`.

    source: uint8, host memory the device can read (pinned, on CUDA), laid out by `offsets` (region
    name -> byte offset, DecodeInputLayout.offsets). Destinations: input_ids, positions,
    slot_mapping [>= size] int64; temperature [>= size] float32; seq_lens, seq_order [>= size]
    int32; seed [1] int64; block_tables [>= size, >= width] int32 with a contiguous last dimension.
    Tokens to take from the previous step are read from the device tensor whose address the header
    holds. No host-device sync.
    """
    if source.dtype != torch.uint8 or source.dim() != 1 or source.numel() < offsets["end"]:
        raise ValueError(f"source must be uint8 [>= {offsets['end']}]; got {source.dtype} {tuple(source.shape)}")
    _load_decode_inputs_kernel[(size,)](
        source.data_ptr(), input_ids, positions, slot_mapping, temperature, seq_lens, seq_order, seed, block_tables,
        block_tables.stride(0), IDS=offsets["input_ids"], POSITIONS=offsets["positions"],
        SLOTS=offsets["slot_mapping"], PREV_ROWS=offsets["prev_rows"], TEMPERATURE=offsets["temperature"],
        SEQ_LENS=offsets["seq_lens"], SEQ_ORDER=offsets["seq_order"], TABLES=offsets["tables"],
        BLOCK=_TABLE_BLOCK, num_warps=1)
