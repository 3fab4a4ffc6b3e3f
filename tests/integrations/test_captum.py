"""ClassActivationMap: CAM as a Captum LayerAttribution, on real timm models."""

from __future__ import annotations

import pytest

timm = pytest.importorskip("timm")
pytest.importorskip("captum")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from cam_plugin.integrations.captum import ClassActivationMap, target_classes  # noqa: E402
from captum.attr import LayerAttribution, LayerGradCam  # noqa: E402
from captum.attr import visualization as viz  # noqa: E402
from captum.metrics import (  # noqa: E402
    infidelity,
    infidelity_perturb_func_decorator,
    sensitivity_max,
)
from torch import nn  # noqa: E402

import cam_plugin as cp  # noqa: E402
from cam_plugin.errors import CAMInputError, UnsupportedHeadError  # noqa: E402
from cam_plugin.placement import place_maps  # noqa: E402
from cam_plugin.tracing import feature_placement  # noqa: E402

NUM_CLASSES = 10


def _timm(name: str, **kwargs: object) -> nn.Module:
    """A random-init timm classifier with a non-trivial head (random init gives tiny fc)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
    fc = model.get_classifier()
    nn.init.normal_(fc.weight, std=0.5)
    nn.init.normal_(fc.bias, std=0.5)
    norm = getattr(getattr(model, "head", None), "norm", None) or getattr(model, "fc_norm", None)
    if isinstance(norm, nn.LayerNorm):  # a LayerNorm head with a real affine part
        nn.init.normal_(norm.weight, mean=1.0, std=0.3)
        nn.init.normal_(norm.bias, std=0.3)
    return model.eval()


def _images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen)


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return _timm("resnet18")


@pytest.fixture(scope="module")
def resnet_cam(resnet: nn.Module) -> ClassActivationMap:
    """Resolved once; other ClassActivationMaps of the resnet reuse its adapter."""
    return ClassActivationMap(resnet)


@pytest.fixture(scope="module")
def convnext() -> tuple[nn.Module, ClassActivationMap]:
    model = _timm("convnext_atto")
    return model, ClassActivationMap(model)


@pytest.fixture(scope="module")
def lite0() -> tuple[nn.Module, torch.Tensor, ClassActivationMap]:
    """The real pretrained EfficientNet-Lite0 and two real photos, preprocessed as it expects."""
    skdata = pytest.importorskip("skimage.data")
    from cam_plugin.integrations.timm import efficientnet_lite0_pretrained

    model = efficientnet_lite0_pretrained()
    photos = [skdata.chelsea(), skdata.coffee()]
    batch = []
    for img in photos:
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None] / 255
        side = min(t.shape[-2:])
        t = F.interpolate(t, scale_factor=256 / side, mode="bilinear", antialias=True)
        top, left = (t.shape[-2] - 224) // 2, (t.shape[-1] - 224) // 2
        batch.append((t[..., top : top + 224, left : left + 224] - 0.5) / 0.5)
    return model, torch.cat(batch), ClassActivationMap(model)


# -- the exactness bridge -----------------------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet18", "regnety_002", "lite0"])
def test_equals_layer_gradcam_times_hw_on_linear_heads(
    arch: str, request: pytest.FixtureRequest
) -> None:
    if arch == "lite0":
        model, x, cam = request.getfixturevalue("lite0")
    elif arch == "resnet18":
        model, cam, x = (
            request.getfixturevalue("resnet"),
            request.getfixturevalue("resnet_cam"),
            _images(2, 96),
        )
    else:
        model, x = _timm(arch), _images(2, 96)
        cam = ClassActivationMap(model)
    target = [3, 7]
    attr = cam.attribute(x, target=target)
    grad_cam = LayerGradCam(model, cam.layer).attribute(x, target=target)
    h, w = attr.shape[-2:]
    assert attr.shape == grad_cam.shape == (x.shape[0], 1, h, w)
    scale = float(attr.abs().max())
    assert scale > 1e-2  # a non-trivial map
    torch.testing.assert_close(attr, grad_cam * (h * w), atol=1e-4 * scale, rtol=1e-4)
    assert cp.count_hooks(model) == 0
    if arch == "resnet18":  # the ReLU of both sides agrees too (Captum's relu_attributions)
        relu = cam.attribute(x, target=target, relu_attributions=True)
        gc = LayerGradCam(model, cam.layer).attribute(x, target=target, relu_attributions=True)
        torch.testing.assert_close(relu, gc * (h * w), atol=1e-4 * scale, rtol=1e-4)


def test_pretrained_lite0_explains_its_own_prediction(
    lite0: tuple[nn.Module, torch.Tensor, ClassActivationMap],
) -> None:
    model, x, cam = lite0
    attr = cam.attribute(x)  # target=None: predicted class
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1)
    assert cam.layer is model.bn2 and attr.shape == (2, 1, 7, 7)
    bias = cam.adapter.fold().bias[pred]
    torch.testing.assert_close(
        attr.mean((2, 3))[:, 0] + bias, logits.gather(1, pred[:, None])[:, 0], atol=1e-3, rtol=1e-4
    )


@pytest.mark.parametrize(
    ("arch", "kwargs", "size"),
    [
        ("convnext_atto", {}, 64),
        ("vit_tiny_patch16_224", {"img_size": 64, "global_pool": "avg"}, 64),
    ],
)
def test_cam_identity_on_layernorm_heads(
    arch: str, kwargs: dict, size: int, request: pytest.FixtureRequest
) -> None:
    if arch == "convnext_atto":
        model, cam = request.getfixturevalue("convnext")
    else:
        model = _timm(arch, **kwargs)
        cam = ClassActivationMap(model)
    x = _images(3, size)
    attr = cam.attribute(x, target=[0, 4, 9])
    with torch.no_grad():
        logits = model(x)
    classes = torch.tensor([0, 4, 9])
    bias = cam.adapter.fold().bias[classes]
    torch.testing.assert_close(
        attr.mean((2, 3))[:, 0] + bias,
        logits.gather(1, classes[:, None])[:, 0],
        atol=1e-4,
        rtol=1e-4,
    )
    assert attr.shape[-2:] == ((2, 2) if arch.startswith("convnext") else (4, 4))


def test_layer_gradcam_differs_through_a_layernorm_head(
    convnext: tuple[nn.Module, ClassActivationMap],
) -> None:
    """Grad-CAM differentiates the norm's mean and std: it is not CAM / (h·w) there."""
    model, default = convnext
    x = _images(2, 96)
    # model.stages outputs the same tensor as the feature module (norm_pre, an Identity)
    cam = ClassActivationMap(model, layer=model.stages, adapter=default.adapter)
    attr = cam.attribute(x, target=[2, 5])
    gc = LayerGradCam(model, model.stages).attribute(x, target=[2, 5])
    h, w = attr.shape[-2:]
    diff = float((attr - gc * (h * w)).abs().max())
    assert diff > 0.05 * float(attr.abs().max())
    # and its spatial mean is ~0 (the norm makes the logit scale-invariant), while CAM's is
    # the logit minus the bias
    assert float((gc * h * w).mean((2, 3)).abs().max()) < 1e-3 * float(attr.abs().max()) + 1e-5


