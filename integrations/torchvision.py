"""torchvision adapters.

torchvision classifiers are resolved by the generic probe at their input size
(299 for Inception v3, 224 otherwise). ResNet / ResNeXt / Wide ResNet, DenseNet
(whose forward applies ``F.relu`` before the pool, which the probe detects), EfficientNet,
ConvNeXt (LayerNorm head, folded exactly), RegNet, MobileNetV2, ShuffleNetV2,
GoogLeNet and Inception v3 (eval mode) resolve. VGG, AlexNet and MobileNetV3 have
non-linear MLP heads after the pool and are refused with the ``convert`` hint.
"""

from __future__ import annotations

from typing import Optional

import torchvision  # noqa: F401  (the integration is for torchvision models)
from torch import nn

from cam_plugin.adapter import Adapter
from cam_plugin.discovery import discover, guess_input_size
from cam_plugin.registry import register_adapter

__all__ = ["is_torchvision_model", "torchvision_adapter"]


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
