"""What the OpenMMLab faces read from and write to data samples.

Reading: ground-truth boxes and their labels (:func:`find_boxes`), the image-level classes
(:func:`gt_classes`, :func:`gt_labels`), any dotted field of a sample object or of the dict
mmengine's evaluator turns it into (:func:`get_field`).

Writing: the **``cam_maps`` contract** between :class:`~.vis_hook.CAMVisualizationHook`
(the writer) and :class:`~.loc_metric.CAMLocalizationMetric` (the reader). The metric sees
no model, so the maps travel in the predictions:

* While the hook is active for a val / test epoch, every data sample returned by the
  model's ``forward(..., mode='predict')`` gets one new field, ``cam_maps`` (a
  :class:`~mmengine.structures.BaseDataElement`; the evaluator hands the metric its
  ``to_dict()``), before the evaluator sees the sample. No other field is touched.
* With maps (:func:`set_cam_maps`): data fields ``maps`` float32 ``(n, h, w)`` at feature
  resolution, ``classes`` ``(n,)``, ``scores`` ``(n,)`` (logits recomputed from the
  features); metainfo ``input_shape`` (``(H, W)`` of the batch tensor the network saw,
  padding included), ``num_targets`` (the first ``num_targets`` maps are the hook's targets,
  the ground-truth classes not among them follow), ``target`` (``"pred"`` / ``"gt"``) and,
  when the geometry could be traced, ``placement`` (a
  :class:`~cam_plugin.placement.Placement`: where every feature cell sits on the batch
  tensor; the pictures and the metric upsample with it).
* Without maps (:func:`set_no_maps`: the hook is disabled for this model, or this batch
  could not be mapped): no data fields, metainfo ``reason`` saying why.
* A sample without ``cam_maps`` went through no active hook: the metric then says to add
  the hook (:func:`has_cam_maps` / :func:`cam_maps_of` tell the cases apart).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
from mmengine.structures import BaseDataElement
from torch import Tensor

__all__ = [
    "BOX_KEYS",
    "BOX_LABEL_KEYS",
    "CAM_MAPS",
    "as_array",
    "cam_maps_of",
    "find_boxes",
    "get_field",
    "gt_classes",
    "gt_labels",
    "has_cam_maps",
    "mark_all",
    "metainfo",
    "set_cam_maps",
    "set_no_maps",
]

#: where ground-truth boxes are looked for in a data sample (first found wins)
BOX_KEYS = ("gt_instances.bboxes", "gt_bboxes", "gt_boxes")
#: where the class of each box is looked for
BOX_LABEL_KEYS = ("gt_instances.labels", "gt_bboxes_labels", "gt_labels")
#: the data-sample field the visualization hook writes and the localization metric reads
CAM_MAPS = "cam_maps"


def get_field(obj: Any, path: str) -> Any:
    """``obj.a.b`` / ``obj['a']['b']`` for a dotted ``path``; ``None`` when absent."""
    cur = obj
    for part in path.split("."):
        if cur is None:
            return None
        if isinstance(cur, Mapping):
            cur = cur.get(part)
        elif isinstance(cur, BaseDataElement):
            cur = cur.get(part, None)
        else:
            cur = getattr(cur, part, None)
    return cur


def as_array(value: Any) -> Optional[np.ndarray]:
    """A numpy array of a tensor, an mmdet box object (its ``.tensor``) or an array-like;
    ``None`` for ``None``."""
    if value is None:
        return None
    if hasattr(value, "tensor") and isinstance(value.tensor, Tensor):  # mmdet BaseBoxes
        value = value.tensor
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def metainfo(sample: Any) -> Mapping[str, Any]:
    """The sample's ``metainfo`` (an empty mapping when it has none)."""
    meta = getattr(sample, "metainfo", None)
    return meta if isinstance(meta, Mapping) else {}


def find_boxes(
    sample: Any, box_key: Optional[str] = None
) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Ground-truth boxes ``(n, 4)`` of a data sample (object or dict) and their labels.

    Looks at ``box_key`` when given, else at :data:`BOX_KEYS` in order
    (``gt_instances.bboxes`` as mmdet packs them, ``gt_bboxes`` as ``PackInputs(
    algorithm_keys=('gt_bboxes',))`` does). Returns ``(None, None)`` when the sample has none.
    """
    keys = (box_key,) if box_key else BOX_KEYS
    for key in keys:
        arr = as_array(get_field(sample, key))
        if arr is None:
            continue
        arr = arr.reshape(-1, 4) if arr.size else arr.reshape(0, 4)
        labels = None
        prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
        for lk in ((prefix + "labels",) if prefix else ()) + BOX_LABEL_KEYS:
            lab = as_array(get_field(sample, lk))
            if lab is not None and lab.size == arr.shape[0]:
                labels = lab.reshape(-1).astype(np.int64)
                break
        return arr, labels
    return None, None


def gt_classes(sample: Any) -> list[int]:
    """Ground-truth classes of a sample: ``gt_label`` (mmpretrain), else the distinct box
    labels in order of appearance; ``[]`` when it has none."""
    label = as_array(get_field(sample, "gt_label"))
    if label is not None and label.size:
        return [int(v) for v in label.reshape(-1)]
    for key in BOX_LABEL_KEYS:
        lab = as_array(get_field(sample, key))
        if lab is not None and lab.size:
            return list(dict.fromkeys(int(v) for v in lab.reshape(-1)))
    return []


def gt_labels(sample: Any) -> Optional[Tensor]:
    """``gt_instances.labels`` of a data sample (mmdet), ``None`` when it has none."""
    inst = getattr(sample, "gt_instances", None)
    if inst is None:
        return None
    labels = inst.get("labels", None) if hasattr(inst, "get") else None
    return labels if isinstance(labels, Tensor) else None


def set_cam_maps(
    sample: BaseDataElement,
    *,
    maps: Tensor,
    classes: Tensor,
    scores: Tensor,
    input_shape: tuple[int, int],
    num_targets: int,
    target: str,
) -> None:
    """Write the ``cam_maps`` of one sample (see the module doc for the fields)."""
    element = BaseDataElement(
        metainfo=dict(input_shape=input_shape, num_targets=num_targets, target=target),
        maps=maps,
        classes=classes,
        scores=scores,
    )
    sample.set_field(element, CAM_MAPS)


def set_no_maps(sample: BaseDataElement, reason: str) -> None:
    """Write a ``cam_maps`` without maps: the hook saw the sample but has no map for it."""
    sample.set_field(BaseDataElement(metainfo=dict(reason=reason)), CAM_MAPS)


def cam_maps_of(sample: Any) -> Any:
    """The sample's ``cam_maps`` (element or dict), ``None`` when it has none."""
    return get_field(sample, CAM_MAPS)


def has_cam_maps(cam: Any) -> bool:
    """Whether a ``cam_maps`` value carries maps (not only a ``reason``)."""
    return cam is not None and isinstance(get_field(cam, "maps"), Tensor)


def mark_all(samples: Sequence[BaseDataElement], reason: str) -> None:
    """:func:`set_no_maps` on every sample that has no ``cam_maps`` yet."""
    for sample in samples:
        if cam_maps_of(sample) is None:
            set_no_maps(sample, reason)
