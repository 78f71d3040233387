#!/usr/bin/env bash
# Creates .venv (once) and installs moekit with the given extras into it.
# torch: an existing torch in the venv is kept; otherwise torch==2.13.0 is installed first
# (a bare `pip install torch` can pull a multi-GB CUDA build). Set MOEKIT_TORCH to choose another spec.
set -euo pipefail
extras="${1:-}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "${MOEKIT_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -e ".${extras:+[$extras]}"
