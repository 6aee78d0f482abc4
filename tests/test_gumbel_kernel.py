"""The Gumbel-max sampling kernel (kernels/triton/gumbel_sampling.py): the noise transform's precision and
the tile/sub-tile/chunk bookkeeping against a reference argmax over the kernel's own noise. What
both Triton samplers must do (greedy ties, frequencies, seeds) is in tests/test_sampling_kernels.py.

On the CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), at ~30 ms
a row, so the statistical test draws 1,000 rows; benchmarks/kernels/bench_sampling.py repeats it
with millions of rows on the GPU.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from pagellm.kernels.triton.gumbel_sampling import _neg_log2_exponential, gumbel_sample_with

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NEG_INF = float("-inf")


@triton.jit
def _noise_kernel(bits_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    bits = tl.load(bits_ptr + offs).to(tl.uint32, bitcast=True)
    tl.store(out_ptr + offs, _neg_log2_exponential(bits))


@triton.jit
def _tile_noise_kernel(out_ptr, vocab_size, seed, BLOCK: tl.constexpr):
    # The noise the sampling kernel adds at (row, tile), written out: the documented column mapping
    # (column tile * BLOCK + k * BLOCK/4 + j takes word k of counter (row, tile * BLOCK/4 + j)).
    QUARTER: tl.constexpr = BLOCK // 4
    row = tl.program_id(0)
    tile = tl.program_id(1)
    offs = tl.arange(0, QUARTER)
    r0, r1, r2, r3 = tl.randint4x(seed, (row.to(tl.int64) << 32) + tile * QUARTER + offs)
    cols = tile * BLOCK + offs
    base = out_ptr + row.to(tl.int64) * vocab_size
    tl.store(base + cols, _neg_log2_exponential(r0), mask=cols < vocab_size)
    tl.store(base + cols + QUARTER, _neg_log2_exponential(r1), mask=cols + QUARTER < vocab_size)
    tl.store(base + cols + 2 * QUARTER, _neg_log2_exponential(r2), mask=cols + 2 * QUARTER < vocab_size)
    tl.store(base + cols + 3 * QUARTER, _neg_log2_exponential(r3), mask=cols + 3 * QUARTER < vocab_size)


def test_noise_is_exact_up_to_float32_rounding():
    # Random words plus the edges: 0, 1, around 1/8 (the series/log switch), 1/2, and near 2^32.
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2**32, (4000,), generator=g, dtype=torch.int64)
    edges = torch.tensor([0, 1, 2, 3, 2**20, 2**24 + 1, 2**29 - 7, 2**29, 2**29 + 513, 2**31, 3 * 2**30,
                          2**32 - 2**16, 2**32 - 129, 2**32 - 1], dtype=torch.int64)
    words = torch.cat([words, edges, torch.zeros(4096 - 4000 - len(edges), dtype=torch.int64)])
    out = torch.empty(4096, dtype=torch.float32, device=DEVICE)
    _noise_kernel[(1,)](words.to(torch.int32).to(DEVICE), out, N=4096)  # int32 wraps: same 32 bits
    noise = out.cpu().double()
    v = (words.double() + 0.5) / 2**32                                # 1 - u, exactly
    e_ref = -torch.log1p(-v)                                          # the Exp(1) variate
    e = torch.exp2(-noise)
    assert torch.isfinite(noise).all()
    # The GPU's base-2 logarithm (lg2.approx, absolute error ~2^-22) is looser than numpy's.
    slack = 4.0 if DEVICE.type == "cuda" else 1.0
    error = (noise + torch.log2(e_ref)).abs()  # in log2 units, the scores' scale
    # Where races are decided (small E: the series) the noise is exact to float32 precision...
    assert error[v < 0.125].max() < 1e-6
    assert error[v < 0.5].max() < 1e-6 * slack
    # ...and everywhere it is the exact transform of a uniform to within float32 roundings (the word's
    # and the logarithm's).
    assert (torch.exp(-e) - torch.exp(-e_ref)).abs().max() < 2**-23 * slack


@pytest.mark.parametrize("block,iters", [(16, 1), (16, 2), (64, 1)])
def test_tokens_are_the_argmax_over_the_kernels_noise(block: int, iters: int):
    # Vocab 37 is no multiple of any block: the last tile is partly masked. Mixed greedy/temperature
    # rows and one row with every token but two masked.
    vocab, seed = 37, 1234
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, vocab, generator=g) * 2
    logits[4, :] = NEG_INF
    logits[4, 11] = logits[4, 30] = 0.0
    temperature = torch.tensor([0.7, 0.0, 1.0, 2.5, 0.6, 0.0])
    logits, temperature = logits.to(DEVICE), temperature.to(DEVICE)
    tokens = gumbel_sample_with(logits, temperature, seed, block=block, iters=iters, num_warps=4)
    noise = torch.empty(6, vocab, device=DEVICE)
    _tile_noise_kernel[(6, triton.cdiv(vocab, block))](noise, vocab, seed, BLOCK=block)
    greedy = temperature == 0
    scores = torch.where(greedy[:, None], logits, logits * (1.4426950408889634 / temperature.clamp(min=1e-9))[:, None]
                         + noise)
    assert tokens.tolist() == scores.argmax(-1).tolist()
    assert tokens[4].item() in (11, 30)
    # The draw depends on the block (the counter mapping), never on the chunking.
    if iters == 1:
        again = gumbel_sample_with(logits, temperature, seed, block=block, iters=4, num_warps=4)
        assert torch.equal(tokens, again)
