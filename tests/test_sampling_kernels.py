"""The Triton samplers of plain rows: what both must do (Gumbel-max, kernels/triton/gumbel_sampling.py,
and inverse CDF, kernels/triton/inverse_cdf_sampling.py): greedy ties as torch.argmax, masked tokens
never drawn, frequencies against softmax(logits / T), a seed fixing the draw whatever the batch;
then the inverse-CDF kernel's own crossing point against a float64 reference over the same uniform.
The Gumbel kernel's noise is checked in tests/test_gumbel_kernel.py.

On the CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1);
benchmarks/kernels/bench_sampling.py repeats the frequency checks with millions of rows on the GPU.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from pagellm.kernels.triton import gumbel_sampling, inverse_cdf_sampling
from pagellm.kernels.triton.inverse_cdf_sampling import _first_crossing, inverse_cdf_sample_with
from pagellm.kernels.triton.sampling_launch import launch_config

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SAMPLERS = pytest.mark.parametrize("kernels", [gumbel_sampling, inverse_cdf_sampling], ids=["gumbel", "cdf"])
NEG_INF = float("-inf")
BASE = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, NEG_INF, 1.5])


def chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """P(chi-square >= observed) with len(counts) - 1 degrees of freedom."""
    stat = ((counts.double() - expected.double()) ** 2 / expected.double()).sum()
    half_dof = torch.tensor((len(counts) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(half_dof, stat / 2))


@triton.jit
def _uniform_kernel(out_ptr, seed):
    row = tl.program_id(0)
    tl.store(out_ptr + row, tl.rand(seed, row))


@triton.jit
def _first_crossing_kernel(mass_ptr, running_ptr, target_ptr, out_ptr, SIZE: tl.constexpr):
    index = tl.arange(0, SIZE)
    tl.store(out_ptr + tl.program_id(0), _first_crossing(tl.load(mass_ptr + index), tl.load(running_ptr + index),
                                                         tl.load(target_ptr + tl.program_id(0)), index, SIZE))


def test_first_crossing_never_picks_an_entry_without_mass():
    # A parallel scan may sum a zero-mass entry a hair above its predecessor (running[2] here): a
    # target between the two must skip it. Past the total (rounding), the last entry with mass.
    mass = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    running = torch.tensor([1.0, 2.0, 2.0000002, 3.0, 3.0, 3.0, 3.0, 3.0])
    targets = torch.tensor([0.0, 0.5, 1.0, 2.0000001, 2.5, 3.0, 3.5])
    out = torch.empty(len(targets), dtype=torch.int32, device=DEVICE)
    _first_crossing_kernel[(len(targets),)](mass.to(DEVICE), running.to(DEVICE), targets.to(DEVICE), out, SIZE=8)
    assert out.tolist() == [0, 0, 1, 3, 3, 3, 3]


@SAMPLERS
def test_greedy_rows_equal_torch_argmax_with_ties(kernels):
    logits = torch.randn(4, 1000)
    logits[0, 5] = logits[0, 900] = 50.0     # a tie across tiles and chunks
    logits[1, 3] = logits[1, 7] = 50.0       # a tie within a tile
    logits[2, 100] = logits[2, 101] = 50.0   # neighbours
    logits[3, :] = 1.0                       # all equal: index 0
    logits = logits.to(DEVICE)
    greedy = torch.zeros(4, device=DEVICE)
    assert kernels.sample(logits, greedy, 3).tolist() == [5, 3, 100, 0]
    with_config = gumbel_sampling.gumbel_sample_with if kernels is gumbel_sampling else inverse_cdf_sample_with
    assert with_config(logits, greedy, 3, block=16, iters=3, num_warps=4).tolist() == [5, 3, 100, 0]
    bf16 = logits.to(torch.bfloat16)
    assert kernels.sample(bf16, greedy, 3).tolist() == bf16.float().argmax(-1).tolist()


@pytest.mark.parametrize("block,iters", [(16, 1), (16, 2), (64, 1)])
def test_tokens_are_where_the_cdf_crosses_the_rows_uniform(block: int, iters: int):
    # Vocab 37 is no multiple of any block: the last tile is partly masked. Mixed greedy/temperature
    # rows and one row with every token but two masked.
    vocab, seed, rows = 37, 1234, 40
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(rows, vocab, generator=g) * 2
    logits[4, :] = NEG_INF
    logits[4, 11] = logits[4, 30] = 0.0
    temperature = torch.rand(rows, generator=g) * 2 + 0.3
    temperature[[1, 5]] = 0.0
    logits, temperature = logits.to(DEVICE), temperature.to(DEVICE)
    tokens = inverse_cdf_sample_with(logits, temperature, seed, block=block, iters=iters, num_warps=4)
    u = torch.empty(rows, device=DEVICE)
    _uniform_kernel[(rows,)](u, seed)
    probs = torch.softmax(logits.double() / temperature.double().clamp(min=1e-9)[:, None], dim=-1)
    expected = (probs.cumsum(-1) <= u.double()[:, None]).sum(-1)
    greedy = temperature == 0
    expected = torch.where(greedy, logits.argmax(-1), expected)
    # float32 sums may cross a hair earlier or later than float64 ones: only where u sits that close.
    margin = (probs.cumsum(-1) - u.double()[:, None]).abs().min(-1).values
    close = margin < 1e-5
    assert torch.equal(tokens[~close], expected[~close]), (tokens, expected)
    assert tokens[4].item() in (11, 30)
    # The draw depends on the block, never on the chunking.
    again = inverse_cdf_sample_with(logits, temperature, seed, block=block, iters=4, num_warps=4)
    assert torch.equal(tokens, again)


@SAMPLERS
def test_frequencies_match_softmax_and_seed_fixes_the_draw(kernels):
    rows, temperature = 1000, 0.7
    logits = BASE.expand(rows, -1).to(DEVICE)  # stride 0 rows: the kernel reads one row for all
    temps = torch.full((rows,), temperature, device=DEVICE)
    tokens = kernels.sample(logits, temps, 11).cpu()
    counts = torch.bincount(tokens, minlength=8).double()
    assert counts[6] == 0  # the -inf logit is never drawn
    probs = torch.softmax(BASE.double() / temperature, dim=-1)
    # Bins with an expectation under 5 are merged (the chi-square approximation needs it): 4 and 5.
    observed = torch.stack([counts[0], counts[1], counts[2], counts[3], counts[4] + counts[5], counts[7]])
    expected = rows * torch.stack([probs[0], probs[1], probs[2], probs[3], probs[4] + probs[5], probs[7]])
    # A fixed seed makes this deterministic; a correct sampler fails it for 1 seed in 10,000, while a
    # temperature off by 1.4x (say, ln vs log2) scores p < 1e-12 at this size.
    assert chi_square_p_value(observed, expected) > 1e-4, (observed, expected)
    # The same seed gives the same tokens, whatever the batch size; another seed others.
    head = kernels.sample(logits[:60], temps[:60], 11).cpu()
    assert torch.equal(head, tokens[:60])
    assert not torch.equal(kernels.sample(logits[:60], temps[:60], 12).cpu(), head)


def test_a_seed_in_device_memory_draws_as_the_same_seed_by_value():
    # A CUDA graph holds the sampler with its seed in a device tensor, rewritten before each replay.
    rows = 300
    logits = BASE.expand(rows, -1).to(DEVICE)
    temps = torch.full((rows,), 0.9, device=DEVICE)
    temps[::7] = 0.0  # greedy rows among them
    seed = torch.tensor([12345], dtype=torch.int64, device=DEVICE)
    tokens = inverse_cdf_sampling.sample_in_graph(logits, temps, seed)
    assert torch.equal(tokens, inverse_cdf_sampling.sample(logits, temps, 12345))
    seed.fill_(54321)
    assert torch.equal(inverse_cdf_sampling.sample_in_graph(logits, temps, seed),
                       inverse_cdf_sampling.sample(logits, temps, 54321))


@SAMPLERS
def test_rejects_bad_input(kernels):
    logits, temperature = torch.zeros(1, 8), torch.ones(1)
    with_config = gumbel_sampling.gumbel_sample_with if kernels is gumbel_sampling else inverse_cdf_sample_with
    with pytest.raises(ValueError, match="block"):
        with_config(logits, temperature, 0, block=24, iters=1, num_warps=4)
    with pytest.raises(ValueError, match="iters"):
        with_config(logits, temperature, 0, block=16, iters=0, num_warps=4)
    with pytest.raises(ValueError, match="temperature"):
        kernels.sample(logits, torch.ones(2), 0)
    with pytest.raises(ValueError, match="logits"):
        kernels.sample(torch.zeros(8), temperature, 0)


@SAMPLERS
def test_compile_all_runs_one_batch_per_launch_config(kernels):
    vocab, max_rows = (151936, 256) if DEVICE.type == "cuda" else (300, 4)
    configs = {launch_config(rows, vocab, DEVICE.type == "cuda") for rows in range(1, max_rows + 1)}
    assert kernels.compile_all(max_rows, vocab, torch.bfloat16, DEVICE) == len(configs)
    if DEVICE.type == "cuda":
        assert len(configs) > 1  # the chunking deepens with the batch: the variants a warm-up can miss


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@SAMPLERS
def test_no_variant_compiles_after_compile_all(kernels, monkeypatch):
    # What the engine passes: logits rows of a graph's output buffer, temperatures of a staging one.
    vocab, max_rows = 151936, 256
    kernels.compile_all(max_rows, vocab, torch.bfloat16, DEVICE)
    compiled = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", lambda *a, **k: compiled.append(k.get("repr")))
    logits = torch.randn(max_rows, vocab, device=DEVICE).to(torch.bfloat16)
    temperature = torch.full((max_rows,), 0.8, device=DEVICE)
    for rows in range(1, max_rows + 1):
        kernels.sample(logits[:rows], temperature[:rows], rows)
    torch.cuda.synchronize()
    assert compiled == []


def test_the_engine_picks_the_sampler_kernel_by_environment(monkeypatch):
    from pagellm.layers.sampler import triton_sampling_module
    monkeypatch.delenv("PAGELLM_SAMPLER_KERNEL", raising=False)
    assert triton_sampling_module() is inverse_cdf_sampling
    monkeypatch.setenv("PAGELLM_SAMPLER_KERNEL", "gumbel")
    assert triton_sampling_module() is gumbel_sampling
    monkeypatch.setenv("PAGELLM_SAMPLER_KERNEL", "fast")
    with pytest.raises(ValueError, match="PAGELLM_SAMPLER_KERNEL"):
        triton_sampling_module()
