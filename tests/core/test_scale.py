"""cam_plugin.result.MapScale: one fixed value scale for the maps of many images (given
bounds or fitted on a calibration set), ``CAMResult.normalize(scale=...)``, and the colour
bar of the pictures (cam_plugin.viz) that says which scale they use; torch only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TinyCNN, images, randomize_head

import cam_plugin as cp
from cam_plugin.errors import CAMInputError
from cam_plugin.result import CAMResult, MapScale, minmax_normalize
from cam_plugin.viz import colorbar_panel, grid_figure, overlay


def _result(maps: torch.Tensor, classes: torch.Tensor | None = None) -> CAMResult:
    b, k = maps.shape[:2]
    return CAMResult(
        maps=maps,
        logits=torch.zeros(b, 5),
        classes=classes if classes is not None else torch.zeros(b, k, dtype=torch.long),
        bias=torch.zeros(b, k),
        input_size=(int(maps.shape[-2]), int(maps.shape[-1])),
    )


def test_fixed_scale_keeps_two_images_comparable_where_minmax_does_not() -> None:
    weak = torch.linspace(0, 1, 16).reshape(1, 1, 4, 4)
    res = _result(torch.cat([weak, 3 * weak]))  # image 1: the same map, three times stronger
    per_map = res.normalize()
    torch.testing.assert_close(per_map.maps[0], per_map.maps[1])  # min-max hides the difference
    assert per_map.scale is None
    fixed = res.normalize(MapScale(0.0, 3.0, "given"))
    torch.testing.assert_close(fixed.maps[1], 3 * fixed.maps[0])
    assert fixed.scale == MapScale(0.0, 3.0, "given") and fixed.stage == "normalized"
    # (low, high) works too; values outside are clamped to [0, 1]
    clipped = res.normalize((0.5, 1.0))
    assert float(clipped.maps.min()) == 0.0 and float(clipped.maps.max()) == 1.0
    torch.testing.assert_close(clipped.maps[0], ((weak - 0.5) / 0.5).clamp(0, 1)[0])


def test_fit_takes_percentiles_over_every_real_map() -> None:
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(6, 2, 8, 8, generator=gen)
    classes = torch.zeros(6, 2, dtype=torch.long)
    classes[-1, -1] = -1  # padding of ragged targets: left out
    maps[-1, -1] = 1000.0
    res = _result(maps, classes)
    real = maps[classes >= 0].flatten().numpy()
    got = MapScale.fit([res[:3], res[3:]], percentiles=(0, 100))
    assert (got.low, got.high) == pytest.approx((float(real.min()), float(real.max())))
    p = MapScale.fit([res], percentiles=(5, 95))
    assert (p.low, p.high) == pytest.approx(tuple(np.percentile(real, [5, 95])), rel=1e-6)
    assert "p5-p95" in p.label and f"{real.size:,} values" in p.label
    sym = MapScale.fit([res.maps[:5]], symmetric=True, percentiles=(0, 90))
    assert sym.low == -sym.high and sym.high == pytest.approx(
        float(np.percentile(np.abs(maps[:5].numpy()), 90)), rel=1e-6
    )
    # a constant calibration set still gives a usable scale
    flat = MapScale.fit([torch.full((1, 1, 2, 2), 2.0)])
    assert flat.low == 2.0 and flat.high > flat.low


def test_scale_on_real_cam_results_and_batches() -> None:
    torch.manual_seed(0)
    model = randomize_head(TinyCNN()).eval()
    with cp.CAM(model) as cam:
        calib = [cam(images(4, 32, seed=s), targets="all") for s in range(3)]
        res = cam(images(2, 32, seed=9), topk=2)
    scale = MapScale.fit(calib)
    up = res.upsample().normalize(scale)
    assert up.stage == "upsampled+normalized" and up.scale is scale
    raw = res.upsample().maps
    torch.testing.assert_close(up.maps, ((raw - scale.low) / (scale.high - scale.low)).clamp(0, 1))
    assert up[1].scale is scale  # kept by indexing


def test_bad_scales_are_refused() -> None:
    with pytest.raises(CAMInputError, match="high > low"):
        MapScale(1.0, 1.0)
    with pytest.raises(CAMInputError, match="finite"):
        MapScale(0.0, float("inf"))
    with pytest.raises(CAMInputError, match="percentiles"):
        MapScale.fit([torch.zeros(1, 1, 2, 2)], percentiles=(50, 10))
    with pytest.raises(CAMInputError, match="at least one map"):
        MapScale.fit([])
    with pytest.raises(CAMInputError, match="NaN"):
        MapScale.fit([torch.tensor([[[[float("nan")]]]])])
    with pytest.raises(CAMInputError, match="CAMResult objects or map tensors"):
        MapScale.fit([[1.0, 2.0]])  # type: ignore[list-item]
    with pytest.raises(CAMInputError, match="scale must be"):
        _result(torch.zeros(1, 1, 2, 2)).normalize("global")  # type: ignore[arg-type]


# --------------------------------------------------------------------- pictures


def test_overlay_colours_follow_the_scale_and_the_colour_bar_says_which() -> None:
    image = np.full((32, 32, 3), 128, np.uint8)
    weak = torch.linspace(0, 1, 64).reshape(8, 8)

    def diff(p: np.ndarray, q: np.ndarray) -> int:
        return int(np.abs(p.astype(np.int32) - q.astype(np.int32)).max())

    a = overlay(image, weak, alpha=1.0)
    b = overlay(image, 3 * weak, alpha=1.0)
    assert (
        diff(a, b) <= 8
    )  # (colormap bins) min-max: the same picture for a map three times stronger
    scale = MapScale(0.0, 3.0, "given")
    fa = overlay(image, weak, alpha=1.0, scale=scale)
    fb = overlay(image, 3 * weak, alpha=1.0, scale=scale)
    assert diff(fa, fb) > 100
    assert diff(fb, a) <= 8  # 3x on [0, 3] is the min-max picture of the weak map
    bar = overlay(image, weak, scale=scale, colorbar=True)
    assert bar.shape[0] == 32 and bar.shape[1] > 32 + 40
    assert np.array_equal(bar[:, :32], overlay(image, weak, scale=scale))
    panel = colorbar_panel(64, 0.0, 3.0, "fixed", colormap="jet")
    assert panel.shape[0] == 64 and panel.dtype == np.uint8
    assert not np.array_equal(panel[0, 0], panel[-1, 0])  # top (high) and bottom (low) differ


def test_grid_figure_draws_one_colour_bar_labelled_with_the_scale() -> None:
    torch.manual_seed(0)
    model = randomize_head(TinyCNN()).eval()
    x = images(2, 32)
    res = cp.CAM(model)(x, topk=2)
    pictures = [minmax_normalize(img) for img in x]
    scale = MapScale(-1.0, 4.0, "p1–p99, 100 values")
    fig = grid_figure(pictures, res, scale=scale, colorbar=True)
    labels = [ax.get_ylabel() for ax in fig.axes] + [ax.get_xlabel() for ax in fig.axes]
    assert any("fixed scale (p1–p99, 100 values)" in t for t in labels), labels
    assert len(fig.axes) == 2 * 3 + 1  # six panels and the colour bar
    fig = grid_figure(pictures, res, colorbar=True)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert any("min-max per map" in t for t in labels), labels
    assert len(grid_figure(pictures, res).axes) == 2 * 3  # no bar unless asked
