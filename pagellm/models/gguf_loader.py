"""GGUF files as HF-shaped model sources: config, tokenizer and weights from one .gguf file.

The engine's models speak HF checkpoint names and layouts, so everything here converts to
them: metadata keys become a transformers config, the vocabulary becomes a fast HF
tokenizer, and tensors are dequantized to float32, renamed, and (for Llama) have
llama.cpp's rotary row reordering undone.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from pagellm.models.source_gguf_file import GGUFFile

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _ArchSpec:
    """How one GGUF `general.architecture` maps onto transformers."""

    architecture: str  # the HF class name put in config.architectures
    model_type: str  # transformers model_type for AutoConfig.for_model
    interleaved_qk: bool  # llama.cpp's converter permuted q/k rows for this architecture
    block_names: dict[str, str] | None = None  # per-block tensor names that differ from _BLOCK_NAMES
    norm_plus_one: bool = False  # llama.cpp stored Gemma's (1 + w) norm weights; HF stores w


# Gemma 2 / 3 blocks have four norms: ffn_norm is the pre-MLP one, not Llama's post-attention one.
_GEMMA2_BLOCK_NAMES = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

_ARCHS: dict[str, _ArchSpec] = {
    "llama": _ArchSpec("LlamaForCausalLM", "llama", interleaved_qk=True),
    "qwen2": _ArchSpec("Qwen2ForCausalLM", "qwen2", interleaved_qk=False),
    "qwen3": _ArchSpec("Qwen3ForCausalLM", "qwen3", interleaved_qk=False),
    "gemma3": _ArchSpec("Gemma3ForCausalLM", "gemma3_text", interleaved_qk=False,
                        block_names=_GEMMA2_BLOCK_NAMES, norm_plus_one=True),
}

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Pre-tokenization per `tokenizer.ggml.pre`, as llama.cpp's tokenizer applies it.
# GPT-2's split rule; ByteLevel(use_regex=True) applies exactly this.
_DIGITS_THEN_GPT2 = "digits+gpt2"
_GPT2 = "gpt2"
# Llama 3 style rule: digits in runs of up to three, case-insensitive contractions.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2 style rule: as Llama 3 but every digit on its own.
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BPE_PRE: dict[str, str] = {
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2,
    "gpt-2": _GPT2,
    "llama-bpe": _LLAMA3_REGEX,
    "llama3": _LLAMA3_REGEX,
    "smaug-bpe": _LLAMA3_REGEX,
    "qwen2": _QWEN2_REGEX,
}


def _require(gguf: GGUFFile, key: str) -> Any:
    if key not in gguf.metadata:
        raise ValueError(f"GGUF file {gguf.path} lacks metadata key {key!r}")
    return gguf.metadata[key]


def _as_float(value: Any) -> float:
    # GGUF stores float32; its shortest decimal (1e-05, not 9.9999997e-06) is what HF configs hold.
    return float(str(np.float32(value)))


def _arch_spec(gguf: GGUFFile) -> tuple[str, _ArchSpec]:
    arch = _require(gguf, "general.architecture")
    if arch not in _ARCHS:
        raise ValueError(f"GGUF file {gguf.path} has general.architecture {arch!r}; "
                         f"the GGUF loader supports {sorted(_ARCHS)}")
    return arch, _ARCHS[arch]


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str:
    """HF checkpoint name for a llama.cpp tensor name of architecture `arch`, e.g. blk.3.attn_q.weight
    -> model.layers.3.self_attn.q_proj.weight. Raises ValueError for names with no HF match."""
    match = _BLOCK_TENSOR.fullmatch(gguf_name)
    if match is not None:
        layer, part, suffix = match.groups()
        block_names = {**_BLOCK_NAMES, **(_ARCHS[arch].block_names or {})} if arch in _ARCHS else _BLOCK_NAMES
        if part in block_names:
            return f"model.layers.{layer}.{block_names[part]}.{suffix}"
    else:
        stem, _, suffix = gguf_name.rpartition(".")
        if stem in _TOP_LEVEL_NAMES and suffix in ("weight", "bias"):
            return f"{_TOP_LEVEL_NAMES[stem]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no HF equivalent in this loader")


def _special_token_ids(gguf: GGUFFile) -> dict[str, int]:
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
            "pad": "padding_token_id", "eot": "eot_token_id", "eom": "eom_token_id"}
    return {role: int(gguf.metadata[f"tokenizer.ggml.{key}"]) for role, key in keys.items()
            if f"tokenizer.ggml.{key}" in gguf.metadata}


def gguf_hf_config(gguf: GGUFFile) -> Any:
    """A transformers PretrainedConfig (e.g. LlamaConfig) built from the GGUF metadata.

    Also checks that every tensor has an HF name, so unsupported files fail at open time.
    Raises ValueError naming the file for unsupported architectures, rope scaling, or
    missing metadata.
    """
    from transformers import AutoConfig

    arch, spec = _arch_spec(gguf)
    for name in gguf.tensors:
        if name == "rope_freqs.weight":
            raise ValueError(f"GGUF file {gguf.path} uses per-frequency rope scaling "
                             f"(rope_freqs), which the GGUF loader does not support")
        hf_tensor_name(name, arch)
    scaling = gguf.metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"GGUF file {gguf.path} uses rope scaling {scaling!r}, "
                         f"which the GGUF loader does not support")
    if "token_embd.weight" not in gguf.tensors:
        raise ValueError(f"GGUF file {gguf.path} has no token_embd.weight tensor")

    hidden_size = int(_require(gguf, f"{arch}.embedding_length"))
    num_heads = int(_require(gguf, f"{arch}.attention.head_count"))
    num_kv_heads = gguf.metadata.get(f"{arch}.attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, np.ndarray):  # per-layer counts; uniform ones are a scalar
        if len(set(num_kv_heads.tolist())) != 1:
            raise ValueError(f"GGUF file {gguf.path} has per-layer kv head counts, "
                             f"which the GGUF loader does not support")
        num_kv_heads = num_kv_heads[0]
    vocab_size = gguf.metadata.get(f"{arch}.vocab_size",
                                   gguf.tensors["token_embd.weight"].shape[0])
    kwargs: dict[str, Any] = dict(
        architectures=[spec.architecture],
        hidden_size=hidden_size,
        intermediate_size=int(_require(gguf, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_require(gguf, f"{arch}.block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(num_kv_heads),
        head_dim=int(gguf.metadata.get(f"{arch}.attention.key_length", hidden_size // num_heads)),
        rms_norm_eps=_as_float(_require(gguf, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=_as_float(gguf.metadata.get(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_require(gguf, f"{arch}.context_length")),
        vocab_size=int(vocab_size),
        tie_word_embeddings="output.weight" not in gguf.tensors,
    )
    if spec.model_type == "llama":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in gguf.tensors
    if spec.model_type == "gemma3_text":
        kwargs.update(_gemma3_config(gguf, arch, kwargs))
    special = _special_token_ids(gguf)
    if "bos" in special:
        kwargs["bos_token_id"] = special["bos"]
    if "eos" in special:
        kwargs["eos_token_id"] = special["eos"]
    return AutoConfig.for_model(spec.model_type, **kwargs)


def _gemma3_config(gguf: GGUFFile, arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a Gemma 3 config needs beyond the common keys, with llama.cpp's fixed choices where the
    file is silent: every 6th layer global, local RoPE base 10k, queries scaled by head_dim^-1/2."""
    extra: dict[str, Any] = dict(
        sliding_window=int(_require(gguf, f"{arch}.attention.sliding_window")),
        query_pre_attn_scalar=kwargs["head_dim"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta")},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    )
    pattern = gguf.metadata.get(f"{arch}.attention.sliding_window_pattern")
    if pattern is not None:
        layers = kwargs["num_hidden_layers"]
        if isinstance(pattern, np.ndarray):  # one flag per layer: True = sliding
            sliding = [bool(v) for v in pattern.tolist()]
        else:
            sliding = [bool((i + 1) % int(pattern)) for i in range(layers)]
        extra["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    softcap = gguf.metadata.get(f"{arch}.final_logit_softcapping")
    if softcap is not None:
        extra["final_logit_softcapping"] = _as_float(softcap)
    return extra


def gguf_generation_config(gguf: GGUFFile) -> dict[str, Any]:
    """{"bos_token_id", "eos_token_id"} from the tokenizer metadata. eos is a list when the
    file also names a distinct end-of-turn/end-of-message token, since chat models stop on it."""
    special = _special_token_ids(gguf)
    config: dict[str, Any] = {}
    if "bos" in special:
        config["bos_token_id"] = special["bos"]
    stops = [special[role] for role in ("eos", "eot", "eom") if role in special]
    stops = list(dict.fromkeys(stops))  # dedupe, keep order
    if stops:
        config["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    return config


def undo_rotary_interleave(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Restores HF's q/k row order from llama.cpp's.

    HF Llama rotates the two halves of each head's dimensions against each other; llama.cpp
    rotates adjacent pairs, so its converter reorders each head's rows from (half, pair) to
    (pair, half). This is the inverse. Works for weights (rows, in) and biases (rows,).
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot split {rows} rows into {num_heads} heads of even size")
    head_dim = rows // num_heads
    # (heads, head_dim/2 pairs, 2 halves, *rest) -> (heads, 2 halves, head_dim/2, *rest)
    split = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return split.transpose(1, 2).reshape(weight.shape)


def iter_gguf_weights(gguf: GGUFFile, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor in the file, dequantized one at a time."""
    arch, spec = _arch_spec(gguf)
    permuted_heads = {"attn_q": hf_config.num_attention_heads,
                      "attn_k": hf_config.num_key_value_heads} if spec.interleaved_qk else {}
    for gguf_name in gguf.tensors:
        hf_name = hf_tensor_name(gguf_name, arch)
        tensor = torch.from_numpy(gguf.dequantize(gguf_name))
        block = _BLOCK_TENSOR.fullmatch(gguf_name)
        if block is not None and block.group(2) in permuted_heads:
            tensor = undo_rotary_interleave(tensor, permuted_heads[block.group(2)])
        if spec.norm_plus_one and gguf_name.endswith("norm.weight"):
            tensor = tensor - 1.0
        yield hf_name, tensor


def gguf_tokenizer(gguf: GGUFFile) -> Any:
    """A fast HF tokenizer from the GGUF vocabulary, with special tokens and chat template.

    Byte-level BPE vocabularies with a known pre-tokenizer are built directly (well under a
    second); anything else goes through transformers' own GGUF conversion, which is correct
    for more vocabularies but re-reads the whole header with gguf.GGUFReader (seconds).
    """
    kind = gguf.metadata.get("tokenizer.ggml.model")
    pre = gguf.metadata.get("tokenizer.ggml.pre", "default")
    if kind == "gpt2" and pre in _BPE_PRE:
        tokenizer = _byte_level_bpe_tokenizer(gguf, _BPE_PRE[pre])
    elif kind == "llama" and gguf.metadata.get("general.architecture") in _SPM_BPE_ARCHS:
        tokenizer = _sentencepiece_bpe_tokenizer(gguf)
    else:
        logger.info("GGUF tokenizer %r/%r: using transformers' GGUF conversion", kind, pre)
        tokenizer = _transformers_gguf_tokenizer(gguf)
    template = gguf.metadata.get("tokenizer.chat_template")
    if template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    return tokenizer


def _transformers_gguf_tokenizer(gguf: GGUFFile) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(gguf.path.parent), gguf_file=gguf.path.name)
    except Exception as exc:  # transformers raises many types for unknown vocabularies
        raise ValueError(f"cannot build a tokenizer from GGUF file {gguf.path}: {exc}") from exc


# Architectures whose "llama" (SentencePiece) vocabulary is a BPE model, built here directly:
# transformers' GGUF conversion treats Gemma's vocabulary as Unigram, which splits words differently.
_SPM_BPE_ARCHS = ("gemma3",)
_TOKEN_NORMAL = 1
_SPACE = "\u2581"  # SentencePiece's visible space


def _sentencepiece_merges(tokens: list[str], scores: np.ndarray, token_types: np.ndarray | None
                          ) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece BPE: llama.cpp (and SentencePiece) repeatedly merge the
    adjacent pair whose joined piece has the highest score, so every split of a normal piece into two
    vocabulary pieces is a merge, ranked by the joined piece's score."""
    vocab = {token: i for i, token in enumerate(tokens)}
    ranked: list[tuple[float, int, str, str]] = []
    for index, piece in enumerate(tokens):
        if token_types is not None and token_types[index] != _TOKEN_NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[index]), index, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def _sentencepiece_bpe_tokenizer(gguf: GGUFFile) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    # Whitespace-run pieces are stored with real spaces; the model's own pieces use U+2581.
    tokens = [t.replace(" ", _SPACE) if t.strip(" ") == "" else t for t in _require(gguf, "tokenizer.ggml.tokens")]
    scores = np.asarray(_require(gguf, "tokenizer.ggml.scores"), dtype=np.float32)
    token_types = gguf.metadata.get("tokenizer.ggml.token_type")
    special = _special_token_ids(gguf)
    merges = _sentencepiece_merges(tokens, scores, token_types)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                     unk_token=tokens[special["unk"]] if "unk" in special else None,
                     fuse_unk=True, byte_fallback=True)
    backend = Tokenizer(bpe)
    replace_space = normalizers.Replace(" ", _SPACE)
    if gguf.metadata.get("tokenizer.ggml.add_space_prefix", True):
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), replace_space])
    else:
        backend.normalizer = replace_space
    backend.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])

    special_ids = set(special.values())
    user_ids: set[int] = set()
    if token_types is not None:
        special_ids |= set(np.flatnonzero(token_types == _TOKEN_CONTROL).tolist())
        user_ids = set(np.flatnonzero(token_types == _TOKEN_USER_DEFINED).tolist())
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special_ids)])
    # User-defined pieces (newline and whitespace runs, tags) are matched whole, on the normalized text.
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=True) for i in sorted(user_ids)])

    names = {role: tokens[token_id] for role, token_id in special.items() if token_id < len(tokens)}
    arch = gguf.metadata.get("general.architecture", "")
    max_length = gguf.metadata.get(f"{arch}.context_length")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=names.get("bos"), eos_token=names.get("eos"),
        unk_token=names.get("unk"), pad_token=names.get("pad"),
        add_bos_token=bool(gguf.metadata.get("tokenizer.ggml.add_bos_token", False)) and "bos" in names,
        add_eos_token=bool(gguf.metadata.get("tokenizer.ggml.add_eos_token", False)) and "eos" in names,
        clean_up_tokenization_spaces=False,
        model_max_length=int(max_length) if max_length is not None else int(1e30))


