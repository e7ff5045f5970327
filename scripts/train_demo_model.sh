#!/usr/bin/env bash
# Rebuild the bundled demonstration model (worker/models/astronn-dist-demo.pt, see its
# MODEL_CARD.md) from nothing: a synthetic survey of 16,000 stars (seed 1, ~7 GB, ~3 min), then
# training on the CPU (~20 min on 2 cores). The same thread count gives the same weights.
#   bash scripts/train_demo_model.sh [WORK_DIR]      then copy WORK_DIR/astronn-dist-demo.*
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-/tmp/astronn-dist-demo}"
bin=.venv/bin/astronn-dist
[ -x "$bin" ] || bash scripts/bootstrap.sh
[ -f "$work/train/catalog.csv" ] || "$bin" synth "$work/train" --n 16000 --seed 1
"$bin" train "$work/train/catalog.csv" --out "$work/astronn-dist-demo.pt" \
  --epochs 40 --patience 6 --seed 0 --device cpu
echo "now: cp $work/astronn-dist-demo.pt $work/astronn-dist-demo.history.csv worker/models/"
