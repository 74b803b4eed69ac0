"""A report on a group of runs (e.g. the two stages of a schedule):

    python -m flowers.compare --group NAME [--output-dir outputs]

Gathers the runs under --output-dir trained with `--group NAME` (their config.yaml), reads each
one's history.jsonl and best/checkpoint.json, and writes <output-dir>/compare-<group>/report.md
with PNGs: the results per run, the options that differ between the runs, learning curves across
runs and each run's validation confusion matrix at its best epoch. With a W&B API key (and a
server) it also builds the same report with W&B's Reports API (pip install 'flowers[report]')
from the group's W&B runs and prints its URL; otherwise one line says why it did not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

import yaml

from flowers import checkpoint, report
from flowers.cli import run
from flowers.config import CompareConfig, parse
from flowers.errors import UserError
from flowers.resume import read_history

# what the config-differences table leaves out: the column headings already name the runs
NOT_COMPARED = ("run_name", "config")
OVERFITTING_GAP = 0.05  # last epoch's train minus val accuracy worth a remark in the discussion
CURVE_KEYS = ("val_accuracy", "train_accuracy", "val_loss", "train_loss", "lr")


@dataclass
class Run:
    name: str
    folder: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]   # history.jsonl: one row per finished epoch
    best: Optional[dict[str, Any]]  # best/checkpoint.json; None before the first epoch ends

    @property
    def best_accuracy(self) -> Optional[float]:
        return (self.best or {}).get("metrics", {}).get("val_accuracy")

    @property
    def epochs_run(self) -> int:
        return int(self.history[-1]["epoch"]) if self.history else 0


def find_runs(output_dir: str, group: str) -> list[Run]:
    """The runs under `output_dir` whose config.yaml has `group: <group>`, oldest first."""
    found = []
    for config_file in Path(output_dir).glob("*/config.yaml"):
        try:
            config = yaml.safe_load(config_file.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue  # not one of our runs
        if isinstance(config, dict) and config.get("group") is not None and str(config["group"]) == group:
            found.append((config_file.stat().st_mtime, config_file.parent, config))
    if not found:
        raise UserError(f"--group {group}: no runs of that group under {output_dir}/ "
                        f"(train them with --group {group}, or pass --output-dir)")
    return [Run(folder.name, folder, config, read_history(folder), _read_best(folder))
            for _, folder, config in sorted(found, key=lambda item: (item[0], item[1].name))]


def _read_best(run_dir: Path) -> Optional[dict[str, Any]]:
    best = run_dir / "best"
    return checkpoint.load_meta(best) if (best / checkpoint.META_FILE).is_file() else None


def epoch_offsets(runs: list[Run]) -> dict[str, int]:
    """Where each run's epoch 1 goes on a shared axis: a run started --init-from a checkpoint of
    another run of the group continues that run's curve after the epoch it started from (the
    report's second stage: epochs 26-50); other runs start at epoch 1."""
    by_name = {r.name: r for r in runs}

    def offset(run: Run, seen: frozenset) -> int:
        init = (run.best or {}).get("init_from") or {}
        parent = by_name.get(init.get("run_name"))
        if parent is None or parent.name in seen:
            return 0
        return offset(parent, seen | {parent.name}) + int(init.get("epoch") or 0)

    return {r.name: offset(r, frozenset({r.name})) for r in runs}


def config_differences(runs: list[Run]) -> dict[str, list[Any]]:
    """option -> its value in each run, for the options whose values differ (in config order)."""
    keys = list(dict.fromkeys(k for r in runs for k in r.config if k not in NOT_COMPARED))
    values = {k: [r.config.get(k) for r in runs] for k in keys}
    return {k: v for k, v in values.items() if len({json.dumps(x, sort_keys=True, default=str) for x in v}) > 1}


# ---- Markdown (shared by the local report and the W&B one) ----------------------------------

def _cell(value: Any) -> str:
    return "—" if value is None or value == "" else str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _accuracy_cell(run: Run) -> Optional[str]:
    if run.best_accuracy is None:
        return None
    val_size = (run.best.get("data") or {}).get("val_size")
    count = f" ({round(run.best_accuracy * val_size)}/{val_size})" if val_size else ""
    return f"{run.best_accuracy:.2%}{count}"


