"""torchvision: the exactness identity on its classifiers, checks by hand, and the
refusal of non-linear heads by name."""

from __future__ import annotations

import pytest

tvm = pytest.importorskip("torchvision.models")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from helpers import assert_identity, images, randomize_head  # noqa: E402

import cam_plugin as cp  # noqa: E402

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
    ],
    ids=["vgg11", "alexnet", "mobilenet_v3_small"],
)
def test_nonlinear_heads_are_refused_by_name(factory, module: str) -> None:  # type: ignore[no-untyped-def]
    model = factory().eval()
    with pytest.raises(cp.UnsupportedHeadError, match=module) as info:
        cp.CAM(model)(images(1, 64))
    assert "cam_plugin.convert" in str(info.value)
