#!/usr/bin/env bash
# Create .venv (if absent) and install astronn-dist into it.
#   scripts/bootstrap.sh            the service itself
#   scripts/bootstrap.sh test       plus the test tools, the astroNN 1.1.0 reference (TensorFlow)
#                                   and the benchmarks' extra reader (fitsio)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv 2>/dev/null || true
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
py=.venv/bin/python
"$py" -m pip install --quiet --upgrade pip
# torch first and pinned (pyproject.toml pins it too). Where pip is configured with a local CPU
# wheel of 2.13.0 it takes that one; elsewhere PyPI's default Linux build of torch includes CUDA
# (gigabytes): for a small CPU-only install, install PyTorch's CPU build of 2.13.0 into .venv
# first (see README, Installing), and this step keeps it.
"$py" -m pip install --quiet "torch==2.13.0"
case "$extras" in
  test) "$py" -m pip install --quiet -e ".[test,reference,postgres,bench]" ;;
  *)    "$py" -m pip install --quiet -e "." ;;
esac
echo "astronn-dist installed in $(pwd)/.venv"
