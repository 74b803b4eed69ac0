"""Fetch the report's flower photos (2,848 JPEGs in 5 class folders) into data/.

    python -m flowers.download [--dest data]

train.py calls this when no data is configured and data/flower_dataset is absent.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from flowers.errors import UserError

URL = "https://www.dropbox.com/s/snom6v4zfky0flx/flower_dataset.zip?dl=1"
FOLDER = "flower_dataset"
EXPECTED_COUNTS = {"daisy": 588, "dandelion": 556, "rose": 583, "sunflower": 536, "tulip": 585}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _fetch(url: str, target: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(target, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="downloading flower photos") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"could not download the flower photos from {url} ({reason}); offline? "
                        "pass --data PATH (one sub-folder per class) or set $FLOWERS_DATA") from None


def _extract(zip_path: Path, into: Path) -> None:
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for member in archive.namelist():  # refuse entries that would land outside `into`
                if not (into / member).resolve().is_relative_to(into.resolve()):
                    raise UserError(f"{zip_path}: unsafe path in archive: {member}")
            archive.extractall(into)
    except zipfile.BadZipFile:
        raise UserError(f"the download is not a zip file ({zip_path.stat().st_size} bytes)") from None


def class_counts(root: Path) -> dict[str, int]:
    return {d.name: sum(1 for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            for d in sorted(root.iterdir()) if d.is_dir()}


def download(dest: Path = Path("data"), url: str | None = None,
             expected: dict[str, int] | None = None) -> Path:
    """Download and unpack the data set into dest/flower_dataset; check the per-class counts."""
    url = url or os.environ.get("FLOWERS_DATA_URL", URL)
    expected = EXPECTED_COUNTS if expected is None else expected
    final = Path(dest) / FOLDER
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".download-", dir=final.parent))
    try:
        _fetch(url, work / "archive.zip")
        _extract(work / "archive.zip", work / "unpacked")
        unpacked = work / "unpacked" / FOLDER
        if not unpacked.is_dir():
            raise UserError(f"the archive from {url} has no {FOLDER}/ folder")
        counts = class_counts(unpacked)
        if expected and counts != expected:
            raise UserError(f"downloaded data has unexpected images per class: {counts} (expected {expected})")
        os.rename(unpacked, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"flower photos ready in {final} ({sum(counts.values())} images, {len(counts)} classes)")
    return final


def main() -> None:
    from flowers.cli import run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default="data", help="folder to put flower_dataset/ in")
    args = parser.parse_args()
    run(lambda: download(Path(args.dest)))


if __name__ == "__main__":
    main()
