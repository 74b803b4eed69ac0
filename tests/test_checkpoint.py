import json

import pytest
import torch

from flowers import checkpoint, loading
from flowers.errors import UserError
from flowers.model import build_model


def _meta(**extra):
    return {"num_classes": 4, "class_names": list("abcd"), "config": {}, **extra}


def test_round_trip_gives_identical_predictions(tmp_path):
    model = build_model(4, "none").eval()
    checkpoint.save_checkpoint(tmp_path / "run" / "best", model.state_dict(), _meta(epoch=3))
    loaded, meta = loading.load_model(tmp_path / "run" / "best")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), loaded.eval()(x))
    assert meta["epoch"] == 3


def test_resave_replaces_and_leaves_no_temporaries(tmp_path):
    state = build_model(4, "none").state_dict()
    for epoch in (1, 2):
        checkpoint.save_checkpoint(tmp_path / "best", state, _meta(epoch=epoch))
    assert json.loads((tmp_path / "best" / "checkpoint.json").read_text())["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_best_resolves_to_the_latest_run(tmp_path):
    state = build_model(4, "none").state_dict()
    older = checkpoint.save_checkpoint(tmp_path / "run1" / "best", state, _meta())
    newer = checkpoint.save_checkpoint(tmp_path / "run2" / "best", state, _meta())
    import os
    os.utime(older / "checkpoint.json", (1, 1))
    assert checkpoint.resolve("best", str(tmp_path)) == newer
    assert checkpoint.resolve(str(tmp_path / "run1"), str(tmp_path)) == older  # a run folder -> its best


def test_interrupted_swap_is_recovered(tmp_path):
    state = build_model(4, "none").state_dict()
    saved = checkpoint.save_checkpoint(tmp_path / "run" / "best", state, _meta(epoch=1))
    saved.rename(saved.with_name("best.old"))  # as if killed between the two renames
    assert checkpoint.resolve("best", str(tmp_path)) == saved.with_name("best.old")  # read in place
    checkpoint.save_checkpoint(saved, state, _meta(epoch=2))  # the trainer's next save repairs it
    assert checkpoint.resolve("best", str(tmp_path)) == saved and not saved.with_name("best.old").exists()


def test_no_runs_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no runs"):
        checkpoint.resolve("best", str(tmp_path))


def _flowers_imports(module: str) -> set[str]:
    """The flowers modules `module` imports, at the top or inside a function."""
    import ast

    from conftest import REPO

    tree = ast.parse((REPO / "flowers" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flowers"):
            found |= {node.module} if node.module != "flowers" else {f"flowers.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("flowers")}
    return found


def test_model_and_checkpoint_do_not_import_each_other():
    """checkpoint.py handles folders and imports only errors; model.py builds modules and opens no
    checkpoint (loading.py joins the two)."""
    assert _flowers_imports("checkpoint") == {"flowers.errors"}
    assert not {"flowers.checkpoint", "flowers.loading"} & _flowers_imports("model")