def results_table(runs: list[Run]) -> str:
    rows = [[r.name, _accuracy_cell(r), (r.best or {}).get("epoch"), r.epochs_run, r.config.get("init_from")]
            for r in runs]
    return _table(["run", "best val accuracy", "at epoch", "epochs run", "init_from"], rows)


def differences_table(runs: list[Run]) -> str:
    differences = config_differences(runs)
    if not differences:
        return "The runs have the same configuration."
    return (_table(["option", *(r.name for r in runs)], [[k, *v] for k, v in differences.items()])
            + "\n\nOnly the options that differ; all others are the same in every run.")


def discussion(runs: list[Run]) -> str:
    """Facts worth a remark: where each run peaked, the gap between training and validation
    accuracy at its last epoch (overfitting), and what each run added to the one it started from."""
    by_name = {r.name: r for r in runs}
    lines = []
    for r in runs:
        if r.best_accuracy is None or not r.history:
            lines.append(f"- {r.name}: no finished epoch yet.")
            continue
        last = r.history[-1]
        line = (f"- {r.name}: best {r.best_accuracy:.2%} at epoch {r.best['epoch']} of {r.epochs_run}; "
                f"last epoch: val {last['val_accuracy']:.2%}, train {last['train_accuracy']:.2%}")
        gap = last["train_accuracy"] - last["val_accuracy"]
        if gap > OVERFITTING_GAP:
            line += f" ({100 * gap:.1f} points above validation: overfitting)"
        parent = by_name.get(((r.best or {}).get("init_from") or {}).get("run_name"))
        if parent is not None and parent.best_accuracy is not None:
            change = 100 * (r.best_accuracy - parent.best_accuracy)
            line += f"; {change:+.2f} points over {parent.name}, whose best weights it started from"
        lines.append(line + ".")
    return "\n".join(lines)


def sections(runs: list[Run]) -> list[tuple[str, str]]:
    """(heading, Markdown) of the text sections; the plots come from each report's own source."""
    return [("Results", results_table(runs)), ("Configuration differences", differences_table(runs)),
            ("Discussion", discussion(runs))]


# ---- the local report ---------------------------------------------------------------------