# -- shapes, upsampling, Captum's contract -------------------------------------------------
def test_contract_and_upsampling(resnet: nn.Module, resnet_cam: ClassActivationMap) -> None:
    cam = resnet_cam
    assert isinstance(cam, LayerAttribution)
    assert cam.has_convergence_delta() is False and cam.multiplies_by_inputs is False
    x = _images(2, 96)
    low = cam.attribute(x, target=1)
    up = cam.attribute(x, target=1, upsample=True)
    assert up.shape == (2, 1, 96, 96)
    # upsample=True places every cell on its traced receptive field (as CAMResult.upsample)
    placed = place_maps(low, (96, 96), feature_placement(resnet, (3, 96, 96), cam.adapter))
    torch.testing.assert_close(up, placed)
    near = LayerAttribution.interpolate(low, (96, 96))
    assert near.shape == (2, 1, 96, 96)
    up_relu = cam.attribute(x, target=1, upsample=True, relu_attributions=True)
    torch.testing.assert_close(up_relu, torch.relu(up))
    # the core path gives the same maps
    core = cp.CAM(resnet, adapter=resnet_cam.adapter)(x, targets=1).maps
    torch.testing.assert_close(low, core)


def test_runs_under_no_grad_without_backward(
    resnet: nn.Module, resnet_cam: ClassActivationMap
) -> None:
    x = _images(2, 64).requires_grad_(True)
    cam = resnet_cam
    with torch.no_grad():
        a = cam.attribute(x, target=2)
    b = cam.attribute(x, target=2)
    assert not a.requires_grad and not b.requires_grad and b.grad_fn is None
    assert x.grad is None
    torch.testing.assert_close(a, b)
    with torch.inference_mode():  # nothing in it needs autograd
        c = cam.attribute(x.detach(), target=2)
    torch.testing.assert_close(c, b)


