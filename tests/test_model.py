import pytest
import torch
from torchvision.models import resnet18

from flowers.errors import UserError
from flowers.model import build_model, imagenet_cache_path


def test_head_matches_number_of_classes():
    model = build_model(5, "none")
    assert model.fc.out_features == 5
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_weights_from_a_state_dict_file(tmp_path):
    source = resnet18(weights=None)
    path = tmp_path / "imagenet_style.pth"
    torch.save(source.state_dict(), path)  # 1000-class head: backbone loads, head is replaced
    model = build_model(3, str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 3


def test_imagenet_weights_from_the_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = imagenet_cache_path()
    assert str(cached).startswith(str(tmp_path))
    cached.parent.mkdir(parents=True)
    source = resnet18(weights=None)
    torch.save(source.state_dict(), cached)
    model = build_model(5, "imagenet")
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_imagenet_weights_missing_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="resnet18-f37072fd.pth.*--weights none"):
        build_model(5, "imagenet")


def test_unknown_weights_name_is_one_line():
    with pytest.raises(UserError, match="no such file"):
        build_model(5, "imagenett")
