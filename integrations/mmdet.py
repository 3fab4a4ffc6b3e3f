"""mmdet: CAM for detection backbones, and a CAM probe that trains inside a detection run.

A detector has no image classifier, so there is no class activation map to read from it
directly. Two ways to get one:

* **Convert the backbone.** An mmdet backbone built with ``mmdet.registry.MODELS.build``
  returns a tuple with one ``(B, K, h, w)`` map per ``out_indices`` entry;
  :func:`cam_plugin.convert` picks one (``stage`` is the position in that tuple), adds
  ``[3x3 conv] -> GAP -> Linear`` and the result is trained on image-level labels like any
  classifier: ``S_c = Σ_k w_ck mean_xy f_k + b_c`` and ``M_c = Σ_k w_ck f_k``, so
  ``mean_xy M_c + b_c = S_c`` exactly.
* **Probe a running detector.** :class:`CAMProbeHook` (registered in mmengine's root
  ``HOOKS``, so it builds under ``default_scope='mmdet'``) trains a multi-label
  GAP + linear probe on the detector's own backbone (or neck) features, captured during the
  run's own forward passes, on detached tensors and with its own optimizer: the detector's
  losses, gradients, parameters and RNG streams are exactly those of the run without it.
  At validation it reports the probe's multi-label mAP and draws, through the runner's
  visualizer, the CAM of every class present in an image, mapped back onto the original
  image (padding cropped, resize and flip undone).

For the probe, with the valid (unpadded) cells ``Ω`` of the captured map ``f`` of one image
(mmengine pads batches at the bottom and right; padded cells are left out):

    p_k = (1/|Ω|) Σ_{(x,y)∈Ω} f_k(x, y)            (masked global average pool)
    S_c = Σ_k w_ck p_k + b_c                        (multi-label logits, sigmoid / BCE)
    M_c(x, y) = Σ_k w_ck f_k(x, y)                  (the CAM)
    =>  S_c = mean_Ω M_c + b_c                       (the exactness identity)

Config::

    custom_imports = dict(imports=["cam_plugin.integrations.mmdet"], allow_failed_imports=False)
    custom_hooks = [dict(type="CAMProbeHook", feature="backbone", index=-1)]

Importing this module registers what mmdet's face needs and nothing else:
:class:`CAMProbeHook` (``HOOKS``), :class:`ClutteredDigitsDetection` (``DATASETS``: several
handwritten digits per image in clutter, with boxes, as an mmdet-style data set) and an
adapter that makes ``cam_plugin.CAM(mmdet_model)`` fail with a message naming the two routes
above. The visualization hook, the localization metric and the classification digits set
come with ``cam_plugin.integrations.mmengine`` (add it to ``custom_imports`` to use them).

The parts live by role in :mod:`cam_plugin.integrations.mm`; this module only registers them.
"""

from __future__ import annotations

from mmengine.registry import DATASETS, HOOKS

from cam_plugin.registry import register_adapter

from .mm.datasets import ClutteredDigitsDetection
from .mm.det_adapter import is_mmdet_model, mmdet_adapter
from .mm.geometry import maps_to_original, valid_cell_mask
from .mm.probe_hook import CAMProbeHook
from .mm.probe_model import CAMProbe, multilabel_average_precision
from .mm.probe_storage import PROBE_FORMAT

__all__ = [
    "PROBE_FORMAT",
    "CAMProbe",
    "CAMProbeHook",
    "ClutteredDigitsDetection",
    "is_mmdet_model",
    "maps_to_original",
    "mmdet_adapter",
    "multilabel_average_precision",
    "valid_cell_mask",
]

register_adapter(is_mmdet_model, mmdet_adapter, name="mmdet")
HOOKS.register_module(module=CAMProbeHook)
DATASETS.register_module(module=ClutteredDigitsDetection)
