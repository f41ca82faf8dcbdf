#!/usr/bin/env bash
# Create .venv (if needed) and install pixtral with every extra and the test dependencies. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned. Which build pip picks depends on where it looks: PyPI's Linux wheels of torch
# bundle CUDA (several GB); for the CPU-only build, point TORCH_INDEX_URL at PyTorch's CPU wheel
# index. Machines that carry a local wheel folder in their pip configuration get the build found there.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
fi
.venv/bin/pip install -q -e ".[test]"
