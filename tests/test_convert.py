"""cam_plugin.convert: any backbone -> CAM-exact GAP classifier (timm, torchvision, tuple
outputs, plain modules), stages and map sizes, training, save / load, script / compile, GMP
opt-in, bad input; the trunk-builder registry (cam_plugin.trunks) and the framework builders
loaded with their integrations."""

from __future__ import annotations

import copy
import subprocess
import sys
from functools import partial

import pytest
import timm
import torch
import torchvision
from helpers import assert_identity, images, randomize_head
from torch import nn

import cam_plugin as cp
from cam_plugin import trunks
from cam_plugin.convert import CAMClassifier
from cam_plugin.errors import CAMInputError, UnsupportedHeadError
from cam_plugin.trunks import SelectOutput, Trunk, register_trunk_builder

SIZE = 64
WIDTHS = (16, 32, 64, 128)


def small_resnet18(**kwargs: object) -> nn.Module:
    """timm's ResNet-18 at a quarter of its width (the real class; fast on a CPU)."""
    return timm.create_model("resnet18", channels=WIDTHS, stem_width=16, **kwargs)


def _cam(model: CAMClassifier, x: torch.Tensor) -> cp.CAMResult:
    model.eval()
    randomize_head(model)  # zero-ish fresh heads would make the identity check vacuous
    with cp.CAM(model) as cam:
        return cam(x, targets="all")


class TwoStages(nn.Module):
    """An OpenMMLab-style backbone: returns a tuple of stage maps."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(16, 24, 3, 2, 1), nn.BatchNorm2d(24), nn.ReLU())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.layer1(self.stem(x))
        return a, self.layer2(a)


class DictStages(TwoStages):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        a, b = super().forward(x)
        return {"c3": a, "c4": b}


class PlainMap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 12, 3, 2, 1), nn.ReLU(), nn.Conv2d(12, 20, 3, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x))


# --------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    ("kwargs", "channels", "side"),
    [
        ({}, WIDTHS[-1], SIZE // 32),
        ({"stage": 2, "extra_conv": 24}, 24, SIZE // 8),
        ({"stage": -2, "dropout": 0.5}, WIDTHS[-2], SIZE // 16),
    ],
)
def test_timm_backbones_are_exact(kwargs: dict, channels: int, side: int) -> None:
    torch.manual_seed(0)
    model = cp.convert(small_resnet18(), 6, input_size=(3, SIZE, SIZE), **kwargs)
    res = _cam(model, images(2, SIZE))
    assert res.maps.shape == (2, 6, side, side)
    assert model.forward_features(images(1, SIZE)).shape == (1, channels, side, side)
    assert model.info.map_size == (side, side) and model.info.family == "timm"
    assert_identity(res)


def test_timm_full_model_drops_its_head_and_unused_layers() -> None:
    torch.manual_seed(0)
    src = timm.create_model("mobilenetv3_small_050", num_classes=1000)
    before = {k: v.clone() for k, v in src.state_dict().items()}
    model = cp.convert(src, 3, input_size=(3, SIZE, SIZE))
    # MobileNetV3's conv_head sits after its pool, so the features never use it
    assert "backbone.model.conv_head.weight" not in model.state_dict()
    assert not any(k.startswith("backbone.model.classifier") for k in model.state_dict())
    assert model.info.pruned == ("model.conv_head",)
    # copy=True (default): the backbone passed in is untouched
    assert src.classifier.out_features == 1000
    assert all(torch.equal(before[k], v) for k, v in src.state_dict().items())


class ConvAttention(nn.Module):
    """A conv stem, then self-attention over its positions with nn.MultiheadAttention
    (which reads ``out_proj.weight`` without calling ``out_proj``), then an unused head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=4, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.aux_head = nn.Linear(16, 5)  # never runs in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stem(x)
        b, c, h, w = f.shape
        t = f.flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return t.transpose(1, 2).reshape(b, c, h, w)


