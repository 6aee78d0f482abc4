"""Beam search: the same beams and scores as transformers' `generate(num_beams=...)`, EOS handling,
early stopping modes and length penalties, on a tiny random Llama whose EOS actually shows up."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import requires_default_model
from pagellm import LLM, BeamSearchParams, SamplingParams
from pagellm.engine.beam_search import BeamSearchState, run_beam_search
from pagellm.outputs import Logprob

PROMPTS = [[1, 504, 3575, 282, 4649, 314], [300 + i for i in range(21)], [42]]
BEAM_WIDTH = 3
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def hf_tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()


def _hf_beams(model, prompt: list[int], eos: list[int], length_penalty: float = 1.0,
              early_stopping: bool | str = False) -> tuple[list[list[int]], list[float]]:
    """transformers' beams (generated tokens, padded with eos[0] past their end) and scores."""
    ids = torch.tensor([prompt])  # [1, P]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=BEAM_WIDTH,
                         num_return_sequences=BEAM_WIDTH, max_new_tokens=MAX_TOKENS, length_penalty=length_penalty,
                         early_stopping=early_stopping, eos_token_id=eos, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True)
    return [s[len(prompt):].tolist() for s in out.sequences], out.sequences_scores.tolist()


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory, tiny_llama_dir, hf_tiny) -> tuple[LLM, list[int]]:
    """The tiny Llama with a second EOS id: a token its best beam for PROMPTS[0] emits third, so
    that some beams end early. Returns the engine and the EOS ids, as transformers takes them."""
    tokens, _ = _hf_beams(hf_tiny, PROMPTS[0], [2])
    eos = [2, tokens[0][2]]
    folder = tmp_path_factory.mktemp("tiny_llama_eos")
    shutil.copytree(tiny_llama_dir, folder, dirs_exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((folder / name).read_text())
        config["eos_token_id"] = eos
        (folder / name).write_text(json.dumps(config))
    llm = LLM(str(folder), dtype="float32", kv_cache_memory="64MiB", seed=0)
    assert llm.llm_engine.eos_token_ids == set(eos)
    return llm, eos


def _run(llm: LLM, length_penalty: float, early_stopping: bool | str, ignore_eos: bool = False):
    params = BeamSearchParams(beam_width=BEAM_WIDTH, max_tokens=MAX_TOKENS, length_penalty=length_penalty,
                              ignore_eos=ignore_eos)
    if early_stopping is False:  # the default, through the public API
        return llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
    return run_beam_search(llm.llm_engine, PROMPTS, params, early_stopping=early_stopping)


@pytest.mark.parametrize(("length_penalty", "early_stopping"),
                         [(1.0, False), (0.0, True), (2.0, "never"), (-1.0, "never"), (0.5, False), (1.0, True)])
def test_beams_equal_transformers(eos_model, hf_tiny, length_penalty: float, early_stopping: bool | str) -> None:
    llm, eos = eos_model
    outputs = _run(llm, length_penalty, early_stopping)
    for prompt, out in zip(PROMPTS, outputs):
        ref_tokens, ref_scores = _hf_beams(hf_tiny, prompt, eos, length_penalty, early_stopping)
        ours = [seq.tokens[len(prompt):] for seq in out.sequences]
        assert len(ours) == BEAM_WIDTH
        for mine, theirs in zip(ours, ref_tokens):
            # transformers pads a beam that ended early with the first EOS id.
            assert mine == theirs[:len(mine)] and all(t == eos[0] for t in theirs[len(mine):]), (ours, ref_tokens)
        assert [s.score for s in out.sequences] == pytest.approx(ref_scores, rel=1e-4, abs=1e-5)
    assert llm.llm_engine.kv_cache.num_used_blocks == 0


def test_eos_ends_a_beam_and_counts_in_its_length(eos_model) -> None:
    llm, eos = eos_model
    outputs = _run(llm, 1.0, False)
    stopped = [seq for out in outputs for seq in out.sequences if seq.finish_reason == "stop"]
    assert stopped, "the EOS token was chosen to end some beam"
    for prompt, out in zip(PROMPTS, outputs):
        for seq in out.sequences:
            generated = seq.tokens[len(prompt):]
            assert seq.tokens[:len(prompt)] == prompt
            assert (seq.finish_reason == "stop") == (generated[-1] in eos)
            assert seq.finish_reason == "stop" or len(generated) == MAX_TOKENS
            assert len(seq.logprobs) == len(generated)
            assert seq.cum_logprob == pytest.approx(sum(lp[t].logprob for lp, t in zip(seq.logprobs, generated)))
            assert seq.score == pytest.approx(seq.cum_logprob / len(generated))
            # vLLM's text: the ending EOS token left out (include_stop_str_in_output=False).
            shown = seq.tokens[:-1] if seq.finish_reason == "stop" else seq.tokens
            assert seq.text == llm.get_tokenizer().decode(shown)
        scores = [seq.score for seq in out.sequences]
        assert scores == sorted(scores, reverse=True)
    # ignore_eos: every beam runs to max_tokens.
    for out in _run(llm, 1.0, False, ignore_eos=True):
        assert all(seq.finish_reason == "length" and len(seq.tokens) == len(out.sequences[0].tokens)
                   for seq in out.sequences)


def test_include_stop_str_in_output_keeps_eos_in_text(eos_model) -> None:
    """vLLM's BeamSearchParams field (sixth, positionally): the ending EOS token's text shows
    only when asked for; the beams and their tokens are the same either way."""
    llm, eos = eos_model
    tokenizer = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    default = llm.beam_search(prompts, BeamSearchParams(BEAM_WIDTH, MAX_TOKENS))
    kept = llm.beam_search(prompts, BeamSearchParams(BEAM_WIDTH, MAX_TOKENS, False, 0.0, 1.0, True))
    assert BeamSearchParams(BEAM_WIDTH, MAX_TOKENS).include_stop_str_in_output is False
    stopped = 0
    for out_default, out_kept in zip(default, kept):
        assert [s.tokens for s in out_default.sequences] == [s.tokens for s in out_kept.sequences]
        for seq_default, seq_kept in zip(out_default.sequences, out_kept.sequences):
            assert seq_kept.text == tokenizer.decode(seq_kept.tokens)
            if seq_default.finish_reason == "stop":
                stopped += 1
                assert seq_default.tokens[-1] in eos
                assert seq_default.text == tokenizer.decode(seq_default.tokens[:-1]) != seq_kept.text
            else:
                assert seq_default.text == seq_kept.text
    assert stopped, "some beam ends on EOS"
    with pytest.raises(ValueError, match="^include_stop_str_in_output "):
        BeamSearchParams(beam_width=2, max_tokens=4, include_stop_str_in_output=1)  # type: ignore[arg-type]


def test_beam_width_beyond_vocabulary(tiny_llm) -> None:
    """A beam width larger than the vocabulary is refused before any step, naming the field; one
    within it, but with more candidates (2 * beam_width) than tokens, runs."""
    vocab = tiny_llm.llm_engine.model_config.vocab_size
    with pytest.raises(ValueError, match="beam_width"):
        tiny_llm.beam_search([{"prompt_token_ids": [1, 2, 3]}], BeamSearchParams(beam_width=vocab + 1, max_tokens=2))
    assert not tiny_llm.llm_engine.has_unfinished_requests()
    wide = vocab // 2 + 1
    out = tiny_llm.beam_search([{"prompt_token_ids": [1, 2, 3]}],
                               BeamSearchParams(beam_width=wide, max_tokens=1, ignore_eos=True))[0]
    assert len(out.sequences) == wide
    assert len({seq.tokens[-1] for seq in out.sequences}) == wide
    assert tiny_llm.llm_engine.kv_cache.num_used_blocks == 0


def test_beam_search_reuses_cached_history(tiny_llm) -> None:
    engine = tiny_llm.llm_engine
    before = engine.stats()
    prompt = [(11 * i + 7) % 49152 for i in range(40)]
    out = tiny_llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(beam_width=2, max_tokens=6))[0]
    after = engine.stats()
    assert len(out.sequences) == 2
    # Steps after the first find the 40-token prompt's two full blocks cached.
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 5 * 2 * 32
    assert engine.kv_cache.num_used_blocks == 0 and not engine.has_unfinished_requests()


