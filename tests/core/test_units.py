"""Class-specific units (paper Sec. 5, issue 14)."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyCNN, images, randomize_head
from torch import nn

import cam_plugin as cp
from cam_plugin.units import rank_units, unit_maps


class Planted(nn.Module):
    """Channel 2 fires only on a bright square; class 1's weight on it dominates."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.fill_(-0.5)
            self.conv.weight[2, 0] = 1.0  # relu(x - 0.5): only the square (value 1) fires
            self.conv.weight[0, 0] = 0.2
            self.conv.bias[0] = 0.1
            self.fc.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0.3, 0.1, 4.0, 0.2], [0, 1, 0, 1]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def test_planted_unit_is_the_top_unit_of_its_class() -> None:
    model = Planted().eval()
    x = torch.zeros(2, 1, 12, 12)
    x[:, :, 3:7, 4:9] = 1.0
    units = cp.CAM(model).units(x, targets=1, top=2)
    assert units.units[:, 0, 0].tolist() == [2, 2]
    fired = units.maps[:, 0, 0] > 0
    assert bool(fired[:, 3:7, 4:9].all()) and int(fired.sum()) == 2 * 20
    by_weight = cp.CAM(model).units(x, targets=1, top=1, by="weight")
    assert by_weight.units[:, 0, 0].tolist() == [2, 2]


@pytest.mark.parametrize("layernorm", [False, True])
def test_weighted_unit_maps_sum_to_the_cam(layernorm: bool) -> None:
    torch.manual_seed(0)
    model = randomize_head(TinyCNN(num_classes=5)).eval()
    if layernorm:
        model.fc = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 5))
        randomize_head(model.fc).eval()
    x = images(3, 16)
    cam = cp.CAM(model)
    res = cam(x, targets="all")
    every = cam.units(x, targets="all", top=16)
    weighted = (every.weights[..., None, None] * every.maps).sum(dim=2)
    torch.testing.assert_close(weighted, res.maps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(every.total + res.bias, res.scores, rtol=1e-4, atol=1e-4)
    top = cam.units(x, targets="all", top=3)
    assert top.contributions.shape == (3, 5, 3)
    assert bool((top.contributions[..., :-1] >= top.contributions[..., 1:]).all())


def test_bad_unit_options() -> None:
    head = cp.FoldedHead(weight=torch.randn(3, 4), bias=torch.zeros(3))
    f = torch.randn(2, 4, 3, 3)
    assert unit_maps(head, f) is f
    with pytest.raises(cp.CAMInputError, match="top"):
        rank_units(head, f, torch.zeros(2, 1, dtype=torch.long), top=0)
    with pytest.raises(cp.CAMInputError, match="by"):
        rank_units(head, f, torch.zeros(2, 1, dtype=torch.long), by="size")  # type: ignore[arg-type]
