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
# torch first and pinned: a CPU wheel of 2.13.0 is on this machine's disk (pip's find-links);
# any other version would download gigabytes of CUDA packages.
"$py" -m pip install --quiet "torch==2.13.0"
case "$extras" in
  test) "$py" -m pip install --quiet -e ".[test,reference,postgres,bench]" ;;
  *)    "$py" -m pip install --quiet -e "." ;;
esac
echo "astronn-dist installed in $(pwd)/.venv"
