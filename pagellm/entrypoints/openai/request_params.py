"""OpenAI request fields -> SamplingParams, with the model's defaults for fields not sent."""

from __future__ import annotations

from pagellm.entrypoints.openai.errors import OpenAIError, bad_request
from pagellm.entrypoints.openai.protocol import SamplingFields
from pagellm.sampling_params import SamplingParams

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
