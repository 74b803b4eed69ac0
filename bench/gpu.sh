#!/usr/bin/env bash
# GPU benchmark on one GPU; installs nothing and finishes in under 8 minutes.
#
#   bash bench/gpu.sh [DATA_DIR]        # DATA_DIR default: $FLOWERS_DATA, else data/flower_dataset
#
# 1. bench/throughput.py at 224 px, batch 32, bf16: model-only vs end-to-end, start-up, memory.
# 2. train.py for 25 epochs at 224 px, bf16, --cache-resized, with GPU utilisation sampled every
#    200 ms: the sum of the per-epoch times (training + validation), the whole command's time,
#    and the GPU's utilisation while training.
# 3. The same with --compile.
# Logs and JSON go to $OUT (default /tmp/flowers-gpu-bench); caches and checkpoints to a
# temporary folder. SIZE, EPOCHS and PRECISION override 224, 25 and bf16 (a CPU dry run:
# SIZE=32 EPOCHS=2 PRECISION=no).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${1:-${FLOWERS_DATA:-data/flower_dataset}}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/flowers-gpu-bench}
SIZE=${SIZE:-224} EPOCHS=${EPOCHS:-25} PRECISION=${PRECISION:-bf16}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
export HF_HOME=$WORK/hf HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
LAUNCH=("$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1
        --mixed_precision "$PRECISION" --dynamo_backend no)
HAVE_SMI=$(command -v nvidia-smi >/dev/null && echo 1 || echo 0)

[ "$HAVE_SMI" = 1 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch, torchvision, accelerate, datasets; print('torch', torch.__version__, 'torchvision',
  torchvision.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"

echo "== throughput, $SIZE px, batch 32, $PRECISION (the first start-up includes building the resized cache)"
timeout 120 "${LAUNCH[@]}" bench/throughput.py --data "$DATA" --image-size "$SIZE" --batch-size 32 \
    --cache-resized --model-steps 100 --no-plain --json "$OUT/throughput.json" 2>"$OUT/throughput.err" \
    || echo "throughput.py failed (exit $?): see $OUT/throughput.err"

train() {  # train NAME [extra train.py flags]: 25 epochs with utilisation sampled every 200 ms
    local name=$1; shift
    echo "== $name: train.py, $EPOCHS epochs at $SIZE px, $PRECISION, --cache-resized $*"
    local sampler=""
    if [ "$HAVE_SMI" = 1 ]; then
        nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 >"$OUT/$name-util.csv" &
        sampler=$!
    fi
    local started finished
    started=$(date +%s.%N)
    timeout 170 "${LAUNCH[@]}" train.py --data "$DATA" --epochs "$EPOCHS" --image-size "$SIZE" --batch-size 32 \
        --weights none --report-to none --cache-resized --output-dir "$WORK/$name" "$@" \
        >"$OUT/$name.log" 2>"$OUT/$name.err" || echo "train.py failed (exit $?): see $OUT/$name.err"
    finished=$(date +%s.%N)
    [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
    grep -E "^epoch (1|$EPOCHS)/|best" "$OUT/$name.log" || true
    # The per-epoch time is the last "<seconds>s" field of each summary line.
    grep -E "^epoch [0-9]+/" "$OUT/$name.log" | awk -v n="$EPOCHS" -v a="$started" -v b="$finished" '
        {for (i = NF; i > 0; i--) if ($i ~ /^[0-9.]+s$/) {sub("s", "", $i); t += $i; if (NR > 1) rest += $i; break}}
        END {printf "%d epochs: %.1f s of training + validation (epochs 2-%d: %.1f s); whole command %.1f s\n",
                    NR, t, n, rest, b - a}'
    if [ -n "$sampler" ]; then  # between the first and the last busy sample: start-up and shutdown left out
        awk '{u[NR] = $1; if ($1 > 0) {if (!first) first = NR; last = NR}}
             END {for (i = first; i <= last; i++) {n++; sum += u[i]; if (u[i] > 0) busy++}
                  printf "while training: mean GPU utilisation %.0f%%, samples with the GPU busy %.0f%%\n",
                         sum / n, 100 * busy / n}' "$OUT/$name-util.csv"
    fi
}
train plain
train compiled --compile
