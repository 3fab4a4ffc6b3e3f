"""cam_plugin.layout: NCHW / NHWC / token features to (B, K, h, w), and the pool the head
applies, checked against the reshapes written out by hand."""

from __future__ import annotations

import pytest
import torch

import cam_plugin as cp
from cam_plugin.layout import FeatureLayout


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def test_nchw_is_a_view_and_pools_over_space() -> None:
    f = _randn(2, 5, 3, 4)
    layout = FeatureLayout()
    assert layout.kind == "NCHW" and layout.to_nchw(f) is f
    torch.testing.assert_close(layout.pool(f), f.mean(dim=(2, 3)))


def test_nhwc_is_permuted() -> None:
    f = _randn(2, 3, 4, 5)  # (B, h, w, K)
    layout = FeatureLayout("NHWC")
    out = layout.to_nchw(f)
    assert out.shape == (2, 5, 3, 4)
    assert torch.equal(out[1, 2, 0, 3], f[1, 0, 3, 2])
    torch.testing.assert_close(layout.pool(f), out.mean(dim=(2, 3)))


def test_tokens_drop_the_prefix_and_fill_the_grid_row_major() -> None:
    tokens = _randn(2, 1 + 2 * 3, 4)  # one class token, a 2 x 3 patch grid, K = 4
    layout = FeatureLayout("tokens", num_prefix_tokens=1)
    out = layout.to_nchw(tokens, input_hw=(20, 30))  # aspect 2:3 -> 2 rows, 3 columns
    assert out.shape == (2, 4, 2, 3)
    for n in range(6):
        assert torch.equal(out[:, :, n // 3, n % 3], tokens[:, 1 + n])
    torch.testing.assert_close(layout.pool(tokens), tokens[:, 1:].mean(dim=1))
    torch.testing.assert_close(layout.pool(tokens), out.mean(dim=(2, 3)))
    square = FeatureLayout("tokens").to_nchw(_randn(1, 9, 2))  # no input size: square
    assert square.shape == (1, 2, 3, 3)
    fixed = FeatureLayout("tokens", grid=(1, 6)).to_nchw(tokens[:, 1:])
    assert fixed.shape == (2, 4, 1, 6)


@pytest.mark.parametrize(
    ("layout", "shape"),
    [
        (FeatureLayout("NCHW", relu=True), (2, 3, 2, 2)),
        (FeatureLayout("NHWC", relu=True), (2, 2, 2, 3)),
        (FeatureLayout("tokens", num_prefix_tokens=2, relu=True), (2, 6, 3)),
    ],
    ids=["NCHW", "NHWC", "tokens"],
)
def test_functional_relu_enters_maps_and_pool(layout: FeatureLayout, shape: tuple) -> None:
    f = _randn(*shape)
    out = layout.to_nchw(f)
    assert float(out.min()) >= 0.0
    torch.testing.assert_close(layout.pool(f), out.mean(dim=(2, 3)))


def test_layout_grid_error_is_clear() -> None:
    layout = cp.FeatureLayout("tokens", num_prefix_tokens=1, grid=(3, 3))
    try:
        layout.to_nchw(torch.zeros(1, 11, 4))
    except cp.CAMInputError as err:
        assert "10 patch tokens" in str(err) and "grid" in str(err)
    else:  # pragma: no cover
        raise AssertionError("expected CAMInputError")


def test_bad_layouts_and_tensors_are_refused() -> None:
    with pytest.raises(cp.CAMInputError, match="'NCHW', 'NHWC' or 'tokens'"):
        FeatureLayout("NDHWC")  # type: ignore[arg-type]
    with pytest.raises(cp.CAMInputError, match="num_prefix_tokens"):
        FeatureLayout("tokens", num_prefix_tokens=-1)
    with pytest.raises(cp.CAMInputError, match="4-D feature tensor"):
        FeatureLayout().to_nchw(torch.zeros(2, 3, 4))
    with pytest.raises(cp.CAMInputError, match="3-D feature tensor"):
        FeatureLayout("tokens").to_nchw(torch.zeros(2, 3, 4, 5))
    with pytest.raises(cp.CAMInputError, match="not a tensor"):
        FeatureLayout().to_nchw((torch.zeros(1),))  # type: ignore[arg-type]
