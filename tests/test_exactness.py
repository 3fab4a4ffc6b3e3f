"""The exactness identity and an independent computation, on every supported architecture."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from helpers import assert_identity, images, randomize_head

import cam_plugin as cp

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


class TwoHeads(torch.nn.Module):
    """A distillation-style head with as many classes as channels: read as a chain the two
    Linears would fold (K -> K -> K) and mismatch; read as branches they average."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.drop = torch.nn.Dropout(0.2)
        self.head = torch.nn.Linear(6, 6)
        self.head_dist = torch.nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.drop(self.conv(x).mean(dim=(2, 3)))
        return (self.head(p) + self.head_dist(p)) / 2


def test_branches_are_read_when_the_chain_folds_but_mismatches() -> None:
    torch.manual_seed(0)
    model = TwoHeads().eval()
    x = images(2, 12)
    cam = cp.CAM(model, input_size=(3, 12, 12))
    res = cam(x, targets="all")
    assert "mean of" in cam.adapter.name
    assert_identity(res)
    with torch.no_grad():
        f = model.conv(x)
        w = (model.head.weight + model.head_dist.weight) / 2
        expected = torch.einsum("ck,bkhw->bchw", w, f)
    torch.testing.assert_close(res.maps, expected, rtol=1e-5, atol=1e-5)


# torchvision classifiers (eval mode), at their smallest sensible size
TV_MODELS = [
    ("resnet18", {}, 64),
    ("resnext50_32x4d", {}, 64),
    ("wide_resnet50_2", {}, 64),
    ("densenet121", {}, 64),
    ("efficientnet_b0", {}, 64),
    ("convnext_tiny", {}, 64),
    ("regnet_y_400mf", {}, 64),
    ("mobilenet_v2", {}, 64),
    ("shufflenet_v2_x0_5", {}, 64),
    ("googlenet", {"aux_logits": False, "init_weights": False}, 64),
    ("inception_v3", {"aux_logits": False, "init_weights": False}, 96),
]


@pytest.mark.parametrize(("name", "kwargs", "size"), TV_MODELS, ids=[m[0] for m in TV_MODELS])
def test_torchvision_identity(name: str, kwargs: dict, size: int) -> None:
    torch.manual_seed(0)
    model = randomize_head(getattr(tvm, name)(num_classes=11, **kwargs)).eval()
    x = images(2, size)
    res = cp.CAM(model)(x, targets="all")
    assert res.maps.shape[:2] == (2, 11)
    assert_identity(res)
    with torch.no_grad():
        torch.testing.assert_close(res.logits, model(x))


def test_torchvision_resnet_independent() -> None:
    model = randomize_head(tvm.resnet18(num_classes=5)).eval()
    x = images(3, 64)
    res = cp.CAM(model)(x, targets="all")
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(model.children())[:-2])
        expected = torch.einsum("ck,bkhw->bchw", model.fc.weight, trunk(x))
    torch.testing.assert_close(res.maps, expected, rtol=1e-4, atol=1e-5)


def test_densenet_functional_relu_is_detected() -> None:
    model = randomize_head(tvm.densenet121(num_classes=4)).eval()
    cam = cp.CAM(model)
    x = images(2, 64)
    res = cam(x, targets="all")
    with torch.no_grad():
        expected = torch.einsum("ck,bkhw->bchw", model.classifier.weight, F.relu(model.features(x)))
    torch.testing.assert_close(res.maps, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("factory", "module"),
    [
        (lambda: tvm.vgg11(num_classes=5), "classifier.1"),
        (lambda: tvm.alexnet(num_classes=5), "classifier.2"),
        (lambda: tvm.mobilenet_v3_small(num_classes=5), "classifier.1"),
        (lambda: timm.create_model("mobilenetv3_small_050", num_classes=5), "act2"),
    ],
    ids=["vgg11", "alexnet", "mobilenet_v3_small", "timm-mobilenetv3"],
)
def test_nonlinear_heads_are_refused_by_name(factory, module: str) -> None:  # type: ignore[no-untyped-def]
    model = factory().eval()
    with pytest.raises(cp.UnsupportedHeadError, match=module) as info:
        cp.CAM(model)(images(1, 64))
    assert "cam_plugin.convert" in str(info.value)


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


def test_generic_probe_refuses_functional_max_pool() -> None:
    class MaxPooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.fc = torch.nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).amax(dim=(2, 3)))

    with pytest.raises(cp.UnsupportedHeadError, match="global average"):
        cp.CAM(MaxPooled().eval(), input_size=(3, 16, 16))(images(2, 16))


class ResidualLast(torch.nn.Module):
    """The last block's output is finished by a functional add after its last module call,
    the pool is functional: the map must be read from the block, not its last leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.block = Block()
        self.norm = torch.nn.LayerNorm(8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.block(self.stem(x)).mean(dim=(2, 3))))


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def test_map_finished_after_the_last_module_call() -> None:
    torch.manual_seed(0)
    model = randomize_head(ResidualLast()).eval()
    x = images(3, 16)
    res = cp.CAM(model, input_size=(3, 16, 16))(x, targets="all")
    assert res.maps.shape == (3, 5, 8, 8)
    assert_identity(res)
    with torch.no_grad():
        f = model.block(model.stem(x))  # by hand, LayerNorm written out
        pooled = f.mean(dim=(2, 3))
        mu = pooled.mean(1)[:, None, None, None]
        sigma = torch.sqrt(pooled.var(1, unbiased=False) + model.norm.eps)[:, None, None, None]
        g = (f - mu) / sigma * model.norm.weight[None, :, None, None]
        expected = torch.einsum("ck,bkhw->bchw", model.fc.weight, g)
    torch.testing.assert_close(res.maps, expected, rtol=1e-5, atol=1e-5)


def test_bn1d_and_dropout_head_fold_exactly(tiny_cnn: torch.nn.Module) -> None:
    class BNHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.GELU())
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.head = torch.nn.Sequential(
                torch.nn.Flatten(),
                torch.nn.BatchNorm1d(6),
                torch.nn.Dropout(0.3),
                torch.nn.Linear(6, 5),
                torch.nn.BatchNorm1d(5),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.pool(self.body(x)))

    model = randomize_head(BNHead()).eval()
    res = cp.CAM(model, input_size=(3, 20, 20))(images(4, 20), targets="all")
    assert_identity(res)


def test_conv1x1_classifier_folds() -> None:
    class ConvHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Conv2d(3, 6, 3, padding=1)
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.cls = torch.nn.Conv2d(6, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.cls(self.pool(torch.relu(self.body(x)))).flatten(1)

    model = randomize_head(ConvHead()).eval()
    res = cp.CAM(model, input_size=(3, 16, 16))(images(2, 16), targets="all")
    assert_identity(res)
    assert res.maps.shape == (2, 4, 16, 16)
