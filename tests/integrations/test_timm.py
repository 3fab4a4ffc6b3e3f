"""timm: the exactness identity and an independent computation on every supported timm
family, the refusals by name, lazy loading of the integration, and the timm-specific
checks of the core (the torch-only versions are in tests/core/)."""

from __future__ import annotations

import subprocess
import sys

import pytest

timm = pytest.importorskip("timm")

import torch  # noqa: E402
from helpers import Counted, assert_identity, images, randomize_head  # noqa: E402
from torch import nn  # noqa: E402

import cam_plugin as cp  # noqa: E402

# (timm name, kwargs, input size, layout)
TIMM_MODELS = [
    ("resnet18", {}, 64, "NCHW"),
    ("resnext26ts", {}, 64, "NCHW"),
    ("regnety_002", {}, 64, "NCHW"),
    ("tf_efficientnet_lite0", {}, 64, "NCHW"),
    ("efficientnet_b0", {}, 64, "NCHW"),
    ("densenet121", {}, 64, "NCHW"),
    ("convnext_atto", {}, 64, "NCHW-LN"),
    ("mobilenetv2_050", {}, 64, "NCHW"),
    ("vit_tiny_patch16_224", {"global_pool": "avg", "img_size": 64}, 64, "tokens"),
    ("deit_tiny_patch16_224", {"global_pool": "avg", "img_size": 64}, 64, "tokens"),
    (
        "vit_small_patch16_224",
        {"global_pool": "avg", "img_size": 64, "reg_tokens": 4, "class_token": True, "depth": 2},
        64,
        "tokens",
    ),
    ("swin_tiny_patch4_window7_224", {"img_size": 112, "depths": (1, 1, 1, 1)}, 112, "NHWC"),
]


def _independent_maps(model: torch.nn.Module, x: torch.Tensor, layout: str) -> torch.Tensor:
    """All-class maps from ``forward_features`` and ``get_classifier()``, written out here."""
    with torch.no_grad():
        f = model.forward_features(x)
        fc = model.get_classifier()
        w = fc.weight.reshape(fc.weight.shape[0], -1)
        if layout == "NHWC":
            f = f.permute(0, 3, 1, 2)
        if layout == "tokens":
            tokens = f[:, model.num_prefix_tokens :]
            side = int(tokens.shape[1] ** 0.5)
            f = tokens.transpose(1, 2).reshape(f.shape[0], -1, side, side)
        if layout == "NCHW-LN" or (
            layout == "tokens" and not isinstance(model.fc_norm, torch.nn.Identity)
        ):
            norm = model.head.norm if layout == "NCHW-LN" else model.fc_norm
            pooled = f.mean(dim=(2, 3))
            mu = pooled.mean(1)[:, None, None, None]
            sigma = torch.sqrt(pooled.var(1, unbiased=False) + norm.eps)[:, None, None, None]
            f = (f - mu) / sigma * norm.weight[None, :, None, None]
        return torch.einsum("ck,bkhw->bchw", w, f)


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "layout"), TIMM_MODELS, ids=[m[0] for m in TIMM_MODELS]
)
def test_timm_identity_and_independent_maps(
    name: str, kwargs: dict, size: int, layout: str
) -> None:
    torch.manual_seed(0)
    model = randomize_head(timm.create_model(name, num_classes=37, **kwargs)).eval()
    x = images(2, size)
    cam = cp.CAM(model)
    res = cam(x, targets="all")
    assert res.maps.shape[:2] == (2, 37)
    assert_identity(res)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(res.logits, logits)
    expected = _independent_maps(model, x, layout)
    scale = float(expected.abs().max())
    assert float((res.maps - expected).abs().max()) <= 1e-4 * max(1.0, scale)
    assert cam.adapter.layout.kind == layout.split("-")[0]


# heads that average two affine branches in eval mode (distillation heads)
DISTILLED = ["levit_128s", "efficientformer_l1", "repvit_m1"]


