"""Where each feature cell sits on the image, and upsampling that respects it (geometry only).

A strided CNN's feature cell ``i`` (along one axis) sees a window of the input centred at

    c(i) = o + s · i                                   (input pixel coordinates)

with ``s`` the product of the strides on the way and ``o`` the offset the kernels and
paddings add up to. Plain bilinear upsampling with ``align_corners=False`` assumes the
"half-pixel" placement ``s = H / h``, ``o = (s − 1) / 2``: right for a non-overlapping
patchify stem (a ViT's 16x16/16 convolution), but a convolution with symmetric "same"
padding (3x3 / stride 2 / pad 1, the ResNet family) centres cell ``i`` at ``2 i``, not at
``2 i + 0.5``, and the error compounds: a ResNet's stride-32 map is centred at ``32 i``,
while bilinear upsampling puts it at ``32 i + 15.5``, half a cell down and to the right.

This module is the geometry: a :class:`Placement` ``(s, o)`` per axis and
:func:`place_maps`, which resamples ``(..., h, w)`` maps to ``(H, W)`` pixels with cell
``i`` at ``o + s · i``: output pixel ``y`` reads the map at fractional cell
``(y − o) / s``, clamped to ``[0, h − 1]`` (linear between cells, constant beyond the
outermost centres). With the half-pixel placement it reproduces ``F.interpolate(...,
mode="bilinear", align_corners=False)`` exactly. It imports nothing from cam-plugin but
its errors.

The placement of a real network is *measured* by :mod:`cam_plugin.tracing`
(:func:`~cam_plugin.tracing.trace_placement`, :func:`~cam_plugin.tracing.feature_placement`,
a converted model's :meth:`~cam_plugin.convert.CAMClassifier.placement`).
:meth:`cam_plugin.CAMResult.upsample` uses it by default wherever it can be traced (results of
:class:`cam_plugin.CAM`: :func:`~cam_plugin.tracing.placement_of`, once per input size);
``upsample(placement="bilinear")`` is plain ``F.interpolate``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .errors import CAMInputError

__all__ = ["Placement", "place_maps"]

#: names that lived here before the tracer got its own module; resolved lazily (so this
#: module stays a leaf) for code that still imports them from ``cam_plugin.placement``
_MOVED_TO_TRACING = ("SpatialOp", "TraceResult", "feature_placement", "trace_placement")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_TRACING:
        return getattr(importlib.import_module("cam_plugin.tracing"), name)
    raise AttributeError(f"module 'cam_plugin.placement' has no attribute {name!r}")


@dataclass(frozen=True)
class Placement:
    """Centre of every feature cell in input pixels: ``c(i) = offset + stride · i`` per axis.

    Pixel coordinates are indices: pixel ``y`` covers ``[y − 0.5, y + 0.5]``, so the first
    pixel's centre is 0.

    Attributes:
        stride: ``(s_y, s_x)`` input pixels per feature cell.
        offset: ``(o_y, o_x)`` centre of cell ``(0, 0)`` in input pixels.
        source: how it was obtained (``"traced"``, ``"half-pixel"``, or ``"assumed"`` when
            a trace lost the frame and fell back to the half-pixel placement).
        disagreement: largest offset difference in pixels between branches that were
            merged during the trace (0 when every branch agreed).
    """

    stride: tuple[float, float]
    offset: tuple[float, float]
    source: str = "traced"
    disagreement: float = 0.0

    def __post_init__(self) -> None:
        if len(self.stride) != 2 or len(self.offset) != 2:
            raise CAMInputError(
                f"Placement needs stride=(s_y, s_x) and offset=(o_y, o_x), got "
                f"stride={self.stride}, offset={self.offset}"
            )
        if not all(math.isfinite(v) and v > 0 for v in self.stride):
            raise CAMInputError(f"Placement stride must be finite and > 0, got {self.stride}")
        if not all(math.isfinite(v) for v in self.offset):
            raise CAMInputError(f"Placement offset must be finite, got {self.offset}")

    @staticmethod
    def half_pixel(input_size: Sequence[int], map_size: Sequence[int]) -> Placement:
        """What bilinear upsampling with ``align_corners=False`` assumes:
        ``s = H / h`` and ``o = (s − 1) / 2`` per axis (each cell centred on its block)."""
        (big_h, big_w), (h, w) = _pair(input_size, "input_size"), _pair(map_size, "map_size")
        sy, sx = big_h / h, big_w / w
        return Placement((sy, sx), ((sy - 1) / 2, (sx - 1) / 2), source="half-pixel")

    def centres(self, map_size: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Input-pixel centres of the rows and the columns of an ``(h, w)`` map."""
        h, w = _pair(map_size, "map_size")
        ys = self.offset[0] + self.stride[0] * torch.arange(h, dtype=torch.float64)
        xs = self.offset[1] + self.stride[1] * torch.arange(w, dtype=torch.float64)
        return ys, xs

    def shift_from(self, other: Placement) -> tuple[float, float]:
        """``(dy, dx)``: how far this placement puts cell ``(0, 0)`` from ``other``'s."""
        return (self.offset[0] - other.offset[0], self.offset[1] - other.offset[1])

    def rescaled(self, input_size: Sequence[int], size: Sequence[int]) -> Placement:
        """The same cells on the image resized from ``input_size`` ``(H, W)`` to ``size``
        ``(H', W')``.

        Pixel ``y`` of the original covers ``[y − 0.5, y + 0.5]``, so a point ``c`` maps
        to ``(c + 0.5) · r − 0.5`` with ``r = H' / H`` per axis:
        ``s' = s · r`` and ``o' = (o + 0.5) · r − 0.5``. The identity when the sizes match.
        """
        (big_h, big_w), (new_h, new_w) = _pair(input_size, "input_size"), _pair(size, "size")
        if (big_h, big_w) == (new_h, new_w):
            return self
        ry, rx = new_h / big_h, new_w / big_w
        return Placement(
            (self.stride[0] * ry, self.stride[1] * rx),
            ((self.offset[0] + 0.5) * ry - 0.5, (self.offset[1] + 0.5) * rx - 0.5),
            source=self.source,
            disagreement=self.disagreement,
        )


