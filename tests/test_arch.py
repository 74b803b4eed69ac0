"""--arch: any torchvision classifier whose classifier ends in an nn.Linear, its head found and
replaced generically, its weights, checks and checkpoints; old resnet18 checkpoints unchanged."""

import csv
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.models
from torch import nn

from conftest import TINY_TRAIN, free_port, make_dataset, run_cli
from flowers import checkpoint, loading
from flowers.config import TrainConfig
from flowers.errors import UserError
from flowers.export import load_exported
from flowers.model import (DropoutHead, build_model, check_arch, classifier_names, head_name, imagenet_cache_path,
                           match_head_keys, skeleton)
from flowers.recipe import head_parameters, parameter_groups
from flowers.resume import load_init_weights

# where torchvision keeps each family's last Linear
HEADS = {"resnet18": "fc", "mobilenet_v3_small": "classifier.3", "efficientnet_b0": "classifier.1",
         "convnext_tiny": "classifier.2", "regnet_y_400mf": "fc", "vit_b_16": "heads.head", "swin_t": "head"}


def _size_that_fits(arch: str) -> int:
    """The smallest of a few image sizes the architecture takes (ViT and MaxViT: 224 only)."""
    for size in (32, 64, 224):
        try:
            check_arch(arch, size)
            return size
        except UserError:
            pass
    raise AssertionError(f"{arch} takes none of 32, 64, 224 px")


def _assert_forward(arch: str, model: nn.Module, num_classes: int) -> None:
    size = _size_that_fits(arch)
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 3, size, size)).shape == (2, num_classes)


@pytest.mark.slow
@pytest.mark.parametrize("arch", classifier_names())
def test_every_supported_classifier_up_to_100m_parameters_builds_and_runs(arch):
    try:
        shapes_only = skeleton(arch)  # on the meta device: counting its parameters allocates nothing
    except UserError:
        pytest.skip(f"{arch} is not supported (see test_unknown_or_unsupported_arch_or_unfit_size_is_one_line)")
    if sum(p.numel() for p in shapes_only.parameters()) > 100e6:
        pytest.skip(f"{arch} has over 100 M parameters")
    model = build_model(3, "none", arch=arch)
    head = model.get_submodule(head_name(model))
    assert isinstance(head, nn.Linear) and head.out_features == 3
    _assert_forward(arch, model, 3)


@pytest.mark.parametrize("arch, head", HEADS.items())
def test_the_head_is_the_last_linear_wherever_the_architecture_keeps_it(arch, head):
    assert head_name(skeleton(arch)) == head


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "vit_b_16"])
def test_the_head_is_replaced_in_place_with_and_without_dropout(arch):
    head = HEADS[arch]
    model = build_model(4, "none", arch=arch)
    assert head_name(model) == head and model.get_submodule(head).out_features == 4
    assert [n for n, _ in model.named_parameters() if n.startswith(head + ".")] == [f"{head}.weight", f"{head}.bias"]
    dropped = build_model(4, "none", dropout=0.3, arch=arch)
    assert head_name(dropped) == head and isinstance(dropped.get_submodule(head), DropoutHead)
    assert f"{head}.1.weight" in dropped.state_dict() and dropped.get_submodule(head)[0].p == 0.3
    _assert_forward(arch, dropped, 4)