def test_target_forms_follow_captum(resnet: nn.Module, resnet_cam: ClassActivationMap) -> None:
    cam = resnet_cam
    x = _images(2, 64)
    ref = cam.attribute(x, target=3)
    for form in (
        (3,),
        torch.tensor(3),
        torch.tensor([3]),
        np.int64(3),
        [3, 3],
        [(3,), (3,)],
        torch.tensor([3, 3]),
    ):
        torch.testing.assert_close(cam.attribute(x, target=form), ref, msg=str(form))
    per = cam.attribute(x, target=[3, 8])
    torch.testing.assert_close(per[0], ref[0])
    torch.testing.assert_close(per[1], cam.attribute(x[1:], target=8)[0])
    with torch.no_grad():
        pred = resnet(x).argmax(1)
    torch.testing.assert_close(cam.attribute(x), cam.attribute(x, target=pred))


@pytest.mark.parametrize(
    ("target", "match"),
    [
        (NUM_CLASSES, "out of range"),
        (-1, "out of range"),
        ([1, NUM_CLASSES + 5], "out of range"),
        (torch.tensor([0, 1, 2]), "does not fit a batch of 2"),
        ([1, 2, 3], "3 entries but the batch has 2"),
        ([1], "1 entries but the batch has 2"),
        ((1, 2, 3), "exactly one element"),
        ((1, 1), "two different classes"),
        ([(1, 2), 3], "mixes contrast pairs"),
        ([(1, 2)], "1 pairs but the batch has 2"),
        ((1, NUM_CLASSES), "out of range"),
        (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), "integers"),
        ([[1, 2], [3]], "one map per example"),
        (torch.tensor([0.0, 1.0]), "integer class indices"),
        (True, "bool"),
    ],
)
def test_bad_targets(
    resnet: nn.Module, resnet_cam: ClassActivationMap, target: object, match: str
) -> None:
    cam = resnet_cam
    with pytest.raises(CAMInputError, match=match):
        cam.attribute(_images(2, 64), target=target)  # type: ignore[arg-type]
    assert cp.count_hooks(resnet) == 0


def test_contrast_pairs_decompose_the_logit_margin(
    resnet: nn.Module, resnet_cam: ClassActivationMap
) -> None:
    """mean_xy (M_c − M_c') = S_c − S_c' − (b'_c − b'_c') for every class pair, on a batch."""
    cam = resnet_cam
    x = _images(3, 64)
    pairs = torch.tensor([(c, d) for c in range(NUM_CLASSES) for d in range(NUM_CLASSES) if c != d])
    batch = x.repeat_interleave(len(pairs), dim=0)  # every image with every pair
    every = pairs.repeat(len(x), 1)
    attr = cam.attribute(batch, target=every)
    with torch.no_grad():
        logits = resnet(batch)
    bias = cam.adapter.fold().class_bias(every)  # (N, 2)
    c, d = every[:, 0], every[:, 1]
    margin = logits.gather(1, c[:, None])[:, 0] - logits.gather(1, d[:, None])[:, 0]
    torch.testing.assert_close(
        attr.mean(dim=(1, 2, 3)), margin - (bias[:, 0] - bias[:, 1]), rtol=1e-4, atol=1e-4
    )
    # the forms agree, and equal the difference of the plain maps
    two = x[:2]
    ref = cam.attribute(two, target=3) - cam.attribute(two, target=5)
    torch.testing.assert_close(cam.attribute(two, target=(3, 5)), ref)
    torch.testing.assert_close(cam.attribute(two, target=[(3, 5), (3, 5)]), ref)
    torch.testing.assert_close(cam.attribute(two, target=3, contrast=5), ref)
    up = cam.attribute(two, target=(3, 5), upsample=True)
    torch.testing.assert_close(
        up,
        cam.attribute(two, target=3, upsample=True) - cam.attribute(two, target=5, upsample=True),
    )
    with torch.no_grad():
        top2 = resnet(two).topk(2, dim=1).indices
    second = cam.attribute(two, contrast="second")
    torch.testing.assert_close(second, cam.attribute(two, target=top2))
    with pytest.raises(CAMInputError, match="not both"):
        cam.attribute(two, target=(3, 5), contrast=1)
    assert cp.count_hooks(resnet) == 0


def test_target_classes_helper() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    assert target_classes(None, logits).tolist() == [1, 0]
    assert target_classes([(2,), (0,)], logits).tolist() == [2, 0]
    with pytest.raises(TypeError, match="TargetType"):
        target_classes("cat", logits)  # type: ignore[arg-type]


