"""cam_plugin.placement (geometry) and cam_plugin.tracing (the frame tracer): receptive-field
centres traced from strides / paddings, checked by hand-derived arithmetic and by an
independent gradient measurement; placed upsampling."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import images
from torch import nn

import cam_plugin as cp
from cam_plugin.errors import CAMInputError
from cam_plugin.placement import Placement, place_maps
from cam_plugin.tracing import feature_placement, trace_placement


def test_half_pixel_placement_is_plain_bilinear() -> None:
    gen = torch.Generator().manual_seed(0)
    for (h, w), (big_h, big_w) in [((7, 7), (224, 224)), ((4, 6), (37, 50)), ((1, 3), (9, 9))]:
        maps = torch.randn(2, 3, h, w, generator=gen)
        ref = F.interpolate(maps, size=(big_h, big_w), mode="bilinear", align_corners=False)
        got = place_maps(maps, (big_h, big_w), Placement.half_pixel((big_h, big_w), (h, w)))
        assert torch.allclose(got, ref, atol=1e-5)


def test_placed_map_puts_each_cell_on_its_centre() -> None:
    maps = torch.zeros(1, 1, 4, 4)
    maps[0, 0, 1, 2] = 1.0  # cell (row 1, col 2)
    p = Placement((8.0, 8.0), (0.0, 0.0))
    out = place_maps(maps, (32, 32), p)[0, 0]
    assert out.argmax() == 8 * 32 + 16  # pixel (8, 16) = (o + s * 1, o + s * 2)
    assert out[8, 16] == 1.0 and out[8, 12] == 0.5  # linear between cell centres
    # the same map, bilinear: the peak sits half a cell lower right
    half = place_maps(maps, (32, 32), Placement.half_pixel((32, 32), (4, 4)))[0, 0]
    assert half[11, 19] == half[12, 20] == half.max() == 0.9375**2


def test_resnet_and_tf_same_padding_offsets_by_hand() -> None:
    # torchvision ResNet: 7x7/2 pad 3, 3x3/2 pad 1 max pool, 3x3/2 pad 1 (and 1x1/2 pad 0)
    # convolutions: each maps output j to input 2 j, so cell i is centred at pixel 32 i.
    trunk = nn.Sequential(*list(torchvision.models.resnet18().children())[:-2])
    res = trace_placement(trunk, (3, 64, 64))
    assert res.placements == [Placement((32.0, 32.0), (0.0, 0.0))]
    assert res.disagreement == 0 and not res.lost
    # TF "same": F.pad(0, 1) then a valid 3x3/2 convolution -> output j centred at 2 j + 1
    # (the padding goes right / bottom), so two of them give 4 i + 1 + 2 * 1 = 4 i + 3.

    class TFSame(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, 2)
            self.b = nn.Conv2d(4, 4, 3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.pad(self.a(F.pad(x, (0, 1, 0, 1))), (0, 1, 0, 1)))

    (p,) = trace_placement(TFSame(), (3, 32, 32)).placements
    assert p is not None and p.stride == (4.0, 4.0) and p.offset == (3.0, 3.0)
    # patchify 4x4/4 (ConvNeXt, ViT stems): cell i covers pixels 4 i .. 4 i + 3, centre 4 i + 1.5,
    # exactly what bilinear align_corners=False assumes
    (q,) = trace_placement(nn.Conv2d(3, 4, 4, 4), (3, 32, 32)).placements
    assert q == Placement((4.0, 4.0), (1.5, 1.5))
    assert q.offset == Placement.half_pixel((32, 32), (8, 8)).offset


def _gradient_centre(net: nn.Module, size: int, cell: tuple[int, int]) -> tuple[float, float]:
    """Centroid of d out[cell] / d input for a network with positive weights: an independent
    measurement of the receptive field's centre (box-like kernels are symmetric about it)."""
    x = torch.ones(1, 1, size, size, requires_grad=True)
    out = net(x)
    out[0, :, cell[0], cell[1]].sum().backward()
    g = x.grad[0, 0]
    ys = torch.arange(size, dtype=torch.float64)
    total = g.double().sum()
    return (
        float((g.double().sum(1) * ys).sum() / total),
        float((g.double().sum(0) * ys).sum() / total),
    )


