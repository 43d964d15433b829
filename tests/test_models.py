from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tinyserve.training.models import ServingModel, create_model, list_models, register_model


@pytest.mark.parametrize("arch", list_models())
@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32)])
def test_every_registered_architecture_classifies(arch: str, in_channels: int, size: int) -> None:
    net = create_model(arch, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        logits = net(torch.randn(2, in_channels, size, size))
    assert logits.shape == (2, 7)


def test_serving_model_takes_uint8_nhwc_and_normalizes() -> None:
    seen: list[torch.Tensor] = []

    class Spy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return x.mean(dim=(2, 3))

    model = ServingModel(Spy(), mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 1.0])
    pixels = torch.full((1, 2, 2, 3), 255, dtype=torch.uint8)
    out = model(pixels)
    assert seen[0].shape == (1, 3, 2, 2)
    assert torch.allclose(out, torch.tensor([[1.0, 3.0, 1.0]]))


def test_unknown_architecture_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="custom_cnn"):
        create_model("resnet9000", num_classes=2, in_channels=1)


def test_registering_a_name_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("custom_cnn")(lambda **_: torch.nn.Identity())


def test_an_architecture_can_be_named_by_import_string(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path
    (folder / "my_nets.py").write_text(
        "from torch import nn\n"
        "def tiny(num_classes, in_channels):\n"
        "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    net = create_model("my_nets:tiny", num_classes=4, in_channels=1)
    assert net(torch.zeros(2, 1, 3, 3)).shape == (2, 4)
    with pytest.raises(ValueError, match="has no factory 'nope'"):
        create_model("my_nets:nope", num_classes=4, in_channels=1)
    with pytest.raises(ValueError, match="cannot import 'not_a_module_here'"):
        create_model("not_a_module_here:net", num_classes=4, in_channels=1)