def test_a_head_saved_with_or_without_dropout_fits_either_way_on_efficientnet():
    """EfficientNet's own classifier is Dropout + Linear: only ours is taken for --dropout's."""
    plain = build_model(5, "none", arch="efficientnet_b0")
    dropped = build_model(5, "none", dropout=0.5, arch="efficientnet_b0")
    assert isinstance(plain.classifier[0], nn.Dropout) and isinstance(plain.classifier[1], nn.Linear)
    dropped.load_state_dict(match_head_keys(plain.state_dict(), dropped))
    assert torch.equal(dropped.classifier[1][1].weight, plain.classifier[1].weight)
    plain.load_state_dict(match_head_keys(build_model(5, "none", dropout=0.5, arch="efficientnet_b0").state_dict(),
                                          plain))
    assert not torch.equal(dropped.classifier[1][1].weight, plain.classifier[1].weight)  # the other model's head


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_freeze_backbone_trains_only_that_architectures_head(dropout):
    cfg = TrainConfig(arch="mobilenet_v3_small", image_size=32, freeze_backbone=-1, dropout=dropout)
    model = build_model(5, "none", dropout=dropout, arch=cfg.arch)
    groups = parameter_groups(cfg, model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    head = "classifier.3.1" if dropout else "classifier.3"
    assert trainable == {f"{head}.weight", f"{head}.bias"}
    assert [p for g in groups for p in g["params"]] == head_parameters(model)


def test_imagenet_weights_of_the_chosen_arch_come_from_the_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = imagenet_cache_path("mobilenet_v3_small")
    assert cached.name == "mobilenet_v3_small-047dcff4.pth" and str(cached).startswith(str(tmp_path))
    cached.parent.mkdir(parents=True)
    source = torchvision.models.get_model("mobilenet_v3_small", weights=None)  # 1000 classes, as ImageNet's
    torch.save(source.state_dict(), cached)
    model = build_model(5, "imagenet", arch="mobilenet_v3_small")
    assert torch.equal(model.features[3].block[0][0].weight, source.features[3].block[0][0].weight)
    assert model.classifier[3].out_features == 5


def test_imagenet_weights_missing_offline_name_the_arch_file(tmp_path, monkeypatch):
    """No cached file, and the download goes to a proxy port nobody listens on (never the network)."""
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen keeps its first opener's proxies
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(UserError) as error:
        build_model(5, "imagenet", arch="efficientnet_b0")
    message = str(error.value)
    expected = tmp_path / "empty" / "hub" / "checkpoints" / "efficientnet_b0_rwightman-7f5810bc.pth"
    assert "\n" not in message and message.startswith("ImageNet weights unavailable")
    assert f"put {expected.name} at {expected}" in message and not expected.exists()


@pytest.mark.parametrize("arch, expected", [
    ("resnet81", "--arch resnet81: not a torchvision classification model (close matches: resnet18, "),
    ("MobileNet_V3_Small", "close matches: mobilenet_v3_small"),
    ("inception_v3", "--arch inception_v3 is not supported: it returns auxiliary classifier outputs"),
    ("googlenet", "--arch googlenet is not supported: it returns auxiliary classifier outputs"),
    ("squeezenet1_1", "--arch squeezenet1_1 is not supported: its classifier is not an nn.Linear"),
    ("quantized_resnet18", "quantized models are int8 models for inference and cannot be fine-tuned; "
                           "use --arch resnet18"),
    ("fasterrcnn_resnet50_fpn", "a torchvision model, but not an image classifier"),
    ("vit_b_16", "--arch vit_b_16 takes 224 px images only (torchvision's VisionTransformer); use --image-size 224, "
                 "not 64"),
    ("maxvit_t", "--image-size 64 does not fit --arch maxvit_t ("),
])
def test_unknown_or_unsupported_arch_or_unfit_size_is_one_line(arch, expected):
    with pytest.raises(UserError) as error:
        TrainConfig(arch=arch, image_size=64)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_a_fitting_size_passes_the_checks():
    assert TrainConfig(arch="vit_b_16", image_size=224).arch == "vit_b_16"
    assert TrainConfig(arch="convnext_tiny", image_size=32).arch == "convnext_tiny"


@pytest.mark.parametrize("args, expected", [
    (("--arch", "resnet81"), "error: --arch resnet81: not a torchvision classification model (close matches: "),
    (("--arch", "vit_b_16"), "error: --arch vit_b_16 takes 224 px images only"),
])
def test_train_py_refuses_an_unusable_arch_in_one_line_before_training(args, expected, tmp_path):
    proc = run_cli("python", "train.py", "--data", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out"),
                   *TINY_TRAIN, *args, check=False, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(expected), proc.stderr
    assert not (tmp_path / "out").exists()


def _save(folder, model: nn.Module, arch=None, dropout: float = 0.0):
    meta = {"num_classes": 3, "class_names": list("abc"), "config": {"dropout": dropout}, "epoch": 1}
    if arch:
        meta["arch"] = arch
    return checkpoint.save_checkpoint(folder, model.state_dict(), meta)


@pytest.mark.parametrize("recorded", ["resnet18", None])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_an_old_resnet18_checkpoint_loads_unchanged(tmp_path, recorded, dropout):
    """Checkpoints from before --arch: a ResNet18 with keys fc.* (fc.1.* with --dropout), its
    architecture recorded as resnet18 or not at all."""
    from torchvision.models import resnet18

    old = resnet18(num_classes=3)
    if dropout:
        old.fc = nn.Sequential(nn.Dropout(dropout), old.fc)
    assert {k for k in old.state_dict() if "fc" in k} == ({"fc.1.weight", "fc.1.bias"} if dropout
                                                           else {"fc.weight", "fc.bias"})
    folder = _save(tmp_path / "best", old, recorded, dropout)
    loaded, _ = loading.load_model(folder)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), old.eval()(x))


def test_a_checkpoint_rebuilds_its_recorded_arch(tmp_path):
    model = build_model(3, "none", dropout=0.2, arch="mobilenet_v3_small").eval()
    loaded, meta = loading.load_model(_save(tmp_path / "best", model, "mobilenet_v3_small", dropout=0.2))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert type(loaded).__name__ == "MobileNetV3" and torch.equal(loaded.eval()(x), model(x))


