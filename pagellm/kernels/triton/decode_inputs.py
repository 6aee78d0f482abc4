"""Triton kernel that finishes a decode graph's inputs after their one host-to-device copy.

The packed copy (pagellm/worker/cuda_graphs.py) cannot put two inputs straight in place: block
tables travel [size, width] but attention reads them with the fixed row stride of
[max_batch, max_blocks_per_seq], and tokens the previous step sampled are still on the device
(their input id travels as -1, with the row of the previous step's sampled tensor to take). The
graph runs this kernel before the model: one program per padded row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TABLE_BLOCK = 128  # block-table columns a program moves per iteration


@triton.jit
def _finish_decode_inputs_kernel(header_ptr, input_ids_ptr, prev_rows_ptr, tables_ptr, block_tables_ptr,
                                 stride_bt, BLOCK: tl.constexpr):
    # One program per (padded) row: the token from the previous step, then the block table spread out.
    row = tl.program_id(0)
    token = tl.load(input_ids_ptr + row)
    if token < 0:
        # header[0]: the address of the previous step's sampled tokens (int64 [S']), read on the device.
        previous = tl.load(header_ptr).to(tl.pointer_type(tl.int64))
        tl.store(input_ids_ptr + row, tl.load(previous + tl.load(prev_rows_ptr + row)))
    width = tl.load(header_ptr + 1).to(tl.int32)
    src = tables_ptr + row * width
    dst = block_tables_ptr + row.to(tl.int64) * stride_bt
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < width
        tl.store(dst + cols, tl.load(src + cols, mask=mask), mask=mask)


def finish_decode_inputs(header: torch.Tensor, input_ids: torch.Tensor, prev_rows: torch.Tensor,
                         packed_tables: torch.Tensor, block_tables: torch.Tensor, size: int) -> None:
    """Completes rows [0, size) of a decode graph's static inputs, in place.

    header: [2] int64 (previous sampled tokens' address or 0, table width); input_ids [>= size]
    int64, -1 where the token is taken from previous[prev_rows[row]]; prev_rows [>= size] int64;
    packed_tables: int32 holding [size, width] first; block_tables: [>= size, >= width] int32 with a
    contiguous last dimension, whose rows [0, size) receive the packed rows. No host-device sync.
    """
    _finish_decode_inputs_kernel[(size,)](header, input_ids, prev_rows, packed_tables, block_tables,
                                          block_tables.stride(0), BLOCK=_TABLE_BLOCK, num_warps=1)
