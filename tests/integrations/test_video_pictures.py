"""Video pictures (issue 15): per-frame overlays of a space-time CAM and the clip picture
(frames in a strip), on a video classifier whose class-0 map is the clip itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TinyCNN

import cam_plugin as cp
from cam_plugin.viz import caption, colorbar_panel
from cam_plugin.viz_video import clip_frames, clip_picture, frame_indices, frame_overlays

T, H, W = 6, 24, 40


def _model() -> torch.nn.Module:
    """Conv3d 1x1x1 (the channel mean) -> ReLU -> GAP3d -> Linear(1, 2) with weights (1, -1):
    the class-0 map is the clip's channel mean, at the clip's own resolution."""
    conv = torch.nn.Conv3d(3, 1, 1)
    fc = torch.nn.Linear(1, 2)
    with torch.no_grad():
        conv.weight.fill_(1.0 / 3.0)
        torch.nn.init.zeros_(conv.bias)  # type: ignore[arg-type]
        fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        fc.bias.zero_()
    pool = torch.nn.AdaptiveAvgPool3d(1)
    return torch.nn.Sequential(conv, torch.nn.ReLU(), pool, torch.nn.Flatten(), fc).eval()


def _clip(dim_frame: bool = False) -> torch.Tensor:
    """(1, 3, T, H, W): a 6x6 square moving 5 px right per frame in frames 0..4, frame 5
    empty; with ``dim_frame`` frame 4's square is at 30 %."""
    x = torch.zeros(1, 3, T, H, W)
    for t in range(5):
        x[0, :, t, 8:14, 3 + 5 * t : 9 + 5 * t] = 1.0
    if dim_frame:
        x[0, :, 4] *= 0.3
    return x


def _path(t: int) -> list[int]:
    return [3 + 5 * t, 8, 8 + 5 * t, 13]


@pytest.fixture
def res_clip() -> tuple[cp.CAMResult, torch.Tensor]:
    x = _clip()
    return cp.CAM(_model())(x, targets=[0]), x


def test_strip_has_the_frames_and_the_size(res_clip: tuple[cp.CAMResult, torch.Tensor]) -> None:
    res, x = res_clip
    assert res.maps.shape == (1, 1, T, H, W) and res.frames == T
    overlays = frame_overlays(res, x[0])
    assert overlays.shape == (T, H, W, 3) and overlays.dtype == np.uint8
    pic = clip_picture(res, x[0], min_side=H, colorbar=False, boxes=False)
    assert pic.shape == (14 + H, T * W + (T - 1) * 2, 3)
    strip = pic[14:]
    for t in range(T):  # panel t is the overlay of frame t, captioned with its index
        expected = caption(overlays[t], f"t={t}")
        np.testing.assert_array_equal(strip[:, t * (W + 2) : t * (W + 2) + W], expected)
    assert clip_picture(res, x[0], min_side=H, every=2, colorbar=False).shape[1] == 3 * W + 4
    assert clip_picture(res, x[0], min_side=H, max_frames=4, colorbar=False).shape[1] == 4 * W + 6
    assert frame_indices(T, max_frames=4) == [0, 2, 3, 5]
    big = clip_picture(res, x[0], min_side=2 * H, colorbar=False)  # enlarged x2
    assert big.shape == (14 + 2 * H, T * 2 * W + (T - 1) * 2, 3)
    with_bar = clip_picture(res, x[0], min_side=H)
    bar = colorbar_panel(H, 0.0, 1.0, "clip min-max")
    assert with_bar.shape[1] == pic.shape[1] + 2 + bar.shape[1]
    np.testing.assert_array_equal(with_bar[14:, -bar.shape[1] :], bar)  # raw min 0, max 1


def test_zero_map_shows_the_plain_frame(res_clip: tuple[cp.CAMResult, torch.Tensor]) -> None:
    res, x = res_clip
    plain = clip_frames(x[0])
    np.testing.assert_array_equal(frame_overlays(res, x[0], alpha=0.0), plain)
    faded = frame_overlays(res, x[0], fade=True, alpha=0.8)
    np.testing.assert_array_equal(faded[5], plain[5])  # the map is zero on the empty frame
    changed = np.any(faded != plain, axis=-1)  # ... and off the square on the others
    for t in range(5):
        x0, y0, x1, y1 = _path(t)
        assert changed[t, y0 : y1 + 1, x0 : x1 + 1].all()
        changed[t, y0 : y1 + 1, x0 : x1 + 1] = False
    assert not changed.any()
    assert np.any(frame_overlays(res, x[0])[5] != plain[5])  # fixed alpha: tinted everywhere