def test_traced_centres_match_a_gradient_measurement() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(1, 2, 3, 2, 1)
            self.c2 = nn.Conv2d(2, 2, 3, 1, 0)  # valid: shifts the frame by one cell
            self.pool = nn.AvgPool2d(2)
            self.c3 = nn.Conv2d(2, 2, 3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.pool(torch.relu(self.c2(self.c1(x))))
            return self.c3(F.pad(h, (0, 1, 1, 0))) + 0.0

    net = Net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
                m.bias.zero_()
    size = 96
    (p,) = trace_placement(net, (1, size, size)).placements
    assert p is not None and p.stride == (8.0, 8.0)
    for cell in [(4, 5), (6, 3)]:
        cy, cx = _gradient_centre(net, size, cell)
        assert abs(cy - (p.offset[0] + p.stride[0] * cell[0])) < 1e-6
        assert abs(cx - (p.offset[1] + p.stride[1] * cell[1])) < 1e-6


def test_trace_leaves_model_untouched() -> None:
    model = torchvision.models.resnet18().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    trace_placement(model, (3, 32, 32))
    assert cp.count_hooks(model) == 0 and model.training
    assert all(m.training for m in model.modules())
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_feature_placement_and_upsample_option() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    p = feature_placement(model, (3, 64, 64), cp.resolve(model))
    assert p.stride == (32.0, 32.0) and p.offset == (0.0, 0.0) and p.source == "traced"
    with cp.CAM(model, placement="bilinear") as cam:  # a result that knows no placement
        res = cam(images(2, 64), topk=2)
    placed = res.upsample(placement=p)
    assert placed.maps.shape == (2, 2, 64, 64) and placed.stage == "upsampled"
    assert torch.allclose(placed.maps, place_maps(res.maps, (64, 64), p))
    # another output size: the placement is rescaled with the image
    half = res.upsample(size=(32, 32), placement=p)
    scaled = Placement((16.0, 16.0), (-0.25, -0.25))
    assert torch.allclose(half.maps, place_maps(res.maps, (32, 32), scaled))
    with pytest.raises(CAMInputError, match="bilinear"):
        res.upsample(mode="bicubic", placement=p)
    # "auto" (the default) uses the result's own placement when it carries one
    plain = F.interpolate(res.maps, size=(64, 64), mode="bilinear", align_corners=False)
    assert res.placement is None and torch.allclose(res.upsample().maps, plain)
    known = dataclasses.replace(res, placement=p)
    assert torch.allclose(known.upsample().maps, placed.maps)
    assert torch.allclose(known.upsample(placement="bilinear").maps, plain)
    assert known.normalize().placement == p and known.upsample().placement is None
    with pytest.raises(CAMInputError, match="placement must be"):
        res.upsample(placement="centre")  # type: ignore[arg-type]


def test_converted_model_placement() -> None:
    import timm

    model = cp.convert(timm.create_model("resnet18"), 3, stage=2, input_size=(3, 64, 64))
    p = model.placement((64, 64))
    assert p.stride == (8.0, 8.0) and p.offset == (0.0, 0.0)
    assert model.placement((3, 64, 64)) is p  # cached per size


def test_cam_attaches_the_placement_when_asked() -> None:
    import timm

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = images(2, 64)
    with cp.CAM(model, placement="bilinear") as cam:
        plain = cam(x)
    assert plain.placement is None
    with cp.CAM(model, placement=True) as cam:
        res = cam(x)
        again = cam(images(1, 64))
        bigger = cam(images(1, 96))
    # a hand count for torchvision's ResNet: every 3x3/2 (pad 1), 7x7/2 (pad 3) and
    # 3x3/2 max pool (pad 1) keeps the centre of cell 0 at pixel 0, so c(i) = 32 i
    assert res.placement == Placement((32.0, 32.0), (0.0, 0.0), source="traced")
    assert again.placement is res.placement and bigger.placement is not None
    torch.testing.assert_close(res.maps, plain.maps)
    torch.testing.assert_close(res.upsample().maps, place_maps(res.maps, (64, 64), res.placement))
    assert not torch.allclose(res.upsample().maps, plain.upsample().maps)
    assert cp.count_hooks(model) == 0
    # a converted model's own (cached) placement is used
    conv = cp.convert(timm.create_model("resnet18"), 3, stage=2, input_size=(3, 64, 64)).eval()
    with cp.CAM(conv, placement=True) as cam:
        assert cam(x).placement is conv.placement((64, 64))


def test_lost_frame_falls_back_to_half_pixel() -> None:
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, global_pool="avg")
    p = feature_placement(vit.eval(), (3, 32, 32), cp.resolve(vit))
    assert p.source == "assumed" and p.stride == (16.0, 16.0) and p.offset == (7.5, 7.5)


def test_feature_placement_needs_the_adapter() -> None:
    model = torchvision.models.resnet18().eval()
    with pytest.raises(TypeError, match="adapter must be a cam_plugin.Adapter"):
        feature_placement(model, (3, 32, 32), "resnet")  # type: ignore[arg-type]
    with pytest.raises(CAMInputError, match=r"\(C, H, W\) or \(H, W\)"):
        feature_placement(model, (32,), cp.resolve(model))
    # (H, W): the channels come from the adapter
    assert feature_placement(model, (64, 64), cp.resolve(model)).stride == (32.0, 32.0)


def test_bad_placement_input() -> None:
    with pytest.raises(CAMInputError, match="stride"):
        Placement((0.0, 1.0), (0.0, 0.0))
    with pytest.raises(CAMInputError, match="floating"):
        place_maps(torch.zeros(1, 2, 2, dtype=torch.long), (4, 4), Placement((2.0, 2.0), (0, 0)))
    with pytest.raises(CAMInputError, match="Placement"):
        place_maps(torch.zeros(1, 2, 2), (4, 4), (2.0, 0.0))  # type: ignore[arg-type]
