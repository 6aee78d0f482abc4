"""BERT, the encoder behind most sentence-embedding models (all-MiniLM, bge, e5, ...).

How it differs from our decoders: attention is bidirectional (every token sees every other
token of its prompt, none of the others in the batch), so there is no KV cache and no decode
step; positions are learned absolute embeddings, plus a token-type embedding (always type 0
here: one segment per prompt); LayerNorm comes after each residual add (post-norm), and the
MLP is a plain GELU two-matrix one. The model returns per-token hidden states; pooling them
into one vector is the pooler's job (pagellm/pooling/pooler.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pagellm.layers.activation import get_activation
from pagellm.layers.layernorm import LayerNorm
from pagellm.layers.linear import Linear


# cuDNN's attention builds a plan for every new batch shape (tens of ms each on an H200, more
# than the whole forward pass), and embedding batches rarely repeat a shape: use the others.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class EncoderSpec:
    """The shape of an encoder, read from its HF config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class BertModel(nn.Module):
    """input_ids [B, T] + a key mask -> hidden states [B, T, H] (the checkpoint's last_hidden_state)."""

    def __init__(self, hf_config) -> None:
        super().__init__()
        self.spec = spec = self.spec_from_config(hf_config)
        self.embeddings = BertEmbeddings(spec)
        self.layers = nn.ModuleList(BertLayer(spec) for _ in range(spec.num_layers))

    @classmethod
    def spec_from_config(cls, c) -> EncoderSpec:
        position_type = getattr(c, "position_embedding_type", "absolute") or "absolute"
        if position_type != "absolute":
            raise ValueError(f"position_embedding_type {position_type!r} is not supported; BERT models with "
                             f"absolute positions are")
        if c.hidden_size % c.num_attention_heads:
            raise ValueError(f"hidden_size ({c.hidden_size}) must be a multiple of num_attention_heads "
                             f"({c.num_attention_heads})")
        spec = EncoderSpec(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, max_position=c.max_position_embeddings,
            type_vocab_size=getattr(c, "type_vocab_size", 2) or 1, layer_norm_eps=getattr(c, "layer_norm_eps", 1e-12),
            hidden_act=getattr(c, "hidden_act", "gelu"))
        get_activation(spec.hidden_act)  # ValueError now rather than at the first forward
        return spec

    def forward(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """input_ids [B, T]; key_mask [B, T] bool (True: a real token; None: no padding) -> [B, T, H]."""
        # SDPA broadcasts a [B, 1, 1, T] mask over heads and query rows: padding keys are
        # hidden from every query. Padding queries still compute (their rows are never read).
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, T]
        x = self.embeddings(input_ids)  # [B, T, H]
        with sdpa_kernel(_SDPA_BACKENDS):
            for layer in self.layers:
                x = layer(x, attn_mask)
        return x

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies HF checkpoint tensors (BertModel's names, or BertForMaskedLM's "bert." ones) in;
        returns the names of the parameters filled. Raises ValueError for a tensor with no place."""
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if _IGNORED.fullmatch(name):
                continue
            target = _our_name(name)
            if target is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the BERT model")
            ours, shard = target
            module_path, _, leaf = ours.rpartition(".")
            module = modules.get(module_path)
            if isinstance(module, Linear):
                module.load_shard(leaf, tensor, shard)
            else:
                param = params.get(ours)
                if param is None or param.shape != tensor.shape:
                    expected = None if param is None else tuple(param.shape)
                    raise ValueError(f"checkpoint tensor {name!r} of shape {tuple(tensor.shape)} does not fit "
                                     f"{ours} ({expected})")
                param.data.copy_(tensor)
            loaded.add(ours)
        return loaded


class BertEmbeddings(nn.Module):
    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.word = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.position = nn.Embedding(spec.max_position, spec.hidden_size)
        self.token_type = nn.Embedding(spec.type_vocab_size, spec.hidden_size)
        self.norm = LayerNorm(spec.hidden_size, spec.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> [B, T, H]."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # [T], every row starts at 0
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type.weight[0]  # [B, T, H]
        return self.norm(x)


class BertLayer(nn.Module):
    """Self-attention then MLP, each followed by add & LayerNorm (post-norm)."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        h = spec.hidden_size
        self.num_heads, self.head_dim = spec.num_heads, spec.head_dim
        self.qkv = Linear(h, [h, h, h], bias=True)
        self.attn_out = Linear(h, h, bias=True)
        self.attn_norm = LayerNorm(h, spec.layer_norm_eps)
        self.up = Linear(h, spec.intermediate_size, bias=True)
        self.down = Linear(spec.intermediate_size, h, bias=True)
        self.mlp_norm = LayerNorm(h, spec.layer_norm_eps)
        self.act = get_activation(spec.hidden_act)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, H], attn_mask [B, 1, 1, T] bool or None -> [B, T, H]."""
        batch, seq, hidden = x.shape
        qkv = self.qkv(x).view(batch, seq, 3, self.num_heads, self.head_dim)  # [B, T, 3, nh, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, nh, T, hd]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, nh, T, hd]
        attn = attn.transpose(1, 2).reshape(batch, seq, hidden)  # [B, T, H]
        x = self.attn_norm(self.attn_out(attn) + x)
        return self.mlp_norm(self.down(self.act(self.up(x))) + x)


# ---- checkpoint names -----------------------------------------------------------------------

_P = r"(?:bert\.)?"  # BertForMaskedLM and friends nest the encoder under "bert."
_NORM = r"LayerNorm\.(weight|bias|gamma|beta)"  # TF-era checkpoints say gamma / beta
_RULES: list[tuple[re.Pattern, str, int]] = [(re.compile(p), r, s) for p, r, s in [
    (_P + r"embeddings\.word_embeddings\.weight", "embeddings.word.weight", 0),
    (_P + r"embeddings\.position_embeddings\.weight", "embeddings.position.weight", 0),
    (_P + r"embeddings\.token_type_embeddings\.weight", "embeddings.token_type.weight", 0),
    (_P + r"embeddings\." + _NORM, r"embeddings.norm.\1", 0),
    (_P + r"encoder\.layer\.(\d+)\.attention\.self\.query\.(weight|bias)", r"layers.\1.qkv.\2", 0),
    (_P + r"encoder\.layer\.(\d+)\.attention\.self\.key\.(weight|bias)", r"layers.\1.qkv.\2", 1),
    (_P + r"encoder\.layer\.(\d+)\.attention\.self\.value\.(weight|bias)", r"layers.\1.qkv.\2", 2),
    (_P + r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"layers.\1.attn_out.\2", 0),
    (_P + r"encoder\.layer\.(\d+)\.attention\.output\." + _NORM, r"layers.\1.attn_norm.\2", 0),
    (_P + r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"layers.\1.up.\2", 0),
    (_P + r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"layers.\1.down.\2", 0),
    (_P + r"encoder\.layer\.(\d+)\.output\." + _NORM, r"layers.\1.mlp_norm.\2", 0),
]]
# Not used for embeddings: the position-id buffer, the [CLS] pooler head (sentence-transformers
# does not use it either) and masked-LM / next-sentence heads.
_IGNORED = re.compile(_P + r"(embeddings\.position_ids|pooler\..*)|cls\..*")


def _our_name(name: str) -> tuple[str, int] | None:
    """(our parameter name, shard of a fused layer) for a checkpoint name; None if none fits."""
    for pattern, replacement, shard in _RULES:
        if pattern.fullmatch(name):
            ours = pattern.sub(replacement, name)
            return ours.replace(".gamma", ".weight").replace(".beta", ".bias"), shard
    return None
