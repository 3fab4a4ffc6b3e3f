"""Space-time CAM on mmaction2 recognisers (issue 15): an I3D-style Recognizer3D and a TSN
Recognizer2D, built from configs with random weights (no downloads), wrapped by
ActionRecognizerLogits; the identity mean_{t,x,y} M_c + b_c = S_c and an independent einsum
of the recogniser's own features. Skipped where mmaction2 is not installed."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import cam_plugin as cp

mmaction = pytest.importorskip("mmaction")

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def _build(cfg: dict[str, Any]) -> Any:
    """Build under mmaction's scope, without leaving it as the process's default scope (later
    tests build mmpretrain / mmdet models)."""
    from mmengine.registry import DefaultScope

    models = _models_registry()
    with DefaultScope.overwrite_default_scope("mmaction"):
        return models.build(cfg).eval()


def _models_registry() -> Any:
    """mmaction's MODELS with every model registered. The mmaction2 1.2.0 wheel on PyPI lacks
    ``mmaction/models/localizers/drn`` (open-mmlab/mmaction2#2714), so ``import
    mmaction.models`` fails there; a placeholder module stands in for that one localizer."""
    drn = Path(mmaction.__file__).parent / "models" / "localizers" / "drn"
    if not drn.is_dir():
        for name in ("mmaction.models.localizers.drn", "mmaction.models.localizers.drn.drn"):
            module = types.ModuleType(name)
            module.__path__ = []  # type: ignore[attr-defined]
            sys.modules.setdefault(name, module)
        sys.modules["mmaction.models.localizers.drn.drn"].DRN = type("DRN", (), {})  # type: ignore[attr-defined]
    from mmaction.registry import MODELS
    from mmaction.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    return MODELS


def _i3d(num_classes: int) -> torch.nn.Module:
    backbone = dict(
        type="ResNet3d",
        depth=18,
        base_channels=16,
        pretrained=None,
        pretrained2d=False,
        conv1_kernel=(3, 7, 7),
        conv1_stride_t=1,
        pool1_stride_t=1,
        inflate=((1, 1), (1, 0), (1, 0), (0, 1)),
        conv_cfg=dict(type="Conv3d"),
        norm_cfg=dict(type="BN3d", requires_grad=True),
        norm_eval=False,
        zero_init_residual=False,
    )
    head = dict(
        type="I3DHead",
        num_classes=num_classes,
        in_channels=128,
        spatial_type="avg",
        dropout_ratio=0.5,
        init_std=0.5,
        average_clips="prob",
    )
    pre = dict(type="ActionDataPreprocessor", mean=MEAN, std=STD, format_shape="NCTHW")
    cfg = dict(type="Recognizer3D", backbone=backbone, cls_head=head, data_preprocessor=pre)
    return _build(cfg)


def _tsn(num_classes: int) -> torch.nn.Module:
    head = dict(
        type="TSNHead",
        num_classes=num_classes,
        in_channels=512,
        spatial_type="avg",
        consensus=dict(type="AvgConsensus", dim=1),
        dropout_ratio=0.4,
        init_std=0.5,
        average_clips="prob",
    )
    cfg = dict(
        type="Recognizer2D",
        backbone=dict(type="ResNet", depth=18, pretrained=None, norm_eval=False),
        cls_head=head,
        data_preprocessor=dict(type="ActionDataPreprocessor", mean=MEAN, std=STD),
    )
    return _build(cfg)


def _clip(frames: int, size: int) -> torch.Tensor:
    return torch.randn(2, 3, frames, size, size, generator=torch.Generator().manual_seed(0))


def test_i3d_recognizer_is_exact() -> None:
    from cam_plugin.integrations.mmaction import ActionRecognizerLogits

    torch.manual_seed(0)
    model = _i3d(5)
    x = _clip(8, 64)
    res = cp.CAM(ActionRecognizerLogits(model))(x, targets="all")
    assert res.maps.dim() == 5 and res.maps.shape[:2] == (2, 5) and res.frames == 8
    scale = max(1.0, float(res.logits.abs().max()))
    assert float(res.identity_residual().abs().max()) <= 1e-4 * scale
    with torch.no_grad():
        feats, _ = model.extract_feat(x[:, None])  # the recogniser's own (B, K, T', h, w)
        torch.testing.assert_close(res.logits, model.cls_head(feats))
    expected = torch.einsum("ck,bkthw->bcthw", model.cls_head.fc_cls.weight, feats)
    torch.testing.assert_close(res.maps, expected, rtol=1e-4, atol=1e-5)
    assert res.upsample().boxes().shape == (2, 5, 8, 4)


def test_tsn_recognizer_segments_are_the_time_axis() -> None:
    """TSN: per-segment 2-D maps, averaged by the consensus: a (B, k, T, h, w) space-time map
    whose mean over (segment, x, y) is the logit."""
    from cam_plugin.integrations.mmaction import ActionRecognizerLogits

    torch.manual_seed(0)
    model = _tsn(4)
    x = _clip(3, 64)
    res = cp.CAM(ActionRecognizerLogits(model))(x, targets="all")
    assert res.maps.shape == (2, 4, 3, 2, 2)
    scale = max(1.0, float(res.logits.abs().max()))
    assert float(res.identity_residual().abs().max()) <= 1e-4 * scale
    with torch.no_grad():
        logits = model(x.transpose(1, 2).contiguous(), stage="head")  # (N, segments, C, H, W)
    torch.testing.assert_close(res.logits, logits)
    model.cls_head.consensus = torch.nn.Identity()  # no longer an average of the segments
    with pytest.raises(cp.UnsupportedHeadError, match="not an average"):
        ActionRecognizerLogits(model).__cam_adapter__()


def test_bare_recognizer_is_refused_with_the_wrapper_recipe() -> None:
    from cam_plugin.integrations import mmaction as integration

    model = _i3d(3)
    assert integration.is_mmaction_model(model)
    with pytest.raises(cp.UnsupportedHeadError, match="ActionRecognizerLogits"):
        cp.CAM(model)(_clip(4, 32))
