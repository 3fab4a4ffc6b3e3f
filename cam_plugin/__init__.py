"""cam-plugin: exact Class Activation Mapping (Zhou et al., CVPR 2016) for the frameworks
people train with.

    import cam_plugin as cp
    with cp.CAM(model) as cam:
        res = cam(images, topk=1)
    boxes = res.upsample().normalize().boxes(threshold=0.2)

For a feature map ``f_k(x, y)``, global average pooling and an affine head ``w_k^c``,
``b_c``: ``M_c(x, y) = Σ_k w_k^c f_k(x, y)`` and ``mean_xy M_c + b_c == S_c`` exactly.

Importing this package imports torch and numpy only: framework integrations
(timm, torchvision, OpenMMLab, Captum) load on first use.
"""

from __future__ import annotations

from typing import Any

from .adapter import Adapter
from .cam import CAM, parse_targets
from .convert import convert  # eager: the submodule must not shadow the function
from .discovery import discover
from .errors import AdapterNotFoundError, CAMInputError, UnsupportedHeadError
from .heads import FoldedHead, fold_head
from .hooks import FeatureCapture, count_hooks
from .layout import FeatureLayout
from .registry import register_adapter, registered_adapters, resolve
from .result import CAMResult, MapScale, minmax_normalize

__version__ = "0.1.0"

__all__ = [
    "CAM",
    "Adapter",
    "AdapterNotFoundError",
    "CAMInputError",
    "CAMModule",
    "CAMResult",
    "BranchSpec",
    "ConcatBranchAdapter",
    "MapScale",
    "ClutteredDigits",
    "WSOLMetrics",
    "FeatureCapture",
    "FeatureLayout",
    "FoldedHead",
    "UnsupportedHeadError",
    "__version__",
    "box_iou",
    "contour_boxes",
    "convert",
    "count_hooks",
    "discover",
    "evaluate_wsol",
    "export_onnx",
    "fold_head",
    "masks",
    "minmax_normalize",
    "parse_targets",
    "register_adapter",
    "registered_adapters",
    "resolve",
    "threshold_boxes",
    "topk_boxes",
    "paper_top5_boxes",
]


# names whose modules load on first use, so `import cam_plugin` stays light (no cv2, sklearn)
_LAZY = {
    "threshold_boxes": "localize",
    "contour_boxes": "localize",
    "topk_boxes": "localize",
    "paper_top5_boxes": "localize",
    "masks": "localize",
    "WSOLMetrics": "metrics",
    "evaluate_wsol": "metrics",
    "box_iou": "metrics",
    "ClutteredDigits": "data",
    "CAMModule": "export",
    "BranchSpec": "branches",
    "ConcatBranchAdapter": "branches",
    "export_onnx": "export",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cam_plugin' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