# -- layers ------------------------------------------------------------------------------
def test_layer_aliases_and_wrong_layers(resnet: nn.Module, resnet_cam: ClassActivationMap) -> None:
    x = _images(2, 64)
    ref = resnet_cam.attribute(x, target=4)
    # a module whose output is the very feature tensor is the same layer
    torch.testing.assert_close(
        ClassActivationMap(resnet, resnet.layer4[-1], adapter=resnet_cam.adapter).attribute(x, 4),
        ref,
    )
    # the pool's *input* is the feature map: fine with attribute_to_layer_input=True
    pool = ClassActivationMap(resnet, resnet.global_pool, adapter=resnet_cam.adapter)
    torch.testing.assert_close(pool.attribute(x, 4, attribute_to_layer_input=True), ref)
    with pytest.raises(CAMInputError, match="attribute_to_layer_input=True"):
        pool.attribute(x, 4)
    with pytest.raises(CAMInputError, match="attribute_to_layer_input=False"):
        ClassActivationMap(resnet, resnet.layer4, adapter=resnet_cam.adapter).attribute(
            x, 4, attribute_to_layer_input=True
        )
    with pytest.raises(UnsupportedHeadError, match="'layer3'.*'layer4'"):
        ClassActivationMap(resnet, resnet.layer3, adapter=resnet_cam.adapter).attribute(x, 4)
    with pytest.raises(CAMInputError, match="not a module of the model"):
        ClassActivationMap(resnet, nn.Conv2d(3, 3, 1), adapter=resnet_cam.adapter)
    assert cp.count_hooks(resnet) == 0


def test_bad_inputs(resnet: nn.Module, resnet_cam: ClassActivationMap) -> None:
    cam = resnet_cam
    x = _images(2, 64)
    (as_tuple,) = cam.attribute((x,), target=1)
    torch.testing.assert_close(as_tuple, cam.attribute(x, target=1))
    with pytest.raises(CAMInputError, match="tuple of 2 tensors"):
        cam.attribute((x, x), target=1)
    with pytest.raises(CAMInputError, match="4-D"):
        cam.attribute(x[0], target=1)
    with pytest.raises(CAMInputError, match="channels"):
        cam.attribute(x[:, :2], target=1)
    resnet.train()
    try:
        with pytest.raises(CAMInputError, match="train mode"):
            cam.attribute(x, target=1)
    finally:
        resnet.eval()


# -- hooks and the host ------------------------------------------------------------------
def test_no_hooks_remain_also_when_forward_raises(
    resnet: nn.Module, resnet_cam: ClassActivationMap
) -> None:
    x = _images(2, 64)

    def exploding(inputs: torch.Tensor) -> torch.Tensor:
        resnet(inputs)  # the hooks fire, then the forward fails
        raise RuntimeError("boom")

    cam = ClassActivationMap(exploding, model=resnet, adapter=resnet_cam.adapter)
    with pytest.raises(RuntimeError, match="boom"):
        cam.attribute(x, target=1)
    assert cp.count_hooks(resnet) == 0
    alias = ClassActivationMap(
        exploding, resnet.layer4[-1], model=resnet, adapter=resnet_cam.adapter
    )
    with pytest.raises(RuntimeError, match="boom"):
        alias.attribute(x, target=1)
    assert cp.count_hooks(resnet) == 0
    with pytest.raises(TypeError):  # resnet.forward takes no extra argument
        resnet_cam.attribute(x, target=1, additional_forward_args=(1.0,))
    assert cp.count_hooks(resnet) == 0


