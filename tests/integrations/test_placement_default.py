"""Placement by default: ``CAMResult.upsample()`` centres every feature cell on its receptive
field wherever the geometry can be traced (traced lazily, once per input size, on a
weightless copy of the model), ``upsample(placement="bilinear")`` is plain bilinear, and the
result says which. The traced centres equal a gradient measurement of the receptive field's
centre on a torch ResNet-like model, timm resnet18, timm tf_efficientnet_lite0 (TF "same"
padding) and a converted model. The faces: Captum's ``upsample=True`` and the mmengine
sample maps."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyResNet, TinyViT, images, randomize_head
from torch import nn

import cam_plugin as cp
import cam_plugin.tracing as tracing
from cam_plugin.placement import Placement, place_maps
from cam_plugin.tracing import feature_placement, placement_of, trace_placement

# --------------------------------------------------------------------- gradient measurement


def _measurable(model: nn.Module) -> nn.Module:
    """A copy whose gradient centroid is the receptive field's centre: every convolution a
    symmetric positive kernel (centre tap, plus a little of every tap so each window
    counts), norms the identity, max pools as average pools over the same windows (ties of
    a max would route the gradient to one corner), float64."""
    net = copy.deepcopy(model)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                kh, kw = m.weight.shape[-2:]
                w = torch.full_like(m.weight, 0.01 / m.weight[0].numel())
                if kh % 2 and kw % 2:
                    w[:, :, kh // 2, kw // 2] += 0.49 / m.weight[0, :, 0, 0].numel()
                else:
                    w += 0.49 / m.weight[0].numel()
                m.weight.copy_(w)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.zero_()  # type: ignore[union-attr]
                m.running_var.fill_(1.0)  # type: ignore[union-attr]
                m.weight.fill_(1.0)
                m.bias.zero_()
                m.eps = 0.0
    for m in list(net.modules()):
        for name, child in list(m.named_children()):
            if isinstance(child, nn.MaxPool2d):
                pool = nn.AvgPool2d(child.kernel_size, child.stride, child.padding)  # type: ignore[arg-type]
                setattr(m, name, pool)
    return net.double().eval()


def _gradient_centre(
    features: Callable[[torch.Tensor], torch.Tensor], size: int, cell: tuple[int, int]
) -> tuple[float, float]:
    x = torch.ones(1, 3, size, size, dtype=torch.float64, requires_grad=True)
    features(x)[0, :, cell[0], cell[1]].sum().backward()
    assert x.grad is not None
    g = x.grad[0].sum(0)
    ys = torch.arange(size, dtype=torch.float64)
    return float((g.sum(1) * ys).sum() / g.sum()), float((g.sum(0) * ys).sum() / g.sum())


class StemResNet(nn.Module):
    """A torch ResNet-like model with torchvision's stem: 7x7/2 pad 3, 3x3/2 pad 1 max pool,
    then TinyResNet's blocks (3x3/2 pad 1 with a 1x1/2 shortcut)."""

    def __init__(self) -> None:
        super().__init__()
        base = TinyResNet()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 7, 2, 3, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        self.layer1, self.layer2, self.fc = base.layer1, base.layer2, nn.Linear(16, 10)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x).mean(dim=(2, 3)))


def _timm(name: str) -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(name).eval()


def _converted() -> nn.Module:
    timm = pytest.importorskip("timm")
    return cp.convert(
        timm.create_model("resnet18"), 10, stage=2, extra_conv=32, input_size=(3, 96, 96)
    ).eval()


