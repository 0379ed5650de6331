#!/usr/bin/env bash
# Idempotent set-up of a checkout: a .venv with the package and its pinned dependencies, the
# animal-mnist data package and the Fashion-MNIST data files.  Re-running it is cheap: each step
# is skipped when its result is already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.pleas-pyproject.sha256"
FMNIST_DIR="/usr/share/datasets/fashion-mnist"

say() { printf '[setup] %s\n' "$*"; }

# 1. virtual environment
if [[ ! -x "$PY" ]]; then
    BASE_PY="${PYTHON:-python3}"
    if ! "$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "[setup] error: $BASE_PY is older than Python 3.11; set PYTHON=/path/to/python3.11+" >&2
        exit 1
    fi
    say "creating $VENV"
    "$BASE_PY" -m venv "$VENV"
fi

# 2. the package and its pinned dependencies, only when pyproject.toml changed since last time
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want" != "$have" ]]; then
    say "installing pleas and its dependencies (pyproject.toml changed or first run)"
    "$PY" -m pip install --disable-pip-version-check -q -e ".[test]"
    echo "$want" > "$STAMP"
else
    say "dependencies up to date (pyproject.toml unchanged)"
fi

# 3. animal-mnist: without its dependencies, which would pull in TensorFlow
if ! "$PY" -c 'import importlib.metadata as m, sys; sys.exit(m.version("animal_mnist") != "0.4")' 2>/dev/null; then
    say "installing animal-mnist==0.4 (--no-deps)"
    "$PY" -m pip install --disable-pip-version-check -q --no-deps animal-mnist==0.4
fi

# 4. Fashion-MNIST from the Debian package
if [[ ! -d "$FMNIST_DIR" ]]; then
    say "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    SUDO=""
    if [[ "$(id -u)" -ne 0 ]]; then SUDO="sudo"; fi
    $SUDO apt-get update
    $SUDO apt-get install -y dataset-fashion-mnist
fi

say "ready: $("$PY" -c 'import torch, timm; print(f"torch {torch.__version__}, timm {timm.__version__}")')"
