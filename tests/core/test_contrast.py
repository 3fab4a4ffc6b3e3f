"""Contrastive maps M_c − M_c' (issue 14): the logit margin decomposes exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyCNN, images, randomize_head

import cam_plugin as cp


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_head(TinyCNN(num_classes=6)).eval()


def _margin_residual(res: cp.CAMResult) -> torch.Tensor:
    """|mean_xy (M_c − M_c') + b_c − b_c' − (S_c − S_c')| computed from the raw fields."""
    logits = res.logits
    margin = logits.gather(1, res.classes) - logits.gather(1, res.contrast)
    return (res.maps.mean(dim=(2, 3)) + res.bias - margin).abs()


def test_every_class_pair_decomposes_the_margin(model: torch.nn.Module) -> None:
    x = images(3, 16)
    cam = cp.CAM(model)
    plain = cam(x, targets="all")
    for other in range(6):
        classes = [[c for c in range(6) if c != other]] * 3
        res = cam(x, targets=classes, contrast=other)
        assert res.contrast is not None and bool((res.contrast == other).all())
        scale = max(1.0, float(res.logits.abs().max()))
        assert float(_margin_residual(res).max()) <= 1e-4 * scale
        assert float(res.identity_residual().abs().max()) <= 1e-4 * scale
        # equals the difference of the plain maps
        expected = plain.maps[:, classes[0]] - plain.maps[:, [other]]
        torch.testing.assert_close(res.maps, expected, rtol=1e-5, atol=1e-5)


def test_second_is_the_runner_up(model: torch.nn.Module) -> None:
    x = images(4, 16, seed=3)
    res = cp.CAM(model)(x, topk=2, contrast="second")
    top2 = res.logits.topk(2, dim=1).indices
    assert res.classes.tolist() == top2.tolist()
    assert res.contrast[:, 0].tolist() == top2[:, 1].tolist()  # top-1 against the runner-up
    assert res.contrast[:, 1].tolist() == top2[:, 0].tolist()  # runner-up against the top-1
    assert float(_margin_residual(res).max()) <= 1e-4 * max(1.0, float(res.logits.abs().max()))
    assert bool((res.scores[:, 0] >= 0).all())  # the top-1 margin is not negative


def test_per_image_contrast_and_indexing(model: torch.nn.Module) -> None:
    x = images(2, 16)
    res = cp.CAM(model)(x, targets=[0, 1], contrast=[5, 4])
    assert res.contrast.tolist() == [[5], [4]]
    assert res[1].contrast.tolist() == [[4]]
    assert "contrast" in res.to_numpy()


@pytest.mark.parametrize(
    ("contrast", "match"),
    [
        ("third", "only string"),
        (6, "out of range"),
        (0, "equals the map's own class"),
        ([[1, 2], [3, 4]], "one class per image"),
        (True, "contrast must be"),
    ],
)
def test_bad_contrast(model: torch.nn.Module, contrast, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(cp.CAMInputError, match=match):
        cp.CAM(model)(images(2, 16), targets=0, contrast=contrast)