def safe_name(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", group).strip("._") or "group"


def report_dir(cfg: CompareConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path(cfg.output_dir) / f"compare-{safe_name(cfg.group)}"


def plot_curves(runs: list[Run], path: Path) -> Path:
    offsets = epoch_offsets(runs)
    curves = {r.name: {"epoch": [offsets[r.name] + row["epoch"] for row in r.history],
                       **{key: [row.get(key, float("nan")) for row in r.history] for key in CURVE_KEYS}}
              for r in runs if r.history}
    best = {r.name: (offsets[r.name] + r.best["epoch"], r.best_accuracy) for r in runs if r.best_accuracy is not None}
    return report.plot_learning_curves(curves, path, best)


def confusion_section(runs: list[Run], folder: Path) -> str:
    """A confusion-matrix PNG per run from the counts best/checkpoint.json records (metrics.val)."""
    parts = []
    for r in runs:
        confusion = ((r.best or {}).get("metrics") or {}).get("val", {}).get("confusion_matrix")
        if confusion is None:
            parts.append(f"### {r.name}\nNo confusion matrix recorded in {r.folder / 'best' / checkpoint.META_FILE}.")
            continue
        png = folder / f"confusion-{r.name}.png"
        title = f"{r.name}: validation, epoch {r.best['epoch']}, accuracy {r.best_accuracy:.1%}"
        report.plot_confusion(confusion, list(r.best["class_names"]), title, png)
        parts.append(f"### {r.name}\n![confusion matrix of {r.name}]({quote(png.name)})")
    return "\n\n".join(parts)


def write_report(runs: list[Run], group: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, folder / "learning_curves.png")
    results, differences, notes = (f"## {heading}\n\n{body}" for heading, body in sections(runs))
    text = [f"# Runs of group `{group}`", f"{len(runs)} run(s) trained with `--group {group}`, oldest first.",
            results, differences]
    text.append("## Learning curves\n\n![learning curves](learning_curves.png)\n\nValidation solid, training dashed; "
                "a dot marks each run's best epoch. A run started with `--init-from` another run of this group "
                "continues that run's curve after the epoch it started from.")
    text.append("## Confusion matrices (validation, best epoch)\n\n" + confusion_section(runs, folder))
    text.append(notes)
    path = folder / "report.md"
    path.write_text("\n\n".join(text) + "\n")
    return path


# ---- the W&B report -----------------------------------------------------------------------

def wandb_unavailable() -> Optional[str]:
    """Why no W&B report can be built here (None when it can be tried)."""
    from flowers.tracking import offline_mode, wandb_key_configured

    mode = os.environ.get("WANDB_MODE", "").lower()
    if offline_mode() or mode == "disabled":
        return f"WANDB_MODE={mode}"
    if not wandb_key_configured():
        return "no W&B API key: run `wandb login` or set WANDB_API_KEY"
    if importlib.util.find_spec("wandb_workspaces") is None:  # optional: the report extra
        return "it needs the wandb-workspaces package: pip install 'flowers[report]'"
    return None


def wandb_project(cfg: CompareConfig, runs: list[Run]) -> str:
    from flowers.tracking import project_name

    return cfg.wandb_project or project_name(runs[0].config.get("wandb_project"))


def build_wandb_report(runs: list[Run], group: str, entity: str, project: str):
    """The local report's content as a W&B Report (not saved: save() needs the server)."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    runset = wr.Runset(entity=entity, project=project, name=f"group {group}",
                       filters=expr.And(expr.Metric("Group") == group))

    def grid(*panels) -> Any:
        return wr.PanelGrid(runsets=[runset], panels=list(panels))

    text = dict(sections(runs))
    return wr.Report(
        entity=entity, project=project, title=f"Runs of group {group}"[:128],
        description=f"{len(runs)} run(s) trained with --group {group} (python -m flowers.compare)",
        blocks=[
            wr.H2("Results"), wr.MarkdownBlock(text["Results"]),
            wr.H2("Configuration differences"), wr.MarkdownBlock(text["Configuration differences"]),
            grid(wr.RunComparer(diff_only="split")),
            wr.H2("Learning curves"),
            grid(wr.LinePlot(title="validation accuracy", x="epoch", y=["val_accuracy"]),
                 wr.LinePlot(title="training and validation loss", x="epoch", y=["train_loss", "val_loss"]),
                 wr.LinePlot(title="training accuracy", x="epoch", y=["train_accuracy"]),
                 wr.LinePlot(title="learning rate", x="epoch", y=["lr"])),
            wr.H2("Confusion matrices (validation, best epoch)"),
            grid(wr.CustomChart(query={"summaryTable": {"tableKey": "confusion_matrix_table"}},
                                chart_name="wandb/confusion_matrix/v1",
                                chart_fields={"Actual": "Actual", "Predicted": "Predicted",
                                              "nPredictions": "nPredictions"})),
            wr.H2("Discussion"), wr.MarkdownBlock(text["Discussion"]),
        ])


def publish_to_wandb(cfg: CompareConfig, runs: list[Run], local: Path) -> Optional[str]:
    """Save the W&B report and return its URL; or print one line saying why not."""
    reason = wandb_unavailable()
    if reason is None:
        try:
            entity = cfg.wandb_entity or os.environ.get("WANDB_ENTITY") or _default_entity()
            wandb_report = build_wandb_report(runs, cfg.group, entity, wandb_project(cfg, runs))
            wandb_report.save()
            return wandb_report.url
        except Exception as e:  # the server's answer (network, key, permissions) in one line
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    print(f"W&B report not created ({reason}); the local report is {local}")
    return None


def _default_entity() -> str:
    import wandb

    entity = wandb.Api().default_entity
    if not entity:
        raise UserError("no default W&B entity for this key: pass --wandb-entity")
    return entity


def main() -> None:
    cfg = parse(CompareConfig, description=__doc__)
    runs = find_runs(cfg.output_dir, cfg.group)
    local = write_report(runs, cfg.group, report_dir(cfg))
    print(f"report of {len(runs)} run(s) written to {local}")
    url = publish_to_wandb(cfg, runs, local)
    if url:
        print(f"W&B report: {url}")


if __name__ == "__main__":
    run(main)
