"""Weakly supervised object localization (WSOL) metrics, as Choe et al. compute them.

The definitions follow Choe et al., CVPR 2020, "Evaluating Weakly Supervised Object
Localization Methods Right", and their reference code (``clovaai/wsolevaluation``,
``evaluation.py``) so that numbers are comparable with published ones:

* boxes come from :func:`cam_plugin.localize.contour_boxes` at every threshold of the sweep
  ``np.arange(0, 1, cam_curve_interval)``;
* box IoU uses inclusive pixel coordinates, ``area = (x1 - x0 + 1) * (y1 - y0 + 1)``;
* an image is correct at threshold ``t`` and IoU level ``d`` when
  ``max over (predicted box, ground-truth box) pairs of IoU >= d``;
* ``BoxAcc(t, d) = 100 * (#correct images) / (#images)``;
* ``MaxBoxAcc = max_t BoxAcc(t, 0.5)`` with the largest contour per threshold;
* ``MaxBoxAccV2 = mean_{d in {0.3, 0.5, 0.7}} max_t BoxAcc(t, d)`` with every contour;
* ``PxAP``: area under the pixel precision-recall curve (their ``MaskEvaluator``).

On top of those, the classic numbers: ``GT-known Loc`` (box correct at IoU 0.5, class
ignored) and ``Top-1 Loc`` (box correct *and* top-1 class correct), both at the threshold
``t*`` that maximizes ``BoxAcc(t, 0.5)`` on the evaluated set (so ``GT-known Loc ==
MaxBoxAcc``) and at a fixed threshold (the paper's 20% by default).

Maps given to the metrics are the maps of the *ground-truth* class (for Top-1 Loc the box of
the predicted class equals that box exactly when the prediction is right), already at image
resolution and min-max normalized to ``[0, 1]``.

Where the parts live: the maps' contract and the contour sweep are
:func:`cam_plugin.localize.as_numpy_maps`, :func:`~cam_plugin.localize.quantize_maps` and
:func:`~cam_plugin.localize.contour_sweep`; the checks of boxes, masks, class ids and sample
ids are :mod:`cam_plugin.wsol_inputs`; the per-sample records (deduplicated by sample id, the
same rule for batches and merged states) are :class:`cam_plugin.wsol_records.RecordStore`.
Wrong types raise ``TypeError``; wrong shapes or values raise
:class:`~cam_plugin.errors.CAMInputError` (a ``ValueError``).
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import Tensor

from .errors import CAMInputError
from .localize import as_numpy_maps, contour_sweep, quantize_maps, threshold_boxes
from .wsol_inputs import (
    check_boxes,
    check_class_ids,
    check_fixed_threshold,
    check_gt_boxes,
    check_iou_levels,
    check_masks,
    check_sample_ids,
)
from .wsol_records import RecordStore

__all__ = [
    "WSOLMetrics",
    "average_precision_from_histograms",
    "best_iou_per_threshold",
    "box_iou",
    "cam_thresholds",
    "evaluate_wsol",
    "mask_histograms",
]

ArrayLike = Union[Tensor, np.ndarray]
BoxesLike = Union[Tensor, np.ndarray, Sequence[Any]]

_STATE_FORMAT = "cam_plugin.WSOLMetrics/1"


def cam_thresholds(cam_curve_interval: float = 0.01) -> np.ndarray:
    """The threshold sweep of Choe et al.: ``np.arange(0, 1, cam_curve_interval)``."""
    if isinstance(cam_curve_interval, bool) or not isinstance(
        cam_curve_interval, (int, float, np.floating)
    ):
        raise TypeError(f"cam_curve_interval must be a float, got {type(cam_curve_interval)!r}.")
    if not 0.0 < float(cam_curve_interval) <= 1.0:
        raise CAMInputError(
            f"cam_curve_interval must be in (0, 1] (Choe et al. use 0.01 or 0.001), got "
            f"{cam_curve_interval}."
        )
    return np.arange(0, 1, float(cam_curve_interval))


# --------------------------------------------------------------------------- boxes


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
    return _box_iou(a, b)


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
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
    ious = _box_iou(np.asarray(boxes, dtype=np.int64), gt).max(axis=1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.maximum.reduceat(ious, starts)


# --------------------------------------------------------------------------- PxAP


def _histogram_edges(thresholds: np.ndarray) -> np.ndarray:
    # Bins [0, bw), ..., [1 - bw, 1), [1, 2), [2, 3] as Choe et al.'s MaskEvaluator.
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
    edges = _histogram_edges(np.asarray(thresholds, dtype=np.float64))
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


# --------------------------------------------------------------------------- accumulator


def _sweep_hits(
    quantized: np.ndarray,
    gt: np.ndarray,
    thresholds: np.ndarray,
    levels: np.ndarray,
    multi_contour: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Whether one image's box is right at every (IoU level, threshold).

    ``hit[l, t] = best(t) >= levels[l]`` with ``best(t)`` from
    :func:`best_iou_per_threshold`: ``(L, T)`` bools for the largest contour (MaxBoxAcc)
    and for every contour (MaxBoxAccV2; the largest again when ``multi_contour`` is off).

    Args:
        quantized: the image's ``uint8`` map (:func:`~cam_plugin.localize.quantize_maps`).
        gt: its ground-truth boxes ``(n, 4)``.
        thresholds: the sweep ``(T,)``.
        levels: IoU levels as fractions ``(L,)``.
        multi_contour: box every contour for the second result.
    """
    found, counts, largest = contour_sweep(quantized, thresholds)
    best_v1 = best_iou_per_threshold(found[largest], np.ones(len(thresholds), np.int64), gt)
    best_v2 = best_iou_per_threshold(found, counts, gt) if multi_contour else best_v1
    return best_v1[None, :] >= levels[:, None], best_v2[None, :] >= levels[:, None]


