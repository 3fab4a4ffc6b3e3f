"""The result of one CAM call: maps, the model's logits and the class of every map.

Each method returns a *new* :class:`CAMResult`; the operations apply to the maps as
they are at that moment, in the order the caller chains them. The usual chain is
``res.upsample().normalize().boxes(0.2)``:

* ``upsample`` first, then ``relu`` / ``normalize``: ReLU and min-max scaling of the
  upsampled map are what the picture shows (bilinear upsampling does not commute with
  ReLU, so ``relu().upsample()`` gives a slightly different map).
* ``boxes(threshold)`` keeps pixels ``>= threshold × max`` *of each map as it is*:
  on a normalized map that is the paper's "20% of the max"; on a raw map with negative
  values it is still a fraction of that map's own maximum.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import CAMInputError

if TYPE_CHECKING:
    from .placement import Placement

__all__ = ["CAMResult", "minmax_normalize"]


def minmax_normalize(maps: Tensor) -> Tensor:
    """Per-map min-max scaling over the last two dims: ``(m − min) / (max − min)``.

    A constant map (``max == min``) becomes all zeros, never NaN.
    """
    flat = maps.flatten(-2)
    lo = flat.amin(dim=-1, keepdim=True)
    hi = flat.amax(dim=-1, keepdim=True)
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    out = torch.where(span > 0, (flat - lo) / safe, torch.zeros_like(flat))
    return out.reshape(maps.shape)


@dataclass(frozen=True)
class CAMResult:
    """Class activation maps of a batch.

    Attributes:
        maps: ``(B, k, h, w)``; at feature resolution straight from :class:`~cam_plugin.CAM`.
        logits: ``(B, C)`` the model's own output for the batch.
        classes: ``(B, k)`` class index of every map; ``-1`` pads ragged multi-label targets.
        bias: ``(B, k)`` the folded head's bias ``b'_c`` of every map, so that at feature
            resolution ``maps.mean((2, 3)) + bias == logits.gather(1, classes)``.
        input_size: ``(H, W)`` of the images.
        exact: False for max-pooled heads (the identity does not hold).
        stage: ``"feature"``, or the operations applied since (``"upsampled"``, ...).
        placement: where each feature cell sits on the image
            (:class:`~cam_plugin.placement.Placement`), when known; ``upsample()`` then
            centres every cell on its receptive field. ``None`` after upsampling.
    """

    maps: Tensor
    logits: Tensor
    classes: Tensor
    bias: Tensor
    input_size: tuple[int, int]
    exact: bool = True
    stage: str = "feature"
    placement: Optional[Placement] = None

    @property
    def valid(self) -> Tensor:
        """``(B, k)`` bool: which maps are real (False only for padding of ragged targets)."""
        return self.classes >= 0

    @property
    def probabilities(self) -> Tensor:
        """``(B, k)`` softmax probability of each map's class (0 for padding)."""
        probs = self.logits.float().softmax(dim=1).gather(1, self.classes.clamp_min(0))
        return probs * self.valid

    @property
    def scores(self) -> Tensor:
        """``(B, k)`` logit of each map's class."""
        return self.logits.gather(1, self.classes.clamp_min(0))

    def identity_residual(self) -> Tensor:
        """``(B, k)`` of ``mean_xy M_c + b_c − logit_c``: zero up to float error for an exact
        CAM at feature resolution (after upsampling the mean changes slightly)."""
        res = self.maps.float().mean(dim=(2, 3)) + self.bias.float() - self.scores.float()
        return res * self.valid

    def upsample(
        self,
        size: Optional[tuple[int, int]] = None,
        mode: Literal["bilinear", "bicubic", "nearest"] = "bilinear",
        align_corners: Optional[bool] = False,
        placement: Union[Placement, Literal["auto", "bilinear"], None] = "auto",
    ) -> CAMResult:
        """Resize the maps, by default to the input size.

        Args:
            size: ``(H, W)``; default the input size.
            mode: interpolation (``"bilinear"``, ``"bicubic"``, ``"nearest"``).
            align_corners: as in ``F.interpolate`` (plain upsampling only).
            placement: where feature cell ``i`` goes: at input pixel ``o + s·i`` for a
                :class:`~cam_plugin.placement.Placement` (a converted model's
                ``placement(input_size)``, or :func:`cam_plugin.placement.feature_placement`),
                resampled by :func:`cam_plugin.placement.place_maps` (``"bilinear"`` /
                ``"nearest"``); ``"auto"`` (default) uses :attr:`placement` of this result
                when it is known, else plain ``F.interpolate``; ``"bilinear"`` or ``None``:
                plain ``F.interpolate`` (``align_corners=False`` puts cell ``i`` at
                ``s·i + (s − 1)/2``, half a cell off for padded strided convolutions).
        """
        target = tuple(size) if size is not None else self.input_size
        if len(target) != 2 or min(target) < 1:
            raise CAMInputError(f"upsample size must be (H, W) with H, W >= 1, got {size}")
        if placement == "auto":
            placement = self.placement
        elif placement == "bilinear":
            placement = None
        elif placement is not None and not hasattr(placement, "offset"):
            raise CAMInputError(
                f"placement must be a cam_plugin.placement.Placement, 'auto', 'bilinear' or "
                f"None; got {placement!r}"
            )
        if placement is not None:
            from .placement import place_maps

            if mode == "bicubic":
                raise CAMInputError("placed upsampling supports mode 'bilinear' or 'nearest'")
            sy, sx = (t / i for t, i in zip(target, self.input_size))
            scaled = type(placement)(
                (placement.stride[0] * sy, placement.stride[1] * sx),
                ((placement.offset[0] + 0.5) * sy - 0.5, (placement.offset[1] + 0.5) * sx - 0.5),
                source=placement.source,
                disagreement=placement.disagreement,
            )
            maps = place_maps(self.maps, target, scaled, mode=mode)  # type: ignore[arg-type]
            return replace(self, maps=maps, stage=self._after("upsampled"), placement=None)
        ac = None if mode == "nearest" else align_corners
        maps = F.interpolate(self.maps, size=target, mode=mode, align_corners=ac)
        return replace(self, maps=maps, stage=self._after("upsampled"), placement=None)

    def normalize(self) -> CAMResult:
        """Min-max scale every map to ``[0, 1]`` (constant map -> zeros)."""
        return replace(self, maps=minmax_normalize(self.maps), stage=self._after("normalized"))

    def relu(self) -> CAMResult:
        """Clamp negative evidence to zero."""
        return replace(self, maps=torch.relu(self.maps), stage=self._after("relu"))

    def boxes(self, threshold: float = 0.2) -> Tensor:
        """The paper's box per map: pixels ``>= threshold × max`` of the map, largest
        8-connected component, its ``(x0, y0, x1, y1)`` (inclusive pixels); ``(B, k, 4)``.

        Coordinates are in the maps' current resolution: call :meth:`upsample` first to
        get boxes in input pixels.
        """
        from .localize import threshold_boxes

        return threshold_boxes(self.maps, threshold)

    def masks(self, threshold: float = 0.2) -> Tensor:
        """``(B, k, h, w)`` bool: pixels ``>= threshold × max`` of each map."""
        from .localize import masks

        return masks(self.maps, threshold)

    def per_image(self) -> list[tuple[Tensor, Tensor]]:
        """``[(classes_i, maps_i), ...]`` without the padding of ragged targets."""
        return [(c[v], m[v]) for c, m, v in zip(self.classes, self.maps, self.valid)]

    def to_numpy(self) -> dict[str, Any]:
        """``maps``, ``logits``, ``classes``, ``probabilities`` as numpy arrays."""
        return {
            "maps": self.maps.detach().float().cpu().numpy(),
            "logits": self.logits.detach().float().cpu().numpy(),
            "classes": self.classes.detach().cpu().numpy(),
            "probabilities": self.probabilities.detach().cpu().numpy(),
            "bias": self.bias.detach().float().cpu().numpy(),
        }

    def _after(self, op: str) -> str:
        return op if self.stage == "feature" else f"{self.stage}+{op}"

    def __repr__(self) -> str:
        return (
            f"CAMResult(maps={tuple(self.maps.shape)}, classes={tuple(self.classes.shape)}, "
            f"input_size={self.input_size}, stage={self.stage!r}, exact={self.exact})"
        )
