"""A run killed (SIGKILL) at any point of an epoch's save sequence, then continued, ends as the
same run uninterrupted would: best/ holds the first best epoch of history.jsonl, ema/ the best EMA
epoch, history.jsonl parses with one row per epoch, summary.csv has one row per epoch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, make_colour_dataset, read_history
from flowers.resume import trim_history

# One Python process; every run is a forked child (no second import of torch): a reference run,
# then for each kill point a run SIGKILLed there at a point of an epoch's save and a run that
# continues it (--resume). The parent compares each continued run with the reference.
SCRIPT = textwrap.dedent('''
    import hashlib, json, os, shutil, signal, sys
    from pathlib import Path

    from flowers import checkpoint, training, tracking
    from flowers.config import TrainConfig, parse
    from safetensors.numpy import load_file  # no torch op in this process: its children fork from it

    data, root, points = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(",")
    ARGS = ["--data", str(data), "--epochs", "3", "--image-size", "32", "--batch-size", "8", "--weights", "none",
            "--report-to", "none", "--workers", "0", "--ema-decay", "0.5", "--lr", "3e-4", "--seed", "5",
            "--val-split", "0.5"]

    def in_child(work):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                work()
            except BaseException as e:
                print(f"child failed: {type(e).__name__}: {e}", flush=True)
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        return "killed" if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    def train(out, *extra):
        sys.argv = ["train.py", *ARGS, "--output-dir", str(out), *extra]
        training.fit(parse(TrainConfig))

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def arm(point):
        """Patch the save sequence to SIGKILL this process at `point` (epoch:file:moment) of that epoch's save."""
        kill_epoch, where, when = point.split(":")
        now = {"epoch": 0}
        save_epoch = training.Run.save_epoch
        def save_epoch_noting(self, result):
            now["epoch"] = result.epoch
            save_epoch(self, result)
        training.Run.save_epoch = save_epoch_noting
        armed = lambda name: now["epoch"] == int(kill_epoch) and name == where

        append = training.append_history
        def append_history(run_dir, row):
            if armed("history") and when == "torn":
                with open(run_dir / "history.jsonl", "a") as f:
                    f.write(json.dumps(row)[:20])
                die()
            append(run_dir, row)
            if armed("history"):
                die()
        training.append_history = append_history

        write_summary = tracking.write_summary_row
        def write_summary_row(path, row):
            write_summary(path, row)
            if armed("summary"):
                die()
        tracking.write_summary_row = write_summary_row

        save = checkpoint.save_checkpoint
        def save_checkpoint(target, *args, **kwargs):
            if armed(target.name) and when == "before":
                die()
            save(target, *args, **kwargs)
            if armed(target.name) and when == "after":
                die()
        checkpoint.save_checkpoint = save_checkpoint

        swap = checkpoint._swap_into_place
        def swap_into_place(tmp, target):
            if armed(target.name) and when == "written":  # the new folder complete, not yet in place
                die()
            if armed(target.name) and when == "swapping":  # the old one moved aside, the new one not in
                if target.exists():
                    os.rename(target, target.with_name(target.name + ".old"))
                die()
            swap(tmp, target)
        checkpoint._swap_into_place = swap_into_place

    def outcome(run):
        history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        summary = (run / "summary.csv").read_text().splitlines()
        state = {"epochs": [r["epoch"] for r in history],
                 "val_accuracy": [r["val_accuracy"] for r in history],
                 "ema_val_accuracy": [r["ema_val_accuracy"] for r in history],
                 "summary_epochs": [line.split(",")[0] for line in summary[1:]]}
        for name in ("best", "ema", "last"):
            meta = json.loads((run / name / "checkpoint.json").read_text())
            weights = load_file(str(run / name / "model.safetensors"))
            state[name] = {"epoch": meta["epoch"], "val_accuracy": meta["metrics"]["val_accuracy"],
                           "weights": hashlib.sha256(b"".join(weights[k].tobytes() for k in sorted(weights))).hexdigest()}
        return state

    reference_out = root / "reference"
    assert in_child(lambda: train(reference_out, "--run-name", "r")) == 0
    reference = outcome(reference_out / "r")
    print("REFERENCE", json.dumps(reference), flush=True)
    for point in points:
        out = root / point.replace(":", "-")
        def killed_run():
            arm(point)
            train(out, "--run-name", "r")
        assert in_child(killed_run) == "killed", f"{point}: the run was not killed"
        # what a user does next: --resume, or the same --run-name when there is nothing to resume
        resumable = any((out / "r" / name / "checkpoint.json").is_file() for name in ("last", "last.old"))
        again = ["--resume", str(out / "r")] if resumable else ["--run-name", "r"]
        assert in_child(lambda: train(out, *again)) == 0, f"{point}: {' '.join(again)} failed"
        print("CONTINUED", point, json.dumps(outcome(out / "r")), flush=True)
        shutil.rmtree(out)  # each point's run holds ~0.5 GB of checkpoints: keep the disk for the rest
