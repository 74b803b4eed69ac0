#!/usr/bin/env bash
# The first contact with a GPU: one GPU, installs nothing, at most 5 minutes (the steps' timeouts
# add up to 300 s), the most important checks first.
#
#   bash bench/gpu.sh [DATA_DIR]     # DATA_DIR: $FLOWERS_DATA, else the flower set beside the checkout
#                                    # (../shared/data/flower_dataset) or data/flower_dataset, else
#                                    # generated photos of the flower set's sizes (it says which)
#   DRY_RUN=1 bash bench/gpu.sh      # the CPU dry run (.ci/run): tiny sizes and 40 generated photos,
#                                    # the same steps
#
# 1. the CUDA no-sync tests (tests/test_host_sync.py, tests/test_device_pipeline.py: -k cuda)
# 2. 20 training steps under torch.cuda.set_sync_debug_mode("warn"), counting the warnings, without
#    and with --ema-decay
# 3. model-only vs end-to-end img/s (--pipeline device) at SIZE px, PRECISION, batch 32 and 128: host
#    time a step (perf_counter) and GPU time (CUDA events); memory before and after the decoded images
#    are placed and the peak at batch 128; the host-gather branch forced; CUDA vs CPU augmentation
#    pixels for the same draws
# 4. EPOCHS epochs of training.fit timed, epochs 2.. only (the first's warm-up and every checkpoint
#    write outside the window), with the utilisation of the GPU in use (chosen by UUID; non-numeric
#    samples, as under MIG, reported as unavailable)
# 5. step 3's speeds with torch.compile (CUDA graphs), if its 40 s allow
# Full logs go to $OUT (default /tmp/flowers-gpu-bench); caches and checkpoints to a temporary folder.
# Relative paths (DATA_DIR, OUT) are the caller's. SIZE 224, EPOCHS 6, PRECISION bf16 by default.
set -uo pipefail
CALLER=$PWD
REPO=$(cd "$(dirname "$0")/.." && pwd)
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$CALLER/$1" ;; esac; }

DRY_RUN=${DRY_RUN:-0}
if [ "$DRY_RUN" = 1 ]; then
    SIZE=${SIZE:-32} EPOCHS=${EPOCHS:-2} PRECISION=${PRECISION:-no} STEPS=${STEPS:-2} BATCHES=${BATCHES:-4,8}
    PER_CLASS=8
else
    SIZE=${SIZE:-224} EPOCHS=${EPOCHS:-6} PRECISION=${PRECISION:-bf16} STEPS=${STEPS:-20} BATCHES=${BATCHES:-32,128}
    PER_CLASS=570
fi
GIVEN=${1:-${FLOWERS_DATA:-}}
if [ -z "$GIVEN" ] && [ "$DRY_RUN" != 1 ]; then  # the dry run trains on 40 generated photos unless told
    for candidate in "$REPO/../shared/data/flower_dataset" "$REPO/data/flower_dataset"; do
        [ -d "$candidate" ] && { GIVEN=$candidate; break; }
    done
fi
[ -n "$GIVEN" ] && GIVEN=$(absolute "$GIVEN")
PYTHON=${PYTHON:-python3}
case "$PYTHON" in */*) PYTHON=$(absolute "$PYTHON") ;; esac
OUT=$(absolute "${OUT:-/tmp/flowers-gpu-bench}")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
export HF_HOME=$WORK/hf HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 WANDB_MODE=disabled \
       PYTHONUNBUFFERED=1 ACCELERATE_MIXED_PRECISION=$PRECISION
PROBE=("$PYTHON" "$REPO/bench/gpu_probe.py")
FAILED=0

step() {  # step SECONDS NAME COMMAND...: its summary lines here, everything in $OUT/NAME.log
    local seconds=$1 name=$2; shift 2
    local started=$SECONDS
    timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    grep -E "^(memory|model only|end to end|peak|host-gather|augmentation|sync warnings|  [0-9]+ x|epochs|GPU in use|[0-9]+ (passed|failed|skipped)|FAILED)" \
        "$OUT/$name.log" | grep -v "it/s" || true
    if [ $status = 124 ]; then echo "$name: did not finish in $seconds s (see $OUT/$name.log)"; FAILED=1
    elif [ $status != 0 ]; then echo "$name: failed (exit $status; see $OUT/$name.log)"; FAILED=1
    else echo "$name: done in $((SECONDS - started)) s"; fi
}

echo "== the machine"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,uuid,name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch, torchvision, accelerate; print('torch', torch.__version__, 'torchvision',
  torchvision.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
echo "GPU in use: $("${PROBE[@]}" gpu-in-use)"
echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"

echo "== data"
DATA=$(timeout 20 "${PROBE[@]}" data "$GIVEN" --out "$WORK" --per-class "$PER_CLASS") || { echo "no data"; exit 1; }
COMMON=(--data "$DATA" --image-size "$SIZE" --work "$WORK")

echo "== 1. the CUDA no-sync tests"
step 45 no-sync-tests bash -c "cd '$REPO' && '$PYTHON' -m pytest -q -p no:cacheprovider tests/test_host_sync.py tests/test_device_pipeline.py -k cuda"
echo "== 2. $STEPS steps under set_sync_debug_mode(\"warn\")"
step 22 sync-warnings "${PROBE[@]}" sync-warnings "${COMMON[@]}" --steps "$STEPS" --batch-size "${BATCHES%%,*}"
step 22 sync-warnings-ema "${PROBE[@]}" sync-warnings "${COMMON[@]}" --steps "$STEPS" --batch-size "${BATCHES%%,*}" \
    --ema-decay 0.999
echo "== 3. model-only vs end-to-end, $SIZE px, $PRECISION, batches $BATCHES"
step 75 throughput "${PROBE[@]}" throughput "${COMMON[@]}" --batch-sizes "$BATCHES" --steps "$STEPS"
echo "== 4. $EPOCHS epochs, batch ${BATCHES%%,*}, timed from epoch 2"
step 75 epochs "${PROBE[@]}" epochs "${COMMON[@]}" --epochs "$EPOCHS" --batch-size "${BATCHES%%,*}" --smi "$(command -v nvidia-smi || true)"
echo "== 5. step 3 with torch.compile (CUDA graphs), if 40 s allow"
if [ "$DRY_RUN" = 1 ]; then
    echo "compile: skipped in the dry run (torch.compile gains nothing on a CPU and costs ~40 s)"
else
    step 40 throughput-compile "${PROBE[@]}" throughput "${COMMON[@]}" --batch-sizes "$BATCHES" --steps "$STEPS" --compile
fi
echo "logs: $OUT"
exit $FAILED
