import collections

import pytest
import torch
from PIL import Image
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


IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}  # torchvision's ResNet18 weights' values


def test_eval_transform_normalises_with_imagenet_statistics():
    """A white and a black photo come out as (1 - mean) / std and -mean / std per channel."""
    for value in (0, 255):
        out = eval_transform(32)(Image.new("RGB", (50, 40), (value,) * 3))
        for channel, (mean, std) in enumerate(zip(IMAGENET["mean"], IMAGENET["std"])):
            expected = torch.full((32, 32), (value / 255 - mean) / std)
            torch.testing.assert_close(out[channel], expected, rtol=0, atol=1e-5)


def test_eval_transform_resizes_and_crops_the_centre_and_draws_nothing_random():
    """A 96x64 photo, left third red, middle green, right third blue: the short side goes to
    eval_size(32) = 37 (the long one to 55), and the centre 32x32 crop keeps columns 12-43 of 55,
    so it sees only green in its middle and a red and a blue edge; the same pixels whatever the
    random state (evaluation must not augment)."""
    photo = Image.new("RGB", (96, 64), (0, 255, 0))
    photo.paste((255, 0, 0), (0, 0, 32, 64))
    photo.paste((0, 0, 255), (64, 0, 96, 64))
    transform = eval_transform(32)
    torch.manual_seed(0)
    first = transform(photo)
    torch.manual_seed(1)
    assert torch.equal(transform(photo), first)
    assert first.shape == (3, 32, 32)
    green = (1 - IMAGENET["mean"][1]) / IMAGENET["std"][1]
    assert torch.allclose(first[1, :, 10:22], torch.full((32, 12), green), atol=1e-5)  # middle: pure green
    red_at_left, blue_at_right = first[0, :, 0], first[2, :, -1]
    assert (red_at_left > 0).all() and (blue_at_right > 0).all()  # the crop reaches into both side thirds


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
