"""The weakly supervised localization metric of mmengine runs (Choe et al., CVPR 2020).

:class:`CAMLocalizationMetric` reads the ``cam_maps`` field that
:class:`~.vis_hook.CAMVisualizationHook` writes into every predicted data sample (the
contract is in :mod:`.samples`): the metric sees no model. A plain class here;
``cam_plugin.integrations.mmengine`` registers it in mmengine's root ``METRICS``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log
from torch import Tensor

from cam_plugin.errors import CAMInputError
from cam_plugin.metrics import WSOLMetrics
from cam_plugin.probing import rng_guard

from .common import reject_unknown
from .geometry import cam_maps_to_image, inclusive_boxes
from .sample_maps import placed_maps
from .samples import (
    BOX_KEYS,
    as_array,
    cam_maps_of,
    find_boxes,
    get_field,
    gt_classes,
    has_cam_maps,
)

__all__ = ["CAMLocalizationMetric"]


class CAMLocalizationMetric(BaseMetric):
    """Weakly supervised localization scores of the CAMs (Choe et al., CVPR 2020).

    For every sample the map of its ground-truth class (from the ``cam_maps`` field that
    :class:`~.vis_hook.CAMVisualizationHook` adds; the contract is in :mod:`.samples`) is
    brought to the image with :func:`~.geometry.cam_maps_to_image` and scored against the
    sample's ground-truth boxes with :class:`cam_plugin.metrics.WSOLMetrics`; per-sample
    records keyed by ``sample_idx`` are gathered across processes, so a distributed
    sampler's padding is counted once. Logged (with the prefix ``cam/``): ``MaxBoxAcc``,
    ``MaxBoxAccV2`` (mean over the IoU levels of ``max_t BoxAcc(t, d)`` with every
    contour), ``MaxBoxAccV2@d``, ``GT-known_Loc`` (box IoU ≥ 0.5 at the best threshold),
    ``Top-1_Loc`` (that and a correct top-1 class), their ``@fixed`` variants at
    ``fixed_threshold``, ``Top-1_Cls`` and ``best_threshold``; all in percent except the
    threshold.

    A sample whose ``cam_maps`` holds no maps (the hook is disabled, or could not map its
    batch) is left out; a sample without ``cam_maps`` means that the hook is missing from
    the run: :class:`~cam_plugin.errors.CAMInputError`.

    Args:
        cam_curve_interval: step of the threshold sweep ``np.arange(0, 1, step)``.
        iou_thresholds: IoU levels (percent) of MaxBoxAccV2.
        fixed_threshold: threshold of the ``@fixed`` numbers (paper: 0.2).
        box_key: dotted path of the boxes in a sample (default: ``gt_instances.bboxes``,
            ``gt_bboxes``, ``gt_boxes``, the first present).
        box_convention: ``"exclusive"`` (OpenMMLab's ``x2 = x1 + width``, float) or
            ``"inclusive"`` (integer pixels ``x0..x1``, as Choe et al.).
        box_frame: ``"img"`` (boxes in the frame of ``img_shape``, transformed with the image
            as OpenMMLab pipelines do) or ``"ori"`` (boxes in ``ori_shape``).
        collect_device: ``"cpu"`` or ``"gpu"``, as any mmengine metric.
        prefix: metric name prefix (default ``"cam"``).
        collect_dir: temporary folder for ``collect_device="cpu"``.
    """

    default_prefix: Optional[str] = "cam"
    _OPTIONS = (
        "cam_curve_interval",
        "iou_thresholds",
        "fixed_threshold",
        "box_key",
        "box_convention",
        "box_frame",
        "collect_device",
        "prefix",
        "collect_dir",
    )

    def __init__(
        self,
        cam_curve_interval: float = 0.01,
        iou_thresholds: Sequence[int] = (30, 50, 70),
        fixed_threshold: float = 0.2,
        box_key: Optional[str] = None,
        box_convention: str = "exclusive",
        box_frame: str = "img",
        collect_device: str = "cpu",
        prefix: Optional[str] = None,
        collect_dir: Optional[str] = None,
        **unknown: Any,
    ) -> None:
        reject_unknown("CAMLocalizationMetric", unknown, self._OPTIONS)
        if box_convention not in ("exclusive", "inclusive"):
            raise CAMInputError(
                f"CAMLocalizationMetric: box_convention must be 'exclusive' (OpenMMLab) or "
                f"'inclusive', got {box_convention!r}"
            )
        if box_frame not in ("img", "ori"):
            raise CAMInputError(
                f"CAMLocalizationMetric: box_frame must be 'img' or 'ori', got {box_frame!r}"
            )
        if box_key is not None and not isinstance(box_key, str):
            raise CAMInputError("CAMLocalizationMetric: box_key must be a dotted path string")
        super().__init__(collect_device=collect_device, prefix=prefix, collect_dir=collect_dir)
        self.config: dict[str, Any] = dict(
            cam_curve_interval=cam_curve_interval,
            iou_thresholds=tuple(iou_thresholds),
            fixed_threshold=fixed_threshold,
        )
        WSOLMetrics(**self.config)  # validates the settings now, at build time
        self.box_key = box_key
        self.box_convention = box_convention
        self.box_frame = box_frame
        self._missing = 0

    @property
    def dataset_meta(self) -> Optional[dict]:
        """Meta info of the data set; one that declares ``with_boxes=False`` is refused."""
        return self._dataset_meta

    @dataset_meta.setter
    def dataset_meta(self, dataset_meta: Optional[dict]) -> None:
        if isinstance(dataset_meta, Mapping) and dataset_meta.get("with_boxes") is False:
            raise CAMInputError(
                "CAMLocalizationMetric needs ground-truth boxes, but the evaluated data set "
                "declares with_boxes=False. Use a data set with boxes or remove the metric "
                "from the evaluator."
            )
        self._dataset_meta = dataset_meta  # type: ignore[assignment]

    def check_dataset(self, dataset: Any) -> None:
        """Raise a clear error when the data set's samples carry no ground-truth boxes.

        Loads the first sample through the data set's pipeline (RNG streams left untouched)
        and looks for the boxes where :meth:`process` will.
        """
        meta = getattr(dataset, "metainfo", None)
        self.dataset_meta = meta if isinstance(meta, dict) else self._dataset_meta
        try:
            if len(dataset) == 0:
                return
        except TypeError:
            return
        with rng_guard():
            item = dataset[0]
        sample = item.get("data_samples", item) if isinstance(item, Mapping) else item
        boxes, _ = find_boxes(sample, self.box_key)
        if boxes is None:
            fields = sorted(sample.keys()) if hasattr(sample, "keys") else []
            where = f"'{self.box_key}'" if self.box_key else " or ".join(BOX_KEYS)
            raise CAMInputError(
                f"CAMLocalizationMetric needs ground-truth boxes, but the samples of "
                f"{type(dataset).__name__} have none at {where} (fields: {fields}). Pack the "
                "boxes into the data samples (mmpretrain: PackInputs(algorithm_keys="
                "('gt_bboxes',))), set box_key=..., or remove the metric."
            )

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        """Score the ground-truth-class map of every sample and keep a per-sample record."""
        for sample in data_samples:
            cam = cam_maps_of(sample)
            if cam is None:
                raise CAMInputError(
                    "CAMLocalizationMetric: the predictions carry no 'cam_maps'. Add "
                    "dict(type='CAMVisualizationHook') to custom_hooks: the metric sees "
                    "no model, the hook computes the maps during the forward pass."
                )
            if not has_cam_maps(cam):  # the hook saw the sample but had no map for it
                self._missing += 1
                continue
            self.results.append(self._record(sample, cam))

    def _record(self, sample: Mapping[str, Any], cam: Any) -> dict[str, Any]:
        boxes, box_labels = find_boxes(sample, self.box_key)
        sid = get_field(sample, "sample_idx")
        if boxes is None or boxes.shape[0] == 0:
            raise CAMInputError(
                f"CAMLocalizationMetric: sample {sid} has no ground-truth boxes (looked at "
                f"{self.box_key or ', '.join(BOX_KEYS)})."
            )
        gt = gt_classes(sample)
        if not gt:
            raise CAMInputError(
                f"CAMLocalizationMetric: sample {sid} has no ground-truth class (gt_label or "
                "box labels); the map of the true class is what is scored."
            )
        cls = gt[0]
        classes = as_array(get_field(cam, "classes"))
        maps = get_field(cam, "maps")
        assert classes is not None and isinstance(maps, Tensor)
        where = np.flatnonzero(classes.reshape(-1) == cls)
        if where.size == 0:
            raise CAMInputError(
                f"CAMLocalizationMetric: the cam_maps of sample {sid} hold no map of its "
                f"ground-truth class {cls}."
            )
        img_shape = get_field(sample, "img_shape")
        out_shape = get_field(sample, "ori_shape") if self.box_frame == "ori" else None
        m = cam_maps_to_image(
            placed_maps(cam, maps[int(where[0]) : int(where[0]) + 1].detach().cpu()),
            get_field(cam, "input_shape"),
            img_shape,
            out_shape,
        )[0]
        height, width = int(m.shape[0]), int(m.shape[1])
        if box_labels is not None and (box_labels == cls).any():
            boxes = boxes[box_labels == cls]
        pixel_boxes = inclusive_boxes(boxes, self.box_convention, height, width)
        pred = as_array(get_field(sample, "pred_label"))
        metric = WSOLMetrics(**self.config)
        metric.update(
            m[None],
            [pixel_boxes],
            labels=[cls] if pred is not None and pred.size else None,
            pred_classes=[int(pred.reshape(-1)[0])] if pred is not None and pred.size else None,
            sample_ids=[int(sid) if isinstance(sid, (int, np.integer)) else sid]
            if sid is not None
            else None,
        )
        return metric.state()

    def compute_metrics(self, results: list) -> dict[str, float]:
        """Merge the per-sample records of every process and compute the scores."""
        if not results:
            print_log(
                "CAMLocalizationMetric: no sample carried maps in its cam_maps "
                f"({self._missing} without: the hook is disabled or could not map them); no "
                "localization scores this time.",
                logger="current",
                level=logging.WARNING,
            )
            self._missing = 0
            return {}
        self._missing = 0
        metric = WSOLMetrics(**self.config)
        metric.merge(results)
        return {key.replace(" ", "_"): float(v) for key, v in metric.compute().items()}
