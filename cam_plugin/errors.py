"""Errors raised by cam-plugin.

Every error is raised *before* torch would fail deep inside, and its message says
what was wrong and what to do. They subclass the built-in ``ValueError`` /
``TypeError`` / ``LookupError`` so existing ``except`` clauses keep working.
"""

from __future__ import annotations

__all__ = [
    "AdapterNotFoundError",
    "CAMInputError",
    "UnsupportedHeadError",
]

CONVERT_HINT = (
    "CAM is exact only for 'feature map -> global average pool -> affine head'. "
    "Use cam_plugin.convert(backbone, num_classes=...) to attach a GAP + linear head "
    "(the paper's recipe) and train or fine-tune it."
)


class CAMInputError(ValueError):
    """An input (images, targets, maps, options) is not what cam-plugin accepts."""


class UnsupportedHeadError(ValueError):
    """The model's head is not affine after a global average pool, so CAM is not exact."""


class AdapterNotFoundError(LookupError):
    """No adapter could be resolved for a model; the message lists everything tried."""
