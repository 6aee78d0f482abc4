"""OpenAI request fields -> SamplingParams (with the model's defaults for fields not sent), or
BeamSearchParams for `use_beam_search`."""

from __future__ import annotations

from pagellm.entrypoints.openai.errors import OpenAIError, bad_request
from typing import Any

from pagellm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from pagellm.sampling_params import MAX_LOGPROBS, BeamSearchParams, SamplingParams

# Fields whose value, when the client leaves them out, comes from the model's
# generation_config.json (as vLLM does) rather than from SamplingParams' own defaults.
_MODEL_DEFAULTED = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

# Cap on `n`: each choice is a sequence in the batch, so an absurd n is a denial of service.
MAX_N = 128


def build_sampling_params(request: SamplingFields, defaults: SamplingParams, max_tokens: int,
                          logprobs: int | None, prompt_logprobs: int | None,
                          field_names: dict[str, str] | None = None) -> SamplingParams:
    """SamplingParams for one request. Raises OpenAIError(400) naming the bad field.

    `field_names` maps SamplingParams names to the request's (chat calls `logprobs`
    `top_logprobs`), so the error names what the client sent.
    """
    if not 1 <= request.n <= MAX_N:
        raise OpenAIError(f"n must be in [1, {MAX_N}], got {request.n}", 400, param="n")
    kwargs = {name: getattr(request, name) if getattr(request, name) is not None else getattr(defaults, name)
              for name in _MODEL_DEFAULTED}
    try:
        return SamplingParams(
            n=request.n, presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0, seed=request.seed, stop=request.stop,
            stop_token_ids=request.stop_token_ids, ignore_eos=request.ignore_eos, max_tokens=max_tokens,
            min_tokens=request.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output, logit_bias=request.logit_bias,
            **kwargs)
    except ValueError as exc:
        error = bad_request(exc, set(type(request).model_fields) | set(SamplingParams.__dataclass_fields__))
        if error.param and field_names and error.param in field_names:
            error.param = field_names[error.param]
        raise error from exc


# Fields that would change which tokens a beam may take or how it is scored, with the value
# that means "not used". Beam search ranks the model's raw logprobs, so it refuses them
# rather than ignore them silently. (temperature, top_p, top_k, min_p and seed only shape
# sampling, which beam search does not do; they are accepted and have no effect, as in vLLM.)
_NOT_WITH_BEAMS: dict[str, tuple[Any, ...]] = {
    "stop": (None, "", []),
    "stop_token_ids": (None, []),
    "logit_bias": (None, {}),
    "min_tokens": (0,),
    "presence_penalty": (None, 0.0),
    "frequency_penalty": (None, 0.0),
    "repetition_penalty": (None, 1.0),
    "prompt_logprobs": (None,),
}


def build_beam_search_params(request: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                             logprobs: int | None, field_names: dict[str, str] | None = None) -> BeamSearchParams:
    """BeamSearchParams for a `use_beam_search` request: n is the beam width (vLLM's rule).
    Raises OpenAIError(400) naming the bad field; `field_names` as in build_sampling_params."""
    names = field_names or {}
    if not 1 <= request.n <= MAX_N:
        raise OpenAIError(f"n (the beam width) must be in [1, {MAX_N}], got {request.n}", 400, param="n")
    for name, unused in _NOT_WITH_BEAMS.items():
        if getattr(request, name) not in unused:
            raise OpenAIError(f"{name} is not supported with use_beam_search", 400, param=name)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        name = names.get("logprobs", "logprobs")
        raise OpenAIError(f"{name} must be in [0, {MAX_LOGPROBS}], got {logprobs}", 400, param=name)
    try:
        return BeamSearchParams(beam_width=request.n, max_tokens=max_tokens, ignore_eos=request.ignore_eos,
                                temperature=request.temperature if request.temperature is not None else 0.0,
                                length_penalty=request.length_penalty, early_stopping=request.early_stopping)
    except ValueError as exc:
        error = bad_request(exc, set(type(request).model_fields) | {"beam_width"})
        if error.param == "beam_width":
            error.param = "n"
        raise error from exc
