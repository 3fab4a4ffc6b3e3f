"""torchvision adapters.

torchvision classifiers are resolved by the generic probe at their input size
(299 for Inception v3, 224 otherwise). ResNet / ResNeXt / Wide ResNet, DenseNet
(whose forward applies ``F.relu`` before the pool, which the probe detects), EfficientNet,
ConvNeXt (LayerNorm head, folded exactly), RegNet, MobileNetV2, ShuffleNetV2,
GoogLeNet and Inception v3 (eval mode) resolve. VGG, AlexNet and MobileNetV3 have
non-linear MLP heads after the pool and are refused with the ``convert`` hint.

:func:`torchvision_trunk` cuts a torchvision classifier for :func:`cam_plugin.convert`:
its layers before the first pooling / classifier layer run in order (``features``,
``trunk_output``, ``layers`` are opened up by :func:`cam_plugin.trunks.sequential_trunk`);
auxiliary classifiers are dropped; GoogLeNet / Inception v3's ``transform_input`` and
DenseNet's final ``F.relu`` (code in their ``forward``, not layers) are kept as modules.

Video classifiers (``torchvision.models.video``) are cut the same way: ``r3d_18``,
``mc3_18``, ``r2plus1d_18`` (``stem``, ``layer1`` .. ``layer4``; stages by spatial stride:
``0`` layer1 /2 ... ``3`` layer4 /16) and ``s3d`` (``features`` opened up) return
``(B, K, T', h, w)`` maps; ``swin3d_*`` supports ``stage=-1`` only (its blocks are
channels-last: the trunk ends with its ``norm`` and :class:`ChannelsFirst`). ``mvit``
(class token) has no space-time map to convert.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torchvision  # noqa: F401  (the integration is for torchvision models)
from torch import Tensor, nn

from cam_plugin.adapter import Adapter
from cam_plugin.discovery import discover, guess_input_size
from cam_plugin.errors import CAMInputError
from cam_plugin.registry import register_adapter
from cam_plugin.trunks import Trunk, register_trunk_builder, sequential_trunk

__all__ = [
    "ChannelsFirst",
    "InputTransform",
    "children_before_head",
    "is_torchvision_model",
    "torchvision_adapter",
    "torchvision_trunk",
]


def is_torchvision_model(model: nn.Module) -> bool:
    """True when the model's class comes from ``torchvision.models``."""
    return type(model).__module__.startswith("torchvision.models")


def torchvision_adapter(model: nn.Module) -> Optional[Adapter]:
    """Adapter for a torchvision classifier, or ``None`` for other models."""
    if not is_torchvision_model(model):
        return None
    name = type(model).__name__
    size = (3, 299, 299) if name == "Inception3" else guess_input_size(model)
    return discover(model, input_size=size, name=f"torchvision:{name}")


register_adapter(is_torchvision_model, torchvision_adapter, name="torchvision")


# ------------------------------------------------------------------------ convert: trunks

#: children that start a torchvision classifier's head (the trunk ends before the first)
HEAD_NAMES = frozenset({"avgpool", "fc", "classifier", "head", "heads", "global_pool", "dropout"})
HEAD_TYPES = (
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool3d,
    nn.Linear,
    nn.Flatten,
)
#: ImageNet statistics; ``transform_input=True`` re-expresses them as ``mean = std = 0.5``
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: token models whose stages are not NCHW maps: only their whole trunk can be used
TOKEN_MODELS = frozenset(
    {"VisionTransformer", "SwinTransformer", "MaxVit", "SwinTransformer3d", "MViT"}
)
#: video models whose trunk output is channels-last ``(B, T, h, w, K)`` (their forward
#: permutes it in code, after ``norm``)
CHANNELS_LAST_VIDEO = frozenset({"SwinTransformer3d"})


class ChannelsFirst(nn.Module):
    """``(B, T, h, w, K) -> (B, K, T, h, w)`` (Video Swin's forward does this permute in code
    before its pool)."""

    def forward(self, x: Tensor) -> Tensor:
        """The permuted view."""
        return x.permute(0, 4, 1, 2, 3)


class InputTransform(nn.Module):
    """Per-channel affine map ``x_c · a_c + b_c`` (torchvision GoogLeNet / Inception v3 apply
    one when ``transform_input=True``: ImageNet normalization re-expressed as ``mean = std
    = 0.5``)."""

    def __init__(self, scale: Sequence[float], shift: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(list(scale)).view(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor(list(shift)).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """``x · scale + shift``."""
        return x * self.scale + self.shift  # type: ignore[operator]


def children_before_head(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's children up to (not including) the first head layer, without auxiliary
    classifiers (GoogLeNet / Inception v3 run those in training only)."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if name.lower().startswith("aux"):
            continue
        if name in HEAD_NAMES or isinstance(child, HEAD_TYPES):
            break
        out.append((name, child))
    return out


def torchvision_trunk(model: nn.Module, stage: Union[int, str], x: Tensor) -> Optional[Trunk]:
    """The trunk of a torchvision classifier for :func:`cam_plugin.convert` (module doc), or
    ``None`` for a string ``stage`` (left to the generic trunks).

    Raises:
        CAMInputError: ``stage != -1`` on a ViT / Swin / MaxViT (their stages are tokens).
    """
    if not is_torchvision_model(model) or not isinstance(stage, int):
        return None
    name = type(model).__name__
    if name in TOKEN_MODELS and stage != -1:
        raise CAMInputError(
            f"torchvision {name} supports only stage=-1 here (its stages are not NCHW "
            "maps); timm's versions with features_only=True give NCHW stages"
        )
    if name == "MViT":
        raise CAMInputError(
            "torchvision MViT classifies from its class token and has no space-time feature "
            "map to convert; convert a 3-D CNN (r3d_18, mc3_18, r2plus1d_18, s3d) or swin3d"
        )
    prefix: list[tuple[str, nn.Module]] = []
    if getattr(model, "transform_input", False) is True:
        scale = [s / 0.5 for s in IMAGENET_STD]
        shift = [(m - 0.5) / 0.5 for m in IMAGENET_MEAN]
        prefix.append(("transform_input", InputTransform(scale, shift)))
    tail: list[tuple[str, nn.Module]] = []
    if name == "DenseNet":
        tail = [("relu", nn.ReLU(inplace=False))]
    elif name in CHANNELS_LAST_VIDEO:
        tail = [("channels_first", ChannelsFirst())]
    trunk = sequential_trunk(
        model, children_before_head(model), stage, x, "torchvision", prefix=prefix, tail=tail
    )
    if name in CHANNELS_LAST_VIDEO:
        trunk.stages = ()  # its blocks' outputs are channels-last, not selectable stages
    return trunk


register_trunk_builder(is_torchvision_model, torchvision_trunk, name="torchvision")