def test_beam_width_one_is_greedy(tiny_llm) -> None:
    prompt = {"prompt_token_ids": PROMPTS[1]}
    greedy = tiny_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0].token_ids
    beam = tiny_llm.beam_search([prompt], BeamSearchParams(beam_width=1, max_tokens=5, ignore_eos=True))[0]
    assert beam.sequences[0].tokens[len(PROMPTS[1]):] == greedy


def test_state_follows_transformers_rules_by_hand() -> None:
    """Two beams, EOS id 2: an EOS ranked below the beam width is dropped, one ranked within it
    becomes a hypothesis scored cum_logprob / length (the EOS counted)."""
    state = BeamSearchState([9], beam_width=2, max_new_tokens=4, eos_token_ids={2}, length_penalty=1.0)
    assert state.num_candidates == 4

    def entry(pairs: dict[int, float]) -> dict[int, Logprob]:
        return {t: Logprob(lp) for t, lp in pairs.items()}

    state.step([entry({5: -0.1, 6: -0.5, 2: -0.6, 7: -3.0})])
    assert [b.tokens for b in state.running] == [[9, 5], [9, 6]] and state.finished == []
    state.step([entry({2: -0.05, 8: -1.0, 3: -2.0, 4: -2.5}), entry({10: -0.1, 11: -2.0, 12: -2.1, 13: -2.2})])
    assert [b.tokens for b in state.finished] == [[9, 5, 2]]
    assert state.finished[0].score == pytest.approx(-0.15 / 2) and state.finished[0].finish_reason == "stop"
    assert [b.tokens for b in state.running] == [[9, 6, 10], [9, 5, 8]]
    assert not state.done
    with pytest.raises(ValueError, match="expansions"):
        state.step([entry({1: -1.0})])


