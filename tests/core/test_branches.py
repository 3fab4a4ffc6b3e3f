"""cam_plugin.branches: per-branch maps for fused heads (a head on several pooled vectors
concatenated): exact split (maps + constant + bias = logit), a two-view model whose digit
is in one view only, [CLS, mean(patches)] heads, non-affine fusions refused; torch only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import images
from torch import nn

import cam_plugin as cp
from cam_plugin.branches import BranchSpec, ConcatBranchAdapter
from cam_plugin.errors import CAMInputError, UnsupportedHeadError
from cam_plugin.layout import FeatureLayout
from cam_plugin.result import MapScale


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


# --------------------------------------------------------------------- a two-view model


class TwoView(nn.Module):
    """Two grey views stacked as channels ``(B, 2, H, W)``; one trunk (shared: called once
    per view, or one per view), each view average-pooled, ``[pool(a), pool(b)]`` -> fc."""

    def __init__(self, shared: bool = True, fusion: str = "concat", classes: int = 10) -> None:
        super().__init__()
        self.trunk_a = self._trunk()
        self.trunk_b = self.trunk_a if shared else self._trunk()
        self.fusion = fusion
        self.fc = nn.Linear(16 if fusion == "product" else 32, classes)

    @staticmethod
    def _trunk() -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fa, fb = self.trunk_a(x[:, :1]), self.trunk_b(x[:, 1:])
        pa, pb = fa.mean(dim=(2, 3)), fb.mean(dim=(2, 3))
        fused = pa * pb if self.fusion == "product" else torch.cat([pa, pb], dim=1)
        return self.fc(fused)


def _planted(model: TwoView) -> TwoView:
    """Box filters with positive weights (each unit: local brightness) and a positive head:
    a map that holds whatever is bright, the digit on a clean canvas."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) / m.weight[0].numel())
                m.bias.zero_()
        model.fc.weight.copy_(torch.rand(model.fc.weight.shape, generator=gen))
        model.fc.bias.copy_(torch.randn(model.fc.bias.shape, generator=gen))
    return model.eval()


def _two_view_adapter(model: TwoView, shared: bool = True) -> ConcatBranchAdapter:
    return ConcatBranchAdapter.from_branches(
        [
            BranchSpec("a", model.trunk_a, (0, 16), call=0 if shared else -1),
            BranchSpec("b", model.trunk_b, (16, 32), call=1 if shared else -1),
        ],
        head=[model.fc],
        name="two-view",
        input_size=(2, 64, 64),  # the views are the input's channels (C = 2, not the trunk's 1)
    )


@pytest.mark.parametrize("shared", [True, False])
def test_maps_and_bias_sum_to_the_logit(shared: bool) -> None:
    model = _planted(TwoView(shared=shared))
    x = images(3, 32, channels=2)
    res = cp.CAM(model, adapter=_two_view_adapter(model, shared))(x, topk=3)
    logits = model(x)
    assert _rel(res.logits, logits) == 0.0
    assert set(res.branches) == {"a", "b"}  # type: ignore[arg-type]
    a, b = res.branches["a"], res.branches["b"]  # type: ignore[index]
    assert torch.equal(res.maps, a.maps) and a.maps.shape == (3, 3, 8, 8)
    # sum over branches of mean_xy M^i + constant + b' = S (no non-spatial part here)
    total = a.maps.mean(dim=(2, 3)) + b.maps.mean(dim=(2, 3)) + res.constant
    bias = model.fc.bias[res.classes]
    assert _rel(total + bias, logits.gather(1, res.classes)) <= 1e-5
    assert float(res.constant.abs().max()) == 0.0  # type: ignore[union-attr]
    for r in (res, a, b):  # every branch satisfies the identity on its own
        assert float(r.identity_residual().abs().max()) <= 1e-5 * max(
            1.0, float(logits.abs().max())
        )
    # each branch map is W[:, cols_i] f^i, computed independently
    fb = model.trunk_b(x[:, 1:])
    ref = torch.einsum("bnk,bkhw->bnhw", model.fc.weight[res.classes][..., 16:], fb)
    assert _rel(b.maps, ref) <= 1e-5


