"""The CAM probe's pictures: which classes to draw, the picture to draw them on, and the
strip itself (drawn by :func:`cam_plugin.viz.probe_strip`).

The maps of one image are brought to its original image (:func:`~.geometry.maps_to_original`:
padding cropped, flip undone, resized to ``ori_shape``); the picture is the original image
read from ``img_path`` when there is one, else the network input brought to the same frame.
"""

from __future__ import annotations

import os
import os.path as osp
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cam_plugin.localize import threshold_boxes
from cam_plugin.viz import probe_strip, to_uint8_image

from .geometry import maps_to_original, to_original
from .probe_model import CAMProbe

__all__ = ["classes_to_draw", "input_picture", "probe_picture", "read_picture", "write_png"]


def classes_to_draw(labels: Optional[Tensor], probs: Tensor, max_classes: int) -> Tensor:
    """The classes present in the image (``labels``), by decreasing probability, at most
    ``max_classes``; the probe's top classes when the image has no labels."""
    if labels is not None and labels.numel():
        present = torch.unique(labels.reshape(-1).long().cpu())
        present = present[(present >= 0) & (present < probs.shape[0])]
        order = torch.argsort(probs[present], descending=True, stable=True)
        return present[order][:max_classes]
    return torch.argsort(probs, descending=True, stable=True)[:max_classes]


def read_picture(path: str, backend_args: Optional[dict]) -> Optional[np.ndarray]:
    """The RGB image at ``path`` (read through mmengine's file backends), ``None`` when it
    cannot be decoded; I/O errors propagate."""
    import cv2
    from mmengine.fileio import get

    buf = np.frombuffer(get(path, backend_args=backend_args), np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return None if img is None else np.ascontiguousarray(img[:, :, ::-1])


def input_picture(
    inputs: Optional[Tensor], input_hw: Sequence[int], meta: Mapping[str, Any], bgr: bool
) -> np.ndarray:
    """The network input ``(C, H, W)`` of one image brought to its original frame and
    min-max scaled to uint8 (black at ``ori_shape`` when the input was not kept); ``bgr``:
    the input is in BGR order."""
    if inputs is None:
        h, w = meta.get("ori_shape", input_hw)
        return np.zeros((int(h), int(w), 3), np.uint8)
    img = to_original(inputs.float(), input_hw, meta)
    return to_uint8_image(img, bgr=bgr, value_range="minmax")


def probe_picture(
    probe: CAMProbe,
    features: Tensor,
    classes: Tensor,
    captions: Sequence[str],
    base: np.ndarray,
    input_hw: Sequence[int],
    meta: Mapping[str, Any],
    *,
    threshold: Optional[float],
    alpha: float,
    colormap: str,
) -> np.ndarray:
    """The strip of one image: ``base``, then the CAM of each of ``classes`` over it.

    Args:
        probe: the probe (its weights give ``M_c = Σ_k w_ck f_k``).
        features: the image's map ``(1, K, h, w)``.
        classes: ``(n,)`` classes to draw.
        captions: one text per class.
        base: the picture (resized to the maps' frame when it differs).
        input_hw: ``(H, W)`` of the batch tensor.
        meta: the sample's metainfo.
        threshold: the paper's box threshold, or ``None`` for no box.
        alpha: heat-map weight.
        colormap: matplotlib colormap name.
    """
    with torch.no_grad():
        maps = probe.maps(features, classes[None].to(features.device))[0]
        maps = maps_to_original(maps, input_hw, meta).cpu()
    if base.shape[:2] != tuple(maps.shape[-2:]):
        base = np.asarray(Image.fromarray(base).resize((maps.shape[-1], maps.shape[-2])))
    boxes = threshold_boxes(maps, threshold) if threshold is not None else None
    return probe_strip(base, maps, captions, boxes=boxes, alpha=alpha, colormap=colormap)


def write_png(folder: str, name: str, picture: np.ndarray) -> None:
    """Write an RGB picture to ``{folder}/{name}.png`` (the folder is created)."""
    import cv2

    os.makedirs(folder, exist_ok=True)
    cv2.imwrite(osp.join(folder, f"{name}.png"), picture[:, :, ::-1])