def test_init_from_another_arch_is_one_line_and_the_same_arch_keeps_its_backbone(tmp_path):
    source = build_model(3, "none", arch="mobilenet_v3_small")
    folder = _save(tmp_path / "best", source, "mobilenet_v3_small")
    with pytest.raises(UserError) as error:
        load_init_weights(build_model(3, "none"), folder, list("abc"))
    assert str(error.value) == (f"--init-from {folder}: it holds a mobilenet_v3_small model and this run builds "
                                "resnet18; start from it with --arch mobilenet_v3_small")
    other_classes = build_model(2, "none", dropout=0.3, arch="mobilenet_v3_small")
    fresh_head = other_classes.classifier[3][1].weight.clone()
    info = load_init_weights(other_classes, folder, ["x", "y"])
    assert not info["head_loaded"] and torch.equal(other_classes.classifier[3][1].weight, fresh_head)
    assert torch.equal(other_classes.features[0][0].weight, source.features[0][0].weight)


def _photo_key(path: str) -> str:
    """class/file name: the same photo whatever the folder it was reached through."""
    return "/".join(Path(path).parts[-2:])


@pytest.mark.slow
@pytest.mark.parametrize("arch, head", [("mobilenet_v3_small", "classifier.3"), ("regnet_y_400mf", "fc")])
def test_train_eval_predict_export_and_init_from_with_other_architectures(tmp_path, arch, head):
    """A real run of another architecture (resnet18's are the rest of the suite): eval.py reproduces its recorded accuracy, predict agrees
    with eval, the exported model gives PyTorch's logits, and --init-from with --freeze-backbone
    --dropout changes only its head."""
    data = make_dataset(tmp_path / "flowers")
    out = tmp_path / "outputs"
    common = ("--data", str(data), "--output-dir", str(out), "--epochs", "1", *TINY_TRAIN)
    run_cli("python", "train.py", *common, "--arch", arch, "--run-name", "first", timeout=1200)
    best = out / "first" / "best"
    meta = json.loads((best / "checkpoint.json").read_text())
    assert meta["arch"] == meta["config"]["arch"] == arch

    proc = run_cli("python", "eval.py", "--ckpt", str(best), "--workers", "0", timeout=1200)
    assert "matches the accuracy recorded" in proc.stdout
    report_dir = proc.stdout.strip().splitlines()[-1].removeprefix("results written to ")
    results = json.loads(open(f"{report_dir}/results.json").read())
    assert results["metrics"]["accuracy"] == meta["metrics"]["val_accuracy"]
    rows = list(csv.DictReader(open(f"{report_dir}/predictions.csv")))
    by_eval = {_photo_key(row["file"]): row["predicted"] for row in rows}
    predictions = tmp_path / "predictions.json"
    run_cli("python", "-m", "flowers.predict", "--ckpt", str(best), "--top-k", "1", "--output", str(predictions),
            *(str(data / key) for key in by_eval), timeout=1200)
    predicted = {_photo_key(row["path"]): row["top_k"][0]["class"] for row in json.loads(predictions.read_text())}
    assert len(by_eval) == 8 and predicted == by_eval

    exported = tmp_path / "exported"
    run_cli("python", "-m", "flowers.export", "--ckpt", str(best), "--format", "torchscript", "--out", str(exported),
            timeout=1200)
    model, _ = loading.load_model(best)
    images = torch.rand(4, 3, 32, 32)
    with torch.inference_mode():
        expected = model.eval()(images).numpy()
    np.testing.assert_allclose(load_exported(exported / "model.torchscript.pt")(images.numpy()), expected, atol=1e-5)

    run_cli("python", "train.py", *common, "--init-from", str(best), "--arch", arch,
            "--freeze-backbone", "--dropout", "0.3", "--run-name", "second", timeout=1200)
    before, after = checkpoint.load_weights(best), checkpoint.load_weights(out / "second" / "last")
    trained = {k for k in after if not torch.equal(after[k], before[k.replace(f"{head}.1.", f"{head}.")])}
    assert {f"{head}.1.weight", f"{head}.1.bias"} <= trained
    assert all(k.startswith(f"{head}.1.") or "running_" in k or "num_batches" in k for k in trained), trained


@pytest.mark.parametrize("entry", ["eval:main", "flowers.predict:main"])
def test_eval_size_on_a_vit_checkpoint_is_one_line(entry, tmp_path, monkeypatch, capsys):
    """eval.py and predict with --eval-size on a ViT checkpoint ended in a traceback (`AssertionError:
    Wrong image height!`). Checked from checkpoint.json, before the weights are read."""
    import importlib
    import sys

    from flowers.cli import run

    folder = tmp_path / "vit" / "best"
    folder.mkdir(parents=True)
    (folder / checkpoint.META_FILE).write_text(json.dumps({"arch": "vit_b_16", "image_size": 224, "num_classes": 5}))
    (folder / checkpoint.WEIGHTS_FILE).write_bytes(b"not read")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"")
    module, function = entry.split(":")
    argv = (["x", str(photo)] if "predict" in module else ["x"]) + ["--ckpt", str(folder), "--eval-size", "160"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        run(getattr(importlib.import_module(module), function))
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --eval-size 160: this checkpoint's vit_b_16 takes 224 px images only (torchvision's "
        "VisionTransformer has a position embedding per patch of that size); leave --eval-size out")
