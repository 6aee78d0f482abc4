"""User-facing generation controls: :class:`SamplingParams` and :class:`BeamSearchParams`.

Field names, defaults and meanings follow vLLM's, so code written against vLLM's offline
API carries over. Every field is checked when the object is created; a bad value raises
``ValueError`` naming the field and the allowed range.

A model's ``generation_config.json`` supplies *defaults* only: the engine uses
:meth:`SamplingParams.from_defaults` when the user passes no parameters, and an explicit
``SamplingParams`` from the user is used as given.
"""

from __future__ import annotations

import copy
import enum
import logging
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Below this temperature sampling is treated as greedy (argmax). A temperature given on
# creation never is, unless 0: smaller positive values are raised to MIN_TEMPERATURE.
SAMPLING_EPS = 1e-5

# As in vLLM: a positive temperature below this is raised to it (dividing logits by less
# risks inf / nan), and the request still samples.
MIN_TEMPERATURE = 1e-2

# Upper bound on `logprobs` / `prompt_logprobs` (the OpenAI API allows at most 20).
MAX_LOGPROBS = 20

# `logit_bias` values are clamped to this magnitude, as the OpenAI API documents.
MAX_LOGIT_BIAS = 100.0

# generation_config.json keys that act as sampling defaults, mapped to our field names.
_GENERATION_CONFIG_KEYS: dict[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


class SamplingType(enum.IntEnum):
    """How the next token is chosen for a request."""

    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


# ----------------------------------------------------------------------------------------
# Field checks (shared by SamplingParams and BeamSearchParams)
# ----------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `n=True` is a mistake, not a count.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _require_int(name: str, value: Any) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _require_float(name: str, value: Any) -> float:
    if not _is_real(value) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _require_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def _require_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")


def _normalise_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    for s in items:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop must contain only non-empty strings, got {s!r}")
    return list(items)


def _normalise_token_ids(name: str, ids: Any) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple, set, frozenset)):
        raise ValueError(f"{name} must be a list of token ids, got {ids!r}")
    out: list[int] = []
    for t in ids:
        if not _is_int(t) or t < 0:
            raise ValueError(f"{name} must contain token ids >= 0, got {t!r}")
        out.append(int(t))
    return out


def _normalise_logit_bias(bias: Any) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {bias!r}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        # JSON object keys are always strings, so the server hands us {"50256": -100}.
        if isinstance(key, str) and key.strip().isdigit():
            key = int(key)
        if not _is_int(key) or key < 0:
            raise ValueError(f"logit_bias keys must be token ids >= 0, got {key!r}")
        if not _is_real(value) or math.isnan(float(value)):
            raise ValueError(f"logit_bias values must be numbers, got {value!r} for token {key}")
        out[int(key)] = min(max(float(value), -MAX_LOGIT_BIAS), MAX_LOGIT_BIAS)
    return out


def _check_logprobs(name: str, value: Any) -> int | None:
    if value is None:
        return None
    value = _require_int(name, value)
    if not 0 <= value <= MAX_LOGPROBS:
        raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
    return value


def _generation_config_dict(gen_cfg: Any) -> dict[str, Any]:
    """A plain dict from a generation_config.json dict or a transformers GenerationConfig."""
    if gen_cfg is None:
        return {}
    if isinstance(gen_cfg, Mapping):
        return dict(gen_cfg)
    # transformers.GenerationConfig: only the values the model's file set, not the
    # library-wide defaults (to_dict() would report top_k=50 for every model).
    if hasattr(gen_cfg, "to_diff_dict"):
        return dict(gen_cfg.to_diff_dict())
    raise ValueError(f"generation config must be a dict or a GenerationConfig, got {type(gen_cfg).__name__}")


def generation_config_defaults(gen_cfg: Any) -> dict[str, Any]:
    """The sampling defaults a model's generation config provides, as SamplingParams kwargs.

    Only temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens (as
    ``max_tokens``) are taken, as vLLM does; keys that are absent or null are skipped.
    ``gen_cfg`` may be a dict (the parsed JSON), a ``transformers.GenerationConfig`` or None.
    """
    cfg = _generation_config_dict(gen_cfg)
    return {ours: cfg[theirs] for theirs, ours in _GENERATION_CONFIG_KEYS.items() if cfg.get(theirs) is not None}


