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
# The web chat page's end-to-end tests drive the system's Chromium through Playwright (installed above
# by the `test` extra; Playwright's own browser downloads are not used). Debian/Ubuntu: from apt, as
# root or through passwordless sudo. Elsewhere, install Chromium and set PIXTRAL_CHROMIUM to it.
if [ -z "${PIXTRAL_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; } \
      && $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; then
    echo "installed chromium (for the web page's browser tests)"
  else
    echo "warning: no chromium, and it could not be installed with apt-get; the web page's browser tests" \
         "are skipped (and fail under CI). Install Chromium, or set PIXTRAL_CHROMIUM to its executable." >&2
  fi
fi
