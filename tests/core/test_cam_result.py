"""The result chain of a CAM call (upsample, normalize, boxes, relu, numpy, probabilities).

tests/test_result.py covers ``CAMResult`` itself; this file keeps the checks that read a
result straight from ``CAM`` on a torch-only model (``TinyResNet``: 4 x 4 maps at 16 x 16).
"""

from __future__ import annotations

import torch
from helpers import TinyResNet, images, randomize_head

import cam_plugin as cp


def test_result_chain() -> None:
    torch.manual_seed(0)
    net = randomize_head(TinyResNet(num_classes=10)).eval()
    res = cp.CAM(net)(images(2, 16), topk=2)
    up = res.upsample()
    assert up.maps.shape == (2, 2, 16, 16) and up.stage == "upsampled"
    norm = up.normalize()
    assert float(norm.maps.min()) >= 0.0 and float(norm.maps.max()) <= 1.0
    flat = norm.maps.flatten(2)
    assert torch.allclose(flat.amax(-1), torch.ones(2, 2))
    boxes = norm.boxes(0.2)
    assert boxes.shape == (2, 2, 4)
    assert bool((boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all())
    assert float(res.relu().maps.min()) >= 0.0
    arrays = res.to_numpy()
    assert arrays["maps"].shape == (2, 2, 4, 4) and arrays["classes"].shape == (2, 2)
    assert torch.allclose(
        res.probabilities.sum(), res.logits.softmax(1).gather(1, res.classes).sum()
    )


def test_constant_map_normalizes_to_zeros() -> None:
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 1] = 3.0
    out = cp.minmax_normalize(maps)
    assert torch.equal(out, torch.zeros_like(out))