CASES = {
    # model, input size, cells, expected (stride, offset) by hand
    "torch-resnet-like": (StemResNet, 64, [(4, 4), (3, 5)], (8.0, 0.0)),
    "timm-resnet18": (lambda: _timm("resnet18"), 160, [(2, 2), (1, 3)], (32.0, 0.0)),
    "timm-tf_efficientnet_lite0": (
        lambda: _timm("tf_efficientnet_lite0"),
        160,
        [(2, 2), (1, 3)],
        (32.0, 31.0),
    ),
    "converted-resnet18": (_converted, 96, [(6, 6), (5, 7)], (8.0, 0.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_traced_placement_equals_the_gradient_measured_centre(case: str) -> None:
    build, size, cells, (stride, offset) = CASES[case]
    model = build()
    p = feature_placement(model, (3, size, size), cp.resolve(model))
    assert p.source == "traced" and p.stride == (stride, stride) and p.offset == (offset, offset)
    net = _measurable(model)
    for cell in cells:
        cy, cx = _gradient_centre(net.forward_features, size, cell)  # type: ignore[arg-type]
        assert abs(cy - (p.offset[0] + p.stride[0] * cell[0])) < 0.25, (cell, cy)
        assert abs(cx - (p.offset[1] + p.stride[1] * cell[1])) < 0.25, (cell, cx)
    # plain bilinear assumes the centre of each stride block: half a cell off, except for
    # the TF-"same" padded network, whose cells sit a full half-cell further on
    half = Placement.half_pixel((size, size), (size // int(stride),) * 2)
    assert abs(p.offset[0] - half.offset[0]) == pytest.approx(abs(offset - (stride - 1) / 2))


# --------------------------------------------------------------------- the default


def test_upsample_places_by_default_and_bilinear_is_explicit() -> None:
    model = _timm("tf_efficientnet_lite0")
    x = images(2, 224)
    res = cp.CAM(model)(x, topk=2)
    assert res.placement is None and res.locate is not None  # nothing traced yet
    traced = feature_placement(model, (3, 224, 224), cp.resolve(model))
    assert traced.offset == (31.0, 31.0)  # cell 0 at pixel 31; bilinear assumes 15.5
    placed, plain = res.upsample(), res.upsample(placement="bilinear")
    assert placed.upsampled_with == "traced" and plain.upsampled_with == "bilinear"
    torch.testing.assert_close(placed.maps, place_maps(res.maps, (224, 224), traced))
    ref = F.interpolate(res.maps, size=(224, 224), mode="bilinear", align_corners=False)
    torch.testing.assert_close(plain.maps, ref)
    assert float((placed.maps - plain.maps).abs().max()) > 1e-3 * float(ref.abs().max())
    # the same with the CAM's switch, and the eager form
    never = cp.CAM(model, placement="bilinear")(x, topk=2)
    assert never.locate is None and never.upsample().upsampled_with == "bilinear"
    eager = cp.CAM(model, placement=True)(x, topk=2)
    assert eager.placement == traced and eager.upsample().upsampled_with == "traced"
    # another output size: the placement is rescaled with the image
    small = res.upsample(112)
    torch.testing.assert_close(
        small.maps, place_maps(res.maps, (112, 112), traced.rescaled((224, 224), (112, 112)))
    )
    with pytest.raises(cp.CAMInputError, match="placement must be"):
        cp.CAM(model, placement="centre")


def test_trace_is_lazy_cached_and_never_runs_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = randomize_head(TinyResNet()).eval()
    traces: list[tuple[int, ...]] = []
    real = tracing.module_placement

    def counting(*args: object, **kwargs: object) -> Placement:
        traces.append(tuple(args[1]))  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tracing, "module_placement", counting)
    calls: list[str] = []
    handles = [
        m.register_forward_hook(lambda m, a, o: calls.append("hook")) for m in model.modules()
    ]
    handles.append(
        nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.append("g"))
    )
    try:
        cam = cp.CAM(model)
        res = cam(images(2, 32))
        in_call = len(calls)
        assert traces == []  # the call itself traces nothing
        a, b = res.upsample(), cam(images(3, 32)).upsample()
        assert traces == [(3, 32, 32)] and a.upsampled_with == b.upsampled_with == "traced"
        cam(images(1, 48)).upsample()
        assert traces == [(3, 32, 32), (3, 48, 48)]  # once per input size
        cp.CAM(model)(images(1, 32)).upsample()  # another CAM on the same model: cached
        assert len(traces) == 2
        # tracing ran no hook of the model (nor a global one): only the three calls did
        assert len(calls) == in_call * 4
        plain = cp.CAM(model, placement="bilinear")(images(1, 64)).upsample()
        res.upsample(placement="bilinear")
        res.upsample(mode="bicubic")
        assert len(traces) == 2 and plain.upsampled_with == "bilinear"
    finally:
        for h in handles:
            h.remove()
    assert res.find_placement() == Placement((4.0, 4.0), (0.0, 0.0))
    # a copy shares the finder; a pickled result never carries the model
    assert copy.deepcopy(res).locate is res.locate
    thawed = pickle.loads(pickle.dumps(res))
    assert thawed.find_placement() is None and thawed.upsample().upsampled_with == "bilinear"


def test_no_trace_where_the_geometry_is_not_known() -> None:
    torch.manual_seed(0)
    vit = TinyViT().eval()
    res = cp.CAM(vit)(images(1, 16))
    assert res.locate is None and res.upsample().upsampled_with == "bilinear"

    class ReadsValues(nn.Module):  # a forward that reads tensor values cannot run on meta
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU())
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.features(x)
            scale = 2.0 if float(f.mean()) > 1e9 else 1.0
            return self.fc(scale * f.mean(dim=(2, 3)))

    model = ReadsValues().eval()
    adapter = cp.Adapter(model.features, [model.fc])
    res = cp.CAM(model, adapter=adapter)(images(1, 16))
    assert placement_of(model, (3, 16, 16), model.features) is None
    assert res.upsample().upsampled_with == "bilinear"
    # the explicit tracer falls back to a hook-free copy with the weights
    result = trace_placement(model, (3, 16, 16), at=model.features)
    assert result.weights and result.at == Placement((2.0, 2.0), (0.0, 0.0))
    with pytest.raises(cp.CAMInputError, match="could not be traced"):
        trace_placement(model, (3, 16, 16), fallback=False)


# --------------------------------------------------------------------- the faces


def test_captum_upsample_uses_the_traced_placement() -> None:
    pytest.importorskip("captum")
    from cam_plugin.integrations.captum import ClassActivationMap

    torch.manual_seed(0)
    model = randomize_head(TinyResNet()).eval()
    x = images(2, 32)
    cam = ClassActivationMap(model)
    low = cam.attribute(x, target=3)
    up = cam.attribute(x, target=3, upsample=True)
    p = feature_placement(model, (3, 32, 32), cp.resolve(model))
    assert isinstance(low, torch.Tensor) and isinstance(up, torch.Tensor)
    torch.testing.assert_close(up, place_maps(low, (32, 32), p))
    eager = cp.CAM(model)(x, targets=3).upsample()
    torch.testing.assert_close(up, eager.maps)


def test_mmengine_sample_maps_carry_and_use_the_placement() -> None:
    pytest.importorskip("mmengine")
    from cam_plugin.integrations.mm.sample_maps import attach_cam_maps, placed_maps
    from mmengine.structures import BaseDataElement

    torch.manual_seed(0)
    model = randomize_head(TinyResNet()).eval()
    adapter = cp.resolve(model)
    x = images(2, 32)
    captured = model.forward_features(x).detach()
    p = placement_of(model, (3, 32, 32), adapter.feature_module, capture=adapter.capture)
    assert p is not None
    samples = [BaseDataElement(), BaseDataElement()]
    problem, _ = attach_cam_maps(
        samples, captured, adapter, adapter.fold(), (32, 32), topk=1, target="pred", placement=p
    )
    assert problem is None
    cam = samples[0].get("cam_maps")
    assert cam.placement == p
    torch.testing.assert_close(placed_maps(cam, cam.maps), place_maps(cam.maps, (32, 32), p))
    as_dict = samples[1].to_dict()["cam_maps"]  # what the metric receives
    assert placed_maps(as_dict, as_dict["maps"]).shape[-2:] == (32, 32)
    bare = [BaseDataElement()]
    attach_cam_maps(bare, captured[:1], adapter, adapter.fold(), (32, 32), topk=1, target="pred")
    cam = bare[0].get("cam_maps")
    assert placed_maps(cam, cam.maps) is cam.maps  # no placement: the geometry is bilinear
