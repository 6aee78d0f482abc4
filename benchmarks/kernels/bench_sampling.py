"""Times the Gumbel-max sampler (kernels/triton/gumbel_sampling.py) against the kernel it replaced and the
inverse-CDF sampler (kernels/triton/inverse_cdf_sampling.py), and checks statistically, before
timing, that each draws from softmax(logits / T). Run on a CUDA machine:

    python benchmarks/kernels/bench_sampling.py            # checks + A/B table (rows 1..256, bf16/fp32)
    python benchmarks/kernels/bench_sampling.py --sweep    # + the new kernel's (BLOCK, ITERS, warps) sweep

"gpu us" is the time of one call replayed in a CUDA graph (device time: what a decode step pays when
the GPU is the bottleneck); "eager us" is triton.testing.do_bench's (includes launch cost when that
dominates, as at one row). The old kernel, one full Philox call and two natural logarithms per
logit, is kept below as the baseline. A kernel whose draws fail a check is marked INVALID in the table.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
import triton.testing

from pagellm.kernels.triton.inverse_cdf_sampling import inverse_cdf_sample
from pagellm.kernels.triton.gumbel_sampling import _reduce_chunks_kernel, gumbel_sample, gumbel_sample_with
from pagellm.kernels.triton.sampling_launch import NUM_WARPS, launch_config

VOCAB = 151_936  # Qwen3
ROWS = (1, 16, 64, 256)
P_FAIL = 1e-6  # a correct sampler fails a check with about this probability


# ---- the previous kernel (baseline) -----------------------------------------------------------
@triton.jit(do_not_specialize=["seed"])
def _baseline_chunk_kernel(logits_ptr, temperature_ptr, best_ptr, best_idx_ptr, stride_l, vocab_size,
                           num_chunks, seed, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, temperature)
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(ITERS):
        cols = (chunk * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < vocab_size
        x = tl.load(logits_ptr + row * stride_l + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if not greedy:
            u = tl.rand(seed, row * vocab_size + cols)
            x = x * inv_t - tl.log(-tl.log(u))
        better = x > best
        best = tl.where(better, x, best)
        best_idx = tl.where(better, cols, best_idx)
    top = tl.max(best, axis=0)
    index = tl.min(tl.where(best == top, best_idx, vocab_size), axis=0)
    tl.store(best_ptr + row * num_chunks + chunk, top)
    tl.store(best_idx_ptr + row * num_chunks + chunk, index)


def baseline_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: int) -> torch.Tensor:
    num_rows, vocab_size = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    block, iters = min(1024, triton.next_power_of_2(vocab_size)), 4
    num_chunks = triton.cdiv(vocab_size, block * iters)
    best = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=logits.device)
    _baseline_chunk_kernel[(num_rows, num_chunks)](
        logits, temperature.float(), best, best_idx, logits.stride(0), vocab_size, num_chunks,
        seed & 0x7FFFFFFF, BLOCK=block, ITERS=iters, num_warps=4)
    _reduce_chunks_kernel[(num_rows,)](best, best_idx, out, num_chunks, vocab_size,
                                       CHUNKS_PAD=max(2, triton.next_power_of_2(num_chunks)), num_warps=1)
    return out


SAMPLERS = {"old": baseline_sample, "new": gumbel_sample, "cdf": inverse_cdf_sample}


# ---- statistics -------------------------------------------------------------------------------
def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of counts [K] against probabilities [K] (bins expected >= 5), K - 1 degrees of freedom."""
    expected = counts.sum() * probs
    stat = ((counts - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2, dtype=torch.float64), stat / 2))


def draw_counts(sample, logits_row: torch.Tensor, temperature: float, rows: int, seeds: int) -> torch.Tensor:
    """Token counts [V] (float64, CPU) of rows x seeds draws from one logits row (stride-0 rows: no copies)."""
    logits = logits_row.expand(rows, -1)
    temps = torch.full((rows,), temperature, device=logits.device)
    counts = torch.zeros(logits.shape[1], dtype=torch.float64, device=logits.device)
    for seed in range(seeds):
        counts += torch.bincount(sample(logits, temps, 1000 + seed), minlength=logits.shape[1]).double()
    return counts.cpu()


