"""No host sync inside a training step: real steps traced on a CPU, where every tensor is a host
tensor, so the tensors that would live on the training device get a provenance (the parameters,
buffers, EMA, running sums, decoded images and loader batches, and whatever is computed from them).

A call that would make the host wait for a GPU (see SYNCS) on such a tensor is recorded with the
flowers function that made it; only the documented, periodic ones (docs/design.md, "Host syncs")
may appear."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from conftest import TINY_TRAIN, make_dataset
from flowers import device_data, training, transforms
from flowers.config import TrainConfig, parse

Tensor = torch.Tensor
# Each reads a device tensor's values on the host, or (on CUDA) copies host memory with a blocking copy.
READS = {Tensor.item, Tensor.tolist, Tensor.cpu, Tensor.numpy, Tensor.__bool__, Tensor.__int__, Tensor.__float__,
         Tensor.__index__, Tensor.__format__, Tensor.__array__, Tensor.nonzero, torch.nonzero, Tensor.masked_select,
         torch.masked_select, torch.unique, Tensor.unique}
FACTORIES_FROM_HOST_DATA = {torch.tensor, torch.as_tensor}
# The documented periodic syncs (docs/design.md, "Host syncs"): (file, function) anywhere on the stack.
PERIODIC = {
    ("engine.py", "_sum_over_processes"),  # the epoch's loss/accuracy, once an epoch
    ("engine.py", "_to_host"),             # evaluation's outputs, once an evaluation
    ("nonfinite.py", "check"),             # the NaN check, every CHECK_EVERY steps and at the epoch's end
    ("resume.py", "requested"),            # the multi-process stop check (several processes only)
}


class HostSyncRecorder(TorchFunctionMode):
    """Follows device provenance through every torch call and records the calls that would sync."""

    def __init__(self):
        super().__init__()
        self.on_device = WeakIdKeyDictionary()
        self.syncs: list[tuple[str, str]] = []  # (call, where) outside the periodic sites
        self.periodic: list[tuple[str, str]] = []
        self.device_calls = 0  # calls on device tensors: the trace saw real work

    def tag(self, *trees) -> None:
        for leaf in tree_flatten(list(trees))[0]:
            if isinstance(leaf, Tensor):
                self.on_device[leaf] = True

    def _tagged(self, tree) -> bool:
        return any(isinstance(leaf, Tensor) and leaf in self.on_device for leaf in tree_flatten(tree)[0])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tagged = self._tagged((args, kwargs))
        sync = self._sync_kind(func, args, kwargs, tagged)
        if sync:
            self._record(sync)
        out = func(*args, **kwargs)
        if func is Tensor.cpu and out is args[0]:
            out = out.clone()  # on a GPU the host's copy is another tensor than the device's
        made_on_device = kwargs.get("device") is not None or func in (Tensor.to, Tensor.cuda)
        if (tagged and func not in READS) or made_on_device:  # what a read copies to the host is the host's
            self.device_calls += tagged
            self.tag(out)
        return out

    def _sync_kind(self, func, args, kwargs, tagged: bool) -> str:
        name = getattr(func, "__name__", str(func))
        if func in READS and tagged:
            return name
        if func is Tensor.__getitem__ and tagged and any(
                isinstance(i, Tensor) and i.dtype == torch.bool for i in tree_flatten(args[1:])[0]):
            return "boolean-mask indexing"
        if func in FACTORIES_FROM_HOST_DATA and kwargs.get("device") is not None:
            return f"torch.{name}(..., device=)"
        moves = func in (Tensor.to, Tensor.cuda) and (
            func is Tensor.cuda or "device" in kwargs
            or any(isinstance(a, (torch.device, str, Tensor)) for a in args[1:]))
        if moves and not tagged and not kwargs.get("non_blocking", False):
            return "blocking .to() of a host tensor"
        if (func is Tensor.copy_ and args[0] in self.on_device and args[1] not in self.on_device
                and not kwargs.get("non_blocking", False)):
            return "blocking copy_ from a host tensor"
        return ""

    def _record(self, call: str) -> None:
        frames = traceback.extract_stack()[:-2]  # without _record and __torch_function__
        ours = [f for f in frames if "/flowers/" in f.filename.replace("\\", "/")]
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name}" if ours else "?"
        if any((Path(f.filename).name, f.name) in PERIODIC for f in ours):
            self.periodic.append((call, where))
        else:
            self.syncs.append((call, where))


def _model_tensors(module: torch.nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


def _tagged_batches(loader, recorder: HostSyncRecorder):
    """The loader, its batches tagged as device tensors (the DataLoader path copies them to the device)."""
    class Tagged:
        def __len__(self):
            return len(loader)

        def __getattr__(self, name):
            return getattr(loader, name)

        def __iter__(self):
            for batch in loader:
                recorder.tag(batch)
                yield batch
    return Tagged()


def traced_fit(monkeypatch, argv: list[str], recorder: HostSyncRecorder) -> None:
    """training.fit as the command line runs it, with train_one_epoch and evaluate traced."""
    create = training.Run.create.__func__

    def create_tagged(cls, *args, **kwargs):
        run = create(cls, *args, **kwargs)
        recorder.tag(_model_tensors(run.model), run.totals, run.guard._first_bad_step)
        if run.ema is not None:
            recorder.tag(list(run.ema.averaged.parameters()), list(run.ema.averaged.buffers()))
        for loader in (run.train_loader, run.val_loader):
            if hasattr(loader, "images"):  # --pipeline device: the decoded images live on the device
                recorder.tag(loader.images.pixels)
            if hasattr(loader, "_non_blocking"):  # the DataLoader path's copies on CUDA (pinned memory)
                loader._non_blocking = True
        return run

    def traced(real):
        def run_traced(accelerator, model, loader, *args, **kwargs):
            recorder.tag(_model_tensors(model))
            with recorder:
                return real(accelerator, model, _tagged_batches(loader, recorder), *args, **kwargs)
        return run_traced

    def tagging(upload):  # what transforms.upload copies is the device's (on a CPU, the host tensor itself)
        def upload_tagged(tensor, device):
            out = upload(tensor, device)
            recorder.tag(out)
            return out
        return upload_tagged

    monkeypatch.setattr(training.Run, "create", classmethod(create_tagged))
    monkeypatch.setattr(transforms, "upload", tagging(transforms.upload))
    monkeypatch.setattr(device_data, "upload", transforms.upload)
    monkeypatch.setattr(training, "train_one_epoch", traced(training.train_one_epoch))
    monkeypatch.setattr(training, "evaluate", traced(training.evaluate))
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    training.fit(parse(TrainConfig))


RECIPES = {
    "plain": [],
    "ema-mixup-accum": ["--ema-decay", "0.9", "--mixup", "0.2", "--grad-accum-steps", "2"],
}


# the fast loop traces the recipe with every option on; the plain runs (without them) are in the slow suite
TRACED = [pytest.param(r, marks=pytest.mark.slow) if r == "plain" else r for r in sorted(RECIPES)]


@pytest.mark.parametrize("recipe", TRACED)
@pytest.mark.parametrize("pipeline", ["workers", "device"])
def test_no_host_sync_inside_a_training_step(tmp_path, monkeypatch, capsys, pipeline, recipe):
    data = make_dataset(tmp_path / "data", per_class=4, classes=["a", "b"])
    recorder = HostSyncRecorder()
    # the device pipeline with every option: the photos kept in host memory, each batch gathered there
    placement = ["--device-cache", "host"] if pipeline == "device" and recipe != "plain" else []
    # 6 training images in batches of 2: 3 steps; --grad-accum-steps 2 adds a short last cycle
    traced_fit(monkeypatch, ["--data", str(data), *TINY_TRAIN, "--batch-size", "2", "--epochs", "1",
                             "--val-split", "0.25", "--pipeline", pipeline, "--output-dir", str(tmp_path / "out"),
                             *RECIPES[recipe], *placement], recorder)
    if placement:
        assert "kept on the host (--device-cache host)" in capsys.readouterr().out
    assert recorder.device_calls > 100  # the steps and evaluations were traced
    assert not recorder.syncs, "host syncs outside the documented periodic ones:\n" + "\n".join(
        f"  {call} at {where}" for call, where in recorder.syncs)
    assert recorder.periodic  # and the periodic syncs were seen: the provenance reaches them


def test_host_sync_recorder_sees_each_kind_of_sync():
    """The recorder itself: each listed call on a device tensor is recorded, the host's own are not."""
    recorder = HostSyncRecorder()
    device, host = torch.ones(4), torch.ones(4)
    recorder.tag(device)
    with recorder:
        derived = device * 2 + 1
        host.sum().item(), host.tolist(), bool(host.sum() > 0)  # the host's own tensors: no sync
        derived.sum().item()
        bool((derived > 0).all())
        derived.cpu()
        derived[derived > 2]
        torch.tensor([1.0], device="cpu")
        host.to("cpu")
        host.to("cpu", non_blocking=True)  # from pinned memory: queued like a kernel
        f"{derived.sum():.3f}"
    assert [call for call, _ in recorder.syncs] == [
        "item", "__bool__", "cpu", "boolean-mask indexing", "torch.tensor(..., device=)",
        "blocking .to() of a host tensor", "__format__"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("pipeline", ["workers", "device"])
def test_no_host_sync_inside_a_training_step_on_cuda(tmp_path, monkeypatch, pipeline, recipe):
    """The same runs on a GPU, where torch itself raises on any synchronising call inside
    train_one_epoch and evaluate (set_sync_debug_mode("error")), except in the periodic ones."""
    from flowers import engine, nonfinite

    def sync_mode(mode, real):
        def run(*args, **kwargs):
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(mode)
            try:
                return real(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        return run
    monkeypatch.setattr(engine, "_sum_over_processes", sync_mode("default", engine._sum_over_processes))
    monkeypatch.setattr(engine, "_to_host", sync_mode("default", engine._to_host))
    monkeypatch.setattr(nonfinite.NonFiniteGuard, "check", sync_mode("default", nonfinite.NonFiniteGuard.check))
    monkeypatch.setattr(training, "train_one_epoch", sync_mode("error", training.train_one_epoch))
    monkeypatch.setattr(training, "evaluate", sync_mode("error", training.evaluate))
    data = make_dataset(tmp_path / "data", per_class=4, classes=["a", "b"])
    monkeypatch.setattr(sys, "argv", ["train.py", "--data", str(data), *TINY_TRAIN, "--batch-size", "2", "--epochs", "1",
                                      "--val-split", "0.25", "--pipeline", pipeline, "--output-dir",
                                      str(tmp_path / "out"), *RECIPES[recipe]])
    training.fit(parse(TrainConfig))
