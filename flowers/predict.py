"""Predict the classes of photos with a trained checkpoint (only the checkpoint folder is needed).

    python -m flowers.predict --ckpt best photo.jpg more_photos/ [--top-k 3] [--output predictions.csv]
                              [--tta flip] [--eval-size 160] [--reject-below 0.8]

Prints one line per image with its top-k classes and probabilities: softmax(logits / T) with the
checkpoint's temperature T (1 when it has none; see eval.py --calibrate). With --reject-below P the
line starts with the answer: the top class, or `unknown` when its probability is below P. A file that cannot be read as
an image gets one line on stderr and the others are still predicted; the exit status is then 1.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from PIL import Image

from flowers import calibration, checkpoint, imagefiles
from flowers.cli import run
from flowers.config import PredictConfig, parse
from flowers.engine import predict_logits
from flowers.loading import load_model
from flowers.model import DEFAULT_ARCH, check_eval_size
from flowers.transforms import eval_transform

@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (class, probability), most probable first
    error: Optional[str] = None
    answer: Optional[str] = None  # with --reject-below: the top class, or UNKNOWN


UNKNOWN = "unknown"


def collect_inputs(inputs: list[str]) -> Iterator[tuple[str, Optional[str]]]:
    """(path, problem) for each file named or found (recursively, by image suffix) in a named folder."""
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in imagefiles.IMAGE_EXTENSIONS)
            if not found:
                yield item, "folder holds no image files"
            yield from ((str(p), None) for p in found)
        elif path.is_file():
            yield item, None
        else:
            yield item, "no such file or folder"


def load_image(path: str) -> Image.Image:
    """Decoded exactly as training decodes its images; UnusableImage when not an image."""
    problem = imagefiles.check_image(path)
    if problem:
        raise imagefiles.UnusableImage(problem)
    return imagefiles.load_rgb({"path": path})


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.inference_mode()
def predict(cfg: PredictConfig) -> list[Prediction]:
    ckpt_dir = checkpoint.resolve(cfg.ckpt, cfg.output_dir)
    check_eval_size(checkpoint.load_meta(ckpt_dir).get("arch") or DEFAULT_ARCH, cfg.eval_size)
    model, meta = load_model(ckpt_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    class_names = meta["class_names"]
    norm = meta["normalization"]
    size = cfg.eval_size or int(meta["image_size"])
    transform = eval_transform(size, norm["mean"], norm["std"])
    k = min(cfg.top_k, len(class_names))
    temperature = meta.get("temperature", 1.0)
    mismatch = calibration.setting_mismatch(meta, eval_size=size, tta=cfg.tta)
    if mismatch:
        print(mismatch, file=sys.stderr)

    results = []
    for chunk in _batches(list(collect_inputs(cfg.inputs)), cfg.batch_size):
        tensors, readable = [], []
        for path, problem in chunk:
            if problem is None:
                try:
                    tensors.append(transform(load_image(path)))
                    readable.append(Prediction(path))
                    results.append(readable[-1])
                    continue
                except imagefiles.UnusableImage as e:
                    problem = str(e)
            results.append(Prediction(path, error=problem))
            _say_skipped(results[-1])
        if tensors:
            logits = predict_logits(model, torch.stack(tensors).to(device), cfg.tta)
            probs = torch.from_numpy(calibration.scaled_probabilities(logits.float().cpu().numpy(), temperature))
            top_probs, top_ids = probs.topk(k, dim=1)
            for prediction, p_row, id_row in zip(readable, top_probs.tolist(), top_ids.tolist()):
                prediction.top = [(class_names[i], p) for i, p in zip(id_row, p_row)]
                prediction.answer = answer(prediction.top, cfg.reject_below)
                print(f"{prediction.path}  " + (f"-> {prediction.answer}  " if prediction.answer else "")
                      + "  ".join(f"{name} {p:.1%}" for name, p in prediction.top))
    if cfg.reject_below is not None:
        answered = [r for r in results if r.error is None]
        unknown = sum(r.answer == UNKNOWN for r in answered)
        print(f"unknown: {unknown} of {len(answered)} images (top probability below {cfg.reject_below:g}"
              + (f", temperature {temperature:.3f})" if "temperature" in meta else ", no temperature fitted)"),
              file=sys.stderr)
    return results


def answer(top: list[tuple[str, float]], reject_below: Optional[float]) -> Optional[str]:
    """The top class, or UNKNOWN when its probability is below `reject_below`; None without it."""
    if reject_below is None:
        return None
    name, p = top[0]
    return UNKNOWN if p < reject_below else name


def _say_skipped(prediction: Prediction) -> None:
    print(f"skipped {prediction.path}: {prediction.error}", file=sys.stderr)


def write_csv(path: Path, results: list[Prediction], k: int, with_answer: bool = False) -> None:
    """One row per input: path, [answer,] class_1, probability_1, ..., error."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", *(["answer"] if with_answer else []),
                         *[f"{kind}_{rank}" for rank in range(1, k + 1) for kind in ("class", "probability")], "error"])
        for r in results:
            cells = [cell for name, p in r.top for cell in (name, f"{p:.6f}")]
            writer.writerow([r.path, *([r.answer or ""] if with_answer else []), *cells, *[""] * (2 * k - len(cells)),
                             r.error or ""])


def write_json(path: Path, results: list[Prediction]) -> None:
    rows = [{"path": r.path, **({"answer": r.answer} if r.answer else {}),
             "top_k": [{"class": name, "probability": p} for name, p in r.top]} if r.error is None
            else {"path": r.path, "error": r.error} for r in results]
    path.write_text(json.dumps(rows, indent=2))


def main() -> None:
    cfg = parse(PredictConfig, description=__doc__)
    results = predict(cfg)
    if cfg.output:
        output = Path(cfg.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.suffix.lower() == ".csv":
            k = max((len(r.top) for r in results), default=cfg.top_k)
            write_csv(output, results, k, with_answer=cfg.reject_below is not None)
        else:
            write_json(output, results)
        print(f"predictions written to {output}", file=sys.stderr)
    if any(r.error for r in results):
        sys.exit(1)


if __name__ == "__main__":
    run(main)