def test_digit_in_one_view_is_found_there_and_not_in_the_other() -> None:
    pytest.importorskip("sklearn")
    from cam_plugin.data import ClutteredDigits
    from cam_plugin.metrics import evaluate_wsol

    ds = ClutteredDigits("test", 24, num_fragments=0, num_strokes=0, noise_std=0.0, seed=3)
    items = [ds[i] for i in range(len(ds))]
    digits = torch.stack([it["image"][:1] for it in items])  # (B, 1, 64, 64) in [0, 1]
    x = torch.cat([digits, torch.zeros_like(digits)], dim=1)  # the digit in view a only
    model = _planted(TwoView())
    with cp.CAM(model, adapter=_two_view_adapter(model)) as cam:
        res = cam(x, targets=[it["label"] for it in items])
    up = res.upsample()
    a, b = up.branches["a"], up.branches["b"]  # type: ignore[index]
    assert a.upsampled_with == "traced" and a.maps.shape == (24, 1, 64, 64)
    scores = evaluate_wsol(
        a.normalize().maps[:, 0], [it["boxes"] for it in items], cam_curve_interval=0.05
    )
    assert scores["MaxBoxAcc"] >= 80.0, scores
    # the empty view's map is (near) zero: its features are zero, so is its share of the logit
    assert float(b.maps.abs().max()) <= 1e-6 * float(a.maps.abs().max())
    # swap the views: the digit is found in b
    swapped = cp.CAM(model, adapter=_two_view_adapter(model))(x.flip(1), targets=res.classes)
    assert float(swapped.branches["a"].maps.abs().max()) <= 1e-6  # type: ignore[index]
    assert float(swapped.branches["b"].maps.min()) >= 0.0  # type: ignore[index]
    assert float(swapped.branches["b"].maps.max()) > 0.1  # type: ignore[index]


def test_results_of_branches_follow_indexing_and_normalize() -> None:
    model = _planted(TwoView())
    x = images(4, 32, channels=2)
    res = cp.CAM(model, adapter=_two_view_adapter(model))(x, topk=2)
    two = res[1:3]
    assert two.branches["b"].maps.shape[0] == 2  # type: ignore[index]
    torch.testing.assert_close(two.branches["b"].maps, res.branches["b"].maps[1:3])  # type: ignore[index]
    assert two.constant.shape == (2, 2)  # type: ignore[union-attr]
    scaled = res.relu().normalize(MapScale(0.0, 2.0))
    assert scaled.branches["b"].stage == "relu+normalized"  # type: ignore[index]
    assert float(scaled.branches["b"].maps.max()) <= 1.0  # type: ignore[index]
    # the branch placement is traced (3x3/2 pad 1 twice: cell i at pixel 4 i)
    placed = res.branches["a"].find_placement()  # type: ignore[index]
    assert placed is not None and placed.stride == (4.0, 4.0) and placed.offset == (0.0, 0.0)
    eager = cp.CAM(model, adapter=_two_view_adapter(model), placement=True)(x)
    assert eager.branches["b"].placement == placed  # type: ignore[index]
    assert cp.CAM(model, adapter=_two_view_adapter(model), placement=False)(x).locate is None


def test_contrastive_branch_maps_decompose_the_margin() -> None:
    model = _planted(TwoView())
    x = images(3, 32, channels=2)
    res = cp.CAM(model, adapter=_two_view_adapter(model))(x, topk=2, contrast="second")
    logits = model(x)
    margin = logits.gather(1, res.classes) - logits.gather(1, res.contrast)  # type: ignore[arg-type]
    total = sum(b.maps.mean(dim=(2, 3)) for b in res.branches.values())  # type: ignore[union-attr]
    db = model.fc.bias[res.classes] - model.fc.bias[res.contrast]
    assert _rel(total + res.constant + db, margin) <= 1e-5  # type: ignore[operator]
    assert float(res.identity_residual().abs().max()) <= 1e-5 * max(1.0, float(margin.abs().max()))


# --------------------------------------------------------------------- [CLS, mean(patches)]


class ClsPatchViT(nn.Module):
    """DINOv2's head shape, torch only: tokens after a final LayerNorm, the classifier on
    ``[CLS, mean(patch tokens)]`` (optionally with register tokens and a head norm)."""

    def __init__(
        self, dim: int = 16, classes: int = 6, registers: int = 0, head_norm: bool = False
    ) -> None:
        super().__init__()
        self.registers = registers
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.prefix = nn.Parameter(0.5 * torch.randn(1, 1 + registers, dim))
        self.block = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.layernorm = nn.LayerNorm(dim)
        self.head_norm = nn.LayerNorm(2 * dim) if head_norm else nn.Identity()
        self.classifier = nn.Linear(2 * dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.prefix.expand(x.shape[0], -1, -1), tokens], dim=1)
        seq = self.layernorm(self.block(tokens))
        cls, patches = seq[:, 0], seq[:, 1 + self.registers :]
        return self.classifier(self.head_norm(torch.cat([cls, patches.mean(dim=1)], dim=1)))


def _cls_patch_adapter(model: ClsPatchViT, dim: int = 16) -> ConcatBranchAdapter:
    head = (
        [model.classifier]
        if isinstance(model.head_norm, nn.Identity)
        else [
            model.head_norm,
            model.classifier,
        ]
    )
    return ConcatBranchAdapter.from_branches(
        [
            BranchSpec("cls", model.layernorm, (0, dim), spatial=False, read=lambda t: t[:, 0]),
            BranchSpec(
                "patches",
                model.layernorm,
                (dim, 2 * dim),
                layout=FeatureLayout("tokens", num_prefix_tokens=1 + model.registers),
            ),
        ],
        head=head,
    )


