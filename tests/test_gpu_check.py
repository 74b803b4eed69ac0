"""bench/gpu.sh's choice of the GPU in use and its reading of nvidia-smi, against the stand-in
nvidia-smi of .ci/stand-in (two GPUs; the one CUDA_VISIBLE_DEVICES names busy, the other idle)."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from conftest import REPO

STAND_IN = str(REPO / ".ci" / "stand-in" / "nvidia-smi")
BUSY_UUID = "GPU-99999999-8888-7777-6666-555555555555"


def _probe():
    spec = importlib.util.spec_from_file_location("gpu_probe", REPO / "bench" / "gpu_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch names the GPU itself on a GPU")
@pytest.mark.parametrize("visible, expected", [(None, "0"), ("1", "1"), (f"{BUSY_UUID},0", BUSY_UUID)])
def test_the_gpu_in_use_is_the_first_visible_one_where_torch_sees_none(monkeypatch, visible, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert _probe().gpu_in_use() == expected


@pytest.mark.parametrize("visible", ["1", BUSY_UUID])
def test_utilisation_is_sampled_for_the_gpu_in_use_only(monkeypatch, visible):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    sampler = _probe().Sampler(STAND_IN, visible)
    time.sleep(1.0)
    sampler.stop()
    assert sampler.samples and {s[1] for s in sampler.samples} == {97.0}  # not the mean of both GPUs (48.5)
    assert sampler.unavailable == 0


def test_non_numeric_samples_are_counted_unavailable(monkeypatch):
    monkeypatch.setenv("STAND_IN_MIG", "1")
    sampler = _probe().Sampler(STAND_IN, "0")
    time.sleep(0.7)
    sampler.stop()
    assert sampler.samples == [] and sampler.unavailable > 0
