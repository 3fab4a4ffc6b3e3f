"""What the WSOL metrics (:mod:`cam_plugin.metrics`) accept: boxes, masks, class ids, sample ids.

Each function turns one argument into the numpy form the metrics compute with, or raises
before anything is recorded: :class:`TypeError` for a wrong type, and
:class:`~cam_plugin.errors.CAMInputError` (a ``ValueError``) for a wrong shape or value, with
a message that says what to fix.

Conventions (Choe et al., CVPR 2020, and ``docs/localization.md``):

* boxes are ``(x0, y0, x1, y1)`` in *inclusive* integer pixel coordinates, ``x`` the column
  and ``y`` the row; ``(x, y, w, h)`` converts with ``x1 = x + w - 1``, ``y1 = y + h - 1``;
* masks are bool, or integers with ``0`` background, ``1`` object and ``255``
  (:data:`MASK_IGNORE`) ignored;
* class ids and sample ids have one entry per image of the batch;
* IoU levels are integer percents, the fixed threshold a fraction of each map's maximum.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from .errors import CAMInputError

__all__ = [
    "MASK_IGNORE",
    "check_boxes",
    "check_class_ids",
    "check_fixed_threshold",
    "check_gt_boxes",
    "check_iou_levels",
    "check_masks",
    "check_sample_ids",
    "check_top5_classes",
    "to_numpy",
]

MASK_IGNORE = 255
"""Mask value of pixels left out of PxAP."""


def to_numpy(x: object) -> np.ndarray:
    """A tensor (detached, on the CPU) or array-like as a numpy array (no dtype change)."""
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def check_boxes(boxes: object, name: str, allow_empty: bool = False) -> np.ndarray:
    """Boxes as int64 ``(n, 4)``, checked for the inclusive ``(x0, y0, x1, y1)`` convention.

    A single box ``(4,)`` becomes ``(1, 4)``. Float boxes are accepted when they hold whole
    numbers. ``n = 0`` is refused unless ``allow_empty`` (a ground-truth box set must not be
    empty: the image could not be scored).

    Raises:
        TypeError: not array-like, or not integer / float coordinates.
        CAMInputError: not ``(n, 4)``, non-whole numbers, empty, negative, or ``x1 < x0`` /
            ``y1 < y0``.
    """
    try:
        arr = to_numpy(boxes)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{name} must be an array-like of boxes (n, 4), got {type(boxes)!r}."
        ) from exc
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr.reshape(1, 4)
    if arr.ndim == 1 and arr.size == 0 and allow_empty:
        arr = arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise CAMInputError(
            f"{name} must have shape (n, 4) (x0, y0, x1, y1) or (4,); got shape {arr.shape}."
        )
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise TypeError(f"{name} must hold integer pixel coordinates, got dtype {arr.dtype}.")
    is_float = np.issubdtype(arr.dtype, np.floating)
    if is_float and (not np.isfinite(arr).all() or (arr != np.round(arr)).any()):
        raise CAMInputError(
            f"{name} must hold whole-number inclusive pixel coordinates; got non-integer "
            "values. Round them (e.g. floor x0/y0 and ceil-1 exclusive x1/y1) first."
        )
    arr = arr.astype(np.int64)
    if arr.shape[0] == 0 and not allow_empty:
        raise CAMInputError(
            f"{name} is empty: every image needs at least one ground-truth box to be scored; "
            "leave images without boxes out of box metrics."
        )
    if (arr < 0).any():
        raise CAMInputError(f"{name} has negative coordinates; boxes are pixel indices >= 0.")
    if (arr[:, 2] < arr[:, 0]).any() or (arr[:, 3] < arr[:, 1]).any():
        raise CAMInputError(
            f"{name} has boxes with x1 < x0 or y1 < y0; boxes must be (x0, y0, x1, y1) with "
            "inclusive corners (convert (x, y, w, h) with x1 = x + w - 1, y1 = y + h - 1)."
        )
    return arr


def check_gt_boxes(gt_boxes: object, b: int, h: int, w: int) -> list[np.ndarray]:
    """The ground-truth boxes of a batch of ``b`` maps of ``h x w``: one int64 ``(n_i, 4)``
    array per image (``n_i >= 1``), every box inside the map.

    Args:
        gt_boxes: a list of ``b`` box sets ``(n_i, 4)``, or one ``(b, 4)`` / ``(b, n, 4)``
            array or tensor.
        b: the maps' batch size.
        h: their height.
        w: their width.
    """
    if isinstance(gt_boxes, (Tensor, np.ndarray)):
        arr = to_numpy(gt_boxes)
        if arr.ndim == 2 and arr.shape[1] == 4:
            items: list[Any] = [arr[i : i + 1] for i in range(arr.shape[0])]
        elif arr.ndim == 3 and arr.shape[2] == 4:
            items = list(arr)
        else:
            raise CAMInputError(
                f"gt_boxes as one array must be (B, 4) or (B, n, 4); got {arr.shape}. Pass "
                "a list of (n_i, 4) arrays when images have different numbers of boxes."
            )
    elif isinstance(gt_boxes, Sequence) and not isinstance(gt_boxes, (str, bytes)):
        items = list(gt_boxes)
    else:
        raise TypeError(
            f"gt_boxes must be a list of B (n_i, 4) boxes or a (B, n, 4) array/tensor; got "
            f"{type(gt_boxes)!r}."
        )
    if len(items) != b:
        raise CAMInputError(
            f"gt_boxes has {len(items)} entries for a batch of {b} maps; give one (n_i, 4) "
            "set of boxes per image."
        )
    out = []
    for i, item in enumerate(items):
        box = check_boxes(item, f"gt_boxes[{i}]")
        if (box[:, 2] >= w).any() or (box[:, 3] >= h).any():
            raise CAMInputError(
                f"gt_boxes[{i}] reaches past the {w}x{h} map: inclusive boxes need "
                f"x1 <= {w - 1} and y1 <= {h - 1} (exclusive x1/y1 must be reduced by 1; "
                "boxes must be at the maps' resolution)."
            )
        out.append(box)
    return out


def check_masks(gt_masks: object, shape: tuple[int, ...]) -> np.ndarray:
    """Masks as uint8 of the maps' ``shape`` with 0 = background, 1 = object, 255 = ignore.

    Bool masks become 0 / 1; integer masks must hold only 0, 1 and :data:`MASK_IGNORE`.
    """
    arr = to_numpy(gt_masks)
    if arr.shape != shape:
        raise CAMInputError(
            f"gt_masks must have the maps' shape {shape} (B, H, W); got {arr.shape}. Resize "
            "masks with nearest-neighbour interpolation to the image resolution."
        )
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"gt_masks must be bool, or integers with 0 = background, 1 = object, 255 = ignore; "
            f"got dtype {arr.dtype}."
        )
    bad = ~np.isin(arr, (0, 1, MASK_IGNORE))
    if bad.any():
        raise CAMInputError(
            "gt_masks holds values other than 0 (background), 1 (object) and 255 (ignore): "
            f"found {np.unique(arr[bad])[:5].tolist()}."
        )
    return arr.astype(np.uint8)


def check_class_ids(x: object, name: str, b: int) -> np.ndarray:
    """``(b,)`` integer class ids (labels or predictions) as int64."""
    arr = to_numpy(x)
    if arr.shape != (b,):
        hint = " (pass logits.argmax(1) for predictions)" if arr.ndim == 2 else ""
        raise CAMInputError(f"{name} must have shape (B,) = ({b},); got {arr.shape}{hint}.")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class ids, got dtype {arr.dtype}.")
    return arr.astype(np.int64)


def check_top5_classes(x: object, b: int) -> np.ndarray:
    """``(b, 5)`` integer class ids, each row the five best predictions, best first (e.g.
    ``logits.topk(5).indices``), as int64."""
    arr = to_numpy(x)
    if arr.shape != (b, 5):
        raise CAMInputError(
            f"top5_classes must have shape (B, 5) = ({b}, 5), the five best classes of each "
            f"image best first (logits.topk(5).indices); got {arr.shape}."
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"top5_classes must hold integer class ids, got dtype {arr.dtype}.")
    return arr.astype(np.int64)


def check_sample_ids(sample_ids: object, b: int) -> list[Hashable]:
    """``b`` hashable sample ids (a 1-D tensor / array, or a sequence such as a list of
    dataset indices or file names) as a list."""
    if isinstance(sample_ids, (Tensor, np.ndarray)):
        raw = to_numpy(sample_ids)
        if raw.ndim != 1:
            raise CAMInputError(f"sample_ids must be 1-D (B,); got shape {raw.shape}.")
        out = list(raw.tolist())
    elif isinstance(sample_ids, Sequence) and not isinstance(sample_ids, (str, bytes)):
        out = list(sample_ids)
    else:
        raise TypeError(
            f"sample_ids must be a sequence of B hashable ids (ints or strings), got "
            f"{type(sample_ids)!r}."
        )
    if len(out) != b:
        raise CAMInputError(f"sample_ids has {len(out)} ids for a batch of {b} maps.")
    for s in out:
        if not isinstance(s, Hashable):
            raise TypeError(f"sample id {s!r} is not hashable; use ints or strings.")
    return out


def check_iou_levels(iou_thresholds: Sequence[int]) -> tuple[int, ...]:
    """IoU levels (``WSOLMetrics(iou_thresholds=...)``) as integer percents in ``(0, 100]``,
    e.g. ``(30, 50, 70)``."""
    levels = [int(d) for d in iou_thresholds]
    if (
        not levels
        or any(not 0 < d <= 100 for d in levels)
        or any(d != float(v) for d, v in zip(levels, iou_thresholds))
    ):
        raise CAMInputError(
            f"iou_thresholds must be a non-empty sequence of integer percents in (0, 100], "
            f"e.g. (30, 50, 70); got {tuple(iou_thresholds)!r}."
        )
    return tuple(levels)


def check_fixed_threshold(fixed_threshold: object) -> float:
    """The fixed threshold (``WSOLMetrics(fixed_threshold=...)``), a fraction of each map's
    max in ``[0, 1]``, as a float."""
    if (
        isinstance(fixed_threshold, bool)
        or not isinstance(fixed_threshold, (int, float, np.floating))
        or not 0.0 <= float(fixed_threshold) <= 1.0
    ):
        raise CAMInputError(
            f"fixed_threshold must be a fraction of each map's max in [0, 1], got "
            f"{fixed_threshold!r}."
        )
    return float(fixed_threshold)