def test_boxes_are_drawn_where_the_tube_boxes_are(
    res_clip: tuple[cp.CAMResult, torch.Tensor],
) -> None:
    res, x = res_clip
    tube = res.upsample().normalize().boxes(0.2)[0, 0]
    plain = frame_overlays(res, x[0], alpha=0.0)
    boxed = frame_overlays(res, x[0], alpha=0.0, boxes=True)
    for t in range(T):
        diff = np.any(boxed[t] != plain[t], axis=-1)
        if t == 5:  # no evidence in the clip's terms: no box
            assert not diff.any() and tube[t].eq(0).all()
            continue
        assert tube[t].tolist() == _path(t)
        x0, y0, x1, y1 = _path(t)
        outline = np.zeros((H, W), bool)
        outline[[y0, y1], x0 : x1 + 1] = True
        outline[y0 : y1 + 1, [x0, x1]] = True
        np.testing.assert_array_equal(diff, outline & np.any(plain[t] != 255, axis=-1))
        assert (boxed[t][outline] == 255).all()


def test_clip_normalization_keeps_frames_comparable() -> None:
    """A dim frame (30 %) is drawn cool with one min-max over the clip, and at full strength
    with min-max per frame."""
    x = _clip(dim_frame=True)
    res = cp.CAM(_model())(x, targets=[0])
    y0, x0 = 10, 3 + 5 * 4 + 2  # inside the dim square
    clip_wise = frame_overlays(res, x[0], alpha=1.0)
    per_frame = frame_overlays(res, x[0], alpha=1.0, relative_to="frame")
    np.testing.assert_array_equal(per_frame[4, y0, x0], per_frame[0, 10, 5])  # both the top
    assert not np.array_equal(clip_wise[4, y0, x0], clip_wise[0, 10, 5])
    fixed = frame_overlays(res, x[0], alpha=1.0, scale=cp.MapScale(0.0, 1.0))
    np.testing.assert_array_equal(fixed, clip_wise)  # this clip's min and max are 0 and 1


def test_model_input_with_mean_and_std_is_undone() -> None:
    frames = np.random.default_rng(0).integers(0, 256, size=(T, H, W, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = (torch.from_numpy(frames).float() / 255 - torch.tensor(mean)) / torch.tensor(std)
    back = clip_frames(x.permute(3, 0, 1, 2), mean=mean, std=std)
    assert back.shape == (T, H, W, 3)
    assert int(np.abs(back.astype(int) - frames.astype(int)).max()) <= 1
    np.testing.assert_array_equal(clip_frames(frames), frames)
    np.testing.assert_array_equal(clip_frames(list(frames)), frames)
    as_float = clip_frames(frames.astype(np.float32) / 255)
    assert int(np.abs(as_float.astype(int) - frames.astype(int)).max()) <= 1


def test_bad_inputs_say_what_to_pass(res_clip: tuple[cp.CAMResult, torch.Tensor]) -> None:
    res, x = res_clip
    with pytest.raises(cp.CAMInputError, match=r"\(T, H, W, 3\)"):
        frame_overlays(res, x)  # the batch, not one clip
    with pytest.raises(cp.CAMInputError, match=r"\(C, T, H, W\)"):
        clip_picture(res, x[0, :, 0])  # one frame
    with pytest.raises(cp.CAMInputError, match="4 frames but the result.s clips have 6"):
        frame_overlays(res, x[0, :, :4])
    with pytest.raises(cp.CAMInputError, match="one per channel"):
        clip_frames(x[0], mean=(0.5, 0.5), std=(0.2, 0.2))
    with pytest.raises(cp.CAMInputError, match="out of range"):
        frame_overlays(res, x[0], j=1)
    with pytest.raises(cp.CAMInputError, match="every"):
        clip_picture(res, x[0], every=0)
    with pytest.raises(cp.CAMInputError, match="relative_to"):
        frame_overlays(res, x[0], relative_to="video")  # type: ignore[arg-type]
    with pytest.raises(cp.CAMInputError, match="alpha"):
        frame_overlays(res, x[0], alpha=2.0)
    torch.manual_seed(0)
    image_res = cp.CAM(TinyCNN(num_classes=3).eval())(torch.randn(1, 3, 32, 32))
    with pytest.raises(cp.CAMInputError, match="video result.*viz.overlay"):
        clip_picture(image_res, x[0])  # 4-D image maps


def test_r3d_picture_from_the_model_input() -> None:
    vm = pytest.importorskip("torchvision.models.video")
    torch.manual_seed(0)
    model = vm.r3d_18(num_classes=3).eval()
    mean, std = (0.43, 0.39, 0.37), (0.23, 0.22, 0.22)
    frames = torch.rand(4, 32, 32, 3)
    x = ((frames - torch.tensor(mean)) / torch.tensor(std)).permute(3, 0, 1, 2)[None]
    res = cp.CAM(model)(x, topk=2)
    assert res.maps.shape[:3] == (1, 2, 1)  # T' = 1: upsampled to the 4 frames
    pic = clip_picture(res, x[0], j=1, mean=mean, std=std, class_names=["a", "b", "c"])
    assert pic.shape[0] == 14 + 96 and pic.shape[1] > 4 * 96
    same = clip_picture(res, (frames.numpy() * 255 + 0.5).astype(np.uint8), j=1, class_names=None)
    assert same.shape == pic.shape
