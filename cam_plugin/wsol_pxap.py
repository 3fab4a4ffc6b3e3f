"""PxAP, the pixel-level metric of Choe et al. (CVPR 2020): histograms and average precision.

Their ``MaskEvaluator``: per image, histograms of the map's values on object and on
background pixels over the threshold sweep (pixels marked
:data:`~cam_plugin.wsol_inputs.MASK_IGNORE` left out); summed over images, the
precision-recall curve of "pixel above threshold" against "object pixel", and the area
under it. :class:`cam_plugin.metrics.WSOLMetrics` keeps the two
histograms per sample and calls :func:`average_precision_from_histograms` on their sums.
"""

from __future__ import annotations

from typing import Union

import numpy as np
from torch import Tensor

from .errors import CAMInputError
from .wsol_contours import as_numpy_maps
from .wsol_inputs import check_masks

__all__ = ["average_precision_from_histograms", "histogram_edges", "mask_histograms"]

ArrayLike = Union[Tensor, np.ndarray]


def histogram_edges(thresholds: np.ndarray) -> np.ndarray:
    """Bin edges of the PxAP histograms: the sweep plus ``1, 2, 3``, i.e. bins
    ``[t_0, t_1), ..., [t_{T-1}, 1), [1, 2), [2, 3]`` as Choe et al.'s ``MaskEvaluator``."""
    return np.append(thresholds, [1.0, 2.0, 3.0])


def mask_histograms(
    maps: ArrayLike, gt_masks: ArrayLike, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image histograms of map values on object and background pixels.

    Bins are ``[t_0, t_1), ..., [t_{T-1}, 1), [1, 2), [2, 3]`` (``np.histogram`` on the
    sweep plus ``1, 2, 3``). Pixels marked 255 (ignore) are left out.

    Args:
        maps: ``(B, H, W)`` values in ``[0, 1]``.
        gt_masks: ``(B, H, W)`` bool, or ints with 0 / 1 / 255 = background / object / ignore.
        thresholds: the sweep, ``(T,)``.

    Returns:
        ``(hist_object, hist_background)``, two int64 arrays ``(B, T + 2)``.
    """
    arr = as_numpy_maps(maps)
    if arr.ndim != 3:
        raise CAMInputError(f"maps must be (B, H, W); got shape {arr.shape}.")
    m = check_masks(gt_masks, arr.shape)
    edges = histogram_edges(np.asarray(thresholds, dtype=np.float64))
    nbins = len(edges) - 1
    b = arr.shape[0]
    # Left-closed bins as np.histogram (values are <= 1 < last edge, so no closing needed).
    bins = np.searchsorted(edges, arr.reshape(b, -1), side="right") - 1
    bins = np.clip(bins, 0, nbins - 1) + (np.arange(b) * nbins)[:, None]
    flat_m = m.reshape(b, -1)
    size = b * nbins
    hist_true = np.bincount(bins[flat_m == 1], minlength=size).reshape(b, nbins)
    hist_false = np.bincount(bins[flat_m == 0], minlength=size).reshape(b, nbins)
    return hist_true.astype(np.int64), hist_false.astype(np.int64)


def average_precision_from_histograms(
    hist_object: np.ndarray, hist_background: np.ndarray
) -> float:
    """PxAP (percent) from summed histograms, as Choe et al.'s ``MaskEvaluator.compute``.

    Sweeping the threshold from high to low: ``TP = cumsum(hist_object reversed)``,
    ``FP = cumsum(hist_background reversed)``, ``FN = #object - TP``; precision
    ``P = TP / (TP + FP)``, recall ``R = TP / #object``, and
    ``PxAP = 100 * sum_i P_i (R_i - R_{i-1})`` over the points where ``TP + FP > 0``.

    Raises:
        ValueError: no object pixel at all, or no pixel at all.
    """
    hist_t = np.asarray(hist_object, dtype=np.float64)
    hist_f = np.asarray(hist_background, dtype=np.float64)
    num_true = hist_t.sum()
    tp = hist_t[::-1].cumsum()
    fn = num_true - tp
    fp = hist_f[::-1].cumsum()
    if ((tp + fn) <= 0).all():
        raise CAMInputError("PxAP needs object pixels: every ground-truth mask is empty.")
    if ((tp + fp) <= 0).all():
        raise CAMInputError("PxAP needs pixels: no map value was counted.")
    non_zero = (tp + fp) != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = tp / (tp + fp)
        recall = tp / (tp + fn)
    return float((precision[1:] * np.diff(recall))[non_zero[1:]].sum() * 100)
