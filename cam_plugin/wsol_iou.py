"""Box IoU as Choe et al. compute it (``calculate_multiple_iou``), inclusive coordinates.

``area(b) = (x1 - x0 + 1) * (y1 - y0 + 1)``; an image is right at an IoU level ``d`` when the
best (predicted box, ground-truth box) pair reaches ``d``. Used by
:class:`cam_plugin.metrics.WSOLMetrics` (and re-exported there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np
from torch import Tensor

from .errors import CAMInputError
from .wsol_inputs import check_boxes

__all__ = ["best_iou_per_threshold", "box_iou", "pairwise_iou"]

BoxesLike = Union[Tensor, np.ndarray, Sequence[Any]]


def box_iou(boxes_a: BoxesLike, boxes_b: BoxesLike) -> np.ndarray:
    """Pairwise IoU of inclusive-coordinate boxes (Choe et al.'s ``calculate_multiple_iou``).

    ``area(b) = (x1 - x0 + 1) * (y1 - y0 + 1)``, intersection
    ``max(0, min(x1) - max(x0) + 1) * max(0, min(y1) - max(y0) + 1)``,
    ``IoU = inter / (area_a + area_b - inter)`` (0 where the denominator is ``<= 0``).

    Args:
        boxes_a: ``(n, 4)`` or ``(4,)`` boxes ``(x0, y0, x1, y1)``.
        boxes_b: ``(m, 4)`` or ``(4,)`` boxes.

    Returns:
        float64 array ``(n, m)``.
    """
    a = check_boxes(boxes_a, "boxes_a", allow_empty=True)
    b = check_boxes(boxes_b, "boxes_b", allow_empty=True)
    return pairwise_iou(a, b)


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """:func:`box_iou` of boxes already checked (int64 ``(n, 4)`` and ``(m, 4)``), ``(n, m)``."""
    ax0, ay0, ax1, ay1 = (a[:, i : i + 1] for i in range(4))
    bx0, by0, bx1, by1 = (b[None, :, i] for i in range(4))
    inter_w = np.maximum(0, np.minimum(ax1, bx1) - np.maximum(ax0, bx0) + 1)
    inter_h = np.maximum(0, np.minimum(ay1, by1) - np.maximum(ay0, by0) + 1)
    inter = inter_w * inter_h
    area_a = (ax1 - ax0 + 1) * (ay1 - ay0 + 1)
    area_b = (bx1 - bx0 + 1) * (by1 - by0 + 1)
    denominator = area_a + area_b - inter
    safe = np.where(denominator > 0, denominator, 1)
    return np.where(denominator > 0, inter / safe, 0.0).astype(np.float64)


def best_iou_per_threshold(
    boxes: np.ndarray, counts: np.ndarray, gt_boxes: BoxesLike
) -> np.ndarray:
    """Best IoU at each threshold between that threshold's boxes and any ground-truth box.

    ``best[t] = max_{p in boxes of t, g in gt} IoU(p, g)``, the quantity Choe et al. compare
    to the IoU level.

    Args:
        boxes: ``(n_total, 4)`` boxes of all thresholds (``ContourBoxes.boxes``).
        counts: ``(T,)`` boxes per threshold (``ContourBoxes.counts``, all ``>= 1``).
        gt_boxes: ``(m, 4)`` ground-truth boxes, ``m >= 1``.

    Returns:
        float64 ``(T,)``.
    """
    gt = check_boxes(gt_boxes, "gt_boxes")
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 1).any() or counts.sum() != len(boxes):
        raise CAMInputError("counts must be (T,) positive ints summing to len(boxes).")
    ious = pairwise_iou(np.asarray(boxes, dtype=np.int64), gt).max(axis=1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.maximum.reduceat(ious, starts)