def test_parameters_read_without_a_call_are_kept() -> None:
    torch.manual_seed(0)
    src = ConvAttention().eval()
    x = images(2, SIZE)
    with torch.no_grad():
        expected = src(x)
    model = cp.convert(src, 4, input_size=(3, SIZE, SIZE))
    assert model.info.pruned == ("aux_head",)
    assert "backbone.attn.out_proj.weight" in model.state_dict()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), expected)
    assert_identity(_cam(model, x))


def test_timm_features_only_selects_stage() -> None:
    torch.manual_seed(0)
    fo = small_resnet18(features_only=True, out_indices=(2, 3))
    model = cp.convert(fo, 4, stage=0, input_size=(3, SIZE, SIZE))
    assert model.info.family == "timm-features"
    assert model.info.stage_name == "layer2" and model.info.map_size == (8, 8)
    assert [s.reduction for s in model.info.stages] == fo.feature_info.reduction()
    assert_identity(_cam(model, images(2, SIZE)))


def tv_resnet10() -> nn.Module:
    """torchvision's ResNet class with one block per stage."""
    return torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])


@pytest.mark.parametrize(
    ("builder", "stage", "name", "side"),
    [
        (tv_resnet10, -1, "layer4", SIZE // 32),
        (tv_resnet10, -2, "layer3", SIZE // 16),
        (partial(torchvision.models.mobilenet_v3_small, width_mult=0.5), -1, "features.12", 2),
    ],
)
def test_torchvision_backbones_are_exact(builder, stage: int, name: str, side: int) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = cp.convert(builder(), 5, stage=stage, input_size=(3, SIZE, SIZE))
    assert model.info.family == "torchvision" and model.info.stage_name == name
    assert not any(".fc." in k or "classifier" in k for k in model.backbone.state_dict())
    res = _cam(model, images(2, SIZE))
    assert res.maps.shape[-2:] == (side, side)
    assert_identity(res)


def test_torchvision_resnet_stages_follow_timm_convention() -> None:
    model = cp.convert(tv_resnet10(), 2, input_size=(3, SIZE, SIZE))
    stages = [(s.name, s.reduction) for s in model.info.stages]
    assert stages == [
        ("relu", 2.0),
        ("layer1", 4.0),
        ("layer2", 8.0),
        ("layer3", 16.0),
        ("layer4", 32.0),
    ]


def test_plain_module_tuple_and_dict_outputs() -> None:
    torch.manual_seed(0)
    plain = cp.convert(PlainMap(), 3, input_size=(3, 32, 32))
    assert plain.info.family == "module" and plain.info.map_size == (8, 8)
    assert_identity(_cam(plain, images(2, 32)))

    tup = cp.convert(TwoStages(), 3, stage=0, input_size=(3, 32, 32))
    assert tup.info.family == "multi-output" and tup.info.map_size == (8, 8)
    assert [s.channels for s in tup.info.stages] == [16, 24]
    assert_identity(_cam(tup, images(2, 32)))
    assert cp.convert(TwoStages(), 3, input_size=(3, 32, 32)).info.map_size == (4, 4)

    dct = cp.convert(DictStages(), 3, stage="c4", input_size=(3, 32, 32))
    assert dct.info.stage_name == "c4" and dct.info.map_size == (4, 4)
    assert_identity(_cam(dct, images(2, 32)))


def test_sequential_backbone_stage_cut() -> None:
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
    model = cp.convert(seq, 2, stage=0, input_size=(3, 32, 32))
    assert model.info.family == "sequential"
    assert (model.info.stage_name, model.info.channels, model.info.map_size) == ("1", 8, (16, 16))


# --------------------------------------------------------------------- stage / stride sizes


def test_stage_extra_conv_and_last_stride_map_sizes() -> None:
    torch.manual_seed(0)
    base = small_resnet18()
    sizes = {
        (-1, None): (SIZE // 32, WIDTHS[3]),
        (-2, None): (SIZE // 16, WIDTHS[2]),
        (2, None): (SIZE // 8, WIDTHS[1]),
        (-1, 1): (SIZE // 16, WIDTHS[3]),  # last_stride=1: layer4 at stride 16
    }
    for (stage, last), (side, ch) in sizes.items():
        m = cp.convert(base, 2, stage=stage, last_stride=last, input_size=(3, SIZE, SIZE))
        out = m.backbone(images(1, SIZE))
        assert out.shape == (1, ch, side, side), (stage, last)
        assert m.info.map_size == (side, side) and m.info.reduction == SIZE / side
    extra = cp.convert(base, 2, stage=-2, extra_conv=40, input_size=(3, SIZE, SIZE))
    assert extra.forward_features(images(1, SIZE)).shape == (1, 40, SIZE // 16, SIZE // 16)
    assert isinstance(extra.neck[0], nn.Conv2d) and extra.neck[0].kernel_size == (3, 3)
    assert extra.neck[0].padding == (1, 1) and extra.neck[0].stride == (1, 1)


def test_last_stride_on_torchvision_resnet_and_refusal_on_patchify() -> None:
    tv = cp.convert(tv_resnet10(), 2, last_stride=1, input_size=(3, SIZE, SIZE))
    assert tv.info.map_size == (SIZE // 16, SIZE // 16)
    assert_identity(_cam(tv, images(2, SIZE)))
    patchify = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 2, 2))
    with pytest.raises(CAMInputError, match="last_stride=1 would turn"):
        cp.convert(patchify, 2, last_stride=1, input_size=(3, 32, 32))


def test_stage_out_of_range_lists_stages() -> None:
    with pytest.raises(CAMInputError, match=r"stage=7 is out of range.*layer3 \(64 ch"):
        cp.convert(small_resnet18(), 2, stage=7, input_size=(3, SIZE, SIZE))
    with pytest.raises(CAMInputError, match="returns one map"):
        cp.convert(PlainMap(), 2, stage=1, input_size=(3, 32, 32))


# --------------------------------------------------------------------- training, io, export


def test_converted_model_overfits_a_tiny_set() -> None:
    torch.manual_seed(0)
    model = cp.convert(small_resnet18(), 4, stage=2, input_size=(3, 32, 32))
    x, y = images(8, 32, seed=3), torch.arange(8) % 4
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    first = None
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).all()
    assert float(loss) < 0.2 * first


def test_state_dict_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    a = cp.convert(
        small_resnet18(), 3, stage=-2, extra_conv=16, dropout=0.2, input_size=(3, 32, 32)
    )
    randomize_head(a)
    path = tmp_path / "cam.pt"
    torch.save(a.state_dict(), path)
    torch.manual_seed(1)
    b = cp.convert(
        small_resnet18(), 3, stage=-2, extra_conv=16, dropout=0.2, input_size=(3, 32, 32)
    )
    b.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = images(2, SIZE)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


def test_script_and_compile_keep_outputs() -> None:
    torch.manual_seed(0)
    model = cp.convert(small_resnet18(), 3, stage=2, input_size=(3, 32, 32)).eval()
    x = images(2, 32)
    with torch.no_grad():
        ref = model(x)
        scripted = torch.jit.script(model)
        assert torch.allclose(scripted(x), ref, atol=1e-5)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        assert torch.allclose(compiled(x), ref, atol=1e-5)
    tup = torch.jit.script(cp.convert(TwoStages(), 2, stage=1, input_size=(3, 32, 32)).eval())
    assert tup(x).shape == (2, 2)


# --------------------------------------------------------------------- GMP


def test_gmp_needs_explicit_opt_in_and_is_flagged_inexact() -> None:
    torch.manual_seed(0)
    model = cp.convert(PlainMap(), 3, pool="max", input_size=(3, 32, 32)).eval()
    randomize_head(model)
    with pytest.raises(UnsupportedHeadError, match="allow_inexact=True"):
        cp.CAM(model)
    x = images(2, 32)
    with cp.CAM(model, adapter=model.cam_adapter(allow_inexact=True)) as cam:
        res = cam(x, targets="all")
    assert not res.exact
    feats = model.forward_features(x)
    expected = torch.einsum("ck,bkhw->bchw", model.fc.weight, feats)
    assert torch.allclose(res.maps, expected, atol=1e-5)
    with torch.no_grad():
        logits = model(x)
    # GMP: S_c = Σ_k w_ck max_xy f_k + b_c, which is not mean_xy M_c + b_c
    assert torch.allclose(logits, model.fc(feats.amax(dim=(2, 3))), atol=1e-5)
    assert float(res.identity_residual().abs().max()) > 1e-2


# --------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_bad_num_classes(bad: object) -> None:
    with pytest.raises(CAMInputError, match="num_classes"):
        cp.convert(PlainMap(), bad, input_size=(3, 32, 32))  # type: ignore[arg-type]


def test_backbone_without_a_map_says_what_came_out() -> None:
    with pytest.raises(CAMInputError, match=r"2-D tensor of shape \(1, 7\)"):
        cp.convert(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 7)), 2, input_size=(3, 8, 8))
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1)
    with pytest.raises(CAMInputError, match=r"3-D tensor of shape \(1, 5, 192\)"):
        cp.convert(vit, 2, input_size=(3, 32, 32))

    class Mixed(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x.flatten(1)

    with pytest.raises(CAMInputError, match=r"tensor\(1, 3, 8, 8\), tensor\(1, 192\)"):
        cp.convert(Mixed(), 2, input_size=(3, 8, 8))


def test_other_bad_arguments() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        cp.convert("resnet18", 3)  # type: ignore[arg-type]
    for kwargs, match in [
        ({"extra_conv": 0}, "extra_conv"),
        ({"dropout": 1.0}, "dropout"),
        ({"pool": "sum"}, "pool"),
        ({"last_stride": 2}, "last_stride"),
        ({"stage": 1.5}, "stage"),
    ]:
        with pytest.raises(CAMInputError, match=match):
            cp.convert(PlainMap(), 3, input_size=(3, 32, 32), **kwargs)


def test_convert_keeps_the_mode_and_leaves_no_hooks() -> None:
    src = TwoStages().train()
    model = cp.convert(copy.deepcopy(src), 2, input_size=(3, 32, 32))
    assert all(m.training for m in model.modules())
    assert cp.count_hooks(model) == 0
    frozen = cp.convert(copy.deepcopy(src).eval(), 2, input_size=(3, 32, 32))
    assert not frozen.training


# --------------------------------------------------------------------- trunk builders


class OwnFamily(TwoStages):
    """A family with its own trunk builder (registered below, for this class only)."""


def _own_builder(model: nn.Module, stage: object, x: torch.Tensor) -> Trunk | None:
    if stage == "decline":
        return None  # left to the generic trunks
    return Trunk(SelectOutput(model, 0), "own", 0, "layer1 (own)", ())


def test_registered_trunk_builder_is_used_and_may_decline() -> None:
    register_trunk_builder(OwnFamily, _own_builder, name="own-family")
    assert "own-family" in trunks.registered_trunk_builders()
    own = cp.convert(OwnFamily(), 3, input_size=(3, 32, 32))
    assert (own.info.family, own.info.stage_name, own.info.map_size) == (
        "own",
        "layer1 (own)",
        (8, 8),
    )
    assert_identity(_cam(own, images(2, 32)))
    # a builder that declines leaves the model to the generic trunks (here: a tuple output)
    with pytest.raises(CAMInputError, match="a string selects a key of a dict output"):
        cp.convert(OwnFamily(), 3, stage="decline", input_size=(3, 32, 32))
    with pytest.raises(CAMInputError, match="register_trunk_builder: builder"):
        register_trunk_builder(OwnFamily, "not callable")  # type: ignore[arg-type]


def test_framework_trunk_builders_load_with_their_integration() -> None:
    code = (
        "import sys; import cam_plugin as cp; from cam_plugin import trunks; "
        "assert not {'timm', 'torchvision'} & set(sys.modules), 'framework imported'; "
        "assert trunks.registered_trunk_builders() == []; "
        "import timm; m = timm.create_model('resnet18', channels=(8, 8, 8, 8), stem_width=8); "
        "c = cp.convert(m, 2, stage=2, input_size=(3, 32, 32)); "
        "print(c.info.family, c.info.stage_name, sorted(trunks.registered_trunk_builders()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["timm", "layer2", "['timm']"]


def test_names_moved_out_of_convert_still_import() -> None:
    from cam_plugin.integrations.timm import TimmFeatures as Moved
    from cam_plugin.integrations.torchvision import InputTransform as MovedTV

    from cam_plugin.convert import InputTransform, StageInfo, TimmFeatures

    assert TimmFeatures is Moved and InputTransform is MovedTV
    assert StageInfo is trunks.StageInfo
    with pytest.raises(ImportError, match="cannot import name 'Nope'"):
        from cam_plugin.convert import Nope  # type: ignore[attr-defined]  # noqa: F401


# -- 3-D (video) backbones -----------------------------------------------------------------


def _tiny_3d() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Conv3d(3, 8, 3, stride=(1, 2, 2), padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(8, 16, 3, stride=2, padding=1),
        torch.nn.ReLU(),
    )


@pytest.mark.parametrize(("stage", "extra_conv"), [(-1, None), (0, 4)])
def test_convert_a_3d_sequential_builds_a_space_time_cam_head(stage: int, extra_conv: int) -> None:
    """A 3-D backbone gets GAP over (t, x, y) (+ a 3x3x3 extra conv) and a Linear layer:
    M_c = Σ_k w_ck f_k(t, x, y) and mean_{t,x,y} M_c + b_c = S_c."""
    from cam_plugin.convert import GlobalPool3d

    torch.manual_seed(0)
    conv = cp.convert(_tiny_3d(), 3, stage=stage, extra_conv=extra_conv, input_size=(3, 4, 16, 16))
    conv = randomize_head(conv).eval()
    info = conv.info
    assert info is not None and info.video and [s.reduction for s in info.stages] == [2.0, 4.0]
    assert (info.map_frames, info.map_size) == ((4, (8, 8)) if stage == 0 else (2, (4, 4)))
    assert isinstance(conv.global_pool, GlobalPool3d) and conv.cam_adapter().layout.kind == "NCTHW"
    x = torch.randn(2, 3, 4, 16, 16)
    res = cp.CAM(conv)(x, targets="all")
    with torch.no_grad():
        feats = conv.forward_features(x)
        torch.testing.assert_close(res.logits, conv(x))
        pooled = conv.fc(feats.mean(dim=(2, 3, 4)))
    torch.testing.assert_close(res.logits, pooled)
    expected = torch.einsum("ck,bkthw->bcthw", conv.fc.weight, feats)
    torch.testing.assert_close(res.maps, expected, rtol=1e-4, atol=1e-5)
    assert float(res.identity_residual().abs().max()) <= 1e-4 * max(
        1.0, float(res.logits.abs().max())
    )


def test_convert_3d_defaults_and_refusals() -> None:
    from cam_plugin.convert import VIDEO_PROBE, is_video_backbone

    assert is_video_backbone(_tiny_3d()) and not is_video_backbone(torch.nn.Conv2d(3, 4, 3))
    conv = cp.convert(_tiny_3d(), 2)  # no input_size: a (C, 16, 112, 112) probe clip
    assert conv.info is not None and conv.info.input_size == (3, *VIDEO_PROBE)
    assert "map=8x28x28 at 16x112x112" in conv.extra_repr()
    with pytest.raises(CAMInputError, match="last_stride=1 is implemented for image"):
        cp.convert(_tiny_3d(), 2, input_size=(3, 4, 16, 16), last_stride=1)
    with pytest.raises(CAMInputError, match=r"\(C, T, H, W\)"):
        cp.convert(_tiny_3d(), 2, input_size=(3, 4, 4, 16, 16))
    with pytest.raises(CAMInputError, match="5-D"):  # a 3-D trunk that pools time away
        cp.convert(
            torch.nn.Sequential(_tiny_3d(), torch.nn.Flatten(2)), 2, input_size=(3, 4, 16, 16)
        )
