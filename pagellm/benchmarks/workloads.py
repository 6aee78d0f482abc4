"""The standard benchmark workloads: random token prompts drawn exactly as the shared definitions say,
so every engine measured sees the same requests."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]
    temperature: float

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.max_tokens)


def per_request_draw(num: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
                     temperature: float, seed: int = 0) -> Workload:
    """cpu-thr style: for each request, its length, its ids in [0, 9999], then its max_tokens."""
    rng = random.Random(seed)
    prompts, max_tokens = [], []
    for _ in range(num):
        length = rng.randint(*prompt_range)
        prompts.append([rng.randint(0, 9999) for _ in range(length)])
        max_tokens.append(rng.randint(*output_range))
    return Workload(prompts, max_tokens, temperature)


def all_prompts_then_lengths(num: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
                             temperature: float, seed: int = 0) -> Workload:
    """gpu-thr style (nano-vllm's benchmark): all prompts (ids in [0, 10000]) first, then all max_tokens."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(*prompt_range))] for _ in range(num)]
    max_tokens = [rng.randint(*output_range) for _ in range(num)]
    return Workload(prompts, max_tokens, temperature)


def fixed_lengths(num: int, input_len: int, output_len: int, temperature: float, seed: int = 0,
                  vocab: int = 10000) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randint(0, vocab - 1) for _ in range(input_len)] for _ in range(num)]
    return Workload(prompts, [output_len] * num, temperature)


def shared_prefix(num: int, prefix_len: int = 1000, suffix_len: int = 50, output_len: int = 64,
                  temperature: float = 0.0, seed: int = 0) -> Workload:
    """A chat-server pattern: every request repeats one system prompt, then adds its own tokens."""
    rng = random.Random(seed)
    prefix = [rng.randint(0, 9999) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randint(0, 9999) for _ in range(suffix_len)] for _ in range(num)]
    return Workload(prompts, [output_len] * num, temperature)


STANDARD = {
    # name: (builder, num_requests, prompt range, output range, temperature)
    "cpu-thr": (per_request_draw, 64, (50, 256), (50, 256), 0.6),
    "gpu-thr": (all_prompts_then_lengths, 256, (100, 1024), (100, 1024), 0.6),
    "gpu-8b-thr": (per_request_draw, 500, (150, 254), (160, 268), 0.6),
}


def standard_workload(name: str, num_prompts: int | None = None) -> Workload:
    if name == "shared-prefix":
        return shared_prefix(num_prompts or 200)
    if name not in STANDARD:
        raise ValueError(f"workload must be one of {', '.join(STANDARD)}, shared-prefix; got {name!r}")
    builder, num, prompt_range, output_range, temperature = STANDARD[name]
    return builder(num_prompts or num, prompt_range, output_range, temperature)
