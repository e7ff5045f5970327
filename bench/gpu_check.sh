#!/usr/bin/env bash
# The GPU checks, in one short script for a lent GPU machine (about 5 minutes on one GPU):
#   1. the CUDA tests (GPU against CPU statistics on the real files, within Monte-Carlo noise);
#   2. the inference bench at batches 256, 1024 and 4096 (beside the reference algorithm);
#   3. `astronn-dist run` end to end on --spectra spectra (default 20,000: --files synthetic
#      apStar files, each listed many times in a catalog under distinct spectrum_ids), with
#      the worker's default plan (one process per core, at most 8 per GPU), sampling the GPU's
#      utilization and memory while it runs.
#
#   bash bench/gpu_check.sh                         # on the GPU machine (expects .venv)
#   bash bench/gpu_check.sh --device cpu --spectra 2000 --files 50   # the same checks on a CPU
#
# Prints Markdown tables and the figures; exits non-zero when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda
spectra=20000
files=300
batches="256 1024 4096"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --spectra) spectra="$2"; shift 2 ;;
    --files) files="$2"; shift 2 ;;
    --batches) batches="$2"; shift 2 ;;
    *) echo "unknown option $1 (use --device, --spectra, --files, --batches)" >&2; exit 2 ;;
  esac
done
py=${PYTHON:-.venv/bin/python}
work="$(mktemp -d "${TMPDIR:-/tmp}/astronn-gpu-check.XXXXXX")"
trap 'kill "${smi_pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
has_smi() { command -v nvidia-smi >/dev/null 2>&1; }

echo "## machine"
"$py" -c "import os, torch; print(f'{os.cpu_count()} cores, torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}')"
if has_smi; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi

echo "## 1. CUDA tests"
if [ "$device" = "cpu" ]; then
  echo "(device cpu: the CUDA tests need a GPU; running the CPU inference tests instead)"
  "$py" -m pytest -q -p no:cacheprovider tests/test_inference.py -rs
else
  "$py" -m pytest -q -p no:cacheprovider tests/test_inference.py -k cuda -rs
fi

echo "## 2. inference bench (100 MC passes)"
# shellcheck disable=SC2086
"$py" -m bench.bench_inference --device "$device" --batches $batches --reference-batches 256 --repeat 1

echo "## 3. run end to end: $spectra spectra from $files synthetic files"
"$py" - "$work" "$files" "$spectra" <<'EOF'
import csv, sys
from pathlib import Path
from astronn_dist.worker.modeling import synth
work, n_files, n_spectra = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
synth.write_survey(work, n_files, seed=7, visits=(1, 2))
paths = sorted(p.name for p in (work / "apstar").glob("*.fits"))
with open(work / "many.csv", "w", newline="") as fh:
    out = csv.writer(fh)
    out.writerow(["path", "spectrum_id"])
    for i in range(n_spectra):  # each file under many ids: the masks differ by id
        out.writerow([f"apstar/{paths[i % len(paths)]}", f"copy-{i:07d}"])
print(f"catalog {work / 'many.csv'}: {n_spectra} rows over {len(paths)} files")
EOF
if has_smi; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 1 > "$work/smi.log" &
  smi_pid=$!
fi
start=$(date +%s.%N)
.venv/bin/astronn-dist run --catalog "$work/many.csv" --db "sqlite:///$work/run.sqlite" \
  --device "$device" --mc-passes 100 --chunk-size 256 | tail -n 4
end=$(date +%s.%N)
"$py" - "$work/run.sqlite" "$spectra" "$start" "$end" <<'EOF'
import sqlite3, sys
db, n, start, end = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
rows, results = sqlite3.connect(db).execute(
    "SELECT count(*), count(dist) FROM astro_nn_dist").fetchone()
print(f"rows {rows} of {n}, {results} with a distance; {n / (end - start):,.0f} spectra/s "
      f"wall clock, start-up included ({end - start:.1f} s)")
sys.exit(0 if rows == n else 1)
EOF
if has_smi; then
  kill "$smi_pid" 2>/dev/null || true
  echo "GPU while run ran (utilization %, memory used), max over the samples:"
  awk -F', ' '{gsub(/ %/,"",$2); gsub(/ MiB/,"",$3); if ($2>u) u=$2; if ($3>m) m=$3} END {print "  utilization " u " %, memory " m " MiB"}' "$work/smi.log"
fi
echo "gpu_check: done"
