"""Everything a user can set when creating an engine, with vLLM's names, turned into configs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagellm.config import CacheConfig, ModelConfig, SchedulerConfig, parse_dtype, parse_memory_size
from pagellm.models.loader import LOAD_FORMATS

TASKS = ("generate", "embed")
RUNNERS = ("auto", "generate", "pooling")


def resolve_task(task: str | None, runner: str | None = None) -> str:
    """The engine task from vLLM's two spellings: task ("generate", "embed" or its old name
    "embedding") and runner ("auto", "generate", "pooling"; "pooling" means embed here).
    Neither given: "generate". Raises ValueError when they disagree or a value is unknown."""
    if runner is not None and runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}; got {runner!r}")
    if task == "embedding":
        task = "embed"
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    implied = {"generate": "generate", "pooling": "embed"}.get(runner or "auto")
    if task is not None and implied is not None and task != implied:
        raise ValueError(f"task={task!r} contradicts runner={runner!r}")
    return task or implied or "generate"


@dataclass(frozen=True)
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    kv_cache_memory: int | float | str | None = None
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    seed: int = 0
    enforce_eager: bool = False
    load_format: str = "auto"
    generation_config: str = "auto"
    device: str = "auto"
    attention_backend: str | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    trust_remote_code: bool = False
    skip_tokenizer_init: bool = False
    served_model_name: str | None = None
    task: str = "generate"  # "generate" (LLMEngine) or "embed" (EmbeddingEngine); see resolve_task
    # Who drives the engine: "llm" (offline batches) or "server". As in vLLM, the offline API takes
    # larger steps by default on a GPU (16,384 tokens against the server's 8,192, which keeps
    # decode latency lower while prompts arrive).
    usage_context: str = "llm"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        if self.usage_context not in ("llm", "server"):
            raise ValueError(f"usage_context must be 'llm' or 'server'; got {self.usage_context!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {self.load_format!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]'; got {self.device!r}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1; got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1; got {self.max_model_len}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool; got {self.enable_prefix_caching!r}")
        parse_dtype(self.dtype)
        parse_memory_size(self.kv_cache_memory, "kv_cache_memory")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but CUDA is not available on this machine")
        return torch.device(self.device)

    def resolve_dtype(self, hf_config, device: torch.device) -> torch.dtype:
        """'auto': the checkpoint's half-precision dtype if it names one (fp16 becomes bf16 on the
        CPU); otherwise bfloat16 on GPUs and float32 on the CPU (a dequantized GGUF names none, and
        small models such as SmolLM2-135M lose their answers in bf16)."""
        dtype = parse_dtype(self.dtype)
        if dtype is not None:
            return dtype
        stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(stored, str):
            stored = parse_dtype(stored) if stored != "auto" else None
        if stored == torch.float16:
            return torch.float16 if device.type == "cuda" else torch.bfloat16
        if stored == torch.bfloat16:
            return torch.bfloat16
        return torch.bfloat16 if device.type == "cuda" else torch.float32

    def create_model_config(self, source, architecture: str, spec, device: torch.device) -> ModelConfig:
        limit = spec.max_position
        max_len = self.max_model_len or limit
        if max_len > limit:
            raise ValueError(f"max_model_len ({max_len}) must be <= the model's max_position_embeddings ({limit})")
        return ModelConfig(
            model=self.served_model_name or source.model, architecture=architecture,
            dtype=self.resolve_dtype(source.hf_config, device), max_model_len=max_len,
            vocab_size=spec.vocab_size, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim, load_format=source.load_format, generation_config=self.generation_config,
            seed=self.seed, enforce_eager=self.enforce_eager)

    def create_cache_config(self) -> CacheConfig:
        return CacheConfig(block_size=self.block_size,
                           kv_cache_memory=parse_memory_size(self.kv_cache_memory, "kv_cache_memory"),
                           gpu_memory_utilization=self.gpu_memory_utilization,
                           num_gpu_blocks_override=self.num_gpu_blocks_override)

    def create_scheduler_config(self, max_model_len: int, device: torch.device) -> SchedulerConfig:
        if device.type == "cuda":
            default_tokens = 16384 if self.usage_context == "llm" else 8192
        else:
            default_tokens = 2048
        tokens = self.max_num_batched_tokens or (default_tokens if self.enable_chunked_prefill
                                                 else max(default_tokens, max_model_len))
        return SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=tokens,
                               max_model_len=max_model_len, enable_chunked_prefill=self.enable_chunked_prefill)
