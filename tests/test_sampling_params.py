"""SamplingParams / BeamSearchParams: vLLM defaults, validation, generation-config defaults."""

from __future__ import annotations

import pytest

from pagellm.sampling_params import (
    MAX_LOGPROBS,
    BeamSearchParams,
    SamplingParams,
    SamplingType,
    apply_generation_config_defaults,
    generation_config_defaults,
)

# vLLM's SamplingParams defaults (after normalisation of stop / stop_token_ids).
VLLM_DEFAULTS = {
    "n": 1,
    "best_of": None,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "seed": None,
    "stop": [],
    "stop_token_ids": [],
    "ignore_eos": False,
    "max_tokens": 16,
    "min_tokens": 0,
    "logprobs": None,
    "prompt_logprobs": None,
    "detokenize": True,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "include_stop_str_in_output": False,
    "logit_bias": None,
}


def test_defaults_match_vllm() -> None:
    params = SamplingParams()
    for name, expected in VLLM_DEFAULTS.items():
        assert getattr(params, name) == expected, name
    assert params.sampling_type is SamplingType.RANDOM
    assert not params.is_greedy


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "n"),
        ({"n": 1.5}, "n"),
        ({"n": True}, "n"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"seed": 1.5}, "seed"),
        ({"seed": "42"}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"logit_bias": {1: "big"}}, "logit_bias"),
        ({"logit_bias": {1: float("nan")}}, "logit_bias"),
        ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
        ({"logit_bias": {-3: 1.0}}, "logit_bias"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"detokenize": "yes"}, "detokenize"),
        ({"temperature": 0.0, "n": 2}, "n"),
    ],
)
def test_invalid_field_raises_naming_it(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} "):
        SamplingParams(**kwargs)


def test_error_message_states_range() -> None:
    with pytest.raises(ValueError, match=r"temperature must be >= 0, got -1"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=2)


def test_boundary_values_accepted() -> None:
    params = SamplingParams(
        temperature=0.0,
        top_p=1.0,
        min_p=1.0,
        presence_penalty=2,
        frequency_penalty=-2,
        logprobs=0,
        prompt_logprobs=MAX_LOGPROBS,
        max_tokens=None,
        min_tokens=100,
        seed=-5,
    )
    assert params.presence_penalty == 2.0 and isinstance(params.presence_penalty, float)
    assert params.max_tokens is None and params.min_tokens == 100


def test_normalisation() -> None:
    params = SamplingParams(top_k=-1, stop="###", stop_token_ids=(7, 9), logit_bias={"50256": -250, 3: 1.5})
    assert params.top_k == 0
    assert params.stop == ["###"]
    assert params.stop_token_ids == [7, 9]
    assert params.logit_bias == {50256: -100.0, 3: 1.5}
    assert SamplingParams(logit_bias={1: float("inf")}).logit_bias == {1: 100.0}


def test_greedy_detection_and_reset() -> None:
    greedy = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2, seed=3)
    assert greedy.is_greedy
    assert greedy.sampling_type is SamplingType.GREEDY
    # Truncation is meaningless for argmax, so it is cleared (vLLM does the same).
    assert (greedy.top_k, greedy.top_p, greedy.min_p) == (0, 1.0, 0.0)
    # As in vLLM, a tiny positive temperature is raised to 0.01 and still samples.
    assert not SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy
    assert SamplingParams(seed=1).sampling_type is SamplingType.RANDOM_SEED


def test_clone_is_deep() -> None:
    params = SamplingParams(stop=["a"], logit_bias={1: 2.0})
    copy = params.clone()
    assert copy == params
    copy.stop.append("b")
    copy.logit_bias[5] = 1.0
    assert params.stop == ["a"] and params.logit_bias == {1: 2.0}


def test_stop_token_sets_and_eos() -> None:
    params = SamplingParams(stop_token_ids=[5])
    assert params.all_stop_token_ids == {5}
    params.update_from_generation_config({"eos_token_id": [1, 2]}, model_eos_token_id=3)
    assert params.eos_token_ids == {1, 2, 3}
    assert params.all_stop_token_ids == {1, 2, 3, 5}
    ignoring = SamplingParams(stop_token_ids=[5], ignore_eos=True)
    ignoring.update_from_generation_config({"eos_token_id": 1})
    assert ignoring.all_stop_token_ids == {5}


