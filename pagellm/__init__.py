"""pagellm: LLM inference with a paged KV cache and continuous batching."""

from pagellm.logger import init_logging

init_logging()


from pagellm.entrypoints.llm import LLM  # noqa: E402
from pagellm.outputs import CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, Logprob, RequestOutput
from pagellm.sampling_params import BeamSearchParams, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput", "Logprob",
           "EmbeddingRequestOutput", "EmbeddingOutput", "__version__"]
