"""The mmpretrain adapter on real mmpretrain classifiers (random init, heads re-drawn)."""

from __future__ import annotations

import mmpretrain.models  # noqa: F401  (registers the models)
import pytest
import torch
from helpers import assert_identity, images, randomize_head
from mmengine.registry import DefaultScope
from mmpretrain.registry import MODELS
from torch import nn

import cam_plugin as cp
from cam_plugin.errors import UnsupportedHeadError


def build(**overrides: object) -> nn.Module:
    cfg: dict = dict(
        type="ImageClassifier",
        backbone=dict(
            type="ResNet_CIFAR", depth=18, stem_channels=8, base_channels=8, out_indices=(3,)
        ),
        neck=dict(type="GlobalAveragePooling"),
        head=dict(type="LinearClsHead", num_classes=7, in_channels=64),
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    # whatever default scope an earlier test's Runner left (mmdet's has no ImageClassifier)
    with DefaultScope.overwrite_default_scope("mmpretrain"):
        model = MODELS.build(cfg)
    model.eval()  # mmpretrain's ResNet.train() returns None: no chaining
    return randomize_head(model)


def test_image_classifier_resolves_to_the_mmpretrain_adapter_and_is_exact() -> None:
    model = build(
        backbone=dict(
            type="ResNet_CIFAR",
            depth=18,
            stem_channels=8,
            base_channels=8,
            out_indices=(0, 1, 2, 3),  # the head uses the last one
        )
    )
    x = images(3, 40)
    with cp.CAM(model) as cam:
        res = cam(x, targets="all")
    assert cam.adapter.name.startswith("mmpretrain:ImageClassifier")
    assert_identity(res)
    # by hand: the last backbone output, the Linear's weights, no adapter machinery
    with torch.no_grad():
        feats = model.backbone(x)[-1]
        logits = model(x)
    expected = torch.einsum("bkhw,ck->bchw", feats, model.head.fc.weight)
    assert res.maps.shape == expected.shape == (3, 7, 5, 5)
    torch.testing.assert_close(res.maps, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.logits, logits)


@pytest.mark.parametrize(
    "head",
    [
        dict(type="MultiLabelLinearClsHead", num_classes=7, in_channels=64),
        dict(type="EfficientFormerClsHead", num_classes=7, in_channels=64, distillation=True),
        dict(type="LeViTClsHead", num_classes=7, in_channels=64, distillation=True),
        dict(type="VisionTransformerClsHead", num_classes=7, in_channels=64),
    ],
    ids=lambda h: h["type"],
)
def test_linear_heads_are_exact(head: dict) -> None:
    model = build(head=head)
    with cp.CAM(model) as cam:
        res = cam(images(2, 32), topk=3)
    assert_identity(res)
    assert res.maps.shape == (2, 3, 4, 4)


def test_vit_with_and_without_a_gap_neck() -> None:
    arch = dict(embed_dims=32, num_layers=2, num_heads=2, feedforward_channels=64)
    vit = dict(type="VisionTransformer", arch=arch, img_size=32, patch_size=8)
    with_neck = build(
        backbone=dict(vit, out_type="featmap"),
        head=dict(type="LinearClsHead", num_classes=7, in_channels=32),
    )
    no_neck = build(
        backbone=dict(vit, out_type="avg_featmap"),  # pools, then LayerNorm, inside
        neck=None,
        head=dict(type="LinearClsHead", num_classes=7, in_channels=32),
    )
    for model in (with_neck, no_neck):
        adapter = cp.resolve(model)
        assert adapter.input_size == (3, 32, 32)  # the backbone's img_size
        with cp.CAM(model) as cam:
            res = cam(images(2, 32), topk=2)
        assert_identity(res)
        assert res.maps.shape == (2, 2, 4, 4)


@pytest.mark.parametrize(
    "backbone",
    [
        dict(type="ConvNeXt", arch="atto", drop_path_rate=0.1),
        dict(type="ConvNeXt", arch="atto", use_grn=True, layer_scale_init_value=0.0),  # v2
        dict(type="EdgeNeXt", arch="xxsmall"),
        dict(type="TinyViT", arch="5m", img_size=(64, 64), window_size=[2, 2, 4, 2]),
    ],
    ids=["convnext", "convnext-v2", "edgenext", "tinyvit"],
)
def test_pool_then_norm_inside_the_backbone_is_exact(backbone: dict) -> None:
    """These backbones average the last stage's output (itself finished by a functional
    residual add after the last module call) and LayerNorm the pooled vector before the
    head, all inside the backbone: the map is the stage's output, the LayerNorm is folded."""
    channels = {"ConvNeXt": 320, "EdgeNeXt": 168, "TinyViT": 320}[backbone["type"]]
    model = build(
        backbone=dict(backbone, gap_before_final_norm=True, out_indices=[-1]),
        neck=None,
        head=dict(type="LinearClsHead", num_classes=7, in_channels=channels),
    )
    randomize_head(model)
    norm = model.backbone.norm3
    with torch.no_grad():  # a non-trivial LayerNorm, so the fold is tested
        norm.weight.normal_(1.0, 0.5)
        norm.bias.normal_(0.0, 0.5)
    x = images(2, 64)
    with cp.CAM(model) as cam:
        res = cam(x, targets="all")
    assert_identity(res)
    assert "stages.3" in cam.adapter.name and "norm3" in cam.adapter.name
    # by hand: the last stage's output f (a plain torch hook), the per-sample LayerNorm of
    # its average written out, then the Linear: M_c = Σ_k w_ck γ_k (f_k − μ) / σ
    seen: list[torch.Tensor] = []
    handle = model.backbone.stages[-1].register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    f = seen[0]
    if f.dim() == 3:  # TinyViT's stages return tokens (B, h·w, K)
        side = int(f.shape[1] ** 0.5)
        f = f.transpose(1, 2).reshape(f.shape[0], -1, side, side)
    pooled = f.mean(dim=(2, 3))
    mu = pooled.mean(1)[:, None, None, None]
    sigma = torch.sqrt(pooled.var(1, unbiased=False) + norm.eps)[:, None, None, None]
    g = (f - mu) / sigma * norm.weight[None, :, None, None]
    expected = torch.einsum("ck,bkhw->bchw", model.head.fc.weight, g)
    torch.testing.assert_close(res.maps, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res.logits, logits)


def test_vit_reading_the_class_token_is_refused_with_the_config_switch() -> None:
    arch = dict(embed_dims=32, num_layers=1, num_heads=2, feedforward_channels=64)
    model = build(
        backbone=dict(type="VisionTransformer", arch=arch, img_size=32, patch_size=8),
        neck=None,
        head=dict(type="VisionTransformerClsHead", num_classes=7, in_channels=32),
    )
    with pytest.raises(UnsupportedHeadError, match="out_type='avg_featmap'"):
        cp.resolve(model)


def test_input_channels_come_from_the_data_preprocessor() -> None:
    model = build(
        backbone=dict(type="ResNet_CIFAR", depth=18, in_channels=1, base_channels=8),
        data_preprocessor=dict(mean=[0.5], std=[0.25]),
    )
    adapter = cp.resolve(model)
    assert adapter.input_size == (1, 224, 224)
    # CAM sees what the network sees: the preprocessor's output
    raw = {"inputs": [torch.randint(0, 255, (1, 24, 24), dtype=torch.uint8) for _ in range(2)]}
    x = model.data_preprocessor(raw, False)["inputs"]
    with cp.CAM(model) as cam:
        res = cam(x)
    assert_identity(res)
    with pytest.raises(cp.CAMInputError, match="channels"):
        cp.CAM(model)(images(1, 24))  # 3 channels for a 1-channel model


@pytest.mark.parametrize(
    ("overrides", "culprit"),
    [
        (
            dict(
                head=dict(
                    type="StackedLinearClsHead", num_classes=7, in_channels=64, mid_channels=[32]
                )
            ),
            "ReLU",
        ),
        (
            dict(
                head=dict(
                    type="VisionTransformerClsHead", num_classes=7, in_channels=64, hidden_dim=16
                )
            ),
            "Tanh",
        ),
        (dict(neck=dict(type="GeneralizedMeanPooling")), "GeneralizedMeanPooling"),
    ],
    ids=["mlp-head", "tanh-head", "gem-neck"],
)
def test_non_affine_heads_are_refused_by_name(overrides: dict, culprit: str) -> None:
    model = build(**overrides)
    with pytest.raises(UnsupportedHeadError, match=culprit):
        cp.resolve(model)


def test_resolution_leaves_modes_rng_and_hooks_alone() -> None:
    model = build()
    model.train()
    model.backbone.layer1.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    state = torch.get_rng_state()
    before = cp.count_hooks(model)
    cp.resolve(model)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), state)
    assert cp.count_hooks(model) == before