''')

# epoch:file:moment. Epoch 2: every point (last/ of epoch 1 exists: --resume). Epoch 1: before last/
# there is nothing to resume (the same --run-name starts afresh), after it --resume.
MOMENTS = ["history:torn", "history:after", "summary:after", "best:written", "best:swapping", "best:after",
           "ema:written", "ema:swapping", "ema:after", "last:before", "last:written", "last:swapping", "last:after"]
POINTS = [f"2:{moment}" for moment in MOMENTS] + [f"1:{moment}" for moment in
                                                 ("history:torn", "best:swapping", "ema:after", "last:swapping",
                                                  "last:after")]


def _kill_and_continue(tmp_path, points: list[str]) -> None:
    data = make_colour_dataset(tmp_path / "colours", per_class=8)
    script = tmp_path / "kill_during_save.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(data), str(tmp_path / "runs"), ",".join(points)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    reference = json.loads(next(line for line in lines if line.startswith("REFERENCE")).split(" ", 1)[1])
    # kills in epoch 2's save test best/ and ema/ only if epoch 2 is a new best for the model and the EMA
    accuracies, ema_accuracies = reference["val_accuracy"], reference["ema_val_accuracy"]
    assert accuracies[1] > accuracies[0] and ema_accuracies[1] > ema_accuracies[0], reference
    assert reference["best"]["epoch"] == accuracies.index(max(accuracies)) + 1
    assert reference["ema"]["epoch"] == ema_accuracies.index(max(ema_accuracies)) + 1
    continued = {line.split(" ")[1]: json.loads(line.split(" ", 2)[2]) for line in lines if line.startswith("CONTINUED")}
    assert sorted(continued) == sorted(points)
    for point, state in continued.items():
        assert (state["best"], state["ema"]) == (reference["best"], reference["ema"]), point
        assert state["epochs"] == [1, 2, 3] and state["summary_epochs"] == ["1", "2", "3"], (point, state)
        assert state == reference, point  # last/ and the metrics too, to the bit


def test_a_kill_while_best_is_swapped_in_loses_nothing(tmp_path):
    """The fast loop's share, the review's case: best/ half swapped in (last/ used to be complete by
    then, so the resumed run never saved that epoch's best/ and ema/)."""
    _kill_and_continue(tmp_path, ["2:best:swapping"])


def test_resume_drops_a_history_line_that_a_kill_cut_short(tmp_path):
    rows = [{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.75}]
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 3, "val_a')
    trim_history(tmp_path, completed_epochs=2)
    assert read_history(tmp_path) == rows
    assert (tmp_path / "history.jsonl").read_text().endswith("}\n")


@pytest.mark.slow
def test_a_kill_at_any_point_of_the_save_sequence_loses_nothing(tmp_path):
    _kill_and_continue(tmp_path, POINTS)
