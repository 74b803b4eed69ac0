"""Export a checkpoint for serving: ONNX (onnxruntime and friends) or TorchScript (C++ / mobile).

    python -m flowers.export --ckpt best --format onnx|torchscript [--out DIR]

Writes the model and a copy of checkpoint.json (class names, image size, normalisation) into
`<run>/export-<ckpt>/`, checks that the exported model gives the same top-1 class as PyTorch,
and prints the model's path last. Inputs: float32 NCHW images, normalised as in the JSON.
The exported model returns logits; the JSON's `temperature` (when eval.py --calibrate or training
fitted one) turns them into calibrated probabilities: `probabilities(logits, folder)`.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from flowers import checkpoint
from flowers.cli import run
from flowers.config import ExportConfig, parse
from flowers.loading import load_model
from flowers.errors import UserError

FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        import onnx  # noqa: F401  (the exporter needs onnx and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("ONNX export needs the onnx extra: pip install 'flowers[onnx]' "
                        "(or use --format torchscript)") from None
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes={"x": {0: batch}}, dynamo=True, external_data=False, verbose=False)


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated upstream but still the C++/mobile format
        traced = torch.jit.trace(model, example)
    traced.save(str(path))


def load_exported(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function from a float32 NCHW batch to logits, running the exported file."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda images: session.run([OUTPUT_NAME], {INPUT_NAME: images.astype(np.float32)})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run_torchscript(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(images)).numpy()
    return run_torchscript


def probabilities(logits: np.ndarray, folder: Path) -> np.ndarray:
    """Calibrated class probabilities (N, C) from an exported model's logits: softmax(logits / T) with
    the temperature in the export folder's checkpoint.json (1 when it has none)."""
    from flowers.calibration import scaled_probabilities

    return scaled_probabilities(logits, checkpoint.load_meta(Path(folder)).get("temperature", 1.0))


def export(cfg: ExportConfig) -> Path:
    ckpt_dir = checkpoint.resolve(cfg.ckpt, cfg.output_dir)
    model, meta = load_model(ckpt_dir)
    model.eval()
    size = int(meta["image_size"])
    out_dir = Path(cfg.out) if cfg.out else ckpt_dir.parent / f"export-{ckpt_dir.name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILE_NAMES[cfg.format]
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    (_export_onnx if cfg.format == "onnx" else _export_torchscript)(model, example, path)
    shutil.copyfile(ckpt_dir / checkpoint.META_FILE, out_dir / checkpoint.META_FILE)

    probe = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(1))  # another batch size too
    with torch.inference_mode():
        expected = model(probe).numpy()
    got = load_exported(path)(probe.numpy())
    same_top1 = bool((expected.argmax(1) == got.argmax(1)).all())
    print(f"{cfg.format} export of {ckpt_dir}: max |logit difference| vs PyTorch {np.abs(expected - got).max():.2e}, "
          f"same top-1: {'yes' if same_top1 else 'NO'}")
    if not same_top1:  # possible on near-tied logits; a real export bug shows large differences
        print(f"warning: the exported model's top-1 differs from PyTorch's on random inputs; check {path}")
    if "temperature" in meta:
        print(f"calibrated probabilities: softmax(logits / {meta['temperature']:.4f}) (temperature in "
              f"{out_dir / checkpoint.META_FILE}; flowers.export.probabilities does it)")
    print(f"exported to {path}")
    return path


def main() -> None:
    export(parse(ExportConfig, description=__doc__))


if __name__ == "__main__":
    run(main)
