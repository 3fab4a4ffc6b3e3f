"""Images in, pictures out (issue 15): PIL / numpy / list inputs give the maps of the
tensor path with the same preprocessing, and to_original maps back to the photo's pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TinyCNN, randomize_head
from PIL import Image

import cam_plugin as cp
from cam_plugin.preprocess import DataConfig, Preprocess


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_head(TinyCNN(num_classes=4)).eval()


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _by_hand(photo: np.ndarray, config: DataConfig) -> torch.Tensor:
    """Resize the short side to round(H / crop_pct), centre-crop, normalize."""
    h0, w0 = photo.shape[:2]
    _, height, width = config.input_size
    short = round(min(height, width) / config.crop_pct)
    s = short / min(h0, w0)
    size = (max(width, round(w0 * s)), max(height, round(h0 * s)))
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    resized = Image.fromarray(photo).resize(size, Image.Resampling.BILINEAR)
    crop = np.asarray(resized.crop((left, top, left + width, top + height)), np.float32) / 255
    x = (crop - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def test_pil_numpy_and_lists_equal_the_tensor_path(model: torch.nn.Module) -> None:
    config = DataConfig(input_size=(3, 32, 32), crop_pct=0.875)
    cam = cp.CAM(model, preprocess=config)
    photos = [_photo(40, 60, 1), _photo(50, 45, 2)]
    x = torch.stack([_by_hand(p, config) for p in photos])
    ref = cam(x, targets="all")
    for given in (photos, [Image.fromarray(p) for p in photos]):
        res = cam(given, targets="all")
        torch.testing.assert_close(res.maps, ref.maps, rtol=1e-5, atol=1e-5)
        assert res.originals is not None and len(res.originals) == 2
    single = cam(Image.fromarray(photos[0]), targets="all")
    torch.testing.assert_close(single.maps, ref.maps[:1], rtol=1e-5, atol=1e-5)


def test_to_original_maps_a_box_back_within_a_pixel(model: torch.nn.Module) -> None:
    """A non-square photo: a bright square in the crop's coordinates lands where resize +
    centre crop put it, computed by hand."""
    config = DataConfig(input_size=(3, 32, 32), crop_pct=1.0)
    photo = _photo(48, 96)  # short side 48 -> scale 32/48, resized 64 x 32, left = 16
    res = cp.CAM(model, preprocess=config)(photo, targets=0).upsample(placement="bilinear")
    prepared = res.originals[0]
    assert prepared.original_size == (48, 96) and prepared.left == 16 and prepared.top == 0
    marked = torch.zeros_like(res.maps)
    marked[..., 8:16, 4:12] = 1.0  # crop pixels x 4..11, y 8..15
    from dataclasses import replace

    original = replace(res, maps=marked).to_original(fill=-1.0)[0][0]
    assert original.shape == (48, 96)
    ys, xs = torch.nonzero(original > 0.5, as_tuple=True)
    s = 32 / 48
    # by hand: crop x in [4, 12) -> original x in [(4 + 16) / s, (12 + 16) / s) = [30, 42)
    assert abs(int(xs.min()) - (4 + 16) / s) <= 1 and abs(int(xs.max()) + 1 - (12 + 16) / s) <= 1
    assert abs(int(ys.min()) - 8 / s) <= 1 and abs(int(ys.max()) + 1 - 16 / s) <= 1
    assert float(original[:, :10].max()) == -1.0  # left of the crop: never seen
    box = prepared.to_original([4, 8, 11, 15])
    assert abs(box[0] - 30) <= 1 and abs(box[1] - 12) <= 1


def test_pictures_are_refused_without_preprocessing(model: torch.nn.Module) -> None:
    with pytest.raises(cp.CAMInputError, match="preprocess=None"):
        cp.CAM(model, preprocess=None)(_photo(20, 20))
    with pytest.raises(cp.CAMInputError, match="to_original"):
        cp.CAM(model)(torch.randn(1, 3, 16, 16)).to_original()
    Preprocess(DataConfig())  # the public preprocessing the CLI also uses
