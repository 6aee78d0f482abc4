"""The decoder-only transformer that Llama-family models share, described by a DecoderSpec.

An architecture file turns its HF config into a spec (what differs: biases, q/k norms, sliding
window, norm kind, parallel residual...) and inherits everything else from here. Checkpoints whose
tensor names or layouts differ from Llama's are translated in the architecture's `remap_weights`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from pagellm.layers.activation import SiluAndMul, gated_activation, get_activation
from pagellm.layers.attention.backend import AttentionMetadata
from pagellm.layers.attention.layer import PagedAttention
from pagellm.layers.layernorm import LayerNorm
from pagellm.layers.linear import Linear, cpu_prepacked_weight, linear
from pagellm.layers.norm import RMSNorm
from pagellm.layers.rotary import RotaryEmbedding, rope_inv_freq

_NORM_TYPES = ("rms", "layer")
_POSITION_EMBEDDINGS = ("rope", "learned")


@dataclass(frozen=True)
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float  # the eps of every norm, RMSNorm or LayerNorm
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    # Options other families switch on; the defaults give the Llama layer.
    norm_type: str = "rms"  # "rms" | "layer" (LayerNorm with bias)
    norm_offset: float = 0.0  # Gemma stores RMSNorm weights as w - 1
    hidden_act: str = "silu"
    gated_mlp: bool = True  # down(act(gate) * up); False: down(act(up))
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_soft_cap: float | None = None  # cap * tanh(scores / cap) (Gemma 2)
    final_soft_cap: float | None = None  # the same on the final logits
    layer_windows: tuple[int | None, ...] | None = None  # per-layer sliding window; None: `sliding_window` on all
    embed_scale: float | None = None  # token embeddings times this (Gemma: sqrt(hidden))
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too (Gemma 2 / 3)
    parallel_residual: bool = False  # attention and MLP read the same layer input (GPT-NeoX, Falcon)
    shared_input_norm: bool = False  # parallel layer whose branches share one norm (Falcon-7B)
    rotary_dim: int | None = None  # partial rotary: only the first rotary_dim dims of a head rotate
    position_embedding: str = "rope"  # "rope" | "learned" (a table added to the token embeddings)
    position_offset: int = 0  # learned table row of position 0 (OPT: 2)
    final_norm: bool = True
    lm_head_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if self.norm_type not in _NORM_TYPES:
            raise ValueError(f"norm_type must be one of {_NORM_TYPES}; got {self.norm_type!r}")
        if self.position_embedding not in _POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding must be one of {_POSITION_EMBEDDINGS}; "
                             f"got {self.position_embedding!r}")
        if self.layer_windows is not None and len(self.layer_windows) != self.num_layers:
            raise ValueError(f"layer_types must name one attention type per layer ({self.num_layers}); "
                             f"got {len(self.layer_windows)}")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"the rotary dimension must be even and in (0, head_dim={self.head_dim}]; "
                             f"got {self.rotary_dim}")
        get_activation(self.hidden_act)  # an unknown activation fails here, with its name

    @classmethod
    def from_hf(cls, c, **overrides) -> DecoderSpec:
        """Reads the fields every Llama-style HF config has."""
        num_heads = c.num_attention_heads
        fields = dict(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers, num_heads=num_heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // num_heads,
            rms_norm_eps=c.rms_norm_eps, max_position=c.max_position_embeddings,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        )
        fields.update(overrides)
        return cls(**fields)

    def window_of(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: full attention)."""
        return self.sliding_window if self.layer_windows is None else self.layer_windows[layer]


def layer_windows_from_hf(c, num_layers: int) -> tuple[int | None, ...] | None:
    """Per-layer windows from a HF config's `layer_types` ("sliding_attention" layers get `sliding_window`)."""
    types = getattr(c, "layer_types", None)
    window = getattr(c, "sliding_window", None)
    if not types or window is None:
        return None
    return tuple(window if t == "sliding_attention" else None for t in types[:num_layers])


