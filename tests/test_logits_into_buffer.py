"""The LM head written into a given buffer (what a decode CUDA graph does: every batch size's graph
writes its logits into rows [0, size) of one shared buffer) equals the head's own output: untied
and tied heads, with and without a final soft cap, and the linear layer's bias path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pagellm.layers.linear import Linear, linear
from pagellm.models.registry import resolve_model_class
from tests.helpers import tiny_config


def _model(kind: str, soft_cap: float | None = None) -> torch.nn.Module:
    architecture = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[kind]
    config = tiny_config(kind, vocab_size=300, architectures=[architecture])
    _, cls = resolve_model_class(config)
    torch.manual_seed(0)
    model = cls(config).eval()
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.3)
    if soft_cap is not None:
        model.spec = dataclasses.replace(model.spec, final_soft_cap=soft_cap)
    return model


@pytest.mark.parametrize("kind,soft_cap", [("llama", None), ("qwen3", None), ("llama", 5.0)])
@torch.inference_mode()
def test_compute_logits_into_a_shared_buffer(kind: str, soft_cap: float | None):
    model = _model(kind, soft_cap)
    assert (model.lm_head is None) == (kind == "qwen3")  # qwen3's tiny config ties the embeddings
    hidden = torch.randn(3, 64)
    expected = model.compute_logits(hidden)
    if soft_cap is not None:
        assert expected.abs().max() <= soft_cap
    buffer = torch.full((8, 300), float("nan"))
    out = model.compute_logits(hidden, out=buffer[:3])
    assert out.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer[:3], expected)
    assert buffer[3:].isnan().all()  # rows past the batch untouched


@torch.inference_mode()
def test_linear_into_a_buffer_with_and_without_bias():
    torch.manual_seed(1)
    x, weight, bias = torch.randn(4, 16), torch.randn(10, 16), torch.randn(10)
    for b in (None, bias):
        out = torch.empty(4, 10)
        assert linear(x, weight, b, out=out) is out
        torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, b))
    layer = Linear(16, 10, bias=True)
    layer.weight.copy_(weight)  # Linear allocates its parameters uninitialized (the loader fills them)
    layer.bias.copy_(bias)
    out = torch.empty(4, 10)
    torch.testing.assert_close(layer(x, out=out), layer(x))
    assert layer(x, out=out).data_ptr() == out.data_ptr()
