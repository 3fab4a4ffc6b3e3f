"""Faithfulness metrics for any attribution maps: batched, on the images' device.

Every metric takes maps from any method -- CAM's, Grad-CAM's, Captum's, a baseline's --
``(B, k, h, w)`` / ``(B, h, w)`` or a :class:`~cam_plugin.CAMResult`, resized to the images
when needed, with the class each map explains, and keeps one record per map keyed by
``(sample id, class)``: ``update`` batch by batch (a key seen before is skipped), ``state`` /
``merge`` across processes, ``records()`` per map, ``compute()`` the summary. The one-shot
functions return :class:`EvalResult` ``(records, summary)``. The model is always run inside
:func:`cam_plugin.probing.untouched` and is left exactly as it was; perturbed images go
through it ``max_batch`` at a time.

The metrics (each module holds the full definition):

* :class:`DeletionInsertion` -- RISE deletion / insertion curves and AUC
  (:mod:`cam_plugin.evaluate_perturb`);
* :class:`ConfidenceChange` -- Average Drop / Increase in Confidence (Grad-CAM++) and
  grad-cam's confidence change and drop (:mod:`cam_plugin.evaluate_perturb`);
* :class:`ROAD` -- ROAD MoRF / LeRF with noisy linear imputation, and the combined score
  (:mod:`cam_plugin.evaluate_road`, the solver in :mod:`cam_plugin.evaluate_impute`);
* :class:`PointingGame` -- the pointing game and the energy in the ground-truth region
  (:mod:`cam_plugin.evaluate_region`);
* :class:`RandomizationCheck` -- Adebayo et al.'s cascading model randomisation
  (:mod:`cam_plugin.evaluate_sanity`);
* :class:`CompletenessResidual` -- CAM's ``|mean M_c + b_c - logit_c|``
  (:mod:`cam_plugin.evaluate_sanity`).

For example (``cam`` a :class:`cam_plugin.CAM`):

```python
from cam_plugin.evaluate import DeletionInsertion

res = cam(images, topk=1).upsample().normalize()
di = DeletionInsertion(step=224)
di.update(model, images, res)  # classes from the result
di.compute()  # {"deletion_auc": ..., "insertion_auc": ..., ...}
```

Peers: with the documented options the numbers equal torchcam 0.5.0's
``ClassificationMetric`` / ``DeletionInsertionMetric`` and grad-cam 1.5.7's ROAD and
confidence-change metrics (``docs/evaluate.md``, ``tests/test_evaluate.py``).
"""

from __future__ import annotations

from .evaluate_core import EvalResult, FaithfulnessMetric, MapBatch, class_scores, map_batch
from .evaluate_impute import linear_impute
from .evaluate_perturb import (
    ConfidenceChange,
    DeletionInsertion,
    confidence_change,
    deletion_insertion,
    gaussian_blur,
    substrate,
)
from .evaluate_region import PointingGame, pointing_game, region_masks
from .evaluate_road import ROAD, numpy_percentile, road, road_keep_masks
from .evaluate_sanity import (
    CompletenessResidual,
    RandomizationCheck,
    average_ranks,
    completeness_residual,
    randomization_check,
    reinitialize,
    spearman,
)

__all__ = [
    "ROAD",
    "CompletenessResidual",
    "ConfidenceChange",
    "DeletionInsertion",
    "EvalResult",
    "FaithfulnessMetric",
    "MapBatch",
    "PointingGame",
    "RandomizationCheck",
    "average_ranks",
    "class_scores",
    "completeness_residual",
    "confidence_change",
    "deletion_insertion",
    "gaussian_blur",
    "linear_impute",
    "map_batch",
    "numpy_percentile",
    "pointing_game",
    "randomization_check",
    "region_masks",
    "reinitialize",
    "road",
    "road_keep_masks",
    "spearman",
    "substrate",
]
