"""Data checks: byte-identical images across/within classes and class imbalance, as warnings."""

import shutil

from flowers.data import full_dataset
from flowers.datacheck import find_problems

from conftest import make_dataset


def test_reports_an_image_in_two_classes_and_a_duplicate_within_one(tmp_path):
    root = make_dataset(tmp_path / "flowers", per_class=3)
    rose = sorted((root / "rose").iterdir())[0]
    shutil.copyfile(rose, root / "tulip" / "copy_of_rose.jpg")
    daisy = sorted((root / "daisy").iterdir())[0]
    shutil.copyfile(daisy, root / "daisy" / "again.jpg")
    dataset, names = full_dataset(str(root))

    text = "\n".join(find_problems([dataset], names))

    assert "1 image(s) have byte-identical copies in different classes" in text
    assert f"rose/{rose.name}" in text and "tulip/copy_of_rose.jpg" in text
    assert "duplicated within their class" in text and "daisy/again.jpg" in text
    assert "imbalance" not in text


def test_clean_balanced_data_gives_no_warning(tmp_path):
    dataset, names = full_dataset(str(make_dataset(tmp_path / "flowers", per_class=3)))
    assert find_problems([dataset], names) == []


def test_reports_class_imbalance(tmp_path):
    root = make_dataset(tmp_path / "flowers", per_class=6)
    for extra in sorted((root / "rose").iterdir())[2:]:
        extra.unlink()
    dataset, names = full_dataset(str(root))
    problems = find_problems([dataset], names)
    assert len(problems) == 1
    assert problems[0].startswith("class imbalance:") and "rose 2" in problems[0] and "daisy 6" in problems[0]
