#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv. Idempotent: safe to rerun.
#
#   bash scripts/setup.sh
#
# 1. creates .venv with Python 3.11 or 3.12 (override: PYTHON=/path/to/python3.11);
# 2. installs torch first, at the version pinned in pyproject.toml. On a machine without a
#    GPU set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to get the small CPU build
#    (plain PyPI serves the multi-GB CUDA build on Linux, which also runs on a CPU);
# 3. installs this project (editable) with its pinned dependencies and the dev extra (pytest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pick_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.11 python3.12 python3; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 13)))'; then
            echo "$candidate"
            return 0
        fi
    done
    echo "setup.sh: need Python 3.11 or 3.12 (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

if [ ! -x .venv/bin/python ]; then
    python=$(pick_python)
    echo "setup.sh: creating .venv with $("$python" --version)"
    "$python" -m venv .venv
fi
.venv/bin/python -c 'import sys; assert (3, 11) <= sys.version_info[:2] < (3, 13), sys.version' || {
    echo "setup.sh: .venv has an unsupported Python; remove .venv and rerun" >&2
    exit 1
}

torch_pin=$(sed -n 's/^ *"torch==\([^"]*\)",.*$/\1/p' pyproject.toml)
[ -n "$torch_pin" ] || { echo "setup.sh: no torch==... pin found in pyproject.toml" >&2; exit 1; }
echo "setup.sh: installing torch==$torch_pin"
.venv/bin/python -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$torch_pin"

echo "setup.sh: installing mixsga-bench and its pinned dependencies"
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c 'import torch, transformers, snakemake, harness, mixsga; print(f"setup.sh: ready (torch {torch.__version__}, transformers {transformers.__version__})")'