def _fixed_ious(
    arr: np.ndarray,
    maps: ArrayLike,
    boxes: list[np.ndarray],
    rows: list[int],
    quantized: np.ndarray,
    threshold: float,
    rule: str,
) -> np.ndarray:
    """IoU of each image's box at the fixed threshold with its best ground-truth box.

    ``rule="paper"``: :func:`~cam_plugin.localize.threshold_boxes` on the maps (a tensor
    stays on its device); ``"contour"``: the largest contour at that threshold.
    ``quantized`` holds the ``uint8`` maps of ``rows``, in that order.
    """
    if rule == "paper":
        src = maps if isinstance(maps, Tensor) else torch.from_numpy(arr)
        pred = threshold_boxes(src[rows], threshold).cpu().numpy()
        pred = pred.astype(np.int64).reshape(len(rows), 1, 4)
    else:
        thr = np.asarray([threshold])
        pred = np.empty((len(rows), 1, 4), dtype=np.int64)
        for j in range(len(rows)):
            found, _, largest = contour_sweep(quantized[j], thr)
            pred[j, 0] = found[largest[0]]
    return np.array(
        [_box_iou(pred[j], boxes[i]).max() for j, i in enumerate(rows)], dtype=np.float64
    )


class WSOLMetrics:
    """Accumulates WSOL metrics over batches, data loaders and processes.

    Per sample it keeps a small record keyed by its sample id: for box metrics whether the
    box is correct at every (IoU level, threshold) pair, largest contour (MaxBoxAcc) and all
    contours (MaxBoxAccV2), the IoU at the fixed threshold and whether the class was right;
    for PxAP the two histograms of its map values. A sample id that was already recorded is
    skipped (the first record wins), so the repeats a distributed sampler pads with are
    counted once. Without ``sample_ids`` every row is a new sample. The records live in two
    :class:`~cam_plugin.wsol_records.RecordStore` objects (boxes, masks).

    Across processes: ``state()`` on every rank, gather the states, then
    ``WSOLMetrics(**same_config).merge(states)`` and ``compute()`` once.

    Args:
        cam_curve_interval: step of the threshold sweep ``np.arange(0, 1, step)``.
        iou_thresholds: IoU levels in percent for MaxBoxAccV2 (Choe et al.: 30, 50, 70).
        fixed_threshold: threshold for the ``@fixed`` numbers, a fraction of each map's max
            (default 0.2, the paper's 20%).
        fixed_rule: ``"paper"`` boxes the fixed threshold with
            :func:`~cam_plugin.localize.threshold_boxes` (``>= t * max``, largest 8-connected
            component, tight box), as Zhou et al.; ``"contour"`` uses Choe et al.'s contour
            rule at that threshold (the sweep's rule).
        multi_contour_for_v2: MaxBoxAccV2 boxes every contour (True, Choe et al.'s
            definition) or only the largest.
    """

    def __init__(
        self,
        cam_curve_interval: float = 0.01,
        iou_thresholds: Sequence[int] = (30, 50, 70),
        fixed_threshold: float = 0.2,
        fixed_rule: Literal["paper", "contour"] = "paper",
        multi_contour_for_v2: bool = True,
    ) -> None:
        self.thresholds = cam_thresholds(cam_curve_interval)
        self.cam_curve_interval = float(cam_curve_interval)
        self.iou_thresholds = check_iou_levels(iou_thresholds)
        self._levels = tuple(sorted(set(self.iou_thresholds) | {50}))
        self.fixed_threshold = check_fixed_threshold(fixed_threshold)
        if fixed_rule not in ("paper", "contour"):
            raise CAMInputError(f"fixed_rule must be 'paper' or 'contour', got {fixed_rule!r}.")
        self.fixed_rule = fixed_rule
        self.multi_contour_for_v2 = bool(multi_contour_for_v2)
        self._uid = uuid.uuid4().hex
        self.reset()

    # ------------------------------------------------------------------ bookkeeping

    def reset(self) -> None:
        """Forget every record."""
        self._auto = 0
        n_l, n_t = len(self._levels), len(self.thresholds)
        self._boxes = RecordStore(
            "box_ids",
            {
                "box_hits_v1": ((n_l, n_t), bool),
                "box_hits_v2": ((n_l, n_t), bool),
                "box_iou_fixed": ((), np.float64),
                "box_correct": ((), np.int8),
            },
        )
        self._masks = RecordStore(
            "mask_ids", {"hist_true": ((n_t + 2,), np.int64), "hist_false": ((n_t + 2,), np.int64)}
        )

    def config(self) -> dict[str, Any]:
        """The settings that records depend on (states merge only with equal configs)."""
        return {
            "cam_curve_interval": self.cam_curve_interval,
            "iou_thresholds": list(self.iou_thresholds),
            "fixed_threshold": self.fixed_threshold,
            "fixed_rule": self.fixed_rule,
            "multi_contour_for_v2": self.multi_contour_for_v2,
        }

    @property
    def num_box_samples(self) -> int:
        """Distinct samples with box records."""
        return len(self._boxes)

    @property
    def num_mask_samples(self) -> int:
        """Distinct samples with mask (PxAP) records."""
        return len(self._masks)

    def _sample_ids(self, sample_ids: object, b: int) -> list[Hashable]:
        """The given ids, checked, or ``b`` fresh ids unique to this metric object."""
        if sample_ids is not None:
            return check_sample_ids(sample_ids, b)
        ids: list[Hashable] = [("auto", self._uid, self._auto + i) for i in range(b)]
        self._auto += b
        return ids

    # ------------------------------------------------------------------ update

    def update(
        self,
        maps: ArrayLike,
        gt_boxes: BoxesLike | None = None,
        *,
        labels: ArrayLike | Sequence[int] | None = None,
        pred_classes: ArrayLike | Sequence[int] | None = None,
        gt_masks: ArrayLike | None = None,
        sample_ids: Sequence[Hashable] | ArrayLike | None = None,
    ) -> None:
        """Record a batch.

        Args:
            maps: ``(B, H, W)`` tensor or array, the ground-truth class's map of each image at
                image resolution, min-max normalized to ``[0, 1]``.
            gt_boxes: ground-truth boxes, inclusive ``(x0, y0, x1, y1)``: a list of ``B``
                arrays/tensors ``(n_i, 4)`` (``n_i >= 1``), or one ``(B, 4)`` / ``(B, n, 4)``
                array/tensor. ``None`` records no box metrics (PxAP only).
            labels: ``(B,)`` ground-truth classes (with ``pred_classes``: Top-1 Loc).
            pred_classes: ``(B,)`` predicted top-1 classes, e.g. ``logits.argmax(1)``.
            gt_masks: ``(B, H, W)`` bool masks, or ints 0 / 1 / 255 (background / object /
                ignore) for PxAP.
            sample_ids: ``B`` hashable ids (e.g. dataset indices); repeats are skipped.

        Raises:
            TypeError: an argument of the wrong type.
            CAMInputError: a wrong shape or value (see :mod:`cam_plugin.wsol_inputs`);
                nothing is recorded then.
        """
        arr = as_numpy_maps(maps)
        if arr.ndim != 3:
            hint = " (squeeze the class dim: maps[:, 0])" if arr.ndim == 4 else ""
            raise CAMInputError(
                f"maps must be (B, H, W), one normalized map per image; got shape {arr.shape}"
                f"{hint}."
            )
        b, h, w = arr.shape
        if gt_boxes is None and gt_masks is None:
            raise CAMInputError("update needs gt_boxes (box metrics) and/or gt_masks (PxAP).")
        boxes = check_gt_boxes(gt_boxes, b, h, w) if gt_boxes is not None else None
        if (labels is None) != (pred_classes is None):
            raise CAMInputError(
                "Top-1 Loc needs both labels and pred_classes (or neither for GT-known only)."
            )
        correct: np.ndarray | None = None
        if labels is not None and pred_classes is not None:
            lab = check_class_ids(labels, "labels", b)
            pred = check_class_ids(pred_classes, "pred_classes", b)
            correct = (lab == pred).astype(np.int8)
        if correct is not None and boxes is None:
            raise CAMInputError("labels/pred_classes are used with gt_boxes (Top-1 Loc).")
        masks = check_masks(gt_masks, arr.shape) if gt_masks is not None else None
        ids = self._sample_ids(sample_ids, b)
        if boxes is not None:
            gt = boxes
            self._boxes.record(ids, lambda rows: self._box_records(arr, maps, gt, correct, rows))
        if masks is not None:
            m = masks
            self._masks.record(
                ids,
                lambda rows: dict(
                    zip(
                        ("hist_true", "hist_false"),
                        mask_histograms(arr[rows], m[rows], self.thresholds),
                    )
                ),
            )

    def _box_records(
        self,
        arr: np.ndarray,
        maps: ArrayLike,
        boxes: list[np.ndarray],
        correct: np.ndarray | None,
        rows: list[int],
    ) -> dict[str, np.ndarray]:
        """The box columns of the images ``rows``: hits per (IoU level, threshold) with the
        largest contour (v1) and every contour (v2), the IoU at the fixed threshold, and
        whether the class was right (``-1``: not given)."""
        levels = np.asarray(self._levels, dtype=np.float64) / 100
        quantized = quantize_maps(arr[rows])
        hits = [
            _sweep_hits(quantized[j], boxes[i], self.thresholds, levels, self.multi_contour_for_v2)
            for j, i in enumerate(rows)
        ]
        fixed = _fixed_ious(
            arr, maps, boxes, rows, quantized, self.fixed_threshold, self.fixed_rule
        )
        return {
            "box_hits_v1": np.stack([v1 for v1, _ in hits]),
            "box_hits_v2": np.stack([v2 for _, v2 in hits]),
            "box_iou_fixed": fixed,
            "box_correct": (
                np.full(len(rows), -1, dtype=np.int8) if correct is None else correct[rows]
            ),
        }

    # ------------------------------------------------------------------ distributed

    def state(self) -> dict[str, Any]:
        """A picklable snapshot of every record (numpy arrays and lists) and the config."""
        return {
            "format": _STATE_FORMAT,
            "config": self.config(),
            **self._boxes.state(),
            **self._masks.state(),
        }

    def merge(self, states: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Add the records of other states (e.g. one per rank); known sample ids are skipped."""
        items = [states] if isinstance(states, Mapping) else list(states)
        for st in items:
            if not isinstance(st, Mapping) or st.get("format") != _STATE_FORMAT:
                raise TypeError("merge expects states produced by WSOLMetrics.state().")
            if st["config"] != self.config():
                diff = sorted(k for k in self.config() if st["config"].get(k) != self.config()[k])
                raise CAMInputError(f"cannot merge a state with a different config: {diff}.")
        for st in items:
            self._boxes.merge_state(st)
            self._masks.merge_state(st)

    # ------------------------------------------------------------------ results

    def curves(self) -> dict[str, np.ndarray]:
        """BoxAcc (percent) at every threshold: ``"thresholds"``, ``"BoxAcc@50"`` (largest
        contour) and ``"BoxAccV2@d"`` for each IoU level ``d`` (all contours)."""
        if not len(self._boxes):
            raise CAMInputError("no box records yet: call update(maps, gt_boxes) first.")
        v1 = self._boxes.column("box_hits_v1").mean(axis=0) * 100
        v2 = self._boxes.column("box_hits_v2").mean(axis=0) * 100
        out = {"thresholds": self.thresholds.copy(), "BoxAcc@50": v1[self._levels.index(50)]}
        for d in self.iou_thresholds:
            out[f"BoxAccV2@{d}"] = v2[self._levels.index(d)]
        return out

    def compute(self) -> dict[str, float]:
        """The metrics, in percent (``best_threshold`` is a fraction of the map's max).

        Keys (box records): ``MaxBoxAcc``, ``MaxBoxAccV2``, ``MaxBoxAccV2@d`` per IoU level,
        ``GT-known Loc`` (at ``best_threshold``, equal to MaxBoxAcc), ``GT-known Loc@fixed``,
        ``best_threshold`` (the lowest threshold maximizing BoxAcc at IoU 0.5); with labels and
        predictions also ``Top-1 Loc``, ``Top-1 Loc@fixed`` and ``Top-1 Cls``. Mask records:
        ``PxAP``.
        """
        if not len(self._boxes) and not len(self._masks):
            raise CAMInputError("nothing to compute: call update(...) with at least one batch.")
        out: dict[str, float] = {}
        if len(self._boxes):
            out.update(self._box_metrics())
        if len(self._masks):
            out["PxAP"] = average_precision_from_histograms(
                self._masks.column("hist_true").sum(axis=0),
                self._masks.column("hist_false").sum(axis=0),
            )
        return out

    def _box_metrics(self) -> dict[str, float]:
        """The box keys of :meth:`compute` from the box records."""
        hits_v1 = self._boxes.column("box_hits_v1")
        hits_v2 = self._boxes.column("box_hits_v2")
        i50 = self._levels.index(50)
        acc_v1 = hits_v1[:, i50].mean(axis=0) * 100
        best = int(np.argmax(acc_v1))
        acc_v2 = hits_v2.mean(axis=0) * 100
        per_level = {d: float(acc_v2[self._levels.index(d)].max()) for d in self.iou_thresholds}
        ok_fixed = self._boxes.column("box_iou_fixed") >= 0.5
        out: dict[str, float] = {
            "MaxBoxAcc": float(acc_v1.max()),
            "MaxBoxAccV2": float(np.mean(list(per_level.values()))),
        }
        for d, v in per_level.items():
            out[f"MaxBoxAccV2@{d}"] = v
        out["GT-known Loc"] = float(acc_v1[best])
        out["GT-known Loc@fixed"] = float(ok_fixed.mean() * 100)
        out["best_threshold"] = float(self.thresholds[best])
        correct = self._boxes.column("box_correct")
        known = correct >= 0
        if known.all():
            right = correct == 1
            out["Top-1 Loc"] = float((hits_v1[:, i50, best] & right).mean() * 100)
            out["Top-1 Loc@fixed"] = float((ok_fixed & right).mean() * 100)
            out["Top-1 Cls"] = float(right.mean() * 100)
        elif known.any():
            raise CAMInputError(
                f"labels/pred_classes were given for {int(known.sum())} of {len(known)} "
                "samples; give them for every batch or for none."
            )
        return out


def evaluate_wsol(
    maps: ArrayLike,
    gt_boxes: BoxesLike | None = None,
    *,
    labels: ArrayLike | Sequence[int] | None = None,
    pred_classes: ArrayLike | Sequence[int] | None = None,
    gt_masks: ArrayLike | None = None,
    **config: Any,
) -> dict[str, float]:
    """One-shot :class:`WSOLMetrics`: ``update`` once and ``compute``.

    ``config`` takes the :class:`WSOLMetrics` settings (``cam_curve_interval``,
    ``iou_thresholds``, ``fixed_threshold``, ``fixed_rule``, ``multi_contour_for_v2``).
    """
    metric = WSOLMetrics(**config)
    metric.update(maps, gt_boxes, labels=labels, pred_classes=pred_classes, gt_masks=gt_masks)
    return metric.compute()
