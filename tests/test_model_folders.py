"""HF model folders as users download them: weight file layouts and checkpoints we cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import requires_default_model
from pagellm.models.builder import build_model
from pagellm.models.loader import default_model_path, open_model_source


def _tiny_llama(folder: Path, **overrides) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 2-layer random Llama (vocabulary 256) saved as model.safetensors; (folder, state dict)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = dict(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=128,
                  tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    config.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config))
    model.save_pretrained(folder)
    return folder, {name: t.detach().clone() for name, t in model.state_dict().items()}


def _build(folder: Path, **kwargs) -> torch.nn.Module:
    source = open_model_source(str(folder), skip_tokenizer_init=True, **kwargs)
    return build_model(source, torch.float32, torch.device("cpu"))


def _to_pytorch_bins(folder: Path, state: dict[str, torch.Tensor], shards: int) -> None:
    """Replaces the safetensors weights with `shards` PyTorch pickle files (+ an index if > 1)."""
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {name: state[name] for name in names[i::shards]}
        torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


# ---------------------------------------------------------------- PyTorch .bin folders

@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_folder_loads(tmp_path: Path, shards: int) -> None:
    """Like vLLM's load_format='auto': no safetensors, so the pytorch_model*.bin files are read."""
    folder, state = _tiny_llama(tmp_path / "bin")
    _to_pytorch_bins(folder, state, shards)
    torch.save({"lr": 1.0}, folder / "training_args.bin")  # training state, not weights
    source = open_model_source(str(folder), skip_tokenizer_init=True)
    assert source.load_format == "pt"
    weights = dict(source.iter_weights())
    assert set(weights) == set(state)
    for name, tensor in weights.items():
        assert torch.equal(tensor, state[name]), name
    model = build_model(source, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(model.model.embed_tokens.weight, state["model.embed_tokens.weight"],
                               rtol=0, atol=0)


def test_pytorch_bin_folder_errors(tmp_path: Path) -> None:
    folder, state = _tiny_llama(tmp_path / "bin")
    _to_pytorch_bins(folder, state, 1)
    with pytest.raises(ValueError, match=r"load_format='safetensors'.*pytorch_model\.bin"):
        open_model_source(str(folder), load_format="safetensors", skip_tokenizer_init=True)
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle")
    source = open_model_source(str(folder), skip_tokenizer_init=True)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin"):
        dict(source.iter_weights())


def test_load_format_pt_reads_the_bin_files_only(tmp_path: Path) -> None:
    """vLLM's load_format='pt': the *.bin files even beside safetensors; a clear error without them."""
    folder, state = _tiny_llama(tmp_path / "both")
    doubled = {name: 2 * tensor for name, tensor in state.items()}
    torch.save(doubled, folder / "pytorch_model.bin")  # beside model.safetensors, other values
    source = open_model_source(str(folder), load_format="pt", skip_tokenizer_init=True)
    assert source.load_format == "pt"
    assert all(torch.equal(t, doubled[name]) for name, t in source.iter_weights())
    assert open_model_source(str(folder), skip_tokenizer_init=True).load_format == "safetensors"
    plain, _ = _tiny_llama(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"load_format='pt' needs PyTorch \*\.bin"):
        open_model_source(str(plain), load_format="pt", skip_tokenizer_init=True)


# ---------------------------------------------------------------- checkpoints we cannot run

@pytest.mark.parametrize("method", ["gptq", "fp8"])
def test_quantized_checkpoint_is_named(tmp_path: Path, method: str) -> None:
    """A quantization_config in config.json means weights we cannot read: say so, not 'a bias'."""
    folder, state = _tiny_llama(tmp_path / method)
    weights = load_file(folder / "model.safetensors")
    for name in [n for n in weights if n.endswith("proj.weight")]:
        if method == "fp8":
            weights[name] = weights[name].to(torch.float8_e4m3fn)
            weights[name.removesuffix("weight") + "weight_scale"] = torch.tensor(0.5)
        else:
            out_features, in_features = weights.pop(name).shape
            base = name.removesuffix(".weight")
            weights[f"{base}.qweight"] = torch.zeros(in_features // 8, out_features, dtype=torch.int32)
            weights[f"{base}.scales"] = torch.ones(1, out_features, dtype=torch.float16)
    save_file(weights, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4 if method == "gptq" else 8}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"quantization_config.*'{method}'"):
        _build(folder)
    assert _build(folder, load_format="dummy") is not None  # random weights need no dequantizing


def test_unknown_tensor_on_a_linear_layer_is_named(tmp_path: Path) -> None:
    """A tensor that is neither weight nor bias of a projection must not be taken for its bias."""
    folder, _ = _tiny_llama(tmp_path / "extra", attention_bias=True)
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.self_attn.o_proj.weight_scale"] = torch.ones(16)  # the bias's shape
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight_scale"):
        _build(folder)


# ---------------------------------------------------------------- tokenizers

@requires_default_model
def test_tokenizer_from_a_gguf_file(tmp_path: Path) -> None:
    """tokenizer= may name a .gguf file, as the loader documents (it raised NameError)."""
    folder, _ = _tiny_llama(tmp_path / "model")
    source = open_model_source(str(folder), tokenizer=str(default_model_path()), load_format="dummy")
    assert source.tokenizer.eos_token == "<|im_end|>"
    assert source.tokenizer("<|im_start|>user").input_ids[0] == 1
