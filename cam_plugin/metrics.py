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
MaxBoxAcc``) and at a fixed threshold (the paper's 20% by default); with the top-5
predictions, Zhou et al.'s ``Top-5 Loc`` (the label among the top 5 and its box correct) and
``Top-5 error``, with the paper's one box per class and with its Sec. 3.2 heuristic (a tight
and a loose box for the top-1 and top-2 classes, a loose box for the top-3 class;
:func:`cam_plugin.localize.paper_top5_boxes`).

Maps given to the metrics are the maps of the *ground-truth* class (for Top-1 Loc the box of
the predicted class equals that box exactly when the prediction is right), already at image
resolution and min-max normalized to ``[0, 1]``.

Where the parts live: the maps' contract and the contour sweeps are
:mod:`cam_plugin.wsol_contours` (:func:`~cam_plugin.wsol_contours.contour_values`,
:func:`~cam_plugin.wsol_contours.contour_sweeps`); PxAP's histograms are
:mod:`cam_plugin.wsol_pxap` (re-exported here); the checks of boxes, masks, class ids and sample
ids are :mod:`cam_plugin.wsol_inputs`; the per-sample records (deduplicated by sample id, the
same rule for batches and merged states) are :class:`cam_plugin.wsol_records.RecordStore`.
Wrong types raise ``TypeError``; wrong shapes or values raise
:class:`~cam_plugin.errors.CAMInputError` (a ``ValueError``).
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Union

import numpy as np
import torch
from torch import Tensor

from .errors import CAMInputError
from .localize import threshold_boxes
from .wsol_contours import contour_sweeps, contour_values
from .wsol_inputs import (
    check_class_ids,
    check_fixed_threshold,
    check_gt_boxes,
    check_iou_levels,
    check_masks,
    check_sample_ids,
    check_top5_classes,
)
from .wsol_iou import best_iou_per_threshold, box_iou, pairwise_iou
from .wsol_pxap import average_precision_from_histograms, mask_histograms
from .wsol_records import RecordStore

