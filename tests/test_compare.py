"""python -m flowers.compare: the report of a group of runs (the report's two stages at tiny size)."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import REPO, TINY_TRAIN, make_dataset
from conftest import run_cli as _run_cli
from flowers.compare import Run, build_wandb_report, config_differences, epoch_offsets, find_runs
from flowers.config import CompareConfig, parse
from flowers.errors import UserError


def run_cli(*args, **kwargs):
    """Generous time limit: these runs share 2 CPU cores with whatever else the machine is doing."""
    return _run_cli(*args, timeout=1200, **kwargs)


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory) -> dict:
    """Stage 1 (2 epochs, lr 1e-3), then stage 2 (2 epochs, lr 1e-4) from stage 1's best weights,
    both in group g; plus a run of another group (a copy of stage 1) that the report must leave out.
    Module-scoped, so it sets its own hermetic environment instead of using `hermetic_env`."""
    root = tmp_path_factory.mktemp("compare")
    env = {"HF_HOME": str(root / "hf"), "TORCH_HOME": str(root / "torch"), "MPLCONFIGDIR": str(root / "mpl"),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    data, output_dir = make_dataset(root / "flowers"), root / "outputs"
    common = ("python", "train.py", "--data", str(data), "--output-dir", str(output_dir), "--epochs", "2",
              "--group", "g", "--seed", "3", *TINY_TRAIN)
    run_cli(*common, "--run-name", "stage1", "--lr", "1e-3", env=env)
    run_cli(*common, "--run-name", "stage2", "--lr", "1e-4", "--init-from", str(output_dir / "stage1" / "best"),
            env=env)
    other = output_dir / "other"
    shutil.copytree(output_dir / "stage1", other)
    config = yaml.safe_load((other / "config.yaml").read_text())
    (other / "config.yaml").write_text(yaml.safe_dump({**config, "group": "another"}))
    return {"output_dir": output_dir, "env": env}


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the first table under `## heading`, header and separator left out."""
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def assert_valid_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 300 and image.height >= 300
        image.load()  # decodes the whole file: fails on a truncated PNG


@pytest.mark.slow
def test_report_of_two_stages_lists_results_differences_and_plots(two_stages):
    output_dir = two_stages["output_dir"]
    # as a user without a W&B key: WANDB_MODE unset
    proc = run_cli("python", "-m", "flowers.compare", "--group", "g", "--output-dir", str(output_dir),
                   env={**two_stages["env"], "WANDB_MODE": ""})

    report = output_dir / "compare-g" / "report.md"
    assert f"report of 2 run(s) written to {report}" in proc.stdout
    wandb_lines = [line for line in proc.stdout.splitlines() if "W&B" in line]
    assert wandb_lines == [f"W&B report not created (no W&B API key: run `wandb login` or set WANDB_API_KEY); "
                           f"the local report is {report}"]
    markdown = report.read_text()

    results = {row[0]: row for row in table_rows(markdown, "Results")}
    assert set(results) == {"stage1", "stage2"}  # not the run of another group
    for name in ("stage1", "stage2"):
        meta = json.loads((output_dir / name / "best" / "checkpoint.json").read_text())
        accuracy, val_size = meta["metrics"]["val_accuracy"], meta["data"]["val_size"]
        assert results[name][1] == f"{accuracy:.2%} ({round(accuracy * val_size)}/{val_size})"
        assert results[name][2:4] == [str(meta["epoch"]), "2"]
    assert results["stage1"][4] == "—" and results["stage2"][4] == str(output_dir / "stage1" / "best")

    differences = {row[0]: row[1:] for row in table_rows(markdown, "Configuration differences")}
    assert set(differences) == {"lr", "init_from"}
    assert differences["lr"] == ["0.001", "0.0001"]
    assert differences["init_from"] == ["—", str(output_dir / "stage1" / "best")]

    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(linked) == ["confusion-stage1.png", "confusion-stage2.png", "learning_curves.png"]
    for name in linked:
        assert_valid_png(report.parent / name)
    assert "- stage2: best" in markdown and "over stage1, whose best weights it started from" in markdown


def hand_built_runs(tmp_path: Path) -> list[Run]:
    """Two runs as find_runs returns them, without training: stage2 started from stage1's epoch 3."""
    history = [{"epoch": e, "val_accuracy": 0.5 + e / 20, "train_accuracy": 0.6, "val_loss": 1.0,
                "train_loss": 0.9, "lr": 1e-3} for e in (1, 2, 3)]
    best = {"epoch": 3, "class_names": ["a", "b"], "data": {"val_size": 20},
            "metrics": {"val_accuracy": 0.65, "val": {"confusion_matrix": [[7, 3], [4, 6]]}}}
    stage1 = Run("stage1", tmp_path / "stage1", {"run_name": "stage1", "lr": 1e-3, "epochs": 3, "group": "g",
                                                 "init_from": None}, history, best)
    stage2 = Run("stage2", tmp_path / "stage2", {"run_name": "stage2", "lr": 1e-4, "epochs": 3, "group": "g",
                                                 "init_from": "outputs/stage1/best"}, history,
                 {**best, "init_from": {"run_name": "stage1", "epoch": 3}})
    return [stage1, stage2]


def test_differences_and_the_shared_epoch_axis(tmp_path):
    runs = hand_built_runs(tmp_path)
    assert config_differences(runs) == {"lr": [1e-3, 1e-4], "init_from": [None, "outputs/stage1/best"]}
    assert epoch_offsets(runs) == {"stage1": 0, "stage2": 3}  # stage 2 continues at epoch 4


def test_no_group_or_no_runs_is_one_line(tmp_path):
    with pytest.raises(UserError, match="give --group NAME"):
        parse(CompareConfig, [])
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "config.yaml").write_text("group: other\n")
    with pytest.raises(UserError, match="no runs of that group"):
        find_runs(str(tmp_path), "g")


def test_wandb_report_is_built_from_the_group_up_to_the_save(tmp_path):
    pytest.importorskip("wandb_workspaces")
    import wandb_workspaces.reports.v2 as wr

    report = build_wandb_report(hand_built_runs(tmp_path), "g", entity="my-team", project="flowers")

    assert isinstance(report, wr.Report) and report.entity == "my-team" and report.project == "flowers"
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert grids and all(g.runsets[0].entity == "my-team" and g.runsets[0].project == "flowers" for g in grids)
    plotted = {y for g in grids for p in g.panels if isinstance(p, wr.LinePlot) for y in p.y}
    assert {"val_accuracy", "train_loss", "val_loss", "lr"} <= plotted
    text = "\n".join(b.text for b in report.blocks if isinstance(b, wr.MarkdownBlock))
    assert "| stage1 | 65.00% (13/20) | 3 | 3 | — |" in text and "| lr | 0.001 | 0.0001 |" in text


def test_group_none_is_a_name_not_the_runs_without_a_group(tmp_path):
    """`--group None` reported every run trained without --group (its config.yaml has group: null)."""
    for name, group in (("plain", None), ("named", "None")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump({"group": group, "epochs": 1}))
    assert [r.name for r in find_runs(str(tmp_path), "None")] == ["named"]
    (tmp_path / "named" / "config.yaml").unlink()
    with pytest.raises(UserError, match="--group None: no runs of that group"):
        find_runs(str(tmp_path), "None")
