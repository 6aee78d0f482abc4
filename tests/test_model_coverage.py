"""Each added architecture against transformers on a tiny random-weight model (fp32, CPU).

Every model is built from a transformers config with the options that set its family apart
switched on (soft caps, sliding windows small enough to matter, partial rotary, parallel residual,
fused checkpoint tensors...), saved with `save_pretrained`, and run by both sides: greedy tokens must
be equal for 32 tokens on 4 prompts and the top-5 logprobs close (helpers.check_logprobs_close).
The vocabulary is small and there is no tokenizer: prompts are token ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from helpers import check_logprobs_close, engine_greedy_result, hf_greedy
from pagellm import LLM, SamplingParams

VOCAB = 512
MAX_TOKENS = 32
# Lengths 6, 1, 13 and 37: the longest crosses several 8-token KV blocks and every window below.
PROMPTS: list[list[int]] = [
    [1, 54, 375, 282, 464, 314],
    [42],
    [99, 28, 95, 146, 314, 17, 211, 30, 70, 127, 260, 220, 30],
    [(7 * i * i + 13 * i + 5) % VOCAB for i in range(37)],
]

# Small enough for every layer to be different, peaked enough (initializer_range 0.3) that
# fp32 rounding never flips a greedy choice.
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=None, pad_token_id=0)  # no EOS: HF's min_new_tokens would mask it


def _gemma():
    from transformers import GemmaConfig
    return GemmaConfig(**{**_COMMON, "tie_word_embeddings": True}, head_dim=16, hidden_act="gelu_pytorch_tanh")


# Gemma 2 / 3 scale the (tied) embeddings by sqrt(hidden) = 8: a smaller init keeps the tiny model
# from repeating one token forever, which would make a weak test.
_GEMMA: dict[str, Any] = dict(tie_word_embeddings=True, initializer_range=0.1)


def _gemma2():
    from transformers import Gemma2Config
    # Caps low enough to bind on this model's scores and logits; window 8 on alternate layers.
    return Gemma2Config(**{**_COMMON, **_GEMMA}, head_dim=16, query_pre_attn_scalar=24,
                        attn_logit_softcapping=4.0, final_logit_softcapping=15.0, sliding_window=8)


def _gemma3():
    from transformers import Gemma3TextConfig
    return Gemma3TextConfig(**{**_COMMON, **_GEMMA, "num_hidden_layers": 3}, head_dim=16,
                            query_pre_attn_scalar=24, sliding_window=8,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                             "full_attention": {"rope_type": "default", "rope_theta": 1e6}})


def _phi3(original_max: int = 128):
    from transformers import Phi3Config
    # Half the head rotates; LongRoPE factors far from 1 so a wrong choice shows. Every test
    # sequence (37 + 32 tokens) stays within original_max_position_embeddings.
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.5, 2.0, 4.0], "long_factor": [3.0, 5.0, 9.0, 20.0],
            "original_max_position_embeddings": original_max}
    return Phi3Config(**_COMMON, hidden_act="silu", sliding_window=12, rope_parameters=rope,
                      original_max_position_embeddings=original_max)


def _mixtral():
    from transformers import MixtralConfig
    return MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=12)


def _qwen2_moe():
    from transformers import Qwen2MoeConfig
    # Layer 1 keeps a dense MLP (mlp_only_layers); the shared expert is wider than the routed ones.
    return Qwen2MoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1])


def _qwen3_moe():
    from transformers import Qwen3MoeConfig
    return Qwen3MoeConfig(**_COMMON, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          norm_topk_prob=True)


def _gpt2():
    from transformers import GPT2Config
    return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.3,
                      activation_function="gelu_new", bos_token_id=1, eos_token_id=None, pad_token_id=0)


def _opt():
    from transformers import OPTConfig
    return OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256, init_std=0.3, word_embed_proj_dim=64, bos_token_id=1,
                     eos_token_id=None, pad_token_id=0)


def _gpt_neox():
    from transformers import GPTNeoXConfig
    return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=256, initializer_range=0.3,
                         rotary_pct=0.25, use_parallel_residual=True, bos_token_id=1, eos_token_id=None,
                         pad_token_id=0)


def _falcon(**variant: Any):
    from transformers import FalconConfig
    return FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=256, initializer_range=0.3, bos_token_id=1, eos_token_id=None,
                        pad_token_id=0, **variant)


CONFIGS: dict[str, Callable[[], Any]] = {
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "gpt2": _gpt2,
    "opt": _opt,
    "gpt_neox": _gpt_neox,
    # falcon-7b: one K/V head, one norm shared by the parallel branches, no biases.
    "falcon_7b": lambda: _falcon(multi_query=True, parallel_attn=True, bias=False),
    # falcon-40b: grouped K/V heads, two norms.
    "falcon_40b": lambda: _falcon(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, bias=False),
    # falcon (sequential, per-head qkv, biases).
    "falcon_seq": lambda: _falcon(multi_query=False, parallel_attn=False, bias=True),
}


def build_tiny(folder: Path, config, seed: int = 0) -> Path:
    """Saves a random-weight model of `config` with random biases and non-trivial norm weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name.split(".")[-2]:
                param.uniform_(0.5, 1.5) if name.endswith("weight") else param.normal_(0.0, 0.3)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    return folder