def test_host_is_not_disturbed(resnet: nn.Module, resnet_cam: ClassActivationMap) -> None:
    x = _images(2, 64)
    params = {k: v.clone() for k, v in resnet.state_dict().items()}
    with torch.no_grad():
        before = resnet(x)
    rng = torch.get_rng_state()
    resnet_cam.attribute(x, target=[1, 2], upsample=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not resnet.training
    assert all(torch.equal(v, params[k]) for k, v in resnet.state_dict().items())
    with torch.no_grad():
        assert torch.equal(resnet(x), before)


def test_plain_function_and_additional_forward_args() -> None:
    class Gain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU()
            )
            self.fc = nn.Linear(16, 5)

        def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
            return self.fc(self.body(x * gain).mean((2, 3)))

    torch.manual_seed(0)
    model = Gain().eval()
    x = _images(2, 32)
    cam = ClassActivationMap(model)  # the generic reading finds body -> mean -> fc
    assert cam.layer is None  # read from the first call's forward, not a probe
    a = cam.attribute(x, target=1, additional_forward_args=2.0)
    assert cam.layer is model.body
    torch.testing.assert_close(a, cam.attribute(x * 2.0, target=1))
    gc = LayerGradCam(model, model.body).attribute(x, 1, additional_forward_args=2.0)
    torch.testing.assert_close(a, gc * 16 * 16, atol=1e-5, rtol=1e-4)
    # a plain function needs the model (or an adapter) to find the head
    with pytest.raises(CAMInputError, match="model="):
        ClassActivationMap(lambda t: model(t).softmax(1))
    soft = ClassActivationMap(lambda t: model(t).softmax(1), model=model)
    torch.testing.assert_close(soft.attribute(x, target=1), cam.attribute(x, target=1))
    adapter = cp.Adapter(feature_module=model.body, head=[("fc", model.fc)])
    explicit = ClassActivationMap(lambda t: model(t), adapter=adapter)
    torch.testing.assert_close(explicit.attribute(x), cam.attribute(x))


# -- Captum's visualization and metrics on the output -------------------------------------
def test_captum_visualization_accepts_the_converted_output(
    resnet: nn.Module, resnet_cam: ClassActivationMap
) -> None:
    x = _images(1, 64)
    attr = resnet_cam.attribute(x, target=3, upsample=True)
    heat = attr[0].permute(1, 2, 0).numpy()  # the documented one-line conversion: (H, W, 1)
    image = (x[0].permute(1, 2, 0).numpy() * 0.2 + 0.5).clip(0, 1)
    fig, ax = viz.visualize_image_attr(
        heat, image, "blended_heat_map", sign="all", use_pyplot=False
    )
    assert heat.shape == (64, 64, 1) and len(ax.images) == 2
    assert np.isfinite(np.asarray(ax.images[-1].get_array())).all()
    plt.close(fig)
    fig, axes = viz.visualize_image_attr_multiple(
        heat,
        image,
        ["original_image", "heat_map", "blended_heat_map"],
        ["all", "positive", "positive"],
        use_pyplot=False,
    )
    assert len(axes) == 3 and all(len(a.images) >= 1 for a in axes)
    plt.close(fig)


def test_captum_metrics_run_on_cam(resnet: nn.Module, resnet_cam: ClassActivationMap) -> None:
    x = _images(2, 64)
    target = [3, 6]
    cam = resnet_cam
    attr = cam.attribute(x, target=target, upsample=True)

    @infidelity_perturb_func_decorator(multiply_by_inputs=False)
    def perturb(inputs: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return inputs - 0.1 * torch.randn(inputs.shape, generator=gen)

    infid = infidelity(resnet, perturb, x, attr.expand_as(x), target=target, n_perturb_samples=3)
    assert infid.shape == (2,) and torch.isfinite(infid).all() and (infid >= 0).all()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(
            sensitivity_max(cam.attribute, x, target=target, upsample=True, n_perturb_samples=3)
        )
    assert runs[0].shape == (2,) and torch.isfinite(runs[0]).all() and (runs[0] >= 0).all()
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert cp.count_hooks(resnet) == 0


def test_feature_map_read_from_the_pool_input() -> None:
    """No module outputs the feature map (a functional ReLU before the pool): the adapter
    reads the pool's input, and so does the default layer."""

    class FunctionalRelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 12, 3, stride=2, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(12, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))

    torch.manual_seed(0)
    model = FunctionalRelu().eval()
    x = _images(2, 16)
    cam = ClassActivationMap(model)
    attr = cam.attribute(x, target=[0, 3])
    assert cam.layer is model.pool and cam.adapter.capture == "input"
    gc = LayerGradCam(model, model.pool).attribute(x, [0, 3], attribute_to_layer_input=True)
    torch.testing.assert_close(attr, gc * 64, atol=1e-5, rtol=1e-4)
    explicit = ClassActivationMap(model, model.pool, adapter=cam.adapter)
    torch.testing.assert_close(explicit.attribute(x, [0, 3], attribute_to_layer_input=True), attr)
    with pytest.raises(CAMInputError, match="attribute_to_layer_input=True"):
        explicit.attribute(x, [0, 3])
    with pytest.raises(UnsupportedHeadError, match="input of 'pool'"):
        ClassActivationMap(model, model.conv, adapter=cam.adapter).attribute(x, 0)
    assert cp.count_hooks(model) == 0