__all__ = [
    "WSOLMetrics",
    "average_precision_from_histograms",
    "best_iou_per_threshold",
    "box_iou",
    "cam_thresholds",
    "evaluate_wsol",
    "mask_histograms",
    "top5_localization",
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


# --------------------------------------------------------------------------- accumulator


def _sweep_hits(
    values: np.ndarray,
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
        values: the image's map ``(H, W)``, float in ``[0, 1]``
            (:func:`~cam_plugin.wsol_contours.contour_values`) or already quantized ``uint8``.
        gt: its ground-truth boxes ``(n, 4)``.
        thresholds: the sweep ``(T,)``.
        levels: IoU levels as fractions ``(L,)``.
        multi_contour: box every contour for the second result.
    """
    found, counts, largest = contour_sweeps(values[None], thresholds)
    best_v1 = best_iou_per_threshold(found[largest], np.ones(len(thresholds), np.int64), gt)
    best_v2 = best_iou_per_threshold(found, counts, gt) if multi_contour else best_v1
    return best_v1[None, :] >= levels[:, None], best_v2[None, :] >= levels[:, None]


def _fixed_ious(
    values: np.ndarray,
    maps: ArrayLike,
    boxes: list[np.ndarray],
    rows: list[int],
    thresholds: tuple[float, ...],
    rule: str,
) -> np.ndarray:
    """IoU of each image's box at each fixed threshold with its best ground-truth box,
    ``(len(rows), len(thresholds))``.

    ``rule="paper"``: :func:`~cam_plugin.localize.threshold_boxes` on the maps (a tensor
    stays on its device; an array is compared in float64, as it always was); ``"contour"``:
    the largest contour at that threshold. ``values`` are the maps as
    :func:`~cam_plugin.wsol_contours.contour_values` returns them.
    """
    n_t = len(thresholds)
    if rule == "paper":
        src = maps if isinstance(maps, Tensor) else torch.from_numpy(values.astype(np.float64))
        picked = src[rows]
        pred = torch.stack([threshold_boxes(picked, t) for t in thresholds], dim=1)
        pred_np = pred.cpu().numpy().astype(np.int64).reshape(len(rows), n_t, 4)
    else:
        sweep = contour_sweeps(values[rows], np.asarray(thresholds, dtype=np.float64))
        pred_np = sweep.boxes[sweep.largest].reshape(len(rows), n_t, 4)
    return np.array(
        [pairwise_iou(pred_np[j], boxes[i]).max(axis=1) for j, i in enumerate(rows)],
        dtype=np.float64,
    ).reshape(len(rows), n_t)


def _label_ranks(labels: np.ndarray, top5: np.ndarray) -> np.ndarray:
    """Rank (1..5) of each label among its image's top-5 predictions, 0 when absent."""
    match = top5 == labels[:, None]
    return np.where(match.any(axis=1), match.argmax(axis=1) + 1, 0).astype(np.int8)


class _Batch(NamedTuple):
    """One checked ``update`` batch: maps as :func:`contour_values` returns them, ground
    truth, and per image whether the top-1 class was right and the label's top-5 rank."""

    values: np.ndarray
    boxes: list[np.ndarray] | None
    masks: np.ndarray | None
    correct: np.ndarray | None
    ranks: np.ndarray | None


def _check_batch(
    maps: ArrayLike,
    gt_boxes: BoxesLike | None,
    labels: ArrayLike | Sequence[int] | None,
    pred_classes: ArrayLike | Sequence[int] | None,
    top5_classes: ArrayLike | None,
    gt_masks: ArrayLike | None,
) -> _Batch:
    """Every argument of :meth:`WSOLMetrics.update` checked before anything is recorded."""
    values = contour_values(maps)
    if values.ndim != 3:
        hint = " (squeeze the class dim: maps[:, 0])" if values.ndim == 4 else ""
        raise CAMInputError(
            f"maps must be (B, H, W), one normalized map per image; got shape {values.shape}{hint}."
        )
    b, h, w = values.shape
    if gt_boxes is None and gt_masks is None:
        raise CAMInputError("update needs gt_boxes (box metrics) and/or gt_masks (PxAP).")
    boxes = check_gt_boxes(gt_boxes, b, h, w) if gt_boxes is not None else None
    top5 = check_top5_classes(top5_classes, b) if top5_classes is not None else None
    if pred_classes is None and top5 is not None:
        pred_classes = top5[:, 0]
    if (labels is None) != (pred_classes is None):
        raise CAMInputError(
            "Top-1 Loc needs both labels and pred_classes (or neither for GT-known only); "
            "Top-5 Loc needs labels and top5_classes."
        )
    correct = ranks = None
    if labels is not None and pred_classes is not None:
        lab = check_class_ids(labels, "labels", b)
        correct = (lab == check_class_ids(pred_classes, "pred_classes", b)).astype(np.int8)
        ranks = _label_ranks(lab, top5) if top5 is not None else None
    if correct is not None and boxes is None:
        raise CAMInputError("labels/pred_classes are used with gt_boxes (Top-1 / Top-5 Loc).")
    masks = check_masks(gt_masks, values.shape) if gt_masks is not None else None
    return _Batch(values, boxes, masks, correct, ranks)


def _known(column: np.ndarray, what: str) -> bool:
    """Whether every sample has ``column`` (``>= 0``); some but not all is an error."""
    known = column >= 0
    if known.any() and not known.all():
        raise CAMInputError(
            f"{what} were given for {int(known.sum())} of {len(known)} samples; give them "
            "for every batch or for none."
        )
    return bool(known.all())


class WSOLMetrics:
    """Accumulates WSOL metrics over batches, data loaders and processes.

    Per sample it keeps a small record keyed by its sample id: for box metrics whether the
    box is correct at every (IoU level, threshold) pair, largest contour (MaxBoxAcc) and all
    contours (MaxBoxAccV2), the IoU at the fixed and at the loose threshold, whether the
    class was right and the label's rank among the top-5 predictions; for PxAP the two
    histograms of its map values. A sample id that was already recorded is skipped (the
    first record wins), so the repeats a distributed sampler pads with are counted once.
    Without ``sample_ids`` every row is a new sample. The records live in two
    :class:`~cam_plugin.wsol_records.RecordStore` objects (boxes, masks).

    Across processes: ``state()`` on every rank, gather the states, then
    ``WSOLMetrics(**same_config).merge(states)`` and ``compute()`` once.

    Args:
        cam_curve_interval: step of the threshold sweep ``np.arange(0, 1, step)``.
        iou_thresholds: IoU levels in percent for MaxBoxAccV2 (Choe et al.: 30, 50, 70).
        fixed_threshold: threshold for the ``@fixed`` numbers, a fraction of each map's max
            (default 0.2, the paper's 20%); also the tight box of the Top-5 heuristic.
        fixed_rule: ``"paper"`` boxes the fixed threshold with
            :func:`~cam_plugin.localize.threshold_boxes` (``>= t * max``, largest 8-connected
            component, tight box), as Zhou et al.; ``"contour"`` uses Choe et al.'s contour
            rule at that threshold (the sweep's rule). The loose box follows the same rule.
        multi_contour_for_v2: MaxBoxAccV2 boxes every contour (True, Choe et al.'s
            definition) or only the largest.
        loose_threshold: the loose box's threshold in the paper's Top-5 heuristic
            (:func:`~cam_plugin.localize.paper_top5_boxes`), ``<= fixed_threshold``;
            ``None`` (default) is half the fixed threshold (0.1 for the paper's 0.2).
    """

    def __init__(
        self,
        cam_curve_interval: float = 0.01,
        iou_thresholds: Sequence[int] = (30, 50, 70),
        fixed_threshold: float = 0.2,
        fixed_rule: Literal["paper", "contour"] = "paper",
        multi_contour_for_v2: bool = True,
        loose_threshold: float | None = None,
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
        loose = self.fixed_threshold / 2 if loose_threshold is None else loose_threshold
        self.loose_threshold = check_fixed_threshold(loose)
        if self.loose_threshold > self.fixed_threshold:
            raise CAMInputError(
                f"loose_threshold ({self.loose_threshold}) must not exceed fixed_threshold "
                f"({self.fixed_threshold}): the loose box comes from the lower threshold."
            )
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
                "box_iou_loose": ((), np.float64),
                "box_correct": ((), np.int8),
                "label_rank": ((), np.int8),
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
            "loose_threshold": self.loose_threshold,
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
        top5_classes: ArrayLike | None = None,
    ) -> None:
        """Record a batch.

        Args:
            maps: ``(B, H, W)`` tensor or array, the ground-truth class's map of each image at
                image resolution, min-max normalized to ``[0, 1]``.
            gt_boxes: ground-truth boxes, inclusive ``(x0, y0, x1, y1)``: a list of ``B``
                arrays/tensors ``(n_i, 4)`` (``n_i >= 1``), or one ``(B, 4)`` / ``(B, n, 4)``
                array/tensor. ``None`` records no box metrics (PxAP only).
            labels: ``(B,)`` ground-truth classes (with ``pred_classes``: Top-1 Loc; with
                ``top5_classes``: Top-1 and Top-5 Loc).
            pred_classes: ``(B,)`` predicted top-1 classes, e.g. ``logits.argmax(1)``
                (default: the first column of ``top5_classes``).
            gt_masks: ``(B, H, W)`` bool masks, or ints 0 / 1 / 255 (background / object /
                ignore) for PxAP.
            sample_ids: ``B`` hashable ids (e.g. dataset indices); repeats are skipped.
            top5_classes: ``(B, 5)`` the five best predicted classes, best first, e.g.
                ``logits.topk(5).indices``: Top-5 Loc and Top-5 error.

        Raises:
            TypeError: an argument of the wrong type.
            CAMInputError: a wrong shape or value (see :mod:`cam_plugin.wsol_inputs`);
                nothing is recorded then.
        """
        batch = _check_batch(maps, gt_boxes, labels, pred_classes, top5_classes, gt_masks)
        ids = self._sample_ids(sample_ids, batch.values.shape[0])
        if batch.boxes is not None:
            self._boxes.record(ids, lambda rows: self._box_records(batch, maps, rows))
        masks = batch.masks
        if masks is not None:
            self._masks.record(
                ids,
                lambda rows: dict(
                    zip(
                        ("hist_true", "hist_false"),
                        mask_histograms(batch.values[rows], masks[rows], self.thresholds),
                    )
                ),
            )

    def _box_records(self, batch: _Batch, maps: ArrayLike, rows: list[int]) -> dict[str, Any]:
        """The box columns of the images ``rows``: hits per (IoU level, threshold) with the
        largest contour (v1) and every contour (v2), the IoU at the fixed and the loose
        threshold, whether the class was right and the label's top-5 rank (``-1``: not
        given)."""
        boxes = batch.boxes
        assert boxes is not None
        levels = np.asarray(self._levels, dtype=np.float64) / 100
        hits = [
            _sweep_hits(
                batch.values[j], boxes[j], self.thresholds, levels, self.multi_contour_for_v2
            )
            for j in rows
        ]
        thresholds = (self.fixed_threshold, self.loose_threshold)
        ious = _fixed_ious(batch.values, maps, boxes, rows, thresholds, self.fixed_rule)
        unknown = np.full(len(rows), -1, dtype=np.int8)
        return {
            "box_hits_v1": np.stack([v1 for v1, _ in hits]),
            "box_hits_v2": np.stack([v2 for _, v2 in hits]),
            "box_iou_fixed": ious[:, 0],
            "box_iou_loose": ious[:, 1],
            "box_correct": unknown if batch.correct is None else batch.correct[rows],
            "label_rank": unknown if batch.ranks is None else batch.ranks[rows],
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
        predictions also ``Top-1 Loc``, ``Top-1 Loc@fixed`` and ``Top-1 Cls``; with the top-5
        predictions ``Top-5 Loc``, ``Top-5 Loc@fixed``, ``Top-5 Loc@heuristic``,
        ``Top-5 error``, ``Top-5 error@heuristic`` and ``Top-5 Cls`` (see
        :func:`top5_localization`). Mask records: ``PxAP``.
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
        col = self._boxes.column
        hits_v1, hits_v2 = col("box_hits_v1"), col("box_hits_v2")
        i50 = self._levels.index(50)
        acc_v1 = hits_v1[:, i50].mean(axis=0) * 100
        best = int(np.argmax(acc_v1))
        acc_v2 = hits_v2.mean(axis=0) * 100
        per_level = {d: float(acc_v2[self._levels.index(d)].max()) for d in self.iou_thresholds}
        ok_fixed = col("box_iou_fixed") >= 0.5
        out: dict[str, float] = {
            "MaxBoxAcc": float(acc_v1.max()),
            "MaxBoxAccV2": float(np.mean(list(per_level.values()))),
        }
        for d, v in per_level.items():
            out[f"MaxBoxAccV2@{d}"] = v
        out["GT-known Loc"] = float(acc_v1[best])
        out["GT-known Loc@fixed"] = float(ok_fixed.mean() * 100)
        out["best_threshold"] = float(self.thresholds[best])
        correct = col("box_correct")
        if _known(correct, "labels/pred_classes"):
            right = correct == 1
            out["Top-1 Loc"] = float((hits_v1[:, i50, best] & right).mean() * 100)
            out["Top-1 Loc@fixed"] = float((ok_fixed & right).mean() * 100)
            out["Top-1 Cls"] = float(right.mean() * 100)
        ranks = col("label_rank")
        if _known(ranks, "top5_classes"):
            out.update(
                top5_localization(
                    ranks, hits_v1[:, i50, best], col("box_iou_fixed"), col("box_iou_loose")
                )
            )
        return out


def top5_localization(
    ranks: np.ndarray, hit_best: np.ndarray, iou_fixed: np.ndarray, iou_loose: np.ndarray
) -> dict[str, float]:
    """Top-5 numbers (percent) from per-sample records of the label's map.

    The box of the label's class is the label map's box, so each rule needs only the
    label's rank ``r`` among the top-5 predictions (``0``: not among them) and the IoU of
    the label map's boxes with the ground truth:

    * ``Top-5 Cls``: ``r >= 1``;
    * ``Top-5 Loc``: ``r >= 1`` and the largest contour at the best threshold is right
      (the rule of ``Top-1 Loc``);
    * ``Top-5 Loc@fixed``: ``r >= 1`` and the paper's box at the fixed threshold has
      IoU >= 0.5 (Zhou et al.: one box per top-5 class, 20% of the max);
    * ``Top-5 Loc@heuristic``: the paper's Sec. 3.2 boxes (:data:`~cam_plugin.localize.
      PAPER_TOP5_LAYOUT`): for ``r in {1, 2}`` the tight (fixed threshold) or the loose box
      is right, for ``r = 3`` the loose box is right; ranks 4 and 5 get no box;
    * ``Top-5 error`` and ``Top-5 error@heuristic``: ``100 -`` the matching Loc.
    """
    ranks = np.asarray(ranks)
    top5 = ranks >= 1
    tight_ok = np.asarray(iou_fixed) >= 0.5
    loose_ok = np.asarray(iou_loose) >= 0.5
    heuristic = ((ranks == 1) | (ranks == 2)) & (tight_ok | loose_ok) | (ranks == 3) & loose_ok
    fixed = float((top5 & tight_ok).mean() * 100)
    paper = float(heuristic.mean() * 100)
    return {
        "Top-5 Loc": float((top5 & np.asarray(hit_best)).mean() * 100),
        "Top-5 Loc@fixed": fixed,
        "Top-5 Loc@heuristic": paper,
        "Top-5 error": 100.0 - fixed,
        "Top-5 error@heuristic": 100.0 - paper,
        "Top-5 Cls": float(top5.mean() * 100),
    }


def evaluate_wsol(
    maps: ArrayLike,
    gt_boxes: BoxesLike | None = None,
    *,
    labels: ArrayLike | Sequence[int] | None = None,
    pred_classes: ArrayLike | Sequence[int] | None = None,
    gt_masks: ArrayLike | None = None,
    top5_classes: ArrayLike | None = None,
    **config: Any,
) -> dict[str, float]:
    """One-shot :class:`WSOLMetrics`: ``update`` once and ``compute``.

    ``config`` takes the :class:`WSOLMetrics` settings (``cam_curve_interval``,
    ``iou_thresholds``, ``fixed_threshold``, ``fixed_rule``, ``multi_contour_for_v2``,
    ``loose_threshold``).
    """
    metric = WSOLMetrics(**config)
    metric.update(
        maps,
        gt_boxes,
        labels=labels,
        pred_classes=pred_classes,
        gt_masks=gt_masks,
        top5_classes=top5_classes,
    )
    return metric.compute()
