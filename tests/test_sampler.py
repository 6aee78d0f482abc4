"""Sampler: greedy, truncation distributions, seeds, penalties, bias, min_tokens, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from pagellm.layers.sampler import Sampler, SamplingBatch, gather_logprobs, make_generator
from pagellm.sampling_params import SamplingParams

NEG_INF = float("-inf")


def build(
    params: list[SamplingParams],
    vocab_size: int,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
    stop_ids: list[set[int]] | None = None,
    device: str = "cpu",
) -> SamplingBatch:
    num_rows = len(params)
    return SamplingBatch.build(
        params,
        prompts if prompts is not None else [[] for _ in range(num_rows)],
        outputs if outputs is not None else [[] for _ in range(num_rows)],
        generators if generators is not None else [None] * num_rows,
        stop_ids if stop_ids is not None else [set() for _ in range(num_rows)],
        vocab_size,
        device,
    )


# -- greedy -----------------------------------------------------------------------------


def test_greedy_is_argmax_and_input_untouched() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 100)
    before = logits.clone()
    batch = build([SamplingParams(temperature=0.0, logit_bias={0: 0.0})] * 6, 100)
    out = Sampler()(logits, batch)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(logits, before)


@pytest.mark.parametrize("extra", [{}, {"top_p": 0.9}, {"min_p": 0.05}])
def test_top_k_1_equals_greedy(extra: dict) -> None:
    torch.manual_seed(1)
    logits = torch.randn(64, 500)
    batch = build([SamplingParams(temperature=1.5, top_k=1, **extra)] * 64, 500)
    assert torch.equal(Sampler()(logits, batch).sampled_token_ids, logits.argmax(-1))


def test_greedy_rows_in_mixed_batch_take_argmax() -> None:
    torch.manual_seed(2)
    logits = torch.randn(8, 50)
    params = [SamplingParams(temperature=0.0 if i % 2 else 5.0) for i in range(8)]
    out = Sampler()(logits, build(params, 50))
    assert torch.equal(out.sampled_token_ids[1::2], logits[1::2].argmax(-1))
    # High temperature on 50 near-uniform tokens: the random rows must not all be argmax.
    assert not torch.equal(out.sampled_token_ids[0::2], logits[0::2].argmax(-1))


def test_bfloat16_logits() -> None:
    logits = torch.randn(4, 30).bfloat16()
    out = Sampler()(logits, build([SamplingParams(temperature=0.0, logprobs=2)] * 4, 30))
    assert torch.equal(out.sampled_token_ids, logits.float().argmax(-1))
    assert out.sampled_logprobs.dtype == torch.float32


def test_fast_path_leaves_unused_features_off() -> None:
    batch = build([SamplingParams(), SamplingParams(temperature=0.0)], 10)
    assert batch.top_k is None and batch.top_p is None and batch.min_p is None
    assert batch.repetition_penalty is None and batch.output_token_counts is None
    assert not batch.needs_logit_processing and batch.max_num_logprobs is None
    assert not batch.all_greedy and not batch.all_random


def test_build_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="^generators"):
        SamplingBatch.build([SamplingParams()], [[]], [[]], [], [set()], 10, "cpu")


# -- distributions ----------------------------------------------------------------------

SMALL_LOGITS = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0]


def reference_probs(logits: list[float], temperature: float, top_k: int, top_p: float, min_p: float) -> list[float]:
    """Independent plain-Python statement of temperature -> top-k -> top-p -> min-p."""
    scaled = [x / temperature for x in logits]
    peak = max(scaled)
    probs = [math.exp(x - peak) for x in scaled]
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = set(order[:top_k] if top_k else order)

    def renorm(p: list[float]) -> list[float]:
        total = sum(p[i] for i in keep)
        return [p[i] / total if i in keep else 0.0 for i in range(len(p))]

    probs = renorm(probs)
    mass, kept = 0.0, set()
    for i in order:
        if i in keep and mass < top_p:
            kept.add(i)
            mass += probs[i]
    keep = kept
    probs = renorm(probs)
    keep = {i for i in keep if probs[i] >= min_p * max(probs)}
    return renorm(probs)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "min_p"),
    [
        (1.0, 0, 1.0, 0.0),
        (0.5, 0, 1.0, 0.0),
        (2.0, 0, 1.0, 0.0),
        (1.0, 3, 1.0, 0.0),
        (1.0, 0, 0.7, 0.0),
        (1.0, 0, 1.0, 0.2),
        (0.7, 5, 0.8, 0.1),
        (1.3, 4, 0.9, 0.0),
    ],
)
def test_empirical_distribution_matches(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    num_draws = 40_000
    torch.manual_seed(1234)
    logits = torch.tensor(SMALL_LOGITS).expand(num_draws, -1)  # [N, 8], one draw per row
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    tokens = Sampler()(logits, build([params] * num_draws, 8)).sampled_token_ids
    empirical = torch.bincount(tokens, minlength=8).double() / num_draws
    expected = torch.tensor(reference_probs(SMALL_LOGITS, temperature, top_k, top_p, min_p), dtype=torch.float64)
    # Sampling noise gives TV ~ 0.005 at 40k draws; a wrong cutoff or temperature gives > 0.03.
    assert 0.5 * (empirical - expected).abs().sum().item() < 0.02
    assert torch.all(empirical[expected == 0] == 0), "a truncated token was drawn"


def test_reference_truncates_as_expected() -> None:
    # Guards the reference itself: these cutoffs are the ones the cases above rely on.
    assert sum(p > 0 for p in reference_probs(SMALL_LOGITS, 1.0, 3, 1.0, 0.0)) == 3
    assert sum(p > 0 for p in reference_probs(SMALL_LOGITS, 1.0, 0, 0.7, 0.0)) == 3
    assert sum(p > 0 for p in reference_probs(SMALL_LOGITS, 1.0, 0, 1.0, 0.2)) == 4


def test_top_p_keeps_top_token_even_when_tiny() -> None:
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]]).expand(2000, -1)
    tokens = Sampler()(logits, build([SamplingParams(top_p=1e-6)] * 2000, 4)).sampled_token_ids
    assert torch.all(tokens == 0)


# -- seeds ------------------------------------------------------------------------------


def run_steps(rows: list[tuple[str, SamplingParams]], logits_by_name: dict[str, torch.Tensor], steps: int) -> dict:
    """Sample `steps` times; returns name -> list of tokens. Fresh generators per call."""
    generators = [make_generator(p.seed, "cpu") if p.seed is not None else None for _, p in rows]
    params = [p for _, p in rows]
    sampler = Sampler()
    result: dict[str, list[int]] = {name: [] for name, _ in rows}
    for _ in range(steps):
        logits = torch.stack([logits_by_name[name] for name, _ in rows])  # [S, V]
        batch = build(params, logits.shape[-1], generators=generators)
        tokens = sampler(logits, batch).sampled_token_ids.tolist()
        for (name, _), token in zip(rows, tokens):
            result[name].append(token)
    return result


def test_seeded_rows_independent_of_batch_composition() -> None:
    vocab = 1000
    gen = torch.Generator().manual_seed(7)
    logits = {name: torch.randn(vocab, generator=gen) * 0.5 for name in "ABxyzg"}
    seeded_a = SamplingParams(seed=11, top_p=0.9)
    seeded_b = SamplingParams(seed=22, temperature=0.8)
    first = [("A", seeded_a), ("x", SamplingParams()), ("B", seeded_b)]
    second = [
        ("y", SamplingParams(top_k=5)),
        ("B", seeded_b),
        ("g", SamplingParams(temperature=0.0)),
        ("z", SamplingParams(seed=99, min_p=0.1)),
        ("A", seeded_a),
        ("x", SamplingParams(top_p=0.5)),
    ]
    torch.manual_seed(0)
    run1 = run_steps(first, logits, steps=6)
    torch.manual_seed(12345)  # the shared RNG state must not matter to seeded rows
    run2 = run_steps(second, logits, steps=6)
    assert run1["A"] == run2["A"]
    assert run1["B"] == run2["B"]
    # Non-trivial: the seeded sequences vary step to step and between seeds.
    assert len(set(run1["A"])) > 1 and run1["A"] != run1["B"]


def test_unseeded_rows_do_not_advance_seeded_generators() -> None:
    logits = torch.randn(1, 200)
    g1, g2 = make_generator(5, "cpu"), make_generator(5, "cpu")
    sampler = Sampler()
    alone = sampler(logits, build([SamplingParams(seed=5)], 200, generators=[g1])).sampled_token_ids
    with_others = sampler(
        torch.cat([logits.expand(3, -1)]),
        build([SamplingParams(), SamplingParams(seed=5), SamplingParams()], 200, generators=[None, g2, None]),
    ).sampled_token_ids
    assert alone.item() == with_others[1].item()
    assert torch.equal(g1.get_state(), g2.get_state())


# -- logit processing -------------------------------------------------------------------

BASE = [2.0, -1.0, 0.5, -0.5, 1.0]


def processed(params: SamplingParams, prompt: list[int], output: list[int], stop_ids: set[int] = frozenset()) -> list[float]:
    batch = build([params], 5, prompts=[prompt], outputs=[output], stop_ids=[set(stop_ids)])
    return Sampler().process_logits(torch.tensor([BASE]), batch)[0].tolist()


def test_repetition_penalty_hand_computed() -> None:
    # Seen in prompt (0, 3) or output (1): positive logits divided, negative multiplied.
    got = processed(SamplingParams(repetition_penalty=2.0), prompt=[0, 3], output=[1, 1])
    assert got == pytest.approx([1.0, -2.0, 0.5, -1.0, 1.0])


def test_frequency_penalty_counts_output_only() -> None:
    got = processed(SamplingParams(frequency_penalty=0.5), prompt=[4], output=[1, 1, 2])
    assert got == pytest.approx([2.0, -2.0, 0.0, -0.5, 1.0])


def test_presence_penalty_is_flat_per_seen_token() -> None:
    got = processed(SamplingParams(presence_penalty=0.3), prompt=[4], output=[1, 1, 2])
    assert got == pytest.approx([2.0, -1.3, 0.2, -0.5, 1.0])


def test_all_penalties_combined_in_order() -> None:
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.3)
    got = processed(params, prompt=[0], output=[1, 1, 2])
    # rep: [1, -2, 0.25, -0.5, 1]; freq: -[0, 1, 0.5, 0, 0]; presence: -[0, .3, .3, 0, 0]
    assert got == pytest.approx([1.0, -3.3, -0.55, -0.5, 1.0])


def test_numpy_histories_match_lists() -> None:
    import numpy as np

    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=0.2)] * 2
    prompts, outputs = [[0, 3], [4]], [[1, 1, 2], []]
    from_lists = build(params, 5, prompts=prompts, outputs=outputs)
    from_arrays = build(
        params,
        5,
        prompts=[np.array(p, dtype=np.int32) for p in prompts],
        outputs=[np.array(o, dtype=np.int64) for o in outputs],
    )
    logits = torch.tensor([BASE, BASE])
    assert torch.equal(Sampler().process_logits(logits, from_lists), Sampler().process_logits(logits, from_arrays))
    assert from_lists.output_token_counts[0].tolist() == [0.0, 2.0, 1.0, 0.0, 0.0]


def test_penalties_only_touch_their_rows() -> None:
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0), SamplingParams()]
    batch = build(params, 5, prompts=[[0], [0]], outputs=[[1, 2], [1, 2]])
    out = Sampler().process_logits(torch.tensor([BASE, BASE]), batch)
    assert out[1].tolist() == pytest.approx(BASE)
    assert out[0].tolist() != pytest.approx(BASE)


def test_logit_bias() -> None:
    got = processed(SamplingParams(logit_bias={"3": 5.0, 0: -100}), prompt=[], output=[])
    assert got == pytest.approx([-98.0, -1.0, 0.5, 4.5, 1.0])
    batch = build([SamplingParams(temperature=0.0, logit_bias={3: 5.0})], 5)
    assert Sampler()(torch.tensor([BASE]), batch).sampled_token_ids.item() == 3


def test_min_tokens_masks_stop_ids_until_reached() -> None:
    params = SamplingParams(min_tokens=3)
    got = processed(params, prompt=[], output=[1, 2], stop_ids={0, 4})
    assert got == [NEG_INF, -1.0, 0.5, -0.5, NEG_INF]
    assert processed(params, prompt=[], output=[1, 2, 3], stop_ids={0, 4}) == pytest.approx(BASE)
    # Greedy would pick the stop id 0; random sampling must never draw it.
    greedy = build([SamplingParams(temperature=0.0, min_tokens=1)], 5, stop_ids=[{0}])
    assert Sampler()(torch.tensor([BASE]), greedy).sampled_token_ids.item() == 4
    many = build([params] * 5000, 5, outputs=[[]] * 5000, stop_ids=[{0, 4}] * 5000)
    tokens = Sampler()(torch.tensor([BASE]).expand(5000, -1), many).sampled_token_ids
    assert not torch.isin(tokens, torch.tensor([0, 4])).any()


def test_penalties_apply_to_greedy() -> None:
    batch = build([SamplingParams(temperature=0.0, repetition_penalty=3.0)], 5, outputs=[[0]])
    # Token 0 (2.0) drops to 0.667, so token 4 (1.0) wins.
    assert Sampler()(torch.tensor([BASE]), batch).sampled_token_ids.item() == 4


# -- logprobs ---------------------------------------------------------------------------


def test_logprobs_are_raw_sorted_and_match_sampled() -> None:
    torch.manual_seed(3)
    logits = torch.randn(5, 40)
    params = [
        SamplingParams(logprobs=3, temperature=0.5, logit_bias={7: 50.0}),
        SamplingParams(logprobs=0),
        SamplingParams(),
        SamplingParams(temperature=0.0, logprobs=1, repetition_penalty=1.7),
        SamplingParams(logprobs=2, top_k=4),
    ]
    out = Sampler()(logits, build(params, 40, outputs=[[1]] * 5))
    raw = torch.log_softmax(logits, dim=-1)
    assert out.topk_logprobs.shape == (5, 3) and out.topk_token_ids.shape == (5, 3)
    ref_lp, ref_ids = raw.topk(3, dim=-1)
    assert torch.equal(out.topk_token_ids, ref_ids)
    torch.testing.assert_close(out.topk_logprobs, ref_lp)
    assert torch.all(out.topk_logprobs[:, :-1] >= out.topk_logprobs[:, 1:])
    sampled = out.sampled_token_ids
    assert sampled[0].item() == 7  # the bias decides the token but not the reported logprob
    torch.testing.assert_close(out.sampled_logprobs, raw.gather(-1, sampled[:, None]).squeeze(-1))
    expected_rank = (raw > raw.gather(-1, sampled[:, None])).sum(-1) + 1
    assert torch.equal(out.sampled_ranks, expected_rank)


def test_logprobs_zero_gives_only_sampled() -> None:
    logits = torch.randn(2, 10)
    out = Sampler()(logits, build([SamplingParams(logprobs=0)] * 2, 10))
    assert out.topk_token_ids is None and out.topk_logprobs is None
    assert out.sampled_ranks is not None
    none = Sampler()(logits, build([SamplingParams()] * 2, 10))
    assert none.sampled_ranks is None and none.sampled_logprobs is None  # skipped when nobody asks


def test_gather_logprobs() -> None:
    logprobs = torch.log_softmax(torch.tensor([[0.0, 3.0, 1.0, 2.0], [4.0, 0.0, 0.0, -1.0]]), dim=-1)
    token_lp, ids, lps = gather_logprobs(logprobs, torch.tensor([2, 0]), 2)
    assert torch.equal(token_lp, torch.stack([logprobs[0, 2], logprobs[1, 0]]))
    assert ids.tolist() == [[1, 3], [0, 1]] or ids.tolist() == [[1, 3], [0, 2]]
    torch.testing.assert_close(lps, logprobs.gather(-1, ids))
    assert gather_logprobs(logprobs, torch.tensor([0, 0]), 0)[1:] == (None, None)
    with pytest.raises(ValueError, match="^k "):
        gather_logprobs(logprobs, torch.tensor([0, 0]), -1)


# -- GPU --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_host_sync_and_seed_matches_batch_changes() -> None:
    vocab = 32_000
    torch.manual_seed(0)
    logits = torch.randn(4, vocab, device="cuda")
    params = [
        SamplingParams(seed=3, top_p=0.9, top_k=50, min_p=0.01, logprobs=5),
        SamplingParams(temperature=0.0, repetition_penalty=1.2, logit_bias={1: 2.0}),
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.2, min_tokens=4),
        SamplingParams(top_k=10),
    ]
    batch = build(
        params,
        vocab,
        prompts=[[1, 2, 3]] * 4,
        outputs=[[4, 5]] * 4,
        generators=[make_generator(3, "cuda"), None, None, None],
        stop_ids=[{0}] * 4,
        device="cuda",
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = Sampler()(logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    processed_logits = Sampler().process_logits(logits, batch)
    assert out.sampled_token_ids[1].item() == processed_logits[1].argmax().item()
    alone = Sampler()(logits[:1], build(params[:1], vocab, [[1, 2, 3]], [[4, 5]], [make_generator(3, "cuda")], [{0}], device="cuda"))
    assert alone.sampled_token_ids[0].item() == out.sampled_token_ids[0].item()


# -- copies on a side stream (CUDA) ------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_values_copied_on_a_side_stream_match_and_tokens_read_back() -> None:
    from pagellm.worker.pending_step import PendingStep, StepResult
    params = [SamplingParams(temperature=0.7, top_p=0.9, logit_bias={3: 1.5}),
              SamplingParams(temperature=0.0, top_k=5, min_p=0.1)]
    copy_stream = torch.cuda.Stream()
    plain = SamplingBatch.build(params, [[1], [2]], [[], []], [None, None], [set(), set()], 16, "cuda")
    side = SamplingBatch.build(params, [[1], [2]], [[], []], [None, None], [set(), set()], 16, "cuda",
                               copy_stream=copy_stream)
    for name in ("temperature", "top_p", "top_k", "min_p", "bias_rows", "bias_tokens", "bias_values"):
        a, b = getattr(side, name), getattr(plain, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    assert side.temperature is not None and side.bias_rows is not None
    tokens = torch.arange(40, 44, device="cuda")
    step = PendingStep(["a", "b", "c", "d"], tokens * 2, StepResult({}, {}, {}), copy_stream)
    assert step.resolve().sampled == {"a": 80, "b": 82, "c": 84, "d": 86}
    # Logprobs come back on the same side stream, with the tokens.
    logits = torch.randn(2, 16, device="cuda")
    asked = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=0.0)]
    out = Sampler()(logits, SamplingBatch.build(asked, [[1], [2]], [[], []], [None, None], [set(), set()], 16, "cuda"))
    step = PendingStep(["a", "b"], out.sampled_token_ids, StepResult({}, {}, {}), copy_stream,
                       logprobs=([p.logprobs for p in asked], out))
    result = step.resolve()
    assert result.sampled == dict(zip("ab", logits.argmax(-1).tolist())) and set(result.logprobs) == {"a"}
    assert [t for t, _ in result.logprobs["a"][2]] == logits[0].topk(3).indices.tolist()


# -- tokens the previous step sampled, not yet read by the host (asynchronous steps) ----------


def test_pending_tokens_count_as_read_ones() -> None:
    # Row 0 penalises its history, row 1 is one token short of min_tokens until its pending one counts.
    params = [SamplingParams(frequency_penalty=1.0, presence_penalty=0.5),
              SamplingParams(min_tokens=2, stop_token_ids=[7])]
    common = dict(params=params, prompt_token_ids=[[1], [2]], generators=[None, None],
                  stop_ids_for_min_tokens=[set(), {7}], vocab_size=16, device="cpu")
    pending = SamplingBatch.build(output_token_ids=[[4], [5]], pending_rows=[0, 1],
                                  pending_tokens=torch.tensor([4, 9]), **common)
    read = SamplingBatch.build(output_token_ids=[[4, 4], [5, 9]], **common)
    assert torch.equal(pending.output_token_counts, read.output_token_counts)
    assert pending.output_token_counts[0, 4] == 2
    assert pending.min_tokens_rows is None and read.min_tokens_rows is None


def test_pending_rows_rejected_when_inconsistent() -> None:
    common = dict(params=[SamplingParams(frequency_penalty=1.0)], prompt_token_ids=[[1]], output_token_ids=[[2]],
                  generators=[None], stop_ids_for_min_tokens=[set()], vocab_size=16, device="cpu")
    with pytest.raises(ValueError, match="pending_rows"):
        SamplingBatch.build(pending_rows=[1], pending_tokens=torch.tensor([3]), **common)
    with pytest.raises(ValueError, match="pending_tokens must be"):
        SamplingBatch.build(pending_rows=[0], pending_tokens=torch.tensor([3, 4]), **common)
    with pytest.raises(ValueError, match="pending_tokens are needed"):
        SamplingBatch.build(pending_rows=[0], **common)


def test_pending_step_reads_logprobs_with_the_tokens() -> None:
    from pagellm.worker.pending_step import PendingStep, StepResult
    logits = torch.randn(3, 16)
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, logprobs=0)]
    batch = SamplingBatch.build(params, [[1]] * 3, [[]] * 3, [None] * 3, [set()] * 3, 16, "cpu")
    out = Sampler()(logits, batch)
    step = PendingStep(["a", "b", "c"], out.sampled_token_ids, StepResult({}, {}, {}),
                       logprobs=([p.logprobs for p in params], out))
    result = step.resolve()
    best = logits.argmax(-1).tolist()
    assert result.sampled == {"a": best[0], "b": best[1], "c": best[2]}
    assert set(result.logprobs) == {"a", "c"}
    logprob, rank, top = result.logprobs["a"]
    assert rank == 1 and logprob == pytest.approx(torch.log_softmax(logits[0], -1)[best[0]].item(), abs=1e-5)
    assert [t for t, _ in top] == logits[0].topk(2).indices.tolist()
    assert result.logprobs["c"][2] == []


def test_samples_plainly_marks_what_the_triton_sampler_takes_alone():
    # A decode graph samples in place only when every row is one of these.
    from pagellm.layers.sampler import samples_plainly
    assert samples_plainly(SamplingParams(temperature=0.0), 0)
    assert samples_plainly(SamplingParams(temperature=0.0, seed=3, top_k=5), 0)  # greedy: a seed is moot
    assert samples_plainly(SamplingParams(temperature=0.8, top_k=-1), 0)
    assert samples_plainly(SamplingParams(temperature=0.0, min_tokens=2), 2)  # min_tokens reached
    not_plain = [dict(temperature=0.8, seed=1), dict(temperature=0.8, top_p=0.9), dict(temperature=0.8, top_k=20),
                 dict(temperature=0.8, min_p=0.1), dict(temperature=0.0, logprobs=0),
                 dict(temperature=0.0, repetition_penalty=1.1), dict(temperature=0.0, logit_bias={5: 1.0})]
    for kwargs in not_plain:
        assert not samples_plainly(SamplingParams(**kwargs), 0), kwargs
    assert not samples_plainly(SamplingParams(temperature=0.0, min_tokens=2), 1)  # EOS still masked
