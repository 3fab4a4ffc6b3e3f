"""Every score of the scoreboard, each computed by the library's public metric (nothing is
re-implemented here): :mod:`cam_plugin.evaluate` for faithfulness, the randomisation check
and CAM's completeness residual; :class:`cam_plugin.metrics.WSOLMetrics` for MaxBoxAccV2 /
PxAP; ``captum.metrics`` for infidelity / sensitivity (:mod:`.captum_metrics`).

Every score is of the class each map explains, on the softmax probability (the
``cam_plugin.evaluate`` default, ``score="probability"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor, nn


@dataclass(frozen=True)
class Column:
    """One table column: the record key, its header, and whether higher is better (``None``:
    neither)."""

    key: str
    header: str
    higher: Optional[bool]

    @property
    def title(self) -> str:
        """The header with its arrow."""
        arrow = "" if self.higher is None else (" ↑" if self.higher else " ↓")
        return self.header + arrow


FAITHFULNESS = (
    Column("deletion_auc", "deletion AUC", False),
    Column("insertion_auc", "insertion AUC", True),
    Column("average_drop", "Average Drop", False),
    Column("increase_in_confidence", "Increase in Conf.", True),
    Column("confidence_change", "conf. change", True),
    Column("road_morf", "ROAD MoRF", False),
    Column("road_lerf", "ROAD LeRF", True),
    Column("road_combined", "ROAD combined", True),
    Column("random_first", "rank corr., top layer random", False),
    Column("random_last", "rank corr., cascade random", False),
    Column("completeness", "completeness residual", False),
)
REGION = (
    Column("pointing_game", "pointing game", True),
    Column("energy", "energy in box", True),
    Column("MaxBoxAccV2", "MaxBoxAccV2", True),
    Column("PxAP", "PxAP", True),
)
CAPTUM = (
    Column("infid_noise", "infidelity, noise", False),
    Column("infid_square", "infidelity, square", False),
    Column("sensitivity", "sensitivity_max", False),
)
TIME = (
    Column("ms", "ms / image", False),
    Column("cpu_ms", "CPU ms / image", False),
    Column("x_cam", "× CAM (CPU)", False),
)


def faithfulness(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    classes: Tensor,
    *,
    di_steps: int,
    road_percentiles: Sequence[float],
    seed: int,
) -> dict[str, float]:
    """Deletion / insertion AUC (``step = ceil(HW / di_steps)``, zeros / blur substrates,
    fraction x axis), Average Drop / Increase in Confidence / confidence change (maps min-max
    normalized), ROAD MoRF / LeRF / combined (paper convention, noise 0.01, seeded)."""
    from cam_plugin.evaluate import ROAD, ConfidenceChange, DeletionInsertion

    n = images.shape[-2] * images.shape[-1]
    di = DeletionInsertion(step=math.ceil(n / di_steps))
    di.update(model, images, maps, classes)
    cc = ConfidenceChange()
    cc.update(model, images, maps, classes)
    road = ROAD(percentiles=tuple(road_percentiles), seed=seed)
    road.update(model, images, maps, classes)
    d, c, r = di.compute(), cc.compute(), road.compute()
    return {
        "deletion_auc": d["deletion_auc"],
        "insertion_auc": d["insertion_auc"],
        "average_drop": c["average_drop"],
        "increase_in_confidence": c["increase_in_confidence"],
        "confidence_change": c["confidence_change"],
        "road_morf": r["MoRF"],
        "road_lerf": r["LeRF"],
        "road_combined": r["combined"],
    }


def randomization(
    model: nn.Module,
    images: Tensor,
    classes: Tensor,
    explain: Callable[..., Any],
    layers: Sequence[str],
    seed: int,
) -> dict[str, float]:
    """Spearman rank correlation of each map with the map of a copy whose ``layers`` are
    re-initialised cumulatively (:class:`cam_plugin.evaluate.RandomizationCheck`): after the
    first layer (``random_first``) and after all of them (``random_last``)."""
    from cam_plugin.evaluate import RandomizationCheck

    check = RandomizationCheck(layers=list(layers), seed=seed)
    check.update(model, images, explain, classes[:, None])
    summary = check.compute()
    return {
        "random_first": summary[f"spearman@{layers[0]}"],
        "random_last": summary[f"spearman@{layers[-1]}"],
        "random_steps": {k: v for k, v in summary.items()},  # type: ignore[dict-item]
    }


def completeness(model: nn.Module, images: Tensor, classes: Tensor) -> float:
    """CAM's largest ``|mean_xy M_c + b_c - logit_c|`` at feature resolution
    (:class:`cam_plugin.evaluate.CompletenessResidual`); other methods have no identity."""
    import cam_plugin as cp
    from cam_plugin.evaluate import completeness_residual

    result = cp.CAM(model)(images, targets=classes[:, None])
    return float(completeness_residual(result).summary["max_residual"])


def region(
    maps: Tensor,
    boxes: Sequence[Any],
    masks: Tensor,
    ids: Sequence[int],
    tolerance: float,
) -> dict[str, float]:
    """Pointing game and energy in the ground-truth boxes (:class:`cam_plugin.evaluate.
    PointingGame`, maps min-max normalized for the energy) and MaxBoxAccV2 / PxAP
    (:class:`cam_plugin.metrics.WSOLMetrics`, on min-max normalized maps)."""
    from cam_plugin import minmax_normalize
    from cam_plugin.evaluate import PointingGame
    from cam_plugin.metrics import WSOLMetrics

    pg = PointingGame(tolerance=tolerance, normalize=True)
    pg.update(maps, gt_boxes=boxes, sample_ids=list(ids))
    wsol = WSOLMetrics()
    wsol.update(minmax_normalize(maps.float()), boxes, gt_masks=masks, sample_ids=list(ids))
    p, w = pg.compute(), wsol.compute()
    return {
        "pointing_game": p["pointing_game"],
        "energy": p["energy"],
        "MaxBoxAccV2": w["MaxBoxAccV2"],
        "PxAP": w["PxAP"],
    }
