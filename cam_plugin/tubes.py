"""Tube boxes: the paper's box rule on every frame of a space-time map.

A video CAM is one map per class over ``(T, h, w)`` (``mean_{t,x,y} M_c + b_c = S_c``). Its
*tube* is one box per frame: on frame ``t`` keep the pixels ``M_c(t, x, y) >= threshold ×
peak``, take the largest 8-connected component and its tight box ``(x0, y0, x1, y1)``
(inclusive pixels) — the paper's rule (Zhou et al., CVPR 2016, Sec. 3), as
:func:`cam_plugin.localize.threshold_boxes` applies it to an image. Every frame of every map
is stacked into the batch dimension and labelled in one call of
:func:`cam_plugin.localize.largest_component_boxes` (no loop over frames).

``peak`` is one of two maxima (``relative_to``):

* ``"clip"`` (the default): the maximum of the whole clip's map, ``max_{t,x,y} M_c``. The
  clip's map is one space-time map — the identity averages over ``t, x, y`` and
  :meth:`CAMResult.normalize` scales a clip as one — so one cut value holds in every frame:
  box sizes compare across frames, and a frame where the class's evidence is weak (the
  object has left, is occluded) gets no box instead of a box around its strongest noise.
* ``"frame"``: each frame's own maximum, ``max_{x,y} M_c(t)`` — exactly the image rule run
  on each frame as if it were a separate picture: every frame with any positive value gets a
  box, however weak its evidence is next to the other frames.

A frame with nothing to box gives ``(0, 0, 0, 0)`` (the image rule's convention);
:func:`tube_presence` tells those frames apart from a one-pixel box at the corner.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from .errors import CAMInputError
from .localize import largest_component_boxes, masks

__all__ = ["RelativeTo", "check_relative_to", "tube_boxes", "tube_masks", "tube_presence"]

#: what the threshold is a fraction of: the clip's maximum or each frame's maximum
RelativeTo = Literal["clip", "frame"]
_RELATIVE = ("clip", "frame")


def check_relative_to(relative_to: object) -> RelativeTo:
    """``relative_to`` when it is ``"clip"`` or ``"frame"``.

    Raises:
        CAMInputError: anything else.
    """
    if relative_to not in _RELATIVE:
        raise CAMInputError(
            f"relative_to must be 'clip' (threshold x the clip's max, the default) or 'frame' "
            f"(threshold x each frame's max), got {relative_to!r}"
        )
    return relative_to  # type: ignore[return-value]


def _clip_maps(maps: object) -> Tensor:
    if not isinstance(maps, Tensor) or maps.dim() < 3:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise CAMInputError(
            f"tube boxes need space-time maps (..., T, H, W), e.g. (B, k, T, H, W); got {shape}"
        )
    return maps


def tube_masks(maps: Tensor, threshold: float = 0.2, relative_to: RelativeTo = "clip") -> Tensor:
    """Per-frame masks ``M(t, x, y) >= threshold × peak`` (module doc for ``peak``).

    A map (clip) or frame whose peak is ``<= 0`` gives an empty mask.

    Args:
        maps: float ``(..., T, H, W)``, e.g. ``(B, k, T, H, W)``.
        threshold: fraction in ``[0, 1]`` (the paper: 0.2).
        relative_to: ``"clip"`` or ``"frame"``.

    Returns:
        bool, the shape of ``maps``.

    Raises:
        CAMInputError: not at least 3-D, a bad threshold / ``relative_to``, or NaN values.
    """
    maps = _clip_maps(maps)
    if check_relative_to(relative_to) == "frame":
        return masks(maps, threshold)
    *lead, t, h, w = maps.shape
    # the clip's frames stacked along H: the per-map maximum over (T·H, W) is the clip's
    return masks(maps.reshape(*lead, t * h, w), threshold).reshape(maps.shape)


def tube_boxes(
    maps: Tensor,
    threshold: float = 0.2,
    relative_to: RelativeTo = "clip",
    backend: Literal["auto", "opencv", "torch"] = "auto",
) -> Tensor:
    """One box per frame (module doc): int64 ``(..., T, 4)`` inclusive ``(x0, y0, x1, y1)``
    on the maps' device, in the maps' pixels (upsample first for input pixels).

    Args:
        maps: float ``(..., T, H, W)``.
        threshold: fraction in ``[0, 1]`` of the peak.
        relative_to: ``"clip"`` (default) or ``"frame"``.
        backend: as :func:`cam_plugin.localize.largest_component_boxes`.
    """
    return largest_component_boxes(tube_masks(maps, threshold, relative_to), backend)


def tube_presence(maps: Tensor, threshold: float = 0.2, relative_to: RelativeTo = "clip") -> Tensor:
    """bool ``(..., T)``: True where frame ``t`` has a pixel to box (its box is real; False
    where :func:`tube_boxes` returns the empty ``(0, 0, 0, 0)``)."""
    return tube_masks(maps, threshold, relative_to).flatten(-2).any(dim=-1)
