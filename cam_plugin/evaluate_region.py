"""Does the map point at the object? The pointing game and the energy inside the object.

Both compare a map with a ground-truth region ``R`` of its image: the union of the image's
boxes (inclusive ``(x0, y0, x1, y1)``, as :mod:`cam_plugin.metrics`) or its mask (``True`` /
``1`` = object; ``0`` and the ignore value ``255`` are outside). Maps at another resolution
are resized to the region's with ``F.interpolate(..., "bilinear", align_corners=False)``.

* **Pointing game** (Zhang et al., ECCV 2016, "Top-down Neural Attention by Excitation
  Backprop"): the map's maximum point (the first in raster order on ties) is a hit when it
  lies within ``tolerance`` pixels (Euclidean) of ``R``; the paper uses 15 pixels. The
  summary is the hit rate over all maps (the paper averages per class; group the records by
  class for that).
* **Energy-based pointing game** (Wang et al., CVPRW 2020, "Score-CAM") -- the *relevance
  mass accuracy* of Arras et al. (2022) for non-negative maps: ``sum_R m+ / sum m+`` with
  ``m+ = max(m, 0)`` (0 for a map without positive values); with ``normalize=True`` the map is
  min-max normalized first.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import CAMInputError
from .evaluate_core import EvalResult, FaithfulnessMetric, one_shot
from .result import CAMResult, minmax_normalize
from .wsol_inputs import check_gt_boxes, check_masks, to_numpy

__all__ = ["PointingGame", "pointing_game", "region_masks"]

MapsLike = Union[Tensor, CAMResult]


def region_masks(
    gt_boxes: Optional[object], gt_masks: Optional[object], b: int, size: tuple[int, int]
) -> Tensor:
    """The ground-truth region of each image as a bool tensor ``(B, H, W)``: the union of
    its inclusive boxes, or its mask's object pixels (value 1 / True)."""
    h, w = size
    if gt_masks is not None:
        masks = check_masks(gt_masks, (b, h, w))
        return torch.from_numpy(masks == 1)
    if gt_boxes is None:
        raise CAMInputError("give gt_boxes or gt_masks (the object region of every image).")
    boxes = check_gt_boxes(gt_boxes, b, h, w)
    ys = np.arange(h).reshape(1, h, 1)
    xs = np.arange(w).reshape(1, 1, w)
    region = np.zeros((b, h, w), dtype=bool)
    for i, box in enumerate(boxes):
        x0, y0, x1, y1 = (box[:, j].reshape(-1, 1, 1) for j in range(4))
        region[i] = ((ys >= y0) & (ys <= y1) & (xs >= x0) & (xs <= x1)).any(axis=0)
    return torch.from_numpy(region)


