"""Bad images and bad folders: training and eval complete, each unusable file is named once,
--strict fails listing them, every decodable image reaches the model as upright RGB."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TRAIN, make_dataset, run_cli
from flowers import imagefiles
from flowers.data import collate, load_splits, with_transform
from flowers.errors import UserError

ODD_CLASS = "rosé rouge"  # a space and a non-ASCII letter

# file (relative to the data folder) -> why it cannot be used
UNUSABLE = {
    "daisy/truncated.jpg": "cannot decode",
    "daisy/empty.jpg": "empty file",
    "daisy/notes.txt": "not an image file extension",
    "daisy/.DS_Store": "hidden file",
    "daisy/document.jpg": "not an image",
    f"{ODD_CLASS}/truncated.png": "cannot decode",
    "stray.jpg": "not inside a class folder",
}
# decodable oddities: all must be used
ODD_BUT_USABLE = ["gray.jpg", "cmyk.jpg", "rgba.png", "palette.png", "deep16.png", "photo.webp",
                  "huge.jpg", "tiny.png", "rotated.jpg", "nested/deeper.jpg"]


def _real_jpeg_bytes(folder: Path) -> bytes:
    return next(p for p in sorted(folder.iterdir()) if p.suffix == ".jpg").resolve().read_bytes()


def write_odd_images(folder: Path, photo: bytes) -> None:
    """Every decodable oddity of the issue, small, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("L", (64, 48), 128).save(folder / "gray.jpg")
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # red in CMYK
    Image.new("RGBA", (64, 48), (255, 0, 0, 0)).save(folder / "rgba.png")  # fully transparent
    palette = Image.new("P", (64, 48), 0)
    palette.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    palette.paste(1, (0, 0, 32, 48))
    palette.save(folder / "palette.png", transparency=0)  # right half transparent
    Image.fromarray(np.full((48, 64), 40000, dtype=np.uint16)).save(folder / "deep16.png")
    Image.new("RGB", (64, 48), (0, 0, 255)).save(folder / "photo.webp")
    Image.new("L", (10_000, 10_000), 90).save(folder / "huge.jpg", quality=50)
    Image.new("RGB", (1, 1), (0, 255, 0)).save(folder / "tiny.png")
    rotated = Image.new("RGB", (80, 40), (200, 200, 0))
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to display
    rotated.save(folder / "rotated.jpg", exif=exif)
    (folder / "nested").mkdir(exist_ok=True)
    (folder / "nested" / "deeper.jpg").write_bytes(photo)


