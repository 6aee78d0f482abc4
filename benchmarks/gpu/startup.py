"""gpu-start: build the engine (CUDA graphs on) and serve one token; the caller times the process."""
import sys

from pagellm import LLM, SamplingParams

llm = LLM(sys.argv[1], load_format="dummy", dtype="bfloat16", max_model_len=4096, skip_tokenizer_init=True)
llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
print("first token served")
