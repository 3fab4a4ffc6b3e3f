"""mmpretrain: ``ImageClassifier`` (and any mmpretrain classifier with a ``backbone`` /
``neck`` / ``head``) resolves in the registry.

The feature map is the input of the last call of the ``GlobalAveragePooling`` neck's
``gap``; the head is folded from a head-only probe and must reproduce the head's output
(distillation heads that average two affine branches are folded branch by branch); models
without a 2-D GAP neck go through the generic discovery at :func:`model_input_size`.
The details are in :mod:`cam_plugin.integrations.mm.pretrain_adapter`. ``CAM(model)``
expects images *after* ``model.data_preprocessor``.

Importing this module (the registry does it when it meets an mmpretrain model) registers
the adapter; the mmengine hook and metric for training runs come with
``cam_plugin.integrations.mmengine``.
"""

from __future__ import annotations

from cam_plugin.adapter import BranchAverageAdapter
from cam_plugin.registry import register_adapter

from .mm.pretrain_adapter import is_mmpretrain_model, mmpretrain_adapter, model_input_size

__all__ = [
    "BranchAverageAdapter",
    "is_mmpretrain_model",
    "mmpretrain_adapter",
    "model_input_size",
]

register_adapter(is_mmpretrain_model, mmpretrain_adapter, name="mmpretrain")
