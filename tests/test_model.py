import socket
import threading
import urllib.request

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import resnet18

from flowers import checkpoint
from flowers.errors import UserError
from flowers.loading import initial_state
from flowers.model import build_model, imagenet_cache_path


def test_head_matches_number_of_classes():
    model = build_model(5, "none")
    assert model.fc.out_features == 5
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_weights_from_a_state_dict_file(tmp_path):
    source = resnet18(weights=None)
    path = tmp_path / "imagenet_style.pth"
    torch.save(source.state_dict(), path)  # 1000-class head: backbone loads, head is replaced
    model = build_model(3, initial_state(str(path)))
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
    """With no cached file the real download runs, through a local proxy that refuses it: the
    test never touches the network (even where there is one), and sees where the download went."""
    requests = []
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()

        def refuse():
            connection, _ = proxy.accept()
            with connection:
                requests.append(connection.recv(4096).decode(errors="replace").split("\r\n")[0])
                connection.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

        threading.Thread(target=refuse, daemon=True).start()
        for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.getsockname()[1]}")
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        # urlopen keeps the opener (and its proxies) of its first call in this process: build a new one
        monkeypatch.setattr(urllib.request, "_opener", None)
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
        with pytest.raises(UserError) as error:
            build_model(5, "imagenet")
    assert [r.rsplit(" ", 1)[0] for r in requests] == ["CONNECT download.pytorch.org:443"]  # the real address
    message = str(error.value)
    assert "\n" not in message and message.startswith("ImageNet weights unavailable")
    assert f"put resnet18-f37072fd.pth at {tmp_path / 'empty' / 'hub' / 'checkpoints'}" in message
    assert "--weights none" in message
    assert not (tmp_path / "empty" / "hub" / "checkpoints" / "resnet18-f37072fd.pth").exists()


def test_unknown_weights_name_is_one_line():
    with pytest.raises(UserError, match="no such file"):
        initial_state("imagenett")


def _source_and_its_backbone(num_classes: int = 1000) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(7)
    source = build_model(num_classes, "none")
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    return source, backbone


def _assert_loaded(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items()), "weights not loaded"


def _save_pth(tmp_path, state: dict, name: str = "weights.pth") -> str:
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("form", ["safetensors", "state_dict wrapper", "module. keys (DDP)",
                                  "_orig_mod. keys (torch.compile)"])
def test_weights_file_forms_load_the_backbone(form, tmp_path):
    """Every common way weights are saved loads the same backbone (a 1000-class head is replaced)."""
    source, backbone = _source_and_its_backbone()
    state = source.state_dict()
    if form == "safetensors":
        path = str(tmp_path / "weights.safetensors")
        save_file(state, path)
    elif form == "state_dict wrapper":
        path = _save_pth(tmp_path, {"state_dict": state, "epoch": 3})
    elif form == "module. keys (DDP)":
        path = _save_pth(tmp_path, {f"module.{k}": v for k, v in state.items()})
    else:
        compiled = torch.compile(source)  # compiles lazily: nothing runs until a forward pass
        assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
        path = _save_pth(tmp_path, compiled.state_dict())
    model = build_model(3, initial_state(path))
    _assert_loaded(model, backbone)
    assert model.fc.out_features == 3


def test_weights_from_a_checkpoint_folder_keep_its_head(tmp_path):
    source, _ = _source_and_its_backbone(num_classes=3)
    folder = checkpoint.save_checkpoint(tmp_path / "run" / "best", source.state_dict(),
                                        {"num_classes": 3, "class_names": list("abc"), "config": {}})
    model = build_model(3, initial_state(str(folder)))
    _assert_loaded(model, source.state_dict())  # the head too: it has our shape
