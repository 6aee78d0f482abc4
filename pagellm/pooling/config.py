"""How an embedding model turns per-token hidden states into one vector, read from the model folder.

sentence-transformers folders say it in `modules.json`: a `Pooling` module (its folder's
config.json sets `pooling_mode_*`) and, when the vectors are unit length, a `Normalize` module.
`sentence_bert_config.json` holds `max_seq_length`, the length the model was trained on.

Without those files we follow vLLM, not sentence-transformers: vLLM's BERT embedding model
pools the [CLS] token and normalizes (its `embed` default), while sentence-transformers would
wrap a bare checkpoint in mean pooling without normalization. A vLLM user moving a model over
gets the vectors vLLM gave them; pass `pooler_config=` to choose otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

POOLING_TYPES = ("MEAN", "CLS", "LAST")

# sentence-transformers' Pooling config keys -> our pooling types. Other modes (max,
# mean_sqrt_len, weightedmean) are refused rather than approximated.
_ST_POOLING_MODES = {
    "pooling_mode_mean_tokens": "MEAN",
    "pooling_mode_cls_token": "CLS",
    "pooling_mode_lasttoken": "LAST",
}
_ST_UNSUPPORTED_MODES = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                         "pooling_mode_weightedmean_tokens")
_ST_MODULE_PREFIX = "sentence_transformers.models."
# Modules that do not change the vector (the encoder itself, the pooling and normalization we
# implement); any other module (Dense, LayerNorm, ...) would, so a folder with one is refused.
_ST_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class PoolerConfig:
    """pooling_type: "MEAN" (average over the prompt's tokens), "CLS" (the first token) or
    "LAST" (the last token); normalize: scale each vector to unit L2 length."""

    pooling_type: str = "CLS"
    normalize: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.pooling_type, str) or self.pooling_type.upper() not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}; got {self.pooling_type!r}")
        object.__setattr__(self, "pooling_type", self.pooling_type.upper())
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool; got {self.normalize!r}")

    @classmethod
    def coerce(cls, value: PoolerConfig | Mapping[str, Any] | None) -> PoolerConfig | None:
        """A PoolerConfig from itself, a {"pooling_type", "normalize"} dict (vLLM's form), or None."""
        if value is None or isinstance(value, PoolerConfig):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"pooling_type", "normalize"}
            if unknown:
                raise ValueError(f"pooler_config has unknown key(s) {sorted(unknown)}; "
                                 f"allowed: pooling_type, normalize")
            return cls(**dict(value))
        raise ValueError(f"pooler_config must be a PoolerConfig or a dict; got {type(value).__name__}")


def load_pooler_config(folder: Path | None) -> PoolerConfig:
    """The pooling the folder's sentence-transformers files describe, else vLLM's BERT default
    (CLS, normalized). Raises ValueError for files it cannot read or modules it cannot honour."""
    modules = _read_modules(folder)
    if modules is None:
        return PoolerConfig()
    pooling_type = "CLS"
    normalize = False
    for module in modules:
        kind = str(module.get("type", "")).removeprefix(_ST_MODULE_PREFIX)
        if kind not in _ST_KNOWN_MODULES:
            raise ValueError(f"modules.json in {folder} has a {module.get('type')!r} module; pagellm "
                             f"supports only {', '.join(_ST_KNOWN_MODULES)}")
        if kind == "Pooling":
            pooling_type = _pooling_type(folder / str(module.get("path", "")) / "config.json")
        elif kind == "Normalize":
            normalize = True
    return PoolerConfig(pooling_type=pooling_type, normalize=normalize)


def load_max_seq_length(folder: Path | None) -> int | None:
    """`max_seq_length` of sentence_bert_config.json (the length the model was trained on), if any."""
    if folder is None:
        return None
    config = _read_json(folder / "sentence_bert_config.json")
    value = config.get("max_seq_length") if isinstance(config, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else None


def _read_modules(folder: Path | None) -> list[dict[str, Any]] | None:
    if folder is None:
        return None
    modules = _read_json(folder / "modules.json")
    if modules is None:
        return None
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ValueError(f"{folder / 'modules.json'} must hold a list of module objects")
    return sorted(modules, key=lambda m: m.get("idx", 0))


def _pooling_type(config_file: Path) -> str:
    config = _read_json(config_file)
    if not isinstance(config, dict):
        raise ValueError(f"the Pooling module needs {config_file}")
    chosen = [kind for key, kind in _ST_POOLING_MODES.items() if config.get(key)]
    unsupported = [key for key in _ST_UNSUPPORTED_MODES if config.get(key)]
    if unsupported:
        raise ValueError(f"{config_file} sets {', '.join(unsupported)}; pagellm pools only by "
                         f"{', '.join(_ST_POOLING_MODES)}")
    if len(chosen) != 1:
        raise ValueError(f"{config_file} must set exactly one of {', '.join(_ST_POOLING_MODES)}; "
                         f"it sets {len(chosen)}")
    return chosen[0]


def _read_json(file: Path) -> Any:
    """The parsed file, or None when it does not exist."""
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {file}: {exc}") from exc
