#!/usr/bin/env bash
# The GPU checks, in one short script for a lent GPU machine (about 2 minutes on an H200):
#   1. the CUDA tests (GPU against CPU: the real DR17 files within Monte-Carlo noise, and the
#      schedule's tests);
#   2. preparation per core on this machine's CPU (bench_prepare: what one process can feed);
#   3. the inference bench at batches 256, 1024 and 4096 (beside the reference algorithm), at
#      each --max-rows (the Predictor's spectrum-passes per GPU group);
#   4. `astronn-dist run` end to end on --spectra spectra (--files synthetic apStar files, each
#      listed many times in a catalog under distinct spectrum_ids), once per --processes entry
#      ("default": the worker's plan; "N@P": N processes at P MC passes, e.g. "16@2" to see what
#      the cores and the database give when inference is almost free; else 100 passes),
#      sampling the GPU's utilization and memory while it runs.
#
#   bash bench/gpu_check.sh                         # on the GPU machine (expects .venv)
#   bash bench/gpu_check.sh --spectra 60000 --processes "default 8 16@2"
#   bash bench/gpu_check.sh --device cpu --spectra 2000 --files 50 --batches "32"   # on a CPU
#   bash bench/gpu_check.sh --runs-only --chunk-size 1000   # step 4 alone, 1000 spectra a chunk
#
# PYTHON names the interpreter (default .venv/bin/python); the CLI runs as `$PYTHON -m`.
# Prints Markdown tables and the figures; exits non-zero when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda
spectra=20000
files=300
batches="256 1024 4096"
max_rows="4096"
processes="default"
chunk=
runs_only=
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --spectra) spectra="$2"; shift 2 ;;
    --files) files="$2"; shift 2 ;;
    --batches) batches="$2"; shift 2 ;;
    --max-rows) max_rows="$2"; shift 2 ;;
    --processes) processes="$2"; shift 2 ;;
    --chunk-size) chunk="$2"; shift 2 ;;
    --runs-only) runs_only=1; shift ;;
    *) echo "unknown option $1 (use --device, --spectra, --files, --batches, --max-rows, --processes," \
            "--chunk-size, --runs-only)" >&2
       exit 2 ;;
  esac
done
py=${PYTHON:-.venv/bin/python}
work="$(mktemp -d "${TMPDIR:-/tmp}/astronn-gpu-check.XXXXXX")"
smi_pid=
trap 'if [ -n "$smi_pid" ]; then kill "$smi_pid" 2>/dev/null || true; fi; rm -rf "$work"' EXIT
has_smi() { [ "$device" != cpu ] && command -v nvidia-smi >/dev/null 2>&1; }
status=0

echo "## machine"
grep -m1 "model name" /proc/cpuinfo || true
"$py" -c "import os, torch; print(f'{len(os.sched_getaffinity(0))} usable cores, torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}')"
if has_smi; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi

if [ -z "$runs_only" ]; then
echo "## 1. CUDA tests"
if [ "$device" = "cpu" ]; then
  echo "(device cpu: the CUDA tests need a GPU; the schedule's tests run on the CPU instead)"
fi
"$py" -m pytest -q -p no:cacheprovider tests/test_inference.py -k "cuda or gpu or schedule" -rs \
  || status=1

echo "## 2. preparation per core (this machine's CPU)"
"$py" -m bench.bench_prepare --files 50 --seconds 1 || status=1

echo "## 3. inference bench (100 MC passes)"
# shellcheck disable=SC2086
"$py" -m bench.bench_inference --device "$device" --batches $batches --reference-batches 256 \
  --repeat 1 --max-rows $max_rows --phases || status=1

fi
echo "## 4. run end to end: $spectra spectra from $files synthetic files, chunks of ${chunk:-the default size}"
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
for entry in $processes; do
  n=${entry%@*} passes=100 opt=()
  if [ "$entry" != "$n" ]; then passes=${entry#*@}; fi
  if [ "$n" != default ]; then opt=(--processes "$n"); fi
  if [ -n "$chunk" ]; then opt+=(--chunk-size "$chunk"); fi
  n=$n-$passes
  echo "### run, processes: ${n%-*}, $passes MC passes"
  if has_smi; then
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 250 \
      > "$work/smi-$n.log" &
    smi_pid=$!
  fi
  start=$(date +%s.%N)
  "$py" -m astronn_dist.producer.cli run --catalog "$work/many.csv" \
    --db "sqlite:///$work/run-$n.sqlite" --device "$device" --mc-passes "$passes" \
    ${opt[@]+"${opt[@]}"} > "$work/run-$n.out" 2>&1 || { status=1; cat "$work/run-$n.out"; }
  end=$(date +%s.%N)
  grep -E "process|spectra/s" "$work/run-$n.out" | grep -v "^│" | tail -n 6 || true
  if [ -n "$smi_pid" ]; then
    kill "$smi_pid" 2>/dev/null || true
    smi_pid=
    # the samples while the GPU was busy (utilization > 0): their mean and the peaks
    awk -F', *' '$1 > 0 {n++; s+=$1} {if ($1>u) u=$1; if ($2>m) m=$2}
      END {printf "GPU while it ran: utilization mean %.0f %% over %d busy samples of 0.25 s, max %d %%; memory max %d MiB\n", (n ? s/n : 0), n, u, m}' \
      "$work/smi-$n.log"
  fi
  "$py" - "$work/run-$n.sqlite" "$spectra" "$start" "$end" <<'EOF' || status=1
import sqlite3, sys
db, n, start, end = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
rows, results, devices = sqlite3.connect(db).execute(
    "SELECT count(*), count(dist), group_concat(DISTINCT device || ' ' || mask_rng) FROM astro_nn_dist"
).fetchone()
print(f"rows {rows} of {n}, {results} with a distance, computed on: {devices}; "
      f"{n / (end - start):,.0f} spectra/s wall clock, start-up included ({end - start:.1f} s)")
sys.exit(0 if rows == n else 1)
EOF
done
echo "gpu_check: done (status $status)"
exit "$status"