def rotary_dim_from_hf(c, head_dim: int) -> int | None:
    """The rotated width of a head when the config asks for partial rotary (`partial_rotary_factor`)."""
    params = getattr(c, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", None))
    return None if factor is None or factor == 1.0 else int(head_dim * factor)


def rename(name: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    """Applies the first (pattern, replacement) rule whose pattern matches all of `name`; None if none does."""
    for pattern, replacement in rules:
        if pattern.fullmatch(name):
            return pattern.sub(replacement, name)
    return None


def renamed(weights: Iterable[tuple[str, torch.Tensor]], rules: list[tuple[re.Pattern, str]],
            skip: re.Pattern | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint (name, tensor) pairs under our names. Names matching `skip` (buffers such as
    attention masks) are dropped; a name no rule covers raises ValueError."""
    for name, tensor in weights:
        if skip is not None and skip.fullmatch(name):
            continue
        ours = rename(name, rules)
        if ours is None:
            raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
        yield ours, tensor


def regroup_qkv(tensor: torch.Tensor, num_kv_heads: int, group: int, head_dim: int) -> torch.Tensor:
    """A fused qkv weight or bias stored per KV head ([Hkv, group q heads + k + v, D, ...] rows, as
    GPT-NeoX (group 1) and Falcon store it) -> [q heads | k heads | v heads] rows, our fused layout."""
    rest = tensor.shape[1:]
    per_kv = tensor.reshape(num_kv_heads, group + 2, head_dim, *rest)  # [Hkv, G + 2, D, ...]
    q = per_kv[:, :group].reshape(num_kv_heads * group * head_dim, *rest)
    k = per_kv[:, group].reshape(num_kv_heads * head_dim, *rest)
    v = per_kv[:, group + 1].reshape(num_kv_heads * head_dim, *rest)
    return torch.cat([q, k, v])


def make_norm(spec: DecoderSpec, size: int | None = None) -> nn.Module:
    """The spec's norm over `size` features (default: hidden size)."""
    size = size or spec.hidden_size
    if spec.norm_type == "layer":
        return LayerNorm(size, spec.rms_norm_eps)
    return RMSNorm(size, spec.rms_norm_eps, offset=spec.norm_offset)


class DecoderAttention(nn.Module):
    def __init__(self, spec: DecoderSpec, rotary: RotaryEmbedding | None, sliding_window: int | None = None) -> None:
        super().__init__()
        h, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, d
        self.qkv_proj = Linear(spec.hidden_size, [h * d, hkv * d, hkv * d], bias=spec.qkv_bias)
        self.o_proj = Linear(h * d, spec.hidden_size, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = make_norm(spec, d)
            self.k_norm = make_norm(spec, d)
        self.qk_norm = spec.qk_norm
        self.rotary = rotary
        self.fused_rope = False  # set by DecoderModel.enable_triton
        scale = spec.attn_scale if spec.attn_scale is not None else d ** -0.5
        self.attn = PagedAttention(h, hkv, d, scale=scale, sliding_window=sliding_window,
                                   logits_soft_cap=spec.attn_soft_cap)

    @property
    def can_fuse_rope(self) -> bool:
        """Whether the Triton q/k norm + RoPE kernel covers this layer (full-width RoPE, RMS q/k norms)."""
        return (self.rotary is not None and self.rotary.rotary_dim == self.head_dim
                and (not self.qk_norm or isinstance(self.q_norm, RMSNorm)))

    def _kv_cache_target(self, num_tokens: int, meta: AttentionMetadata) -> tuple | None:
        """(k_cache, v_cache, slot_mapping) where a fused kernel can store this step's K/V itself
        (one slot per token, a paged cache allocated), else None."""
        if meta.slot_mapping.shape[0] != num_tokens or self.attn.k_cache.dim() != 4:
            return None
        return self.attn.k_cache, self.attn.v_cache, meta.slot_mapping

    def _norm_rotate_and_cache(self, qkv: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> bool:
        """The q/k norms (if any) and RoPE on qkv [T, H + 2 Hkv, D], in place, as one Triton kernel that
        also stores the step's K/V in this layer's cache when it can. Returns whether it stored them."""
        from pagellm.kernels.triton.rotary import qk_norm_rope_
        table = self.rotary.cos_sin_cache
        cache = self._kv_cache_target(qkv.shape[0], meta)
        if self.qk_norm:  # q and k norms share eps and offset (one spec)
            qk_norm_rope_(qkv, self.num_heads, self.num_kv_heads, positions, table, self.q_norm.weight,
                          self.k_norm.weight, self.q_norm.eps, self.q_norm.offset, kv_cache=cache)
        else:
            qk_norm_rope_(qkv, self.num_heads, self.num_kv_heads, positions, table, kv_cache=cache)
        return cache is not None

    def _project_rotate_and_cache(self, x: torch.Tensor, positions: torch.Tensor,
                                  meta: AttentionMetadata) -> torch.Tensor | None:
        """Decode batches without q/k norms: the qkv product, RoPE and the K/V cache stores as one
        skinny-GEMM launch (kernels/triton/skinny_gemm.py). Returns qkv [T, H + 2 Hkv, D], or None
        where that kernel does not take the step."""
        proj = self.qkv_proj
        if self.qk_norm or not proj.use_triton or x.dim() != 2 or x.stride(-1) != 1:
            return None
        cache = self._kv_cache_target(x.shape[0], meta)
        if cache is None:
            return None
        from pagellm.kernels.triton.skinny_gemm import rope_config, skinny_gemm_rope
        config = rope_config(x.shape[0], proj.out_features, proj.in_features, self.head_dim, x.device)
        if config is None:
            return None
        qkv = skinny_gemm_rope(x, proj.weight, proj.bias, config=config, num_q_heads=self.num_heads,
                               num_kv_heads=self.num_kv_heads, positions=positions,
                               cos_sin_cache=self.rotary.cos_sin_cache, kv_cache=cache)
        return qkv.view(x.shape[0], -1, self.head_dim)

    def forward(self, cos_sin: torch.Tensor | None, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """`cos_sin`: the step's rotary rows (RotaryEmbedding.cos_sin), or the positions [T] once the
        fused kernel is on (it reads this layer's rotary table itself)."""
        t, h, hkv = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self._project_rotate_and_cache(x, cos_sin, meta) if self.fused_rope else None
        kv_written = qkv is not None  # the projection's epilogue rotated q and k and cached k and v
        if qkv is None:
            qkv = self.qkv_proj(x).view(t, h + 2 * hkv, self.head_dim)  # [T, H + 2 Hkv, D]
            if self.fused_rope:
                kv_written = self._norm_rotate_and_cache(qkv, cos_sin, meta)
        v = qkv[:, h + hkv:]  # [T, Hkv, D]
        if self.fused_rope:
            q, k = qkv[:, :h], qkv[:, h:h + hkv]
        elif self.qk_norm:
            q, k = self.q_norm(qkv[:, :h]), self.k_norm(qkv[:, h:h + hkv])  # [T, H, D], [T, Hkv, D]
            if self.rotary is not None:
                q, k = self.rotary.rotate(q, cos_sin), self.rotary.rotate(k, cos_sin)
        elif self.rotary is not None:
            # q and k rotate together: one set of ops for both.
            qk = self.rotary.rotate(qkv[:, :h + hkv], cos_sin)  # [T, H + Hkv, D]
            q, k = qk[:, :h], qk[:, h:]
        else:
            q, k = qkv[:, :h], qkv[:, h:h + hkv]
        out = self.attn(q, k, v, meta, kv_written=kv_written)  # [T, H, D]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up fused into one projection."""

    def __init__(self, spec: DecoderSpec, intermediate_size: int | None = None) -> None:
        super().__init__()
        size = intermediate_size or spec.intermediate_size
        self.gate_up_proj = Linear(spec.hidden_size, [size] * 2, bias=spec.mlp_bias)
        self.down_proj = Linear(size, spec.hidden_size, bias=spec.mlp_bias)
        self.act = gated_activation(spec.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2 * size]
        if isinstance(self.act, SiluAndMul) and self.act.use_triton:
            fused = self.down_proj.forward_silu_gated(gate_up)  # decode batches: one kernel
            if fused is not None:
                return fused
        return self.down_proj(self.act(gate_up))


class MLP(nn.Module):
    """down(act(up(x))): the two-matrix MLP of GPT-2, OPT, GPT-NeoX and Falcon."""

    def __init__(self, spec: DecoderSpec, intermediate_size: int | None = None) -> None:
        super().__init__()
        size = intermediate_size or spec.intermediate_size
        self.up_proj = Linear(spec.hidden_size, size, bias=spec.mlp_bias)
        self.down_proj = Linear(size, spec.hidden_size, bias=spec.mlp_bias)
        self.act = get_activation(spec.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


def default_mlp(spec: DecoderSpec, layer: int) -> nn.Module:
    return GatedMLP(spec) if spec.gated_mlp else MLP(spec)


class DecoderLayer(nn.Module):
    """One block. The residual stream is carried separately so each norm can fuse the residual add.

    Sequential (pre-norm): x += attn(norm1(x)); x += mlp(norm2(x)); Gemma 2/3 also normalise the
    attention and MLP outputs ("sandwich"). Parallel (GPT-NeoX, Falcon): x += attn(norm1(x)) + mlp(norm2(x)).
    """

    def __init__(self, spec: DecoderSpec, rotary: RotaryEmbedding | None, layer: int = 0,
                 mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.sliding_window = spec.window_of(layer)
        self.self_attn = DecoderAttention(spec, rotary, self.sliding_window)
        self.mlp = mlp if mlp is not None else default_mlp(spec, layer)
        self.parallel = spec.parallel_residual
        self.sandwich = spec.sandwich_norms
        self.shared_norm = spec.parallel_residual and spec.shared_input_norm
        self.input_layernorm = make_norm(spec)
        if not self.shared_norm:
            self.post_attention_layernorm = make_norm(spec)
        if spec.sandwich_norms:
            self.pre_feedforward_layernorm = make_norm(spec)
            self.post_feedforward_layernorm = make_norm(spec)

    def forward(self, cos_sin, x, residual, meta):
        """x [T, hidden] is the last block's output, `residual` the stream before it (None at layer 0).
        Returns the same pair for the next block."""
        if self.parallel:
            if residual is not None:
                x = x + residual  # the stream this block reads and adds to
            h = self.input_layernorm(x)
            h_mlp = h if self.shared_norm else self.post_attention_layernorm(x)
            return self.self_attn(cos_sin, h, meta) + self.mlp(h_mlp), x
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(cos_sin, x, meta)
        if self.sandwich:
            x = self.post_attention_layernorm(x)
            x, residual = self.pre_feedforward_layernorm(x, residual)
            return self.post_feedforward_layernorm(self.mlp(x)), residual
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, spec: DecoderSpec, rotary: RotaryEmbedding | None,
                 make_mlp: Callable[[DecoderSpec, int], nn.Module] | None = None,
                 local_rotary: RotaryEmbedding | None = None) -> None:
        """`local_rotary`, if given, is the RoPE of the sliding-window layers (Gemma 3)."""
        super().__init__()
        self.rotary = rotary
        self.local_rotary = local_rotary
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        if spec.position_embedding == "learned":
            self.embed_positions = nn.Embedding(spec.max_position + spec.position_offset, spec.hidden_size)
        self.position_offset = spec.position_offset
        self.learned_positions = spec.position_embedding == "learned"
        if spec.embed_scale is not None:
            self.register_buffer("embed_scale", torch.tensor(spec.embed_scale), persistent=False)
        self.scale_embeddings = spec.embed_scale is not None
        make_mlp = make_mlp or default_mlp
        self.layers = nn.ModuleList(
            DecoderLayer(spec, local_rotary if local_rotary is not None and spec.window_of(i) else rotary, i,
                         make_mlp(spec, i))
            for i in range(spec.num_layers))
        self.norm = make_norm(spec) if spec.final_norm else None
        self.fused_rope = False

    def enable_triton(self) -> None:
        """Rotates q/k with the fused Triton kernel when every layer's attention allows it."""
        attentions = [layer.self_attn for layer in self.layers]
        if self.rotary is not None and all(a.can_fuse_rope for a in attentions):
            self.fused_rope = True
            for a in attentions:
                a.fused_rope = True

    def forward(self, input_ids, positions, meta):
        x, residual = self.embed_tokens(input_ids), None  # [T, hidden]
        if self.scale_embeddings:
            # Rounded to the model's dtype first, as HF multiplies.
            x = x * self.embed_scale.to(x.dtype)
        if self.learned_positions:
            x = x + self.embed_positions(positions + self.position_offset)
        if self.fused_rope:
            cos_sin = positions  # the fused kernel gathers each layer's cos/sin rows itself
        else:
            cos_sin = self.rotary.cos_sin(positions, x.dtype) if self.rotary is not None else None  # shared
        local_cos_sin = None
        if self.local_rotary is not None and not self.fused_rope:
            local_cos_sin = self.local_rotary.cos_sin(positions, x.dtype)
        for layer in self.layers:
            layer_cos_sin = local_cos_sin if local_cos_sin is not None and layer.sliding_window else cos_sin
            x, residual = layer(layer_cos_sin, x, residual, meta)
        if self.norm is None:
            return x if residual is None else x + residual
        if residual is None:
            return self.norm(x)
        x, _ = self.norm(x, residual)
        return x


class CausalLM(nn.Module):
    """A decoder plus its LM head. Subclasses provide `spec_from_config` and, where the family
    differs, `make_rotary`, `make_mlp` and `remap_weights`."""

    # checkpoint name fragment -> (our fused module, shard index)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    @classmethod
    def spec_from_config(cls, hf_config) -> DecoderSpec:
        return DecoderSpec.from_hf(hf_config)

    def __init__(self, hf_config) -> None:
        super().__init__()
        self.spec = spec = self.spec_from_config(hf_config)
        rotary, local_rotary = self.make_rotary(hf_config, spec)
        self.model = DecoderModel(spec, rotary, lambda s, layer: self.make_mlp(hf_config, s, layer), local_rotary)
        self.lm_head = None if spec.tie_word_embeddings else Linear(spec.hidden_size, spec.vocab_size,
                                                                    bias=spec.lm_head_bias)
        self.use_triton_head = False  # a tied head through the skinny kernel (enable_triton)

    def enable_triton(self) -> None:
        self.use_triton_head = True

    def make_rotary(self, hf_config, spec: DecoderSpec) -> tuple[RotaryEmbedding | None, RotaryEmbedding | None]:
        """(RoPE of every layer, RoPE of the sliding-window layers or None to use the first)."""
        if spec.position_embedding != "rope":
            return None, None
        rotary_dim = spec.rotary_dim or spec.head_dim
        inv_freq, scaling = rope_inv_freq(hf_config, rotary_dim)
        return RotaryEmbedding(spec.head_dim, spec.max_position, inv_freq, scaling, rotary_dim=rotary_dim), None

    def make_mlp(self, hf_config, spec: DecoderSpec, layer: int) -> nn.Module:
        """The feed-forward block of layer `layer` (MoE models return their expert layer)."""
        return default_mlp(spec, layer)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab], written into `out` when given (a CUDA graph's
        static output, shared by every batch size)."""
        if self.lm_head is not None:
            logits = self.lm_head(hidden, out=out)
        else:
            # The token embeddings^T: the skinny kernel, oneDNN's packed layout or cuBLAS.
            logits = linear(hidden, self.model.embed_tokens.weight, use_triton=self.use_triton_head,
                            packed=getattr(self, "_packed_lm_head", None), out=out)
        cap = self.spec.final_soft_cap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap if out is None else logits.div_(cap).tanh_().mul_(cap)
        return logits

    def prepack_weights(self) -> None:
        """Lays out bf16 CPU weights for oneDNN once, after loading (see layers.linear)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepack()
        if self.lm_head is None:
            self._packed_lm_head = cpu_prepacked_weight(self.model.embed_tokens.weight)

    def remap_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint (name, tensor) pairs -> the Llama-style names and layouts this model holds."""
        return iter(weights)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads HF-named tensors; returns the names of the parameters that were filled."""
        from pagellm.models.weights import load_named_weights
        packed = self.packed_modules_mapping
        if not self.spec.gated_mlp:  # a plain MLP's up_proj is a layer of its own
            packed = {k: v for k, v in packed.items() if v[0] != "gate_up_proj"}
        return load_named_weights(self, self.remap_weights(weights), packed)
