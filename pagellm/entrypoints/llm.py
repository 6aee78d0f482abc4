"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`, as in vLLM."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from pagellm.engine.args import EngineArgs, resolve_task
from pagellm.engine.beam_search import BeamSearchOutput, run_beam_search
from pagellm.engine.engine import LLMEngine
from pagellm.engine.input_processor import PromptType
from pagellm.outputs import EmbeddingRequestOutput, RequestOutput
from pagellm.pooling.registry import check_generate_model
from pagellm.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from pagellm.pooling.config import PoolerConfig
    from pagellm.pooling.engine import EmbeddingEngine


class LLM:
    """An engine for offline batched generation.

    Args mirror vLLM's: model (HF folder, .gguf file, or None for SmolLM2-135M-Instruct), tokenizer,
    dtype, max_model_len, max_num_seqs, max_num_batched_tokens, block_size, kv_cache_memory (CPU KV
    budget: bytes, GiB, or '4GiB'), gpu_memory_utilization, seed, enforce_eager, load_format
    ('auto' | 'safetensors' | 'gguf' | 'dummy'), generation_config ('auto' | 'pagellm'),
    enable_prefix_caching (reuse the KV of prompt prefixes seen before; on by default).

    task: "generate" (the default) or "embed" (vLLM's runner="pooling" says the same) for
    embedding models such as BERT: then `embed` works and `generate`/`chat` raise ValueError.
    pooler_config (embed only): a PoolerConfig or {"pooling_type": "MEAN"|"CLS"|"LAST",
    "normalize": bool} overriding the model folder's sentence-transformers settings.
    """

    def __init__(self, model: str | None = None, tokenizer: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, block_size: int = 16,
                 kv_cache_memory: int | float | str | None = None, gpu_memory_utilization: float = 0.9,
                 seed: int = 0, enforce_eager: bool = False, load_format: str = "auto",
                 generation_config: str = "auto", enable_prefix_caching: bool = True, task: str | None = None,
                 runner: str | None = None, pooler_config: PoolerConfig | Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        kwargs.pop("trust_remote_code", None)
        task = resolve_task(task, runner)
        if pooler_config is not None and task != "embed":
            raise ValueError("pooler_config applies to task='embed' only")
        if "kv_cache_memory_bytes" in kwargs:
            kv_cache_memory = kwargs.pop("kv_cache_memory_bytes")
        allowed = set(EngineArgs.__dataclass_fields__)
        unknown = set(kwargs) - allowed
        if unknown:
            raise ValueError(f"unknown LLM argument(s): {', '.join(sorted(unknown))}")
        self.engine_args = EngineArgs(
            model=model, tokenizer=tokenizer, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, block_size=block_size, kv_cache_memory=kv_cache_memory,
            gpu_memory_utilization=gpu_memory_utilization, seed=seed, enforce_eager=enforce_eager,
            load_format=load_format, generation_config=generation_config,
            enable_prefix_caching=enable_prefix_caching, task=task, **kwargs)
        self.task = task
        self.embedding_engine: EmbeddingEngine | None = None
        if task == "embed":
            from pagellm.pooling.engine import EmbeddingEngine
            self.embedding_engine = EmbeddingEngine(self.engine_args, pooler_config)
            self.llm_engine = None
        else:
            check_generate_model(model)
            self.llm_engine = LLMEngine(self.engine_args)

    def get_tokenizer(self):
        if self.embedding_engine is not None:
            return self.embedding_engine.tokenizer
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self._generation_engine("get_default_sampling_params").default_sampling_params()

    def embed(self, prompts: PromptType | Sequence[PromptType], use_tqdm: bool = True,
              truncate_prompt_tokens: int | None = None) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt, in prompt order (needs task="embed").

        `prompts`: a string, a {"prompt_token_ids": [...]} dict, or a list of them (a list of ints
        is one tokenized prompt). `truncate_prompt_tokens`: keep only that many tokens (-1: up to
        max_model_len); unset, a prompt longer than max_model_len raises ValueError.
        Each output has `outputs.embedding` (list[float]), `prompt_token_ids`, `request_id`.
        """
        if self.embedding_engine is None:
            raise ValueError("embed needs an embedding model loaded with task='embed' (or runner='pooling'); "
                             "this LLM was created for task='generate'")
        return self.embedding_engine.embed(self._as_prompt_list(prompts), truncate_prompt_tokens, use_tqdm)

    def encode(self, prompts: PromptType | Sequence[PromptType], use_tqdm: bool = True,
               truncate_prompt_tokens: int | None = None) -> list[EmbeddingRequestOutput]:
        """Same as `embed` (vLLM's older name for pooling)."""
        return self.embed(prompts, use_tqdm=use_tqdm, truncate_prompt_tokens=truncate_prompt_tokens)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates for every prompt; returns outputs in prompt order.

        `prompts`: a string, a {"prompt_token_ids": [...]} dict, or a list of them (a list of ints is
        one tokenized prompt). `sampling_params`: one for all, or one per prompt.
        """
        self._generation_engine("generate")
        prompt_list = self._as_prompt_list(prompts)
        params_list = self._as_params_list(sampling_params, len(prompt_list))
        return self._run(prompt_list, params_list, use_tqdm)

    def chat(self, messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False,
             chat_template_kwargs: Mapping[str, Any] | None = None) -> list[RequestOutput]:
        """Generates replies to one conversation (a list of messages) or to a list of conversations."""
        self._generation_engine("chat")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of messages or of conversations")
        conversations = [messages] if isinstance(messages[0], Mapping) else list(messages)
        inputs = self.llm_engine.inputs
        prompts = []
        for conv in conversations:
            text = inputs.render_chat(list(conv), chat_template, add_generation_prompt, continue_final_message,
                                      chat_template_kwargs)
            prompts.append({"prompt": text, "prompt_token_ids": inputs.encode_chat(text)})
        return self._run(prompts, self._as_params_list(sampling_params, len(prompts)), use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search for each prompt (vLLM's API); returns outputs in prompt order.

        Each output holds the best `params.beam_width` sequences, best first, each with the
        prompt's tokens followed by the generated ones (its text leaves out an ending EOS token
        unless `params.include_stop_str_in_output`). Beams are scored as transformers'
        `generate(num_beams=..., length_penalty=...)` scores them, with its early stopping
        (`params.early_stopping`: False, True or "never", as in transformers).
        """
        self._generation_engine("beam_search")
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams; got {type(params).__name__}")
        engine = self.llm_engine
        check = SamplingParams(max_tokens=params.max_tokens, ignore_eos=params.ignore_eos)
        token_ids = [engine.validate(p, check)[1] for p in self._as_prompt_list(prompts)]
        early_stopping = params.early_stopping
        return run_beam_search(engine, token_ids, params, early_stopping=early_stopping, use_tqdm=use_tqdm)

    def reset_prefix_cache(self) -> bool:
        """Forgets the prefix cache's blocks (those no request holds); True if it is now empty."""
        return self._generation_engine("reset_prefix_cache").reset_prefix_cache()

    # ---- internals ----------------------------------------------------------------------------
    def _generation_engine(self, method: str) -> LLMEngine:
        if self.llm_engine is None:
            raise ValueError(f"{method} needs a text-generation model (task='generate'); this LLM was created "
                             f"with task='embed': use embed()")
        return self.llm_engine

    @staticmethod
    def _as_prompt_list(prompts) -> list[PromptType]:
        if isinstance(prompts, (str, Mapping)):
            return [prompts]
        if isinstance(prompts, (list, tuple)):
            if not prompts:
                raise ValueError("prompts must not be empty")
            if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
                return [list(prompts)]
            return list(prompts)
        raise ValueError(f"prompts must be a string, a dict or a list of them; got {type(prompts).__name__}")

    def _as_params_list(self, params, count: int) -> list[SamplingParams]:
        if params is None:
            return [self.get_default_sampling_params()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        if isinstance(params, (list, tuple)):
            if len(params) != count:
                raise ValueError(f"sampling_params has {len(params)} entries for {count} prompts")
            return list(params)
        raise ValueError(f"sampling_params must be a SamplingParams or a list of them; got {type(params).__name__}")

    def _run(self, prompts: list[PromptType], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        # Validate everything before queueing anything, so a bad prompt leaves the engine untouched.
        validated = [engine.validate(p, sp) for p, sp in zip(prompts, params)]
        ids: list[str] = []
        finished: dict[str, RequestOutput] = {}
        bar = _progress_bar(len(prompts)) if use_tqdm else None
        start, out_tokens = time.perf_counter(), 0
        try:
            # Inside the try: a request that fails to queue takes back those queued before it.
            for prompt, sp, checked in zip(prompts, params, validated):
                rid = engine.new_request_id()
                engine.add_request(rid, prompt, sp, validated=checked, stream=False)
                ids.append(rid)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        if bar is not None:
                            out_tokens += sum(len(c.token_ids) for c in out.outputs)
                            bar.set_postfix_str(f"{out_tokens / (time.perf_counter() - start):.1f} output tok/s")
                            bar.update(1)
        except BaseException:
            engine.abort_request([rid for rid in ids if rid not in finished])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[rid] for rid in ids]


def _progress_bar(total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
