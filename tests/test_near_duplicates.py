"""Near-duplicate photos (resized or re-encoded copies) stay on one side of the split and are named by
the data check; with no groups the split is exactly the plain stratified one; the groups a run used
rebuild its split, and a record without groups rebuilds the plain split."""

import collections
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowers import duplicates
from flowers.data import SplitOptions, _load_folder, image_paths, load_splits, recorded_split
from flowers.datacheck import find_problems


def _photo(rng: np.random.Generator) -> Image.Image:
    """A smooth random picture (a 6x5 colour grid blown up), so its difference hash is its own."""
    grid = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((120, 100), Image.Resampling.BICUBIC)


def _resized_reencoded(path: Path) -> bytes:
    img = Image.open(path)
    small = img.resize((img.width * 3 // 5, img.height * 3 // 5), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=60)
    return buffer.getvalue()


def make_photos(root: Path, classes=("a", "b", "c"), per_class: int = 10, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _photo(rng).save(root / name / f"{name}{i}.jpg", quality=92)
    return root


def test_a_resized_reencoded_copy_has_a_close_hash_and_other_photos_do_not(tmp_path):
    root = make_photos(tmp_path / "p")
    original = root / "a" / "a0.jpg"
    (tmp_path / "copy.jpg").write_bytes(_resized_reencoded(original))
    near = duplicates.file_hash(str(tmp_path / "copy.jpg")) ^ duplicates.file_hash(str(original))
    assert bin(near).count("1") <= duplicates.DEFAULT_DISTANCE
    hashes = np.array([duplicates.file_hash(str(p)) for p in sorted(root.glob("*/*.jpg"))], dtype=np.uint64)
    assert duplicates.groups_of(hashes, max_distance=duplicates.DEFAULT_DISTANCE) == []
    Image.new("RGB", (50, 40), (10, 200, 30)).save(tmp_path / "flat.png")
    assert duplicates.file_hash(str(tmp_path / "flat.png")) is None  # no gradient: nothing to compare


@pytest.mark.parametrize("seed", range(6))
def test_a_copy_lands_on_the_side_of_its_original_and_the_data_check_names_it(tmp_path, seed):
    root = make_photos(tmp_path / "p")
    (root / "a" / "a0-small.jpg").write_bytes(_resized_reencoded(root / "a" / "a0.jpg"))  # same class
    (root / "b" / "a3-in-b.jpg").write_bytes(_resized_reencoded(root / "a" / "a3.jpg"))  # another class

    splits = load_splits(str(root), 0.3, seed)

    assert sorted(map(sorted, splits.groups)) == [["a/a0-small.jpg", "a/a0.jpg"], ["a/a3.jpg", "b/a3-in-b.jpg"]]
    val = {str(Path(p).relative_to(root)) for p in image_paths(splits.val)}
    for group in splits.groups:
        assert len({p in val for p in group}) == 1, (group, sorted(val))
    assert len(splits.train) + len(splits.val) == 32
    # still stratified: 3 units of each class (30 units, 9 held out), a group counting as one
    assert sorted(collections.Counter(splits.val["label"]).values()) in ([3, 3, 3], [3, 3, 4], [3, 4, 4])

    text = "\n".join(find_problems([splits.train, splits.val], splits.class_names, splits.group_paths()))
    assert "1 group(s) of near-duplicate photos (resized or re-encoded copies) are in different classes " \
           "(a label is likely wrong):\n  a/a3.jpg ~ b/a3-in-b.jpg" in text
    assert "1 group(s) of near-duplicate photos within a class (each kept on one side of the split): " \
           "a/a0-small.jpg ~ a/a0.jpg" in text


def test_without_groups_the_split_is_exactly_the_plain_stratified_one(tmp_path):
    """No near-duplicates found, or the search off: datasets' own stratified train_test_split of the
    same rows, as every split was before groups existed."""
    root = make_photos(tmp_path / "p", per_class=12)
    ds, _ = _load_folder(root)
    for seed in (0, 1, 42):
        old = ds.train_test_split(test_size=0.2, stratify_by_column="label", seed=seed)
        for options in (SplitOptions(), SplitOptions(duplicate_distance=-1), SplitOptions(groups=[])):
            splits = load_splits(str(root), 0.2, seed, options=options)
            assert splits.groups == []
            assert image_paths(splits.val) == image_paths(old["test"])
            assert image_paths(splits.train) == image_paths(old["train"])


def test_recorded_groups_rebuild_the_split_and_no_record_is_the_plain_split(tmp_path):
    root = make_photos(tmp_path / "p")
    for name, copy in (("a0", "a/copy.jpg"), ("b1", "b/copy.jpg"), ("c2", "c/copy.jpg")):
        (root / copy).write_bytes(_resized_reencoded(root / name[0] / f"{name}.jpg"))
    run = load_splits(str(root), 0.3, 7)
    meta = {"groups": run.groups}  # what checkpoint_meta records
    again = load_splits(str(root), 0.3, 7, options=recorded_split(meta))
    assert image_paths(again.val) == image_paths(run.val)
    older = load_splits(str(root), 0.3, 7, options=recorded_split({}))  # a checkpoint saved before groups
    plain = load_splits(str(root), 0.3, 7, options=SplitOptions(duplicate_distance=-1))
    assert older.groups == [] and image_paths(older.val) == image_paths(plain.val)


def test_folds_partition_the_images_stratified_with_groups_whole(tmp_path):
    root = make_photos(tmp_path / "p", per_class=9)
    (root / "a" / "copy.jpg").write_bytes(_resized_reencoded(root / "a" / "a0.jpg"))
    splits = [load_splits(str(root), 0.2, 3, options=SplitOptions(fold=(k, 3))) for k in (1, 2, 3)]
    vals = [set(image_paths(s.val)) for s in splits]
    assert sum(map(len, vals)) == 28 and set.union(*vals) == set(image_paths(splits[0].train)) | vals[0]
    for s, val in zip(splits, vals):
        assert not val & set(image_paths(s.train))
        assert sorted(collections.Counter(s.val["label"]).values())[0] >= 3  # each class in each fold
    together = [i for i, val in enumerate(vals) if str(root / "a" / "a0.jpg") in val]
    assert together == [i for i, val in enumerate(vals) if str(root / "a" / "copy.jpg") in val]
