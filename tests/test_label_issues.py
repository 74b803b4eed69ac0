"""Label issues from out-of-fold probabilities (cleanlab), and acting on them with --exclude and
--relabel: on arrays and small folders, no training."""

import sys

import numpy as np
import pytest

from flowers.data import SplitOptions, image_paths, load_splits, read_edits, recorded_split
from flowers.errors import UserError
from flowers.label_issues import INSTALL, rank_label_issues

from conftest import make_colour_dataset


def _confident_probabilities(truth: np.ndarray, classes: int, seed: int = 0) -> np.ndarray:
    """Out-of-fold probabilities of a model that is right and confident about every image."""
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0.0, 0.05, (len(truth), classes))
    probs[np.arange(len(truth)), truth] = rng.uniform(0.88, 0.95, len(truth))
    return probs / probs.sum(axis=1, keepdims=True)


def test_planted_flips_are_found_lowest_score_first_and_nothing_else():
    truth = np.repeat(np.arange(3), 20)
    probs = _confident_probabilities(truth, 3)
    given = truth.copy()
    flips = {4: 1, 25: 2, 47: 0}
    for i, label in flips.items():
        given[i] = label
    found, scores = rank_label_issues(given, probs)
    assert sorted(found.tolist()) == sorted(flips)
    assert list(scores[found]) == sorted(scores[found])           # most likely wrong first
    assert scores[found].max() < np.delete(scores, found).min()   # every flip scores below every clean image


def test_without_cleanlab_one_line_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "cleanlab", None)
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    with pytest.raises(UserError) as error:
        rank_label_issues(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]))
    assert str(error.value) == f"finding label issues needs cleanlab: {INSTALL}"


def test_wrong_shapes_and_a_class_without_images_are_one_line():
    with pytest.raises(UserError, match="labels \\(n,\\) and probabilities"):
        rank_label_issues(np.array([0, 1, 1]), np.ones((2, 2)) / 2)
    with pytest.raises(UserError, match="class id\\(s\\) \\[2\\] label no image"):
        rank_label_issues(np.array([0, 1]), np.ones((2, 3)) / 3)


def test_exclude_and_relabel_files_change_the_images_and_are_recorded(tmp_path):
    root = make_colour_dataset(tmp_path / "c", per_class=6)
    issues = tmp_path / "label_issues.csv"  # as flowers.label_issues writes it
    issues.write_text("path,given_label,suggested_label,score\nblue/blue_0.jpg,blue,red,0.01\n"
                      f"{root / 'green' / 'green_1.jpg'},green,blue,0.02\n")
    plain_list = tmp_path / "drop.csv"  # a bare list of paths, no header
    plain_list.write_text("red/red_3.jpg\n")

    exclude, _ = read_edits(str(plain_list), None, root)
    _, relabel = read_edits(None, str(issues), root)
    assert exclude == ("red/red_3.jpg",)
    assert relabel == (("blue/blue_0.jpg", "red"), ("green/green_1.jpg", "blue"))

    splits = load_splits(str(root), 0.25, 0, options=SplitOptions(exclude=exclude, relabel=relabel))
    every = {p: label for part in (splits.train, splits.val) for p, label in zip(image_paths(part), part["label"])}
    assert len(every) == 17 and str(root / "red" / "red_3.jpg") not in every
    assert every[str(root / "blue" / "blue_0.jpg")] == splits.class_names.index("red")
    assert every[str(root / "green" / "green_1.jpg")] == splits.class_names.index("blue")

    meta = {"exclude": splits.exclude, "relabel": splits.relabel, "groups": splits.groups}  # checkpoint_meta's
    again = load_splits(str(root), 0.25, 0, options=recorded_split(meta))
    assert image_paths(again.val) == image_paths(splits.val) and again.val["label"] == splits.val["label"]


def test_a_list_for_other_data_is_refused_in_one_line(tmp_path):
    root = make_colour_dataset(tmp_path / "c", per_class=3)
    with pytest.raises(UserError, match="1 path\\(s\\) of --exclude/--relabel are not images in .*: rose/x.jpg"):
        load_splits(str(root), 0.3, 0, options=SplitOptions(exclude=("rose/x.jpg",)))
    with pytest.raises(UserError, match="--relabel names class\\(es\\) purple, not among blue, green, red"):
        load_splits(str(root), 0.3, 0, options=SplitOptions(relabel=(("blue/blue_0.jpg", "purple"),)))
    missing = tmp_path / "missing.csv"
    with pytest.raises(UserError, match="--exclude .*missing.csv: cannot read it"):
        read_edits(str(missing), None, root)