class PointingGame(FaithfulnessMetric):
    """The pointing game and the energy-based pointing game (see the module notes).

    Records per map: ``hit`` (bool), ``distance`` (pixels from the maximum point to the
    region, 0 inside), ``energy`` (share of the positive mass inside). Summary:
    ``pointing_game`` (hit rate) and ``energy`` (mean share).

    Args:
        tolerance: pixels around the region that still count as a hit (the paper's 15).
        normalize: min-max normalize each map before the energy.
    """

    format = "cam_plugin.PointingGame/1"

    def __init__(self, tolerance: float = 15.0, *, normalize: bool = False) -> None:
        if not isinstance(tolerance, (int, float)) or not 0 <= tolerance < float("inf"):
            raise CAMInputError(f"tolerance must be a finite number >= 0, got {tolerance!r}.")
        self.tolerance = float(tolerance)
        self.normalize = bool(normalize)
        super().__init__()

    def config(self) -> dict[str, Any]:
        """The settings that records depend on."""
        return {"tolerance": self.tolerance, "normalize": self.normalize}

    def update(
        self,
        maps: MapsLike,
        gt_boxes: Optional[object] = None,
        gt_masks: Optional[object] = None,
        *,
        classes: Optional[object] = None,
        sample_ids: Optional[Sequence[Hashable]] = None,
        image_size: Optional[tuple[int, int]] = None,
    ) -> None:
        """Score every map of a batch against its image's region.

        Args:
            maps: ``(B, k, h, w)`` / ``(B, h, w)`` float, or a :class:`~cam_plugin.CAMResult`
                (padding maps left out).
            gt_boxes: per image ``(n_i, 4)`` inclusive boxes (a list, or ``(B, 4)`` /
                ``(B, n, 4)``) in image pixels.
            gt_masks: ``(B, H, W)`` bool, or 0 / 1 / 255 ints (instead of boxes).
            classes: the class of each map for the record keys (default: the result's, else
                the map's index ``0 .. k-1``).
            sample_ids: ``B`` ids; a (sample id, class) seen before is skipped.
            image_size: ``(H, W)`` of the boxes' image (default: the masks' size, else the
                maps' own).
        """
        grid, maps_t = _maps_and_classes(maps, classes)
        b, k = grid.shape
        size = _region_size(maps_t, gt_masks, image_size)
        region = region_masks(gt_boxes, gt_masks, b, size).to(maps_t.device)
        if tuple(maps_t.shape[-2:]) != size:
            maps_t = F.interpolate(maps_t.float(), size=size, mode="bilinear", align_corners=False)
        valid = (grid >= 0).view(-1)
        rows = valid.nonzero().view(-1)
        ids = self.sample_keys(sample_ids)(b)
        image = torch.arange(b, device=maps_t.device).repeat_interleave(k)[rows]
        flat_cls = grid.reshape(-1)[rows]
        keys: list[Hashable] = [(ids[i], c) for i, c in zip(image.tolist(), flat_cls.tolist())]
        flat = maps_t.reshape(b * k, *size)[rows]
        columns = {"hit": ((), bool), "distance": ((), np.float64), "energy": ((), np.float64)}
        self._record(keys, columns, lambda sel: self._score(flat, region, image, sel))

    def _score(
        self, maps: Tensor, region: Tensor, image: Tensor, sel: list[int]
    ) -> dict[str, np.ndarray]:
        idx = torch.tensor(sel, dtype=torch.int64, device=maps.device)
        m = maps[idx].double()
        r = region[image[idx]]
        n, h, w = m.shape
        peak = m.flatten(1).argmax(dim=1)
        py, px = (peak // w).double(), (peak % w).double()
        ys = torch.arange(h, device=m.device, dtype=torch.float64).view(1, h, 1)
        xs = torch.arange(w, device=m.device, dtype=torch.float64).view(1, 1, w)
        d2 = (ys - py.view(-1, 1, 1)) ** 2 + (xs - px.view(-1, 1, 1)) ** 2
        d2 = torch.where(r, d2, torch.full_like(d2, float("inf")))
        distance = d2.flatten(1).amin(dim=1).sqrt()
        if self.normalize:
            m = minmax_normalize(m)
        pos = m.clamp_min(0)
        total = pos.flatten(1).sum(dim=1)
        inside = (pos * r).flatten(1).sum(dim=1)
        energy = torch.where(total > 0, inside / total.clamp_min(1e-300), torch.zeros_like(total))
        return {
            "hit": (distance <= self.tolerance).cpu().numpy(),
            "distance": distance.cpu().numpy(),
            "energy": energy.cpu().numpy(),
        }

    def summarize(self, columns: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Hit rate and mean energy."""
        return {
            "pointing_game": float(columns["hit"].mean()),
            "energy": float(columns["energy"].mean()),
        }


def _maps_and_classes(maps: MapsLike, classes: Optional[object]) -> tuple[Tensor, Tensor]:
    """``(B, k)`` class grid (``-1`` padding of a result) and ``(B, k, h, w)`` maps."""
    result_classes = None
    if isinstance(maps, CAMResult):
        result_classes, maps = maps.classes, maps.maps
    if not isinstance(maps, Tensor) or not maps.is_floating_point():
        raise CAMInputError(
            "maps must be a float tensor (B, k, h, w) or (B, h, w), or a CAMResult."
        )
    maps = maps.detach()
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    if maps.dim() != 4 or 0 in maps.shape:
        raise CAMInputError(f"maps must be (B, k, h, w) or (B, h, w); got {tuple(maps.shape)}.")
    if not bool(torch.isfinite(maps).all()):
        raise CAMInputError("maps contain NaN or inf; fix them (or drop those images) first.")
    b, k = maps.shape[:2]
    if classes is not None:
        grid = torch.as_tensor(to_numpy(classes)).to(maps.device, torch.int64)
        grid = grid.view(b, 1).expand(b, k) if grid.shape == (b,) else grid
        if tuple(grid.shape) != (b, k):
            raise CAMInputError(f"classes must be (B,) or (B, k) = ({b}, {k}); got {grid.shape}.")
    elif result_classes is not None:
        grid = result_classes.to(maps.device, torch.int64)
    else:
        grid = torch.arange(k, device=maps.device).expand(b, k)
    return grid, maps


def _region_size(
    maps: Tensor, gt_masks: Optional[object], image_size: Optional[tuple[int, int]]
) -> tuple[int, int]:
    if gt_masks is not None:
        shape = to_numpy(gt_masks).shape
        if len(shape) != 3:
            raise CAMInputError(f"gt_masks must be (B, H, W); got {shape}.")
        return int(shape[1]), int(shape[2])
    if image_size is not None:
        h, w = (int(v) for v in image_size)
        return h, w
    return int(maps.shape[-2]), int(maps.shape[-1])


def pointing_game(
    maps: MapsLike,
    gt_boxes: Optional[object] = None,
    gt_masks: Optional[object] = None,
    **options: Any,
) -> EvalResult:
    """One-shot :class:`PointingGame`; ``options`` take its settings and ``update``'s
    keywords (``classes``, ``image_size``)."""
    keywords = ("classes", "image_size")
    return one_shot(PointingGame, maps, gt_boxes, gt_masks, update_keywords=keywords, **options)
