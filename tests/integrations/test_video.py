"""Space-time CAM on torchvision video classifiers (issue 15): maps (B, k, T', h, w), the
identity mean_{t,x,y} M_c + b_c = S_c, and an independent computation of the maps."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_head

import cam_plugin as cp
from cam_plugin.convert import GlobalPool3d
from cam_plugin.localize import threshold_boxes
from cam_plugin.tubes import tube_presence

vm = pytest.importorskip("torchvision.models.video")


def _clip(frames: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, frames, size, size, generator=gen)


def _hooked(module: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[-1]


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_resnet3d_family_is_exact(name: str) -> None:
    torch.manual_seed(0)
    model = randomize_head(getattr(vm, name)(num_classes=5)).eval()
    x = _clip(8, 48)
    res = cp.CAM(model)(x, targets="all")
    assert res.maps.dim() == 5 and res.maps.shape[:2] == (2, 5) and res.frames == 8
    scale = max(1.0, float(res.logits.abs().max()))
    assert float(res.identity_residual().abs().max()) <= 1e-4 * scale
    feats = _hooked(model.layer4, model, x)  # (B, 512, T', h, w), independent of the library
    expected = torch.einsum("ck,bkthw->bcthw", model.fc.weight, feats)
    torch.testing.assert_close(res.maps, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(res.logits, model(x))
    up = res.upsample()
    assert up.maps.shape == (2, 5, 8, 48, 48)
    norm = up.normalize().maps
    assert float(norm.amin()) == 0.0 and float(norm.amax()) == 1.0


def test_swin3d_channels_last_tokens_are_exact() -> None:
    torch.manual_seed(0)
    model = randomize_head(vm.swin3d_t(num_classes=4)).eval()
    x = _clip(4, 64)
    res = cp.CAM(model)(x, targets=[1, 3])
    scale = max(1.0, float(res.logits.abs().max()))
    assert float(res.identity_residual().abs().max()) <= 1e-4 * scale
    normed = _hooked(model.norm, model, x).permute(0, 4, 1, 2, 3)  # (B, K, T', h, w)
    expected = torch.einsum("ck,bkthw->bcthw", model.head.weight, normed)
    torch.testing.assert_close(
        res.maps, expected[torch.arange(2)[:, None], torch.tensor([[1], [3]])], rtol=1e-4, atol=1e-5
    )


def test_s3d_at_its_clip_length_is_exact() -> None:
    """s3d: an AvgPool3d((2, 7, 7)) that is global at 16 frames x 224 px, then a 1x1x1 conv
    (folded) and a mean; at other lengths the pool is local and the model is refused."""
    torch.manual_seed(0)
    model = randomize_head(vm.s3d(num_classes=3)).eval()
    res = cp.CAM(model)(torch.randn(1, 3, 16, 224, 224), targets="all")
    scale = max(1.0, float(res.logits.abs().max()))
    assert float(res.identity_residual().abs().max()) <= 1e-4 * scale


def test_mvit_class_token_is_refused() -> None:
    model = vm.mvit_v1_b(num_classes=3).eval()
    with pytest.raises(cp.UnsupportedHeadError, match="convert"):
        cp.CAM(model)(torch.randn(1, 3, 16, 224, 224))


def test_image_input_to_a_video_model_is_refused_clearly() -> None:
    model = vm.r3d_18(num_classes=3).eval()
    cam = cp.CAM(model)
    cam(_clip(8, 32))
    with pytest.raises(cp.CAMInputError, match="5-D"):
        cam(torch.randn(2, 3, 32, 32)[0])


# -- tube boxes ------------------------------------------------------------------------------


def _moving_square_clip() -> tuple[torch.nn.Module, torch.Tensor]:
    """A 1x1x1-conv video classifier whose class-0 map is the clip itself, and a clip of a
    6x6 square moving 5 px right per frame; frame 4 is dim (10 %), frame 5 holds only one
    faint pixel far from the path."""
    conv = torch.nn.Conv3d(1, 1, 1)
    fc = torch.nn.Linear(1, 2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
        fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        fc.bias.zero_()
    pool = torch.nn.AdaptiveAvgPool3d(1)
    model = torch.nn.Sequential(conv, torch.nn.ReLU(), pool, torch.nn.Flatten(), fc).eval()
    x = torch.zeros(1, 1, 6, 24, 40)
    for t in range(5):
        x[0, 0, t, 8:14, 3 + 5 * t : 9 + 5 * t] = 1.0
    x[0, 0, 4] *= 0.1
    x[0, 0, 5, 20, 35] = 0.01
    return model, x


def test_tube_boxes_follow_a_moving_object() -> None:
    model, x = _moving_square_clip()
    res = cp.CAM(model)(x, targets=[0])
    assert float(res.identity_residual().abs().max()) <= 1e-6
    path = torch.tensor([[3 + 5 * t, 8, 8 + 5 * t, 13] for t in range(5)])
    tube = res.boxes(0.2)  # default: relative to the clip's max
    assert tube.shape == (1, 1, 6, 4) and tube.dtype == torch.int64
    torch.testing.assert_close(tube[0, 0, :4], path[:4])  # the box moves with the square
    assert tube[0, 0, 4:].eq(0).all()  # dim and empty frames: below 20 % of the clip's max
    present = tube_presence(res.maps, 0.2)
    assert present[0, 0].tolist() == [True, True, True, True, False, False]
    per_frame = res.boxes(0.2, relative_to="frame")
    torch.testing.assert_close(per_frame[0, 0, :5], path)  # each frame's own max: the dim one too
    assert per_frame[0, 0, 5].tolist() == [35, 20, 35, 20]  # ... and the faint pixel
    # vectorised over frames == the image rule run frame by frame
    loop = torch.stack([threshold_boxes(res.maps[:, :, t], 0.2) for t in range(6)], 2)
    torch.testing.assert_close(per_frame, loop)
    assert res.masks(0.2).shape == (1, 1, 6, 24, 40)
    with pytest.raises(cp.CAMInputError, match="relative_to"):
        res.boxes(relative_to="video")  # type: ignore[arg-type]


def test_tube_boxes_of_an_upsampled_r3d_clip_are_in_input_pixels() -> None:
    torch.manual_seed(0)
    model = randomize_head(vm.r3d_18(num_classes=3)).eval()
    res = cp.CAM(model)(_clip(8, 32), targets="all").upsample().normalize()
    tube = res.boxes(0.2)
    assert tube.shape == (2, 3, 8, 4)
    assert bool((tube[..., 2] < 32).all()) and bool((tube[..., 3] < 32).all())
    assert bool((tube[..., :2] <= tube[..., 2:]).all())


# -- convert for 3-D backbones ---------------------------------------------------------------


def test_convert_r3d_cut_at_layer3_is_exact() -> None:
    """r3d_18 cut at layer3 (stage 2 of layer1..layer4 by spatial stride) + GAP3d + Linear:
    the trunk is the original's layer3 output, the maps an einsum of it, the identity holds."""
    torch.manual_seed(0)
    model = vm.r3d_18(num_classes=4).eval()
    conv = cp.convert(model, 3, stage=2, input_size=(3, 4, 32, 32)).eval()
    info = conv.info
    assert info is not None and info.video and info.stage_name == "layer3"
    assert [s.name for s in info.stages] == ["layer1", "layer2", "layer3", "layer4"]
    assert (info.map_frames, info.map_size, info.reduction) == (1, (4, 4), 8.0)
    assert isinstance(conv.global_pool, GlobalPool3d)
    with torch.no_grad():  # only the new head: the trunk keeps the original's weights
        conv.fc.weight.normal_(0.0, 0.1)
        conv.fc.bias.normal_()
    x = _clip(4, 32)
    res = cp.CAM(conv)(x, targets="all")
    assert res.maps.shape == (2, 3, 1, 4, 4) and res.frames == 4
    scale = max(1.0, float(res.logits.abs().max()))
    assert float(res.identity_residual().abs().max()) <= 1e-4 * scale
    feats = _hooked(model.layer3, model, x)  # the original model's own layer3 map
    expected = torch.einsum("ck,bkthw->bcthw", conv.fc.weight, feats)
    torch.testing.assert_close(res.maps, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(res.logits, conv(x))
    assert res.upsample().maps.shape == (2, 3, 4, 32, 32)
    with pytest.raises(cp.CAMInputError, match="image maps"):
        conv.placement((32, 32))


def test_convert_s3d_makes_an_unusable_head_exact_with_an_extra_conv() -> None:
    """s3d's head (AvgPool3d((2, 7, 7)), local below 16 x 224 x 224) cannot even run on a small
    clip; converted with a 3x3x3 extra convolution it is CAM-exact at any clip size."""
    torch.manual_seed(0)
    model = vm.s3d(num_classes=3).eval()
    conv = cp.convert(model, 2, extra_conv=8, input_size=(3, 8, 64, 64)).eval()
    assert isinstance(conv.neck.conv, torch.nn.Conv3d)
    assert isinstance(conv.neck.bn, torch.nn.BatchNorm3d)
    randomize_head(conv)
    res = cp.CAM(conv)(_clip(8, 64), targets="all")
    assert res.maps.shape[:3] == (2, 2, 1) and res.maps.shape[-2:] == (2, 2)
    scale = max(1.0, float(res.logits.abs().max()))
    assert float(res.identity_residual().abs().max()) <= 1e-4 * scale