def _pair(value: Sequence[int], name: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise CAMInputError(f"{name} must be (H, W), got {value!r}") from None
    if a < 1 or b < 1:
        raise CAMInputError(f"{name} must be (H, W) with H, W >= 1, got {value!r}")
    return a, b


# ------------------------------------------------------------------------ resampling


def _axis_matrix(
    out_len: int, in_len: int, stride: float, offset: float, mode: str, ref: Tensor
) -> Tensor:
    """``(out_len, in_len)`` interpolation weights: row ``y`` reads cell ``(y − o) / s``."""
    y = torch.arange(out_len, dtype=torch.float64, device=ref.device)
    u = ((y - offset) / stride).clamp(0, in_len - 1)
    if mode == "nearest":
        idx = torch.floor(u + 0.5).long().clamp(max=in_len - 1)
        mat = torch.zeros(out_len, in_len, dtype=torch.float64, device=ref.device)
        mat[torch.arange(out_len, device=ref.device), idx] = 1.0
        return mat.to(ref.dtype)
    i0 = torch.floor(u).long().clamp(max=in_len - 1)
    i1 = (i0 + 1).clamp(max=in_len - 1)
    frac = u - i0.to(u.dtype)
    mat = torch.zeros(out_len, in_len, dtype=torch.float64, device=ref.device)
    rows = torch.arange(out_len, device=ref.device)
    mat.index_put_((rows, i0), 1.0 - frac, accumulate=True)
    mat.index_put_((rows, i1), frac, accumulate=True)
    return mat.to(ref.dtype)


def place_maps(
    maps: Tensor,
    size: Sequence[int],
    placement: Placement,
    mode: Literal["bilinear", "nearest"] = "bilinear",
) -> Tensor:
    """Resample ``(..., h, w)`` maps to ``(..., H, W)`` with cell ``i`` centred at ``o + s i``.

    ``out[..., y, x] = Σ_ij A_y[y, i] A_x[x, j] maps[..., i, j]`` where row ``y`` of ``A_y``
    holds the linear (or nearest) interpolation weights of the fractional cell
    ``u = clamp((y − o_y) / s_y, 0, h − 1)``; the same along ``x``. Two small matrix
    products, batched over every leading dim, differentiable, on the maps' device.
    With :meth:`Placement.half_pixel` this equals ``F.interpolate(maps, size,
    mode="bilinear", align_corners=False)``.

    Args:
        maps: float tensor ``(..., h, w)``.
        size: output ``(H, W)`` in input pixels.
        placement: the cell centres (:func:`cam_plugin.tracing.trace_placement`,
            :func:`cam_plugin.tracing.feature_placement`).
        mode: ``"bilinear"`` (linear between neighbouring cells) or ``"nearest"``.

    Returns:
        ``(..., H, W)`` tensor of the maps' dtype.
    """
    if not isinstance(maps, Tensor) or maps.dim() < 2:
        raise CAMInputError(
            f"maps must be a tensor (..., h, w), got "
            f"{tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__}"
        )
    if not maps.is_floating_point():
        raise CAMInputError(f"maps must be floating point, got {maps.dtype}")
    if not isinstance(placement, Placement):
        raise CAMInputError(
            f"placement must be a cam_plugin.placement.Placement, got {type(placement).__name__}"
        )
    if mode not in ("bilinear", "nearest"):
        raise CAMInputError(f"placed upsampling supports 'bilinear' or 'nearest', got {mode!r}")
    big_h, big_w = _pair(size, "size")
    h, w = maps.shape[-2:]
    ref = maps if maps.dtype in (torch.float32, torch.float64) else maps.float()
    ay = _axis_matrix(big_h, h, placement.stride[0], placement.offset[0], mode, ref)
    ax = _axis_matrix(big_w, w, placement.stride[1], placement.offset[1], mode, ref)
    out = torch.einsum("yi,...ij,xj->...yx", ay, ref, ax)
    return out.to(maps.dtype)