def apply_generation_config_defaults(params_kwargs: Mapping[str, Any], gen_cfg: Any) -> dict[str, Any]:
    """Merge user kwargs over the generation config's defaults; user-set keys always win.

    Returns a new dict suitable for ``SamplingParams(**result)``; inputs are not modified.
    """
    merged = generation_config_defaults(gen_cfg)
    merged.update(params_kwargs)
    return merged


def _eos_ids_from(gen_cfg: Any) -> set[int]:
    eos = _generation_config_dict(gen_cfg).get("eos_token_id")
    if eos is None:
        return set()
    return {int(eos)} if _is_int(eos) else {int(t) for t in eos}


# ----------------------------------------------------------------------------------------
# SamplingParams
# ----------------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    """How to generate text for one prompt (vLLM-compatible names and defaults).

    Mutable like vLLM's, but every field is validated (and normalised: ``stop`` becomes a
    list, ``top_k=-1`` becomes 0, ``seed=-1`` becomes None, a temperature in (0, 0.01) becomes
    0.01, string ``logit_bias`` keys become ints) on creation: only ``temperature=0`` is greedy.
    ``best_of`` may only repeat ``n``: best_of > n is not supported.
    Mutating a field afterwards skips validation; build a new object instead.

    Raises:
        ValueError: a field is out of range; the message names the field and the range.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1 on input) = consider the whole vocabulary
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None = until the context length is reached
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None

    # Filled by update_from_generation_config(): the model's end-of-sequence token ids.
    eos_token_ids: set[int] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.n = _require_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.best_of is not None:
            self.best_of = _require_int("best_of", self.best_of)
            # Nothing ranks best_of > n candidates (vLLM V1 refuses it too): accepting it would
            # silently return n plain samples.
            if self.best_of != self.n:
                raise ValueError(f"best_of must equal n ({self.n}) or be None (best_of > n is not supported), "
                                 f"got {self.best_of}")

        self.presence_penalty = _require_float("presence_penalty", self.presence_penalty)
        _require_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self.frequency_penalty = _require_float("frequency_penalty", self.frequency_penalty)
        _require_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        self.repetition_penalty = _require_float("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

        self.temperature = _require_float("temperature", self.temperature)
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            logger.warning("temperature %g is below %g, which may overflow the logits; raised to %g",
                           self.temperature, MIN_TEMPERATURE, MIN_TEMPERATURE)
            self.temperature = MIN_TEMPERATURE
        self.top_p = _require_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = _require_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= -1 (-1 or 0 disables it), got {self.top_k}")
        if self.top_k == -1:
            self.top_k = 0
        self.min_p = _require_float("min_p", self.min_p)
        _require_range("min_p", self.min_p, 0.0, 1.0)

        if self.seed is not None:
            self.seed = _require_int("seed", self.seed)
            if self.seed == -1:
                self.seed = None  # vLLM's (and the OpenAI API's) "no seed"
        if self.seed is not None:
            # The range torch.Generator.manual_seed accepts, for every sibling: sibling i of an
            # n > 1 request samples with seed + i.
            if not -(2**63) <= self.seed <= 2**64 - self.n:
                raise ValueError(f"seed must be in [-2**63, 2**64 - n] (sibling i of n uses seed + i), "
                                 f"got {self.seed} with n={self.n}")

        self.stop = _normalise_stop(self.stop)
        self.stop_token_ids = _normalise_token_ids("stop_token_ids", self.stop_token_ids)

        if self.max_tokens is not None:
            self.max_tokens = _require_int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1 (or None), got {self.max_tokens}")
        self.min_tokens = _require_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")

        self.logprobs = _check_logprobs("logprobs", self.logprobs)
        self.prompt_logprobs = _check_logprobs("prompt_logprobs", self.prompt_logprobs)

        for name in (
            "ignore_eos",
            "detokenize",
            "skip_special_tokens",
            "spaces_between_special_tokens",
            "include_stop_str_in_output",
        ):
            _require_bool(name, getattr(self, name))

        self.logit_bias = _normalise_logit_bias(self.logit_bias)

        if self.is_greedy:
            # Truncation cannot change an argmax; clearing it keeps the sampler's fast path.
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
            if self.n > 1:
                raise ValueError(f"n must be 1 when temperature is 0 (greedy), got {self.n}")

    # -- derived properties ------------------------------------------------------------

    @property
    def is_greedy(self) -> bool:
        """True when the request takes the argmax (temperature below ``SAMPLING_EPS``)."""
        return self.temperature < SAMPLING_EPS

    @property
    def sampling_type(self) -> SamplingType:
        """GREEDY, RANDOM_SEED (own generator from ``seed``) or RANDOM (shared RNG)."""
        if self.is_greedy:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    @property
    def all_stop_token_ids(self) -> set[int]:
        """Token ids that finish the request: ``stop_token_ids`` plus EOS unless ignored.

        EOS ids are known only after :meth:`update_from_generation_config`.
        """
        ids = set(self.stop_token_ids or ())
        if not self.ignore_eos:
            ids |= self.eos_token_ids
        return ids

    @property
    def output_text_buffer_length(self) -> int:
        """Characters to hold back from streamed text so a stop string is never half-shown."""
        if not self.stop or self.include_stop_str_in_output:
            return 0
        return max(len(s) for s in self.stop) - 1

    # -- construction helpers ----------------------------------------------------------

    def clone(self) -> SamplingParams:
        """A deep copy (lists and the logit_bias dict are not shared)."""
        return copy.deepcopy(self)

    def update_from_generation_config(self, gen_cfg: Any, model_eos_token_id: int | None = None) -> None:
        """Record the model's EOS ids (tokenizer EOS plus generation config ``eos_token_id``).

        Mutates ``eos_token_ids``; the sampling fields are left alone (defaults come
        only through :meth:`from_defaults`). Called by the engine for every request.
        """
        ids = _eos_ids_from(gen_cfg)
        if model_eos_token_id is not None:
            ids.add(int(model_eos_token_id))
        self.eos_token_ids = ids

    def verify_token_ids(self, vocab_size: int) -> None:
        """Check that token ids in ``logit_bias`` and ``stop_token_ids`` are below ``vocab_size``.

        The input processor calls this once the model is known; the sampler trusts it.
        """
        for t in self.logit_bias or ():
            if t >= vocab_size:
                raise ValueError(f"logit_bias token id must be < vocab size ({vocab_size}), got {t}")
        for t in self.stop_token_ids or ():
            if t >= vocab_size:
                raise ValueError(f"stop_token_ids must be < vocab size ({vocab_size}), got {t}")

    @classmethod
    def from_generation_config(cls, gen_cfg: Any, **overrides: Any) -> SamplingParams:
        """Parameters from the model's generation config defaults, with ``overrides`` on top."""
        return cls(**apply_generation_config_defaults(overrides, gen_cfg))

    @classmethod
    def from_defaults(cls, gen_cfg: Any = None) -> SamplingParams:
        """What the engine uses when the user passes no SamplingParams.

        Equal to ``SamplingParams()`` except for the keys the model's generation config
        sets (see :func:`generation_config_defaults`).
        """
        return cls.from_generation_config(gen_cfg)


# ----------------------------------------------------------------------------------------
# BeamSearchParams
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BeamSearchParams:
    """Beam search settings (vLLM's ``LLM.beam_search`` names).

    Raises:
        ValueError: a field is out of range; the message names the field and the range.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    # vLLM's: whether a beam's text keeps the EOS token that ended it (False: left out). Before
    # early_stopping, so that positional arguments line up with vLLM's.
    include_stop_str_in_output: bool = False
    # transformers' meaning: False (default), True (stop at beam_width finished beams) or "never".
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        beam_width = _require_int("beam_width", self.beam_width)
        if beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {beam_width}")
        max_tokens = _require_int("max_tokens", self.max_tokens)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        _require_bool("ignore_eos", self.ignore_eos)
        _require_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        temperature = _require_float("temperature", self.temperature)
        if temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        length_penalty = _require_float("length_penalty", self.length_penalty)
        # Frozen: normalised values (e.g. numpy ints) go in through object.__setattr__.
        object.__setattr__(self, "beam_width", beam_width)
        object.__setattr__(self, "max_tokens", max_tokens)
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "length_penalty", length_penalty)
