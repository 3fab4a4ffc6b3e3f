"""One fixed value scale for the maps of many images (:class:`MapScale`), next to per-map
min-max normalization.

Maps are in logit units (``mean_xy M_c + b_c = S_c``), so one raw value means the same in
every image; ``m̂ = clamp((m − low) / (high − low), 0, 1)`` with bounds given or fitted on a
calibration set (:meth:`MapScale.fit`) colours them alike. Used by
:meth:`cam_plugin.result.CAMResult.normalize` and the pictures (:mod:`cam_plugin.viz`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from torch import Tensor

from .errors import CAMInputError

if TYPE_CHECKING:
    from .result import CAMResult

__all__ = ["FIT_MAX_VALUES", "MapScale", "as_scale"]

#: at most this many values are kept by :meth:`MapScale.fit` (an even stride over the rest)
FIT_MAX_VALUES = 1 << 24


@dataclass(frozen=True)
class MapScale:
    """One fixed value scale for the maps of many images, next to per-map min-max.

    ``m̂ = clamp((m − low) / (high − low), 0, 1)``: the same raw value (in logit units, since
    ``mean_xy M_c + b_c = S_c``) gets the same colour in every image, so maps of different
    images (or classes) can be compared. Build it from given bounds, ``MapScale(low, high)``,
    or from a calibration pass with :meth:`fit`.

    Attributes:
        low: the raw value drawn as 0.
        high: the raw value drawn as 1 (``> low``).
        label: what the bounds are, for colour bars and reports (``"given bounds"``,
            ``"p1-p99, 40,960 values"``).
    """

    low: float
    high: float
    label: str = "given bounds"

    def __post_init__(self) -> None:
        low, high = float(self.low), float(self.high)
        if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
            raise CAMInputError(
                f"MapScale needs finite bounds with high > low, got low={self.low!r}, "
                f"high={self.high!r}"
            )
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @classmethod
    def fit(
        cls,
        maps: Iterable[Union[CAMResult, Tensor]],
        *,
        percentiles: tuple[float, float] = (1.0, 99.0),
        symmetric: bool = False,
    ) -> MapScale:
        """The scale of a calibration set: ``low, high`` = the ``percentiles`` of every value
        of every map (padding maps of ragged targets left out).

        Args:
            maps: :class:`CAMResult` objects (any stage: feature resolution or upsampled,
                raw or after :meth:`CAMResult.relu`) or map tensors ``(..., h, w)``, for
                example one per batch of a data loader.
            percentiles: ``(p_low, p_high)`` in ``[0, 100]``; ``(0, 100)`` is the min and
                max. Percentiles ignore the few extreme values a min-max would be set by.
            symmetric: ``low = −high`` with ``high`` the ``p_high`` percentile of ``|m|``
                (signed maps, e.g. contrastive ``M_c − M_c'``: zero stays in the middle).

        Memory stays bounded: once more than ``2 ·`` :data:`FIT_MAX_VALUES` values are held,
        every second one is dropped (and later maps are sampled at the same stride), so the
        percentiles come from an even subsample of a large calibration set.
        """
        lo_p, hi_p = (float(v) for v in percentiles)
        if not 0.0 <= lo_p < hi_p <= 100.0:
            raise CAMInputError(
                f"percentiles must be (low, high) with 0 <= low < high <= 100, got {percentiles}"
            )
        parts: list[Tensor] = []
        count, held, step = 0, 0, 1
        for item in maps:
            values = _scale_values(item)
            count += values.numel()
            parts.append(values[::step])
            held += parts[-1].numel()
            if held > 2 * FIT_MAX_VALUES:
                parts, step = [torch.cat(parts)[::2]], step * 2
                held = parts[0].numel()
        if count == 0:
            raise CAMInputError("MapScale.fit needs at least one map with values")
        arr = torch.cat(parts).numpy()
        if not np.isfinite(arr).all():
            raise CAMInputError("MapScale.fit: the maps contain NaN or inf")
        if symmetric:
            high = float(np.percentile(np.abs(arr), hi_p))
            low = -high
            label = f"±p{hi_p:g} of |m|, {count:,} values"
        else:
            low, high = (float(v) for v in np.percentile(arr, [lo_p, hi_p]))
            label = f"p{lo_p:g}-p{hi_p:g}, {count:,} values"
        if high <= low:  # constant maps: any non-empty range draws them
            high = low + 1.0
        return cls(low, high, label)

    def apply(self, maps: Tensor) -> Tensor:
        """``clamp((maps − low) / (high − low), 0, 1)``, same shape and dtype."""
        return ((maps - self.low) / (self.high - self.low)).clamp(0.0, 1.0)

    def __call__(self, maps: Tensor) -> Tensor:
        """:meth:`apply`."""
        return self.apply(maps)


def _scale_values(item: Any) -> Tensor:
    """Every value of the real maps of a result (or of a tensor), flat, float32 on the CPU."""
    from .result import CAMResult  # the result module imports this one

    if isinstance(item, CAMResult):
        maps = item.maps.detach()
        keep = item.valid.to(maps.device)
        values = maps[keep] if not bool(keep.all()) else maps
    elif isinstance(item, Tensor):
        values = item.detach()
    else:
        raise CAMInputError(
            f"MapScale.fit takes CAMResult objects or map tensors, got {type(item).__name__}"
        )
    return values.float().flatten().cpu()


def as_scale(scale: Any) -> MapScale:
    """``scale`` as a :class:`MapScale`: one already, or ``(low, high)``."""
    if isinstance(scale, MapScale):
        return scale
    if isinstance(scale, (tuple, list)) and len(scale) == 2:
        return MapScale(float(scale[0]), float(scale[1]))
    raise CAMInputError(
        f"scale must be None (per-map min-max), a cam_plugin.MapScale or (low, high); got {scale!r}"
    )