@pytest.mark.parametrize(("registers", "head_norm"), [(0, False), (2, False), (0, True)])
def test_cls_and_mean_patches_head_sums_to_the_logit(registers: int, head_norm: bool) -> None:
    torch.manual_seed(0)
    model = ClsPatchViT(registers=registers, head_norm=head_norm).eval()
    with torch.no_grad():
        model.classifier.bias.normal_()
    x = images(2, 24)
    res = cp.CAM(model, adapter=_cls_patch_adapter(model))(x, targets="all")
    logits = model(x)
    assert list(res.branches) == ["patches"] and res.maps.shape == (2, 6, 6, 6)  # type: ignore[arg-type]
    scale = max(1.0, float(logits.abs().max()))
    assert float(res.identity_residual().abs().max()) <= 1e-5 * scale
    total = res.maps.mean(dim=(2, 3)) + res.constant + model.classifier.bias
    assert _rel(total, logits) <= 1e-5
    if not head_norm:  # the constant is exactly the CLS half of the head
        with torch.no_grad():
            tokens = model.patch_embed(x).flatten(2).transpose(1, 2)
            tokens = torch.cat([model.prefix.expand(2, -1, -1), tokens], dim=1)
            cls = model.layernorm(model.block(tokens))[:, 0]
        torch.testing.assert_close(res.constant, cls @ model.classifier.weight[:, :16].t())
    assert res.upsample().upsampled_with == "bilinear"  # tokens: no traced geometry


# --------------------------------------------------------------------- refusals


def test_non_affine_fusion_is_refused() -> None:
    model = _planted(TwoView(fusion="product"))
    adapter = ConcatBranchAdapter.from_branches(
        [
            BranchSpec("a", model.trunk_a, (0, 16), call=0),
            BranchSpec("b", model.trunk_a, (0, 16), call=1),  # summed: not what the model does
        ],
        head=[model.fc],
        input_size=(2, 64, 64),
    )
    with pytest.raises(UnsupportedHeadError, match="not a concatenation"):
        cp.CAM(model, adapter=adapter)(images(2, 32, channels=2))


def test_bad_branch_specs_are_refused() -> None:
    model = _planted(TwoView())
    a = BranchSpec("a", model.trunk_a, (0, 16), call=0)
    with pytest.raises(CAMInputError, match="no branch fills column 16"):
        ConcatBranchAdapter.from_branches([a, BranchSpec("b", model.trunk_a, (17, 32))], [model.fc])
    with pytest.raises(CAMInputError, match="unique"):
        ConcatBranchAdapter.from_branches([a, BranchSpec("a", model.trunk_a, (16, 32))], [model.fc])
    with pytest.raises(UnsupportedHeadError, match="expects 32 inputs"):
        ConcatBranchAdapter.from_branches([a], [model.fc])
    with pytest.raises(CAMInputError, match="spatial branch"):
        ConcatBranchAdapter.from_branches(
            [BranchSpec("z", model.trunk_a, (0, 32), spatial=False)], [model.fc]
        )
    with pytest.raises(CAMInputError, match="columns"):
        BranchSpec("a", model.trunk_a, (4, 4)).check()
    adapter = ConcatBranchAdapter.from_branches(
        [a, BranchSpec("b", model.trunk_a, (16, 32), call=2)], [model.fc], input_size=(2, 32, 32)
    )
    with pytest.raises(CAMInputError, match="ran 2 time"):
        cp.CAM(model, adapter=adapter)(images(1, 32, channels=2))
    wide = ConcatBranchAdapter.from_branches(
        [a, BranchSpec("b", model.trunk_a, (16, 32), read=lambda t: t[:, :8], call=1)],
        [model.fc],
        input_size=(2, 32, 32),
    )
    with pytest.raises(UnsupportedHeadError, match="has 8 channels but fills 16"):
        cp.CAM(model, adapter=wide)(images(1, 32, channels=2))
    with pytest.raises(UnsupportedHeadError, match="one capture per branch"):
        adapter.maps_from_capture(torch.zeros(1, 16, 8, 8))
    assert cp.count_hooks(model) == 0


def test_branch_capture_leaves_no_hook_when_the_forward_raises() -> None:
    model = _planted(TwoView())
    adapter = _two_view_adapter(model)

    def boom(module: nn.Module, args: object) -> None:
        raise RuntimeError("boom in the head")

    handle = model.fc.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        cp.CAM(model, adapter=adapter)(images(1, 32, channels=2))
    handle.remove()
    assert cp.count_hooks(model) == 0
    # the maps follow the model's own forward once: F.interpolate is not involved
    res = cp.CAM(model, adapter=adapter, placement="bilinear")(images(1, 32, channels=2))
    plain = F.interpolate(res.maps, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(res.upsample().maps, plain)
