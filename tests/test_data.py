import collections

import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value

from conftest import make_dataset
from flowers.data import collate, image_paths, load_splits, resolve_data, stratified_split, with_transform
from flowers.errors import UserError
from flowers.transforms import eval_transform, train_transform


def test_split_is_stratified_and_deterministic(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=10)
    a = load_splits(str(root), 0.2, seed=1)
    b = load_splits(str(root), 0.2, seed=1)
    c = load_splits(str(root), 0.2, seed=2)
    assert a.class_names == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    assert (len(a.train), len(a.val)) == (40, 10)
    assert collections.Counter(a.val["label"]) == {k: 2 for k in range(5)}  # 2 of each class
    assert image_paths(a.val) == image_paths(b.val)
    assert image_paths(a.val) != image_paths(c.val)
    assert not set(image_paths(a.val)) & set(image_paths(a.train))


def test_presplit_folder_is_used_as_given(tmp_path):
    make_dataset(tmp_path / "d" / "train", per_class=3, classes=["a", "b"])
    make_dataset(tmp_path / "d" / "val", per_class=2, classes=["a", "b"])
    splits = load_splits(str(tmp_path / "d"), 0.2, seed=0)
    assert (len(splits.train), len(splits.val), splits.class_names) == (6, 4, ["a", "b"])


def test_transforms_shapes_and_dtypes(flower_dir):
    splits = load_splits(str(flower_dir), 0.2, seed=0)
    for transform in (train_transform(48), eval_transform(48)):
        batch = collate([with_transform(splits.train, transform)[i] for i in range(3)])
        assert batch["pixel_values"].shape == (3, 3, 48, 48)
        assert batch["pixel_values"].dtype == torch.float32
        assert batch["labels"].dtype == torch.long
        assert -3 < batch["pixel_values"].mean() < 3  # normalised, not 0..255


def test_eval_transform_is_deterministic(flower_dir):
    ds = with_transform(load_splits(str(flower_dir), 0.2, seed=0).val, eval_transform(40))
    assert torch.equal(ds[0]["pixel_values"], ds[0]["pixel_values"])


def test_missing_data_offline_says_how_to_point_at_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLOWERS_DATA_URL", "http://127.0.0.1:9/flower_dataset.zip")  # nothing listens
    with pytest.raises(UserError, match="could not download.*--data.*FLOWERS_DATA"):
        resolve_data(None)
    with pytest.raises(UserError, match="--data.*FLOWERS_DATA"):
        resolve_data(None, download_if_missing=False)
    monkeypatch.setenv("FLOWERS_DATA", "/some/where")
    assert resolve_data(None) == "/some/where"


def test_folder_with_one_class_is_refused(tmp_path):
    make_dataset(tmp_path / "d", per_class=2, classes=["only"])
    with pytest.raises(UserError, match="at least 2"):
        load_splits(str(tmp_path / "d"), 0.2, seed=0)


@pytest.mark.parametrize("val_fraction, seed", [(0.2, 42), (0.3, 7)])
def test_stratified_split_is_exactly_datasets_train_test_split(val_fraction, seed):
    """Our fast split must keep the split of every earlier run (and checkpoint) unchanged."""
    labels = [i % 5 for i in range(97)] + [0, 0, 1]
    ds = Dataset.from_dict({"path": [f"img{i}.jpg" for i in range(len(labels))], "label": labels},
                           features=Features({"path": Value("string"), "label": ClassLabel(names=list("abcde"))}))
    ds = ds.select(range(3, len(ds)))  # with an indices mapping, as a filtered Hub dataset has
    expected = ds.train_test_split(test_size=val_fraction, stratify_by_column="label", seed=seed)
    train, val = stratified_split(ds, val_fraction, seed)
    assert train["path"] == expected["train"]["path"] and val["path"] == expected["test"]["path"]