def make_dirty_folder(root: Path) -> Path:
    """Two classes of real photos plus every bad file and folder case from the issue."""
    make_dataset(root, per_class=6, classes=["daisy", "rose"])
    (root / "rose").rename(root / ODD_CLASS)
    photo = _real_jpeg_bytes(root / "daisy")
    write_odd_images(root / ODD_CLASS, photo)
    (root / "daisy" / "truncated.jpg").write_bytes(photo[: len(photo) // 2])
    (root / "daisy" / "empty.jpg").write_bytes(b"")
    (root / "daisy" / "notes.txt").write_text("shot in May\n")
    (root / "daisy" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (root / "daisy" / "document.jpg").write_bytes(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")
    Image.new("RGB", (64, 64), (9, 9, 9)).save(root / ODD_CLASS / "truncated.png")
    png = (root / ODD_CLASS / "truncated.png").read_bytes()
    (root / ODD_CLASS / "truncated.png").write_bytes(png[:-20])
    (root / "stray.jpg").write_bytes(photo)
    (root / "empty class").mkdir()
    return root


@pytest.fixture(scope="module")
def dirty_dir(tmp_path_factory) -> Path:
    return make_dirty_folder(tmp_path_factory.mktemp("dirty") / "data")


def _usable_count(root: Path) -> int:
    return 6 + 6 + len(ODD_BUT_USABLE)  # the photos of both classes and the decodable oddities


@pytest.mark.slow
def test_dirty_folder_trains_and_evaluates_skipping_each_bad_file_once(dirty_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("python", "train.py", "--data", str(dirty_dir), "--epochs", "1", "--output-dir", str(out),
                   "--run-name", "dirty", *TINY_TRAIN)
    text = proc.stdout + proc.stderr
    for name, reason in UNUSABLE.items():
        lines = [line for line in text.splitlines() if f"skipped {name}:" in line]
        assert len(lines) == 1 and reason in lines[0], (name, lines, text[-3000:])
    total = len(UNUSABLE) + _usable_count(dirty_dir)
    assert f"skipped {len(UNUSABLE)} of {total} files" in text
    assert "class folder empty class/ has no usable images; ignored" in text
    assert f"{ODD_CLASS}/ has images in sub-folders" in text
    assert f"{len(UNUSABLE)} unusable image file(s) were skipped" in proc.stdout.splitlines()[-1]
    for odd in ODD_BUT_USABLE:
        assert odd not in text, f"{odd} is decodable but was reported"

    meta = json.loads((out / "dirty" / "best" / "checkpoint.json").read_text())
    assert meta["class_names"] == ["daisy", ODD_CLASS]
    assert meta["data"]["train_size"] + meta["data"]["val_size"] == _usable_count(dirty_dir)

    proc = run_cli("python", "eval.py", "--ckpt", "best", "--output-dir", str(out), "--data", str(dirty_dir),
                   "--workers", "0")
    assert f"{_usable_count(dirty_dir)} images in " in proc.stdout  # every usable image evaluated


@pytest.mark.slow
def test_strict_fails_listing_every_unusable_file(dirty_dir, tmp_path):
    proc = run_cli("python", "train.py", "--data", str(dirty_dir), "--epochs", "1", "--strict",
                   "--output-dir", str(tmp_path / "out"), *TINY_TRAIN, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    for name in UNUSABLE:
        assert f"unusable {name}:" in text
    assert re.search(rf"--strict: {len(UNUSABLE)} of \d+ files .* are not usable images", text)
    assert "Traceback" not in text
    assert not (tmp_path / "out").exists()


def test_every_decodable_oddity_becomes_upright_rgb(tmp_path):
    folder = tmp_path / "odd"
    Image.new("RGB", (30, 20), (1, 2, 3)).save(tmp_path / "photo.jpg")
    write_odd_images(folder, (tmp_path / "photo.jpg").read_bytes())
    for path in sorted(folder.rglob("*.*")):
        assert imagefiles.check_image(str(path)) is None, path
        assert imagefiles.load_rgb({"path": str(path), "bytes": None}).mode == "RGB"

    def pixel(name: str, xy=(0, 0)) -> tuple:
        return imagefiles.load_rgb({"path": str(folder / name), "bytes": None}).getpixel(xy)

    assert imagefiles.load_rgb({"path": str(folder / "rotated.jpg"), "bytes": None}).size == (40, 80)
    assert pixel("deep16.png") == (156, 156, 156)          # 40000 / 256, not clipped to 255
    assert pixel("rgba.png") == (255, 255, 255)            # transparent -> white, not black
    assert pixel("palette.png", (0, 0)) == (255, 0, 0) and pixel("palette.png", (40, 0)) == (255, 255, 255)
    r, g, b = pixel("cmyk.jpg")
    assert r > 200 and g < 60 and b < 60
    assert pixel("gray.jpg")[0] == pixel("gray.jpg")[1] == pixel("gray.jpg")[2]
    assert pixel("tiny.png") == (0, 255, 0)
    huge = imagefiles.load_rgb({"path": str(folder / "huge.jpg"), "bytes": None})
    assert 2048 <= min(huge.size) <= 5000  # decoded at a reduced scale, not 10000 x 10000


def test_image_broken_after_the_scan_is_left_out_of_its_batch(tmp_path, capsys):
    data = make_dataset(tmp_path / "d", per_class=3, classes=["a", "b"])
    splits = load_splits(str(data), 0.5, seed=0)
    ds = with_transform(splits.train, lambda img: torch.zeros(3, 8, 8))
    victim = Path(ds.with_format(None)[0]["image"]["path"])
    victim.unlink()  # a symlink to a real photo: replace it, never write through it
    victim.write_bytes(b"garbage")
    batch = collate(ds.__getitems__(list(range(len(ds)))))
    # the batch keeps its size (DDP ranks exchange equal batches); the broken image does not count
    assert batch["pixel_values"].shape[0] == len(ds)
    assert batch["valid"].tolist() == [False] + [True] * (len(ds) - 1)
    assert f"skipped {victim}: cannot decode" in capsys.readouterr().out


def test_bad_folders_give_one_clear_line(tmp_path, capsys):
    one_class = make_dataset(tmp_path / "one", per_class=3, classes=["daisy"])
    with pytest.raises(UserError, match="1 class folder"):
        load_splits(str(one_class), 0.2, seed=0)

    wrapper = tmp_path / "wrapper"
    make_dataset(wrapper / "flower_dataset", per_class=3, classes=["a", "b"])
    with pytest.raises(UserError, match="did you mean --data .*flower_dataset"):
        load_splits(str(wrapper), 0.2, seed=0)

    a_file = tmp_path / "photos.zip"
    a_file.write_bytes(b"PK")
    with pytest.raises(UserError, match="is a file"):
        load_splits(str(a_file), 0.2, seed=0)

    only_bad = make_dataset(tmp_path / "bad", per_class=4, classes=["a", "b"])
    (only_bad / "c").mkdir()
    (only_bad / "c" / "x.jpg").write_bytes(b"not a jpeg")
    splits = load_splits(str(only_bad), 0.5, seed=0)
    assert splits.class_names == ["a", "b"]
    out = capsys.readouterr().out
    assert "class folder c/ has no usable images; ignored" in out and "skipped c/x.jpg" in out


def test_scan_verdicts_are_cached_by_size_and_modification_time(tmp_path):
    """A second scan of a folder reuses each unchanged file's verdict (fast for 100,000 files) and
    checks again every file whose size or modification time changed."""
    root = make_dataset(tmp_path / "flowers", per_class=3)
    cache = tmp_path / "scans"
    victim = next((root / "rose").iterdir())
    good = Image.new("RGB", (40, 30), (200, 30, 30))
    victim.unlink()
    good.save(victim, format="JPEG")
    assert not imagefiles.scan_folder(root, cache_dir=cache).skipped
    assert len(list(cache.glob("*.json"))) == 1

    stat = victim.stat()
    victim.write_bytes(b"\0" * stat.st_size)  # broken, with the same size and modification time
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not imagefiles.scan_folder(root, cache_dir=cache).skipped  # the cached verdict: unchanged file

    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert [path for path, _ in imagefiles.scan_folder(root, cache_dir=cache).skipped] == [str(victim)]