def hf_model(folder: Path, **config_overrides: Any):
    """transformers' model in fp32 with eager attention: SDPA would skip Gemma 2's attention soft cap."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(folder)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def engine_greedy(folder: Path, prompts=PROMPTS, **llm_kwargs):
    kwargs = dict(dtype="float32", kv_cache_memory="8MiB", skip_tokenizer_init=True, block_size=8,
                  max_num_batched_tokens=24)
    kwargs.update(llm_kwargs)
    llm = LLM(str(folder), **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.llm_engine.kv_cache.num_used_blocks == 0
    return [engine_greedy_result(o) for o in outputs]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = build_tiny(tmp_path_factory.mktemp(f"tiny_{kind}"), CONFIGS[kind]())
        return cache[kind]
    return get


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_greedy_and_logprobs_match_transformers(kind: str, tiny_dirs) -> None:
    folder = tiny_dirs(kind)
    theirs = hf_greedy(hf_model(folder), PROMPTS, MAX_TOKENS)
    # block_size 8 and a 24-token budget: prompts span several blocks and prefill is chunked.
    ours = engine_greedy(folder)
    assert all(len(r.token_ids) == MAX_TOKENS for r in ours)
    check_logprobs_close(ours, theirs, atol=1e-3, require_equal=True)
    assert [r.token_ids for r in ours] == [r.token_ids for r in theirs]


def test_phi3_longrope_past_the_original_limit() -> None:
    """Positions past original_max_position_embeddings rotate with HF's long factors, earlier ones
    with its short factors (HF picks per sequence length; see pagellm/models/phi3.py)."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    from pagellm.models.phi3 import Phi3ForCausalLM

    config = _phi3(original_max=32)
    ours = Phi3ForCausalLM(config).model.rotary
    hf = Phi3RotaryEmbedding(config)
    x = torch.zeros(1, 1, 16)
    for positions in (torch.arange(0, 32), torch.arange(0, 100)):
        cos, sin = hf(x, positions[None])  # [1, P, rotary_dim]; long factors once P > 32
        tail = slice(32, None) if len(positions) > 32 else slice(None)
        ours_cs = ours.cos_sin(positions, torch.float32)  # [2, P, 1, rotary_dim]
        torch.testing.assert_close(ours_cs[0, tail, 0], cos[0, tail])
        torch.testing.assert_close(ours_cs[1, tail, 0], sin[0, tail])
    # The short and long tables really differ, so the check above tells them apart.
    short_cos, _ = hf(x, torch.arange(0, 32)[None])
    long_cos, _ = hf(x, torch.arange(0, 100)[None])
    assert not torch.allclose(short_cos[0, 1:32], long_cos[0, 1:32], atol=1e-3)


def _differs(a, b) -> bool:
    """Whether two greedy runs differ in a token or in a top logprob by more than 0.01."""
    for ra, rb in zip(a, b):
        if ra.token_ids != rb.token_ids:
            return True
        for ta, tb in zip(ra.top_logprobs, rb.top_logprobs):
            if any(abs(ta[k] - tb.get(k, float("-inf"))) > 1e-2 for k in ta):
                return True
    return False


# Each option the comparison above relies on really changes transformers' output on the long
# prompt, so a model that ignored it would have failed there.
OPTION_SWITCHES = [
    ("gemma2", dict(attn_logit_softcapping=None)),
    ("gemma2", dict(final_logit_softcapping=None)),
    ("gemma2", dict(sliding_window=1000)),
    ("gemma3", dict(sliding_window=1000)),
    ("gemma3", dict(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e6},
                                     "full_attention": {"rope_type": "default", "rope_theta": 1e6}})),
    ("phi3", dict(sliding_window=None)),
    ("phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    ("mixtral", dict(sliding_window=None)),
    ("qwen2_moe", dict(norm_topk_prob=True)),
    ("gpt_neox", dict(use_parallel_residual=False)),
]


@pytest.mark.parametrize("kind,overrides", OPTION_SWITCHES, ids=lambda v: v if isinstance(v, str) else ",".join(v))
def test_distinguishing_options_matter(kind: str, overrides: dict, tiny_dirs) -> None:
    folder = tiny_dirs(kind)
    prompt = PROMPTS[3:4]
    assert _differs(hf_greedy(hf_model(folder), prompt, MAX_TOKENS),
                    hf_greedy(hf_model(folder, **overrides), prompt, MAX_TOKENS))


def test_every_architecture_is_registered() -> None:
    from pagellm.models.registry import resolve_model_class, supported_architectures

    for kind, make in CONFIGS.items():
        config = make()
        name = type(config).__name__
        arch = {"Gemma3TextConfig": "Gemma3ForCausalLM", "GPT2Config": "GPT2LMHeadModel"}.get(
            name, name.replace("Config", "ForCausalLM"))
        config.architectures = [arch]
        assert resolve_model_class(config)[0] == arch
        assert arch in supported_architectures()


@pytest.mark.parametrize("kind,overrides,message", [
    ("falcon_7b", dict(alibi=True), "alibi"),
    ("opt", dict(do_layer_norm_before=False), "do_layer_norm_before"),
    ("opt", dict(word_embed_proj_dim=32), "word_embed_proj_dim"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ("gpt2", dict(activation_function="mish"), "hidden_act"),
    ("mixtral", dict(num_experts_per_tok=5), "num_experts_per_tok"),
])
def test_unsupported_variants_fail_clearly(kind: str, overrides: dict, message: str) -> None:
    from pagellm.models.registry import resolve_model_class

    config = CONFIGS[kind]()
    for key, value in overrides.items():
        setattr(config, key, value)
    arch = {"falcon_7b": "FalconForCausalLM", "opt": "OPTForCausalLM", "gpt2": "GPT2LMHeadModel",
            "mixtral": "MixtralForCausalLM"}[kind]
    config.architectures = [arch]
    _, cls = resolve_model_class(config)
    with pytest.raises(ValueError, match=message):
        cls(config)