@pytest.mark.parametrize("name", DISTILLED)
def test_distillation_heads_average_their_branches(name: str) -> None:
    """An affine head ``h`` after the pool gives ``M(x, y) = h(f(x, y)) − h(0)``: computed
    here by running timm's own ``forward_head`` on one position at a time (a 1-position
    map pools to itself), which averages ``head`` and ``head_dist`` as the model does."""
    torch.manual_seed(0)
    model = randomize_head(timm.create_model(name, num_classes=11)).eval()
    x = images(2, 224)
    cam = cp.CAM(model)
    res = cam(x, targets="all")
    assert "mean of" in cam.adapter.name
    assert_identity(res)
    with torch.no_grad():
        f = model.forward_features(x)
        if f.dim() == 3:  # tokens (B, N, K), row-major positions
            side = int(f.shape[1] ** 0.5)
            cols = [model.forward_head(f[:, n : n + 1]) for n in range(f.shape[1])]
            zero = model.forward_head(torch.zeros_like(f[:, :1]))
        else:  # (B, K, h, w)
            side = f.shape[-1]
            cols = [
                model.forward_head(f[:, :, i : i + 1, j : j + 1])
                for i in range(f.shape[-2])
                for j in range(f.shape[-1])
            ]
            zero = model.forward_head(torch.zeros_like(f[:, :, :1, :1]))
        expected = (torch.stack(cols, dim=-1) - zero[..., None]).reshape(2, 11, -1, side)
    torch.testing.assert_close(res.maps, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pool", ["token", "map"])
def test_vit_cls_and_attention_pooling_refused(pool: str) -> None:
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=3, img_size=32, global_pool=pool, depth=1
    )
    with pytest.raises(cp.UnsupportedHeadError, match="global_pool") as info:
        cp.CAM(model.eval())
    assert "convert" in str(info.value)


def test_max_pooled_timm_model_refused() -> None:
    model = timm.create_model("resnet18", num_classes=3, global_pool="max").eval()
    with pytest.raises(cp.UnsupportedHeadError, match="max"):
        cp.CAM(model)


def test_nonlinear_timm_head_is_refused_by_name() -> None:
    """timm MobileNetV3: a conv_head and an activation after the pool (the torchvision
    families are in test_torchvision.py)."""
    model = timm.create_model("mobilenetv3_small_050", num_classes=5).eval()
    with pytest.raises(cp.UnsupportedHeadError, match="act2") as info:
        cp.CAM(model)(images(1, 64))
    assert "cam_plugin.convert" in str(info.value)


def test_timm_integration_loads_lazily_by_class_module() -> None:
    code = (
        "import sys, timm, cam_plugin as cp, torch\n"
        "assert 'cam_plugin.integrations.timm' not in sys.modules\n"
        "m = timm.create_model('resnet18', num_classes=3).eval()\n"
        "a = cp.resolve(m)\n"
        "assert 'cam_plugin.integrations.timm' in sys.modules\n"
        "assert 'cam_plugin.integrations.torchvision' not in sys.modules\n"
        "print(a.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("timm:resnet18")


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_head(timm.create_model("resnet18", num_classes=10)).eval()


def test_probe_restores_train_mode_and_rng() -> None:
    model = randomize_head(timm.create_model("resnet18", num_classes=4))
    model.train()
    bn = model.bn1
    stats = bn.running_mean.clone()
    rng = torch.get_rng_state()
    adapter = cp.resolve(model)  # probe forward runs in eval mode, then restores
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(bn.running_mean, stats)
    assert torch.equal(torch.get_rng_state(), rng)
    assert adapter.feature_name == "layer4"


def test_hook_free_compute_matches_hook_path(resnet: nn.Module) -> None:
    x = images(2, 64)
    cam = cp.CAM(resnet)
    res = cam(x, targets="all")
    with torch.no_grad():
        feats = resnet.forward_features(x)
        logits, maps = cam.adapter.compute(feats)
    torch.testing.assert_close(logits, res.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(maps, res.maps)


def test_verify_catches_a_changed_model() -> None:
    model = randomize_head(timm.create_model("resnet18", num_classes=3)).eval()
    cam = cp.CAM(model)
    cam(images(1, 64))  # resolved from this call
    model.global_pool = timm.layers.SelectAdaptivePool2d(pool_type="max", flatten=True)
    with pytest.raises(cp.UnsupportedHeadError, match="reproduces the model's logits"):
        cam(images(1, 64))
    assert cp.count_hooks(model) == 0


def test_user_hooks_fire_once_per_call_and_never_at_construction() -> None:
    model = randomize_head(timm.create_model("resnet18", num_classes=4)).eval()
    size = 64  # a 2x2 last map: read from the call itself
    counted = Counted(model)
    try:
        cam = cp.CAM(model)
        assert counted.counts() == (0, 0, 0), "the model ran at construction"
        for call in range(1, 4):
            res = cam(images(2, size))
            assert counted.counts() == (call, call, call)
        assert res.maps.shape[:2] == (2, 1)
        logits = model(images(2, size))  # the user's own call, for the logits
        torch.testing.assert_close(res.logits, logits)
    finally:
        counted.remove()
