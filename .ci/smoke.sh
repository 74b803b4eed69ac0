#!/usr/bin/env bash
# Smoke test of one Python interpreter, as a user installs and runs the package:
#     .ci/smoke.sh PYTHON [--minimum]
# (--minimum: with the minimum versions setup.cfg declares, whose APIs tests/test_minimum_versions.py checks)
# a fresh venv, `pip install -e .`, a tiny real training run, then eval.py on its best checkpoint,
# which must reproduce the accuracy recorded at training time. Photos: a few per class copied from
# ../shared/data/flower_dataset (beside the checkout in CI), or generated when it is absent.
# Everything is written under a temporary folder (the venv is ~6 GB), removed at the end.
set -euo pipefail
python=${1:?usage: .ci/smoke.sh PYTHON [--minimum]}
minimum=${2:-}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/flowers-smoke.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "smoke: $("$python" --version 2>&1) ($python)"

start=$SECONDS
"$python" -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q --upgrade pip
if [ "$minimum" = --minimum ]; then
    # exactly the minimum versions setup.cfg declares (install_requires, >= read as ==), and pytest for
    # tests/test_minimum_versions.py
    sed -n '/^install_requires =/,/^\[/p' "$repo/setup.cfg" | grep -oE "^ +[A-Za-z0-9_-]+>=[0-9.]+" \
        | sed 's/^ *//; s/>=/==/' > "$work/minimum.txt"
    "$py" -m pip install -q -e "$repo" pytest -c "$work/minimum.txt"
else
    "$py" -m pip install -q -e "$repo"
fi
echo "smoke: installed in $((SECONDS - start)) s"

export HF_HOME="$work/hf" TORCH_HOME="$work/torch" MPLCONFIGDIR="$work/mpl" WANDB_DIR="$work/wandb" \
       WANDB_MODE=disabled HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 HF_EVALUATE_OFFLINE=1
unset FLOWERS_DATA PYTHONPATH

# 6 photos per class (5 classes x 6 x 20% = 6 validation images, one per class), and one photo twice,
# so that the duplicate check hashes files (hashlib's API differs across Python versions)
"$py" - "$(dirname "$repo")/shared/data/flower_dataset" "$work/photos" <<'EOF'
import shutil, sys
from pathlib import Path
from PIL import Image

real, photos = Path(sys.argv[1]), Path(sys.argv[2])
for index, name in enumerate(["daisy", "dandelion", "rose", "sunflower", "tulip"]):
    (photos / name).mkdir(parents=True)
    files = sorted((real / name).glob("*.jpg"))[:6] if (real / name).is_dir() else []
    for src in files:
        shutil.copyfile(src, photos / name / src.name)  # a copy: nothing is ever written beside the source
    for i in range(6 - len(files)):
        Image.new("RGB", (80, 60), (index * 50, (i * 40) % 256, 255 - index * 40)).save(photos / name / f"{i}.jpg")
first = sorted((photos / "daisy").iterdir())[0]
shutil.copyfile(first, first.with_name("copy-" + first.name))
EOF

cd "$work"
start=$SECONDS
fail() { tail -n 40 "$1" >&2; echo "smoke: $2" >&2; exit 1; }
"$py" "$repo/train.py" --data photos --image-size 32 --epochs 1 --weights none --report-to none --workers 0 \
      --batch-size 8 > train.log 2>&1 || fail train.log "train.py failed"
grep -E "^(data|epoch|best)" train.log || true
"$py" "$repo/eval.py" --ckpt best --workers 0 > eval.log 2>&1 || fail eval.log "eval.py failed"
grep "matches the accuracy recorded at training time" eval.log \
    || fail eval.log "eval.py does not reproduce the accuracy recorded at training time"
echo "smoke: $("$python" --version 2>&1): train + eval passed in $((SECONDS - start)) s"
if [ "$minimum" = --minimum ]; then
    FLOWERS_MINIMUM_VERSIONS=1 "$py" -m pytest -q -p no:cacheprovider "$repo/tests/test_minimum_versions.py"
fi