def checks(sample, dtype: torch.dtype) -> list[tuple[str, float, bool]]:
    """(name, p-value or mismatches, passed) of each distribution check, for one sampler and dtype."""
    results = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    # 1. Eight tokens, one masked, T = 0.7 (every bin expected >= 400 at 4M draws).
    small = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, float("-inf"), 1.5], device="cuda")
    counts = draw_counts(sample, small.to(dtype), 0.7, 1 << 20, 4)
    probs = torch.softmax(small.to(dtype).double().cpu() / 0.7, dim=-1)
    keep = probs > 0
    p = chi_square_p(counts[keep], probs[keep])
    results.append(("8 tokens T=0.7", p, p > P_FAIL and bool(counts[~keep].sum() == 0)))
    # 2. Flat over the whole vocab: the winners' noise lives at E ~ 1/V, where precision and ties bite;
    #    64 bins of contiguous tokens also catch a bias between tiles or sub-tiles.
    flat = torch.zeros(VOCAB, device="cuda", dtype=dtype)
    counts = draw_counts(sample, flat, 1.0, 1 << 18, 4)
    bins = counts[:VOCAB // 64 * 64].view(64, -1).sum(1)
    p = chi_square_p(bins, torch.full((64,), 1 / 64, dtype=torch.float64))
    results.append(("flat vocab, 64 bins", p, p > P_FAIL))
    # 3. A peaked LLM-like row at T = 0.6: the 48 likeliest tokens one by one, the rest pooled.
    peaked = (torch.randn(VOCAB, device="cuda", generator=gen) * 2.5).to(dtype)
    counts = draw_counts(sample, peaked, 0.6, 1 << 18, 4)
    probs = torch.softmax(peaked.double().cpu() / 0.6, dim=-1)
    order = probs.argsort(descending=True)
    top = order[:48]
    cat_counts = torch.cat([counts[top], (counts.sum() - counts[top].sum()).view(1)])
    cat_probs = torch.cat([probs[top], (1 - probs[top].sum()).view(1)])
    keep = counts.sum() * cat_probs >= 5
    p = chi_square_p(cat_counts[keep], cat_probs[keep] / cat_probs[keep].sum())
    results.append(("peaked vocab T=0.6", p, p > P_FAIL))
    # 4. Greedy rows are torch.argmax exactly, ties included.
    logits = torch.randn(256, VOCAB, device="cuda", generator=gen).to(dtype)
    logits[7, 100] = logits[7, 150_000] = 100.0
    wrong = int((sample(logits, torch.zeros(256, device="cuda"), 1) != logits.float().argmax(-1)).sum())
    results.append(("greedy == argmax", wrong, wrong == 0))
    return results


# ---- timing -----------------------------------------------------------------------------------
def time_us(fn, eager: bool = True) -> tuple[float, float]:
    """(gpu us per call from CUDA-graph replay, eager us per call from do_bench or nan)."""
    fn()  # compiles outside the graph capture
    torch.cuda.synchronize()
    gpu = triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3
    return gpu, (triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3 if eager else float("nan"))


def inputs(rows: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(rows)
    logits = (torch.randn(rows, VOCAB, device="cuda", generator=gen) * 3).to(dtype)
    return logits, torch.full((rows,), 0.6, device="cuda")


def sweep() -> None:
    print("\nnew kernel sweep (gpu us; BLOCK changes which noise a column gets, not the distribution):")
    print(f"{'rows':>5} {'dtype':>6} {'BLOCK':>6} {'ITERS':>6} {'warps':>6} {'gpu us':>8}")
    for rows in (16, 256):
        for dtype in (torch.bfloat16, torch.float32):
            logits, temps = inputs(rows, dtype)
            chosen = launch_config(rows, VOCAB, True)
            for block in (1024, 2048, 4096):
                for iters in (1, 2, 4):
                    for warps in (4, 8):
                        gpu, _ = time_us(lambda: gumbel_sample_with(logits, temps, 7, block, iters, warps), eager=False)
                        mark = "  <- default" if (block, iters) == chosen and warps == NUM_WARPS else ""
                        print(f"{rows:>5} {str(dtype)[6:]:>6} {block:>6} {iters:>6} {warps:>6} {gpu:>8.1f}{mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time the new kernel's launch configs")
    parser.add_argument("--no-checks", action="store_true", help="skip the statistical checks")
    parser.add_argument("--samplers", nargs="+", choices=sorted(SAMPLERS), default=list(SAMPLERS),
                        help="old: one Philox call per logit; new: the Gumbel kernel; cdf: inverse CDF")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_sampling needs a CUDA device")

    samplers = {name: SAMPLERS[name] for name in args.samplers}
    valid = {name: True for name in samplers}
    if not args.no_checks:
        print(f"distribution checks (pass: p > {P_FAIL:g}):")
        for dtype in (torch.bfloat16, torch.float32):
            for name, sample in samplers.items():
                for check, value, ok in checks(sample, dtype):
                    valid[name] &= ok
                    shown = f"p={value:.3g}" if isinstance(value, float) else f"{value} wrong"
                    print(f"  {name:>4} {str(dtype)[6:]:>8}  {check:<22} {shown:<14} {'ok' if ok else 'FAIL'}")

    rows_out = []
    for dtype in (torch.bfloat16, torch.float32):
        for rows in ROWS:
            logits, temps = inputs(rows, dtype)
            times = {name: time_us(lambda s=sample: s(logits, temps, 7)) for name, sample in samplers.items()}
            rows_out.append((rows, dtype, times))

    if args.sweep:
        sweep()

    print(f"\nsampling, vocab {VOCAB}, T=0.6, us per call: gpu (CUDA-graph replay) / eager")
    print(f"{'rows':>5} {'dtype':>9} " + " ".join(f"{name + ' gpu':>10} {name + ' eager':>11}" for name in samplers))
    for rows, dtype, times in rows_out:
        cells = " ".join(f"{times[name][0]:>10.1f} {times[name][1]:>11.1f}" for name in samplers)
        print(f"{rows:>5} {str(dtype)[6:]:>9} {cells}")
    if not all(valid.values()):
        bad = ", ".join(name for name, ok in valid.items() if not ok)
        print(f"INVALID (failed a check): {bad}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
