#!/usr/bin/env bash
# GPU benchmark on one GPU; installs nothing and finishes in under 8 minutes on an H200.
#
#   bash bench/gpu.sh [DATA_DIR]        # DATA_DIR default: $FLOWERS_DATA, else data/flower_dataset
#   SIZE=32 EPOCHS=2 PRECISION=no bash bench/gpu.sh DATA_DIR     # the CPU dry run: must pass first
#
# For both data pipelines (--pipeline workers: DataLoader workers + PIL; --pipeline device: decoded
# images on the GPU, batches augmented there):
# 1. bench/throughput.py at SIZE px, batch 32: model-only vs end-to-end img/s, start-up, peak memory.
# 2. train.py for EPOCHS epochs at SIZE px, PRECISION, batch 32, with nvidia-smi sampling the GPU's
#    utilisation and memory every 200 ms: the sum of epoch_time_s (training + validation, from
#    history.jsonl), the whole command's time, the mean utilisation while training, the peak memory.
# 3. The device pipeline at a larger batch (BIG_BATCH, default 128, learning rate scaled with it).
# Logs and JSON go to $OUT (default /tmp/flowers-gpu-bench); caches and checkpoints to a temporary
# folder. SIZE, EPOCHS and PRECISION default to 224, 25 and bf16.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${1:-${FLOWERS_DATA:-data/flower_dataset}}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/flowers-gpu-bench}
SIZE=${SIZE:-224} EPOCHS=${EPOCHS:-25} PRECISION=${PRECISION:-bf16} BIG_BATCH=${BIG_BATCH:-128}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
export HF_HOME=$WORK/hf HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
LAUNCH=("$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1
        --mixed_precision "$PRECISION" --dynamo_backend no)
HAVE_SMI=$(command -v nvidia-smi >/dev/null && echo 1 || echo 0)
FAILED=0

[ "$HAVE_SMI" = 1 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch, torchvision, accelerate, datasets; print('torch', torch.__version__, 'torchvision',
  torchvision.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"

for pipeline in workers device; do
    echo "== throughput, --pipeline $pipeline, $SIZE px, batch 32, $PRECISION (the first start-up builds the resized cache)"
    timeout 150 "${LAUNCH[@]}" bench/throughput.py --data "$DATA" --image-size "$SIZE" --batch-size 32 \
        --pipeline "$pipeline" --cache-resized --model-steps 100 --no-plain --json "$OUT/throughput-$pipeline.json" \
        2>"$OUT/throughput-$pipeline.err" | grep -E "^(machine|startup|train|eval|peak)" \
        || { echo "throughput.py failed: see $OUT/throughput-$pipeline.err"; FAILED=1; }
done

train() {  # train NAME [train.py flags]: EPOCHS epochs, the GPU sampled every 200 ms
    local name=$1; shift
    echo "== $name: train.py, $EPOCHS epochs at $SIZE px, $PRECISION $*"
    local sampler=""
    if [ "$HAVE_SMI" = 1 ]; then
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 >"$OUT/$name-smi.csv" &
        sampler=$!
    fi
    local started finished
    started=$(date +%s.%N)
    timeout 200 "${LAUNCH[@]}" train.py --data "$DATA" --epochs "$EPOCHS" --image-size "$SIZE" --weights none \
        --report-to none --cache-resized --output-dir "$WORK/$name" --run-name run "$@" \
        >"$OUT/$name.log" 2>"$OUT/$name.err" || { echo "train.py failed (exit $?): see $OUT/$name.err"; FAILED=1; }
    finished=$(date +%s.%N)
    if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null || true; fi
    grep -E "^(device pipeline|epoch (1|$EPOCHS)/|best)" "$OUT/$name.log" || true
    "$PYTHON" - "$WORK/$name/run/history.jsonl" "$started" "$finished" <<'EOF' || FAILED=1
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
total = sum(r["epoch_time_s"] for r in rows)
print(f"{len(rows)} epochs: {total:.1f} s of training + validation (epochs 2-{len(rows)}: "
      f"{total - rows[0]['epoch_time_s']:.1f} s); best val_acc {max(r['val_accuracy'] for r in rows):.2%}; "
      f"whole command {float(sys.argv[3]) - float(sys.argv[2]):.1f} s")
EOF
    if [ -n "$sampler" ]; then  # between the first and the last busy sample: start-up and shutdown left out
        awk -F', *' '{u[NR] = $1; m[NR] = $2; if ($1 > 0) {if (!first) first = NR; last = NR}}
             END {for (i = first; i <= last; i++) {n++; sum += u[i]; if (u[i] > 0) busy++; if (m[i] > peak) peak = m[i]}
                  printf "while training: mean GPU utilisation %.0f%%, samples with the GPU busy %.0f%%, peak memory %.1f GiB\n",
                         sum / n, 100 * busy / n, peak / 1024}' "$OUT/$name-smi.csv"
    fi
}
train workers-b32 --pipeline workers --batch-size 32
train device-b32 --pipeline device --batch-size 32
BIG_LR=$("$PYTHON" -c "print(2e-3 * $BIG_BATCH / 32)")
train "device-b$BIG_BATCH" --pipeline device --batch-size "$BIG_BATCH" --lr "$BIG_LR"
exit $FAILED
