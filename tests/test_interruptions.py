"""kill -9 at any moment of a checkpoint save, and a full disk while saving, never cost the
previous checkpoint."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, TINY_TRAIN, make_dataset, run_cli
from flowers import checkpoint, loading

pytestmark = pytest.mark.slow  # hundreds of killed saves, and a training run on a full disk

# Saves checkpoint `epoch` (every tensor filled with `epoch`) in a forked child that SIGKILLs
# itself at its N-th traced line (in checkpoint.py, or the shutil code it calls), for
# N = 1, 2, ... until a save completes. After every kill the parent loads the checkpoint the way
# eval.py does and checks it is complete and self-consistent, and no older than the last finished save.
KILL_AT_EVERY_LINE = textwrap.dedent('''
    import os, shutil, signal, sys
    from pathlib import Path
    import torch
    from flowers import checkpoint

    torch.set_num_threads(1)  # no OpenMP pool to inherit across fork()
    root = Path(sys.argv[1])
    target = root / "run" / "last"
    TRACED = ("flowers/checkpoint.py", "/shutil.py")

    def save(epoch):
        state = {"w": torch.full((256, 256), float(epoch)), "b": torch.full((7,), float(epoch))}
        checkpoint.save_checkpoint(target, state, {"epoch": epoch})

    def save_killed_at(line_number, epoch):
        """True when the save was killed at that line, False when it finished first."""
        pid = os.fork()
        if pid == 0:
            count = 0
            def tracer(frame, event, arg):
                nonlocal count
                if event == "line" and frame.f_code.co_filename.endswith(TRACED):
                    count += 1
                    if count == line_number:
                        os.kill(os.getpid(), signal.SIGKILL)
                return tracer
            sys.settrace(tracer)
            save(epoch)
            sys.settrace(None)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0, status
        return os.WIFSIGNALED(status)

    def check(finished_epoch, new_epoch):
        path = checkpoint.resolve(str(target))
        epoch = checkpoint.load_meta(path)["epoch"]
        weights = checkpoint.load_weights(path)
        assert epoch in (finished_epoch, new_epoch), (epoch, finished_epoch, new_epoch)
        assert all(bool((t == epoch).all()) for t in weights.values()), "weights and metadata disagree"
        assert set(weights) == {"w", "b"}
        return epoch

    kills = 0
    for chained in (False, True):  # every line from a clean state; then kills on top of kills
        shutil.rmtree(root / "run", ignore_errors=True)
        save(1)
        finished, line = 1, 1
        while True:
            new = finished + 1
            killed = save_killed_at(line, new)
            finished = check(finished, new)
            if not killed:
                assert finished == new, "a completed save is not visible"
                break
            kills += 1
            line += 1
            if not chained:
                shutil.rmtree(root / "run")
                save(1)
                finished = 1
    left = sorted(p.name for p in (root / "run").iterdir())
    assert left == ["last"], left
    print(f"killed {kills} saves")
''')


def test_kill_9_at_every_line_of_a_save_keeps_a_complete_checkpoint(tmp_path):
    script = tmp_path / "kill_at_every_line.py"
    script.write_text(KILL_AT_EVERY_LINE)
    proc = run_cli("python", str(script), str(tmp_path), timeout=600)
    kills = int(proc.stdout.split("killed ")[1].split()[0])
    assert kills > 40, proc.stdout  # every line of the save path, twice


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare + an unprivileged tmpfs mount for a real full disk")
def test_full_disk_while_saving_is_one_error_and_keeps_the_previous_checkpoint(tmp_path):
    """Output on a 300 MB tmpfs: epoch 1 saves last/ (weights + resumable state, ~171 MB) and best/
    (~43 MB); epoch 2 needs ~130 MB more and hits ENOSPC."""
    data = make_dataset(tmp_path / "flowers", per_class=4, classes=["a", "b"])
    disk = tmp_path / "disk"
    disk.mkdir()
    train = shlex.join([sys.executable, "train.py", "--data", str(data), "--epochs", "2", "--output-dir", str(disk),
                        "--run-name", "r", *TINY_TRAIN])
    run_dir, out = shlex.quote(str(disk / "r")), shlex.quote(str(tmp_path))
    script = (f"mount -t tmpfs -o size=300m tmpfs {shlex.quote(str(disk))} && {train}; status=$?; "
              f"ls -a {run_dir} > {out}/listing; cp -r {run_dir} {out}/kept; exit $status")
    proc = run_cli("unshare", "-rm", "sh", "-c", script, cwd=REPO, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert err[-1].startswith("error: disk full while saving the checkpoint"), err[-3:]
    assert "previous one there (if any) is kept" in err[-1] and "Traceback" not in proc.stderr
    kept = tmp_path / "kept"
    assert json.loads((kept / "last" / "checkpoint.json").read_text())["epoch"] == 1
    loading.load_model(kept / "last")  # complete and loadable
    listing = (tmp_path / "listing").read_text().split()
    assert {"best", "last"} <= set(listing) and [n for n in listing if n.startswith(".")] == [".", ".."], listing
