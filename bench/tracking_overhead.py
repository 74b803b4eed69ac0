"""W&B (offline) overhead per training run: import, run start, 25 epoch logs, end (chart, table, artifact).

    python bench/tracking_overhead.py DATA_FOLDER      # everything it writes goes to a temp folder
"""
import os, shutil, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
root = Path(tempfile.mkdtemp(prefix="wb-overhead-"))
for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "HF_HOME"):
    os.environ[k] = str(root / k.lower()); os.makedirs(os.environ[k], exist_ok=True)
os.environ.update(WANDB_MODE="offline", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1")
import numpy as np, torch
from flowers import checkpoint, tracking
from flowers.data import load_splits
from flowers.model import build_model
from flowers.runtime import environment, make_accelerator
splits = load_splits(sys.argv[1], 0.2, 42)
acc = make_accelerator(0, 1, ["wandb"], project_dir=str(root))
run_dir = root / "out" / "bench"; run_dir.mkdir(parents=True)
model = build_model(5, "none")
checkpoint.save_checkpoint(run_dir / "best", model.state_dict(),
    {"epoch": 1, "metrics": {"val_accuracy": 0.5}, "class_names": splits.class_names, "arch": "resnet18", "image_size": 224})
info = tracking.run_info({"lr": 1e-3}, splits.source, splits.class_names, len(splits.train), len(splits.val), environment(acc))
t0 = time.perf_counter(); import wandb; t1 = time.perf_counter()
tracking.start(acc, tracking.RunInfo("wandb", None, "bench", run_dir, info)); t2 = time.perf_counter()
for epoch in range(1, 26):
    tracking.log_epoch(acc, epoch, {"train_loss": 1.0 / epoch, "val_accuracy": epoch / 26})
t3 = time.perf_counter()
n = len(splits.val)
scores = np.random.default_rng(0).normal(size=(n, 5)).astype("float32")
shown = tracking.ValidationOutputs(1, scores, np.asarray(splits.val["label"]), splits.class_names, splits.val)
tracking.finish(acc, run_dir, shown, 25)
t4 = time.perf_counter()
print(f"val images {n}: import wandb {t1-t0:.2f}s  start {t2-t1:.2f}s  25 epoch logs {t3-t2:.2f}s  "
      f"end (chart+table+45MB artifact+close) {t4-t3:.2f}s  total {t4-t0:.2f}s")
shutil.rmtree(root, ignore_errors=True)
