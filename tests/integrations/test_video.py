"""Space-time CAM on torchvision video classifiers (issue 15): maps (B, k, T', h, w), the
identity mean_{t,x,y} M_c + b_c = S_c, and an independent computation of the maps."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_head

import cam_plugin as cp

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
