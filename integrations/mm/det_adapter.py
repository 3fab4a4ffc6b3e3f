"""How the registry treats mmdet models: it refuses them, naming what works.

A detector or a detection backbone ends in no ``GAP -> affine`` image classifier, so it has
no exact CAM as it is; :func:`mmdet_adapter` says so and names the two routes
(:func:`cam_plugin.convert` for a backbone, the CAM probe inside a detection run).
``cam_plugin.integrations.mmdet`` registers it.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from cam_plugin.adapter import Adapter
from cam_plugin.errors import UnsupportedHeadError

__all__ = ["is_mmdet_model", "mmdet_adapter"]


def is_mmdet_model(model: nn.Module) -> bool:
    """True when the model's class comes from mmdet."""
    return type(model).__module__.split(".")[0] == "mmdet"


def mmdet_adapter(model: nn.Module) -> Optional[Adapter]:
    """Refuse mmdet models with a message naming what works.

    mmdet backbones and detectors end in no ``GAP -> affine`` image classifier, so no
    exact CAM exists for them as they are.

    Raises:
        UnsupportedHeadError: always, naming :func:`cam_plugin.convert` and
            :class:`~.probe_hook.CAMProbeHook`.
    """
    name = type(model).__name__
    raise UnsupportedHeadError(
        f"mmdet's {name} has no image classifier (global average pool -> linear layer), so "
        "it has no class activation map as it is. For a backbone: "
        "cam_plugin.convert(backbone, num_classes=..., stage=...) attaches a GAP + linear "
        "head to one of its stage maps; train it on image-level labels. Inside a detection "
        "run: add dict(type='CAMProbeHook') to custom_hooks (with custom_imports="
        "dict(imports=['cam_plugin.integrations.mmdet'])) to train a CAM probe on the "
        "detector's own features."
    )
