"""CAM in any mmengine run: a hook, localization and faithfulness metrics, a data set.

Three lines in a config add class activation maps and WSOL scores to every validation::

    custom_imports = dict(imports=["cam_plugin.integrations.mmengine"],
                          allow_failed_imports=False)
    custom_hooks = [dict(type="CAMVisualizationHook", interval=1, max_samples=8)]
    val_evaluator = [dict(type="Accuracy"), dict(type="CAMLocalizationMetric")]

Importing this module registers, in mmengine's **root** registries (so they build under any
``default_scope``: mmpretrain, mmdet, mmseg or none):

* :class:`CAMVisualizationHook` (``HOOKS``): for the val / test epoch it installs forward
  hooks on the model (removed at the end of the epoch, by the next call of the hook, or by
  its finalizer). During the loop's own ``val_step`` it captures the feature map, and when
  the model's ``forward(..., mode='predict')`` returns its data samples it computes
  ``M_c(x, y) = Σ_k W'_ck f_k(x, y)`` (fp32, outside autocast, no autograd) and adds one
  field, ``cam_maps``, to every predicted data sample, before the evaluator sees them: no
  second forward pass, no change to any existing field. Every ``interval`` iterations the
  main process draws overlays through ``runner.visualizer.add_image``.
* :class:`CAMLocalizationMetric` (``METRICS``): MaxBoxAcc, MaxBoxAccV2, GT-known Loc and
  Top-1 Loc (Choe et al., CVPR 2020) from the ``cam_maps`` and the ground-truth boxes of the
  samples, with per-sample records so that a distributed sampler's padding is not counted.
* :class:`CAMFaithfulnessMetric` (``METRICS``): deletion / insertion AUC (RISE) of the
  ``cam_maps`` by :class:`cam_plugin.evaluate.DeletionInsertion`; the hook binds the runner's
  model to it for each val / test epoch, and it runs ``2 ceil(H W / step)`` extra forwards of
  perturbed images per map (the documented cost).
* :class:`ClutteredDigitsDataset` (``DATASETS``): :class:`cam_plugin.data.ClutteredDigits`
  as an mmengine ``BaseDataset`` producing mmpretrain-style samples (``img`` HWC uint8,
  ``gt_label``, ``gt_bboxes``), ready for mmpretrain's ``PackInputs``.

``cam_maps`` of a sample is a :class:`~mmengine.structures.BaseDataElement` with data fields
``maps`` ``(n, h, w)`` float32 at feature resolution, ``classes`` ``(n,)`` and ``scores``
``(n,)`` (the logits recomputed from the features), and metainfo ``input_shape`` (the
``(H, W)`` of the batch tensor the network saw, padding included) and ``num_targets`` (the
first ``num_targets`` maps are the hook's ``target`` classes; the ground-truth classes
follow when ``target='pred'``, for the metric); a sample the hook saw but could not map
carries a ``cam_maps`` with only a ``reason``. The contract is written out in
:mod:`cam_plugin.integrations.mm.samples`. :func:`cam_maps_to_image` brings maps to the
image.

The parts live by role in :mod:`cam_plugin.integrations.mm`; this module only registers them.
"""

from __future__ import annotations

from mmengine.registry import DATASETS, HOOKS, METRICS

from .mm.datasets import ClutteredDigitsBase, ClutteredDigitsDataset
from .mm.faith_metric import CAMFaithfulnessMetric
from .mm.geometry import cam_maps_to_image
from .mm.loc_metric import CAMLocalizationMetric
from .mm.samples import BOX_KEYS, BOX_LABEL_KEYS, find_boxes
from .mm.vis_hook import CAMVisualizationHook

__all__ = [
    "BOX_KEYS",
    "BOX_LABEL_KEYS",
    "CAMFaithfulnessMetric",
    "CAMLocalizationMetric",
    "CAMVisualizationHook",
    "ClutteredDigitsBase",
    "ClutteredDigitsDataset",
    "cam_maps_to_image",
    "find_boxes",
]

HOOKS.register_module(module=CAMVisualizationHook)
METRICS.register_module(module=CAMLocalizationMetric)
METRICS.register_module(module=CAMFaithfulnessMetric)
DATASETS.register_module(module=ClutteredDigitsDataset)
