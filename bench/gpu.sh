#!/usr/bin/env bash
# GPU benchmark on one GPU; installs nothing and finishes in under 8 minutes.
#
#   bash bench/gpu.sh [DATA_DIR]        # DATA_DIR default: $FLOWERS_DATA, else data/flower_dataset
#
# 1. bench/throughput.py at 224 px, batch 32, bf16: model-only vs end-to-end, startup, memory.
# 2. train.py for 25 epochs at 224 px, bf16, with GPU utilisation sampled every 200 ms: the sum of
#    the per-epoch times (training + validation) and the share of samples with the GPU busy.
# Results go to $OUT (default /tmp/flowers-gpu-bench). Extra flags for train.py: $TRAIN_FLAGS
# (e.g. TRAIN_FLAGS=--compile).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${1:-${FLOWERS_DATA:-data/flower_dataset}}
PYTHON=${PYTHON:-python}
OUT=${OUT:-/tmp/flowers-gpu-bench}
mkdir -p "$OUT"
export HF_HOME=${HF_HOME:-$OUT/hf} HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 WANDB_MODE=disabled
LAUNCH=("$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1
        --mixed_precision bf16 --dynamo_backend no)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== throughput, 224 px, batch 32, bf16 (cache build included in the first start-up)"
timeout 200 "${LAUNCH[@]}" bench/throughput.py --data "$DATA" --image-size 224 --batch-size 32 \
    --cache-resized --model-steps 100 --no-plain --json "$OUT/throughput.json" 2>"$OUT/throughput.err"

echo "== train.py, 25 epochs at 224 px, bf16, --cache-resized ${TRAIN_FLAGS:-}"
nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 >"$OUT/utilization.csv" &
SAMPLER=$!
trap 'kill $SAMPLER 2>/dev/null || true' EXIT
started=$(date +%s.%N)
# shellcheck disable=SC2086
timeout 240 "${LAUNCH[@]}" train.py --data "$DATA" --epochs 25 --image-size 224 --batch-size 32 \
    --weights none --report-to none --cache-resized --output-dir "$OUT/outputs" ${TRAIN_FLAGS:-} \
    2>"$OUT/train.err" | tee "$OUT/train.log" | grep -E "^epoch (1|25)/|best val_acc"
finished=$(date +%s.%N)
kill $SAMPLER 2>/dev/null || true

# Per-epoch times are the numbers before the final "s" of each summary line ("... 1.2s").
grep -E "^epoch [0-9]+/" "$OUT/train.log" \
  | awk '{for (i = NF; i > 0; i--) if ($i ~ /^[0-9.]+s$/) {sub("s", "", $i); t += $i; break}}
         END {printf "25 epochs: %.1f s of training + validation time\n", t}'
# Utilisation between the first and the last busy sample (start-up and shutdown left out).
awk -v wall="$(awk -v a="$started" -v b="$finished" 'BEGIN {print b - a}')" \
    '{u[NR] = $1; if ($1 > 0) {if (!first) first = NR; last = NR}}
     END {for (i = first; i <= last; i++) {n++; sum += u[i]; if (u[i] > 0) busy++}
          printf "whole command %.1f s; while training: GPU busy in %.0f%% of samples, mean utilisation %.0f%%\n",
                 wall, 100 * busy / n, sum / n}' "$OUT/utilization.csv"