def test_bad_arguments(tiny_llm) -> None:
    with pytest.raises(ValueError, match="params"):
        tiny_llm.beam_search(["hi"], SamplingParams())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="early_stopping"):
        BeamSearchState([1], beam_width=2, max_new_tokens=4, eos_token_ids={2}, early_stopping="sometimes")
    with pytest.raises(ValueError, match="prompt"):
        tiny_llm.beam_search([{"prompt_token_ids": [1] * 300}], BeamSearchParams(beam_width=2, max_tokens=4))
    assert not tiny_llm.llm_engine.has_unfinished_requests()


# Recorded with transformers fp32 on the dequantized GGUF: generate(num_beams=3,
# num_return_sequences=3, max_new_tokens=10, do_sample=False, eos_token_id=<the engine's>).
SMOLLM2_BEAMS = {
    "The capital of France is": (
        [[7042, 30, 378, 3575, 282, 4649, 314, 7042, 30, 198], [7042, 30, 198, 29, 378, 1797, 1918, 553, 253, 2155],
         [7042, 30, 198, 29, 378, 1797, 1918, 553, 216, 34]],
        [-0.8318818211555481, -0.8622816205024719, -0.9539834856987]),
    "def fibonacci(n):": (
        [[472, 585, 304, 1758, 216, 32, 42, 448, 1003, 216], [472, 585, 304, 1758, 216, 33, 42, 448, 1003, 216],
         [472, 585, 304, 10204, 216, 32, 42, 448, 1003, 216]],
        [-0.38217154145240784, -0.3831216096878052, -0.4622120261192322]),
}


@requires_default_model
@pytest.mark.slow
def test_smollm2_beams_equal_recorded_transformers(smollm2_llm) -> None:
    prompts = list(SMOLLM2_BEAMS)
    outputs = smollm2_llm.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=10))
    tokenizer = smollm2_llm.get_tokenizer()
    for prompt, out in zip(prompts, outputs):
        tokens, scores = SMOLLM2_BEAMS[prompt]
        prompt_len = len(tokenizer.encode(prompt))
        assert [seq.tokens[prompt_len:] for seq in out.sequences] == tokens
        assert [seq.score for seq in out.sequences] == pytest.approx(scores, rel=1e-4)
        assert out.sequences[0].text.startswith(prompt)