def test_verify_token_ids() -> None:
    SamplingParams(logit_bias={9: 1.0}, stop_token_ids=[9]).verify_token_ids(10)
    with pytest.raises(ValueError, match="^logit_bias"):
        SamplingParams(logit_bias={10: 1.0}).verify_token_ids(10)
    with pytest.raises(ValueError, match="^stop_token_ids"):
        SamplingParams(stop_token_ids=[10]).verify_token_ids(10)


def test_output_text_buffer_length() -> None:
    assert SamplingParams().output_text_buffer_length == 0
    assert SamplingParams(stop=["ab", "wxyz"]).output_text_buffer_length == 3
    assert SamplingParams(stop=["wxyz"], include_stop_str_in_output=True).output_text_buffer_length == 0


# -- generation config defaults ---------------------------------------------------------

GEN_CFG = {
    "temperature": 0.6,
    "top_p": 0.95,
    "top_k": 20,
    "min_p": None,  # null in the JSON: not a default
    "repetition_penalty": 1.05,
    "max_new_tokens": 512,
    "do_sample": True,  # not a sampling default in vLLM either
    "eos_token_id": [151645, 151643],
    "presence_penalty": 1.5,  # not taken from generation config
}


def test_generation_config_defaults_pick_only_known_keys() -> None:
    assert generation_config_defaults(GEN_CFG) == {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "repetition_penalty": 1.05,
        "max_tokens": 512,
    }
    assert generation_config_defaults(None) == {}


def test_from_defaults_applies_generation_config() -> None:
    params = SamplingParams.from_defaults(GEN_CFG)
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.95, 20)
    assert params.repetition_penalty == 1.05 and params.max_tokens == 512
    # Fields the config does not set keep vLLM's defaults.
    assert params.min_p == 0.0 and params.presence_penalty == 0.0 and params.n == 1
    assert SamplingParams.from_defaults(None) == SamplingParams()


def test_user_values_override_generation_config() -> None:
    kwargs = {"temperature": 0.0, "max_tokens": 8}
    merged = apply_generation_config_defaults(kwargs, GEN_CFG)
    assert merged["temperature"] == 0.0 and merged["max_tokens"] == 8 and merged["top_p"] == 0.95
    assert kwargs == {"temperature": 0.0, "max_tokens": 8}  # input not mutated
    params = SamplingParams.from_generation_config(GEN_CFG, top_k=-1, temperature=0.9)
    assert (params.temperature, params.top_k, params.top_p) == (0.9, 0, 0.95)


def test_transformers_generation_config_uses_only_set_values() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GenerationConfig(temperature=0.7, top_p=0.8)
    params = SamplingParams.from_defaults(cfg)
    assert (params.temperature, params.top_p) == (0.7, 0.8)
    assert params.top_k == 0  # transformers' library default (50) is not a model default


def test_invalid_generation_config_value_names_field() -> None:
    with pytest.raises(ValueError, match="^top_p "):
        SamplingParams.from_defaults({"top_p": 0.0})


# -- BeamSearchParams --------------------------------------------------------------------


def test_beam_search_params() -> None:
    params = BeamSearchParams(beam_width=4, max_tokens=32)
    assert (params.ignore_eos, params.temperature, params.length_penalty) == (False, 0.0, 1.0)
    with pytest.raises(AttributeError):
        params.beam_width = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"beam_width": 0, "max_tokens": 8}, "beam_width"),
        ({"beam_width": 2.0, "max_tokens": 8}, "beam_width"),
        ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
        ({"beam_width": 2, "max_tokens": 8, "temperature": -0.5}, "temperature"),
        ({"beam_width": 2, "max_tokens": 8, "length_penalty": float("inf")}, "length_penalty"),
        ({"beam_width": 2, "max_tokens": 8, "ignore_eos": None}, "ignore_eos"),
    ],
)
def test_beam_search_params_invalid(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} "):
        BeamSearchParams(**kwargs)