def _byte_level_bpe_tokenizer(gguf: GGUFFile, pre: str) -> Any:
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers, processors)
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = _require(gguf, "tokenizer.ggml.tokens")
    merges = [tuple(pair.split(" ", 1)) for pair in _require(gguf, "tokenizer.ggml.merges")]
    vocab = {token: index for index, token in enumerate(tokens)}
    # Llama 3 style vocabularies take a whole pre-token when it is in the vocabulary,
    # whatever the merges would do (llama.cpp's ignore_merges).
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                     ignore_merges=pre == _LLAMA3_REGEX)
    backend = Tokenizer(bpe)
    if pre == _GPT2:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre == _DIGITS_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:  # a custom split rule replaces ByteLevel's built-in GPT-2 one
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pre), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == _QWEN2_REGEX:
        backend.normalizer = normalizers.NFC()  # as Qwen2's own tokenizer.json
    backend.decoder = decoders.ByteLevel()

    token_types = gguf.metadata.get("tokenizer.ggml.token_type")
    special = _special_token_ids(gguf)
    special_ids = set(special.values())
    user_ids: set[int] = set()
    if token_types is not None:
        special_ids |= set(np.flatnonzero(token_types == _TOKEN_CONTROL).tolist())
        user_ids = set(np.flatnonzero(token_types == _TOKEN_USER_DEFINED).tolist())
    # Added tokens are matched before BPE, so "<|im_start|>" in text stays one token.
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i in sorted(special_ids) if i < len(tokens)])
    if user_ids:
        backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                            for i in sorted(user_ids)])

    names = {role: tokens[token_id] for role, token_id in special.items() if token_id < len(tokens)}
    add_bos = bool(gguf.metadata.get("tokenizer.ggml.add_bos_token", False)) and "bos" in names
    add_eos = bool(gguf.metadata.get("tokenizer.ggml.add_eos_token", False)) and "eos" in names
    # transformers turns add_bos_token/add_eos_token into the template post-processor itself
    # (and saves the flags with the tokenizer), so only the byte-level offset rule is set here.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)

    arch = gguf.metadata.get("general.architecture", "")
    max_length = gguf.metadata.get(f"{arch}.context_length")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=names.get("bos"),
        eos_token=names.get("eos"),
        unk_token=names.get("unk"),
        pad_token=names.get("pad"),
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
        model_max_length=int(max_length) if max_length is not None else int(1e30),
    )
