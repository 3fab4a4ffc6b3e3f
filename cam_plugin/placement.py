"""Where each feature cell sits on the image, and upsampling that respects it.

A strided CNN's feature cell ``i`` (along one axis) sees a window of the input centred at

    c(i) = o + s · i                                   (input pixel coordinates)

with ``s`` the product of the strides on the way and ``o`` the offset the kernels and
paddings add up to. Plain bilinear upsampling with ``align_corners=False`` assumes the
"half-pixel" placement ``s = H / h``, ``o = (s − 1) / 2``: right for a non-overlapping
patchify stem (a ViT's 16x16/16 convolution), but a convolution with symmetric "same"
padding (3x3 / stride 2 / pad 1, the ResNet family) centres cell ``i`` at ``2 i``, not at
``2 i + 0.5``, and the error compounds: a ResNet's stride-32 map is centred at ``32 i``,
while bilinear upsampling puts it at ``32 i + 15.5``, half a cell down and to the right.

This module measures ``(s, o)`` per axis and resamples maps accordingly:

* :func:`trace_placement` runs the backbone once on a probe input (eval mode, no autograd,
  RNG untouched, everything removed afterwards) under a ``TorchFunctionMode`` that sees
  every torch call and follows the data flow tensor by tensor. Each convolution, pooling,
  padding, adaptive pooling, resize or pixel-(un)shuffle updates the frame ``(s, o)`` from
  its *actual* kernel size, stride, padding and dilation (TF-"same" padding done with an
  ``F.pad`` before the convolution is seen as what it is: a pad, then a valid
  convolution); element-wise ops, normalization, activations and concatenations keep it.
  For one such layer with kernel ``k``, dilation ``d``, stride ``t`` and left padding
  ``p``: ``s_out = s_in · t`` and ``o_out = o_in + s_in · ((d (k − 1)) / 2 − p)``.
  When two branches with different frames meet (a ResNet-D shortcut averages 2x2 cells,
  centre ``2 i + 0.5``, while its main path's 3x3/2 convolution is centred at ``2 i``),
  their mean is used and the disagreement is reported.
* :func:`place_maps` resamples ``(..., h, w)`` maps to ``(H, W)`` pixels with cell ``i``
  at ``o + s · i``: output pixel ``y`` reads the map at fractional cell ``(y − o) / s``,
  clamped to ``[0, h − 1]`` (linear between cells, constant beyond the outermost
  centres). With the half-pixel placement it reproduces ``F.interpolate(...,
  mode="bilinear", align_corners=False)`` exactly.

Use it through :meth:`cam_plugin.CAMResult.upsample` (``placement=``), a converted model's
:meth:`~cam_plugin.convert.CAMClassifier.placement`, or :func:`feature_placement` for any
model the CAM core resolves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .errors import CAMInputError

__all__ = [
    "Placement",
    "SpatialOp",
    "TraceResult",
    "feature_placement",
    "place_maps",
    "trace_placement",
]


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
        placement: the cell centres (:func:`trace_placement`, :func:`feature_placement`).
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


# ------------------------------------------------------------------------ tracing


@dataclass(frozen=True)
class _Frame:
    """Per-axis ``c(i) = o + s i``, the spatial size, and where the spatial dims are
    (negative indices: ``(-2, -1)`` for NCHW, ``(-3, -2)`` for NHWC)."""

    sy: float
    sx: float
    oy: float
    ox: float
    h: int
    w: int
    dy: int = -2
    dx: int = -1

    def fits(self, t: Tensor) -> bool:
        return (
            t.dim() >= max(-self.dy, -self.dx)
            and int(t.shape[self.dy]) == self.h
            and int(t.shape[self.dx]) == self.w
        )

    def moved(self, dy: int, dx: int) -> _Frame:
        return _Frame(self.sy, self.sx, self.oy, self.ox, self.h, self.w, dy, dx)


@dataclass(frozen=True)
class SpatialOp:
    """One call that changed the frame (convolution, pooling, padding, resize, ...).

    Attributes:
        op: the torch function's name (``"conv2d"``, ``"max_pool2d"``, ``"pad"``, ...).
        module_name: qualified name of the innermost module that made the call ("" at the
            top level).
        module: that module (``None`` at the top level).
        in_size, out_size: spatial sizes before and after.
        stride: the call's own stride ``(t_y, t_x)`` (1 for pads).
        out_stride: the total stride ``(s_y, s_x)`` of its output.
    """

    op: str
    module_name: str
    module: Optional[nn.Module]
    in_size: tuple[int, int]
    out_size: tuple[int, int]
    stride: tuple[int, int]
    out_stride: tuple[float, float]


@dataclass
class TraceResult:
    """What :func:`trace_placement` saw.

    Attributes:
        placements: the placement of every 4-D tensor in the traced output (flattened in
            order: a tensor, or the items of a tuple / list / dict), ``None`` when the frame
            was lost (a reshape to tokens, an unknown op that changed the size).
        at: the placement of the watched submodule's tensor (``at=``), if any.
        ops: every call that changed a frame, in call order.
        lost: descriptions of calls where a frame could not be followed.
        disagreement: largest offset difference (pixels) between merged branches.
        input_size: ``(H, W)`` of the probe.
    """

    placements: list[Optional[Placement]]
    at: Optional[Placement]
    ops: list[SpatialOp]
    lost: list[str] = field(default_factory=list)
    disagreement: float = 0.0
    input_size: tuple[int, int] = (0, 0)


def _two(v: Any, name: str = "") -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return int(v[0]), int(v[0])
        return int(v[0]), int(v[1])
    return int(v), int(v)


_SIGNATURES: dict[str, tuple[str, ...]] = {
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "max_pool2d": (
        "input",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "ceil_mode",
        "return_indices",
    ),
    "avg_pool2d": (
        "input",
        "kernel_size",
        "stride",
        "padding",
        "ceil_mode",
        "count_include_pad",
        "divisor_override",
    ),
    "lp_pool2d": ("input", "norm_type", "kernel_size", "stride", "ceil_mode"),
    "pad": ("input", "pad", "mode", "value"),
    "adaptive_avg_pool2d": ("input", "output_size"),
    "adaptive_max_pool2d": ("input", "output_size", "return_indices"),
    "interpolate": (
        "input",
        "size",
        "scale_factor",
        "mode",
        "align_corners",
        "recompute_scale_factor",
        "antialias",
    ),
    "pixel_unshuffle": ("input", "downscale_factor"),
    "pixel_shuffle": ("input", "upscale_factor"),
}
_ALIASES = {
    "_max_pool2d": "max_pool2d",
    "max_pool2d_with_indices": "max_pool2d",
    "_adaptive_max_pool2d": "adaptive_max_pool2d",
    "adaptive_max_pool2d_with_indices": "adaptive_max_pool2d",
    "upsample": "interpolate",
    "upsample_bilinear": "interpolate",
    "upsample_nearest": "interpolate",
}


def _bind(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = _SIGNATURES[name]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _windowed(
    frame: _Frame,
    out_hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pad_left: tuple[float, float],
    dilation: tuple[int, int] = (1, 1),
) -> _Frame:
    """Frame after a sliding window: centre of output ``j`` is at input index
    ``t j + d (k − 1) / 2 − p`` (``p`` the left / top padding)."""
    cy = dilation[0] * (kernel[0] - 1) / 2 - pad_left[0]
    cx = dilation[1] * (kernel[1] - 1) / 2 - pad_left[1]
    return _Frame(
        sy=frame.sy * stride[0],
        sx=frame.sx * stride[1],
        oy=frame.oy + frame.sy * cy,
        ox=frame.ox + frame.sx * cx,
        h=out_hw[0],
        w=out_hw[1],
    )


def _affine_fit(centres: Tensor) -> tuple[float, float]:
    """``(s, o)`` of ``c(i) ≈ o + s i`` for window centres (exact when evenly spaced)."""
    n = centres.numel()
    if n == 1:
        return 1.0, float(centres[0])
    i = torch.arange(n, dtype=torch.float64)
    s = float(((i - i.mean()) * (centres - centres.mean())).sum() / ((i - i.mean()) ** 2).sum())
    o = float(centres.mean() - s * i.mean())
    return s, o


def _adaptive_axis(in_len: int, out_len: int) -> tuple[float, float]:
    i = torch.arange(out_len, dtype=torch.float64)
    start = torch.floor(i * in_len / out_len)
    end = torch.ceil((i + 1) * in_len / out_len)
    return _affine_fit((start + end - 1) / 2)


def _resize_axis(in_len: int, out_len: int, align_corners: bool) -> tuple[float, float]:
    """Input index of output sample ``j`` for a resize: ``(s, o)`` with ``u = o + s j``."""
    if align_corners:
        if out_len == 1:
            return 1.0, 0.0
        return (in_len - 1) / (out_len - 1), 0.0
    scale = in_len / out_len
    return scale, 0.5 * scale - 0.5


class _FrameTracer(TorchFunctionMode):
    """Follows every tensor's frame through one forward pass (see the module doc)."""

    def __init__(self, stack: list[tuple[str, Optional[nn.Module]]]) -> None:
        super().__init__()
        self.frames: dict[int, _Frame] = {}
        self.keep: list[Tensor] = []
        self.ops: list[SpatialOp] = []
        self.lost: list[str] = []
        self.disagreement = 0.0
        self.stack = stack

    def set(self, t: Tensor, frame: Optional[_Frame]) -> None:
        if frame is None:
            return
        self.frames[id(t)] = frame
        self.keep.append(t)

    def get(self, t: Any) -> Optional[_Frame]:
        if isinstance(t, Tensor):
            fr = self.frames.get(id(t))
            if fr is not None and fr.fits(t):
                return fr
        return None

    def _record(self, name: str, before: _Frame, after: _Frame, stride: tuple[int, int]) -> None:
        mod_name, module = self.stack[-1] if self.stack else ("", None)
        self.ops.append(
            SpatialOp(
                op=name,
                module_name=mod_name,
                module=module,
                in_size=(before.h, before.w),
                out_size=(after.h, after.w),
                stride=stride,
                out_stride=(after.sy, after.sx),
            )
        )

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Optional[dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._follow(func, args, kwargs, out)
        except Exception as err:  # a probe must never break the forward pass
            self.lost.append(f"{getattr(func, '__name__', func)}: {err}")
        return out

    def _follow(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.dim() >= 3]
        if not outs:
            return
        name = getattr(func, "__name__", "")
        name = _ALIASES.get(name, name)
        if name in _SIGNATURES and args and isinstance(args[0], Tensor):
            frame = self.get(args[0])
            if frame is None or (frame.dy, frame.dx) != (-2, -1):
                if args[0].dim() == 4:
                    self.lost.append(f"{name}: its input's frame is unknown")
                return
            new = self._spatial(name, _bind(name, args, kwargs), frame, outs[0])
            if new is not None:
                if new != frame:
                    stride = (round(new.sy / frame.sy), round(new.sx / frame.sx))
                    self._record(name, frame, new, stride)
                for t in outs:
                    if new.fits(t):
                        self.set(t, new)
            return
        if name in ("permute", "transpose", "swapaxes", "swapdims") and args:
            self._follow_permute(name, args, kwargs, out)
            return
        # any other op: outputs with the spatial size of a framed input inherit its frame
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        framed = [(t, fr) for t, fr in ((t, self.get(t)) for t in inputs) if fr is not None]
        if not framed:
            return
        for t in outs:
            same = []
            for src, fr in framed:
                if fr.fits(t) and (t.dim() == src.dim() or (fr.dy, fr.dx) == (-2, -1)):
                    same.append(fr)
            if not same:
                if t.dim() == 4 and name not in ("reshape", "view", "flatten", "unflatten"):
                    self.lost.append(f"{name or func}: changed the size to {tuple(t.shape)}")
                continue
            self.set(t, self._merge(same))

    def _follow_permute(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        src = args[0]
        frame = self.get(src)
        if frame is None or not isinstance(out, Tensor):
            return
        rank = src.dim()
        py, px = frame.dy % rank, frame.dx % rank
        if name == "permute":
            dims = args[1:] if len(args) > 2 or not isinstance(args[1], (tuple, list)) else args[1]
            dims = kwargs.get("dims", dims)
            order = [int(d) % rank for d in dims]
        else:
            d0 = int(args[1] if len(args) > 1 else kwargs.get("dim0", 0)) % rank
            d1 = int(args[2] if len(args) > 2 else kwargs.get("dim1", 0)) % rank
            order = list(range(rank))
            order[d0], order[d1] = order[d1], order[d0]
        if sorted(order) != list(range(rank)):
            return
        moved = frame.moved(order.index(py) - rank, order.index(px) - rank)
        if moved.fits(out):
            self.set(out, moved)

    def _merge(self, frames: list[_Frame]) -> _Frame:
        first = frames[0]
        if all(f == first for f in frames[1:]):
            return first
        oy = sum(f.oy for f in frames) / len(frames)
        ox = sum(f.ox for f in frames) / len(frames)
        spread = max(
            max(f.oy for f in frames) - min(f.oy for f in frames),
            max(f.ox for f in frames) - min(f.ox for f in frames),
        )
        self.disagreement = max(self.disagreement, spread)
        return _Frame(first.sy, first.sx, oy, ox, first.h, first.w, first.dy, first.dx)

    def _spatial(
        self, name: str, a: dict[str, Any], frame: _Frame, out: Tensor
    ) -> Optional[_Frame]:
        out_hw = (int(out.shape[-2]), int(out.shape[-1]))
        if name == "conv2d":
            weight = a["weight"]
            kernel = (int(weight.shape[-2]), int(weight.shape[-1]))
            stride = _two(a.get("stride", 1))
            dilation = _two(a.get("dilation", 1))
            padding = a.get("padding", 0)
            if isinstance(padding, str):
                if padding == "valid":
                    pad: tuple[float, float] = (0, 0)
                else:  # 'same': total d (k - 1), the smaller half on the left / top
                    pad = (
                        (dilation[0] * (kernel[0] - 1)) // 2,
                        (dilation[1] * (kernel[1] - 1)) // 2,
                    )
            else:
                pad = _two(padding)
            return _windowed(frame, out_hw, kernel, stride, pad, dilation)
        if name in ("max_pool2d", "avg_pool2d", "lp_pool2d"):
            kernel = _two(a["kernel_size"])
            stride_arg = a.get("stride")
            stride = kernel if stride_arg is None or stride_arg == [] else _two(stride_arg)
            pad = _two(a.get("padding", 0)) if name != "lp_pool2d" else (0, 0)
            dilation = _two(a.get("dilation", 1)) if name == "max_pool2d" else (1, 1)
            return _windowed(frame, out_hw, kernel, stride, pad, dilation)
        if name == "pad":
            pads = list(a["pad"])
            left = pads[0] if len(pads) >= 1 else 0
            top = pads[2] if len(pads) >= 3 else 0
            return _Frame(
                frame.sy,
                frame.sx,
                frame.oy - frame.sy * top,
                frame.ox - frame.sx * left,
                out_hw[0],
                out_hw[1],
            )
        if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
            (ky, cy), (kx, cx) = (
                _adaptive_axis(frame.h, out_hw[0]),
                _adaptive_axis(frame.w, out_hw[1]),
            )
            return _Frame(
                frame.sy * ky,
                frame.sx * kx,
                frame.oy + frame.sy * cy,
                frame.ox + frame.sx * cx,
                out_hw[0],
                out_hw[1],
            )
        if name == "interpolate":
            ac = bool(a.get("align_corners") or False)
            (ky, cy), (kx, cx) = (
                _resize_axis(frame.h, out_hw[0], ac),
                _resize_axis(frame.w, out_hw[1], ac),
            )
            return _Frame(
                frame.sy * ky,
                frame.sx * kx,
                frame.oy + frame.sy * cy,
                frame.ox + frame.sx * cx,
                out_hw[0],
                out_hw[1],
            )
        if name == "pixel_unshuffle":
            r = int(a["downscale_factor"])
            return _windowed(frame, out_hw, (r, r), (r, r), (0, 0))
        if name == "pixel_shuffle":
            r = int(a["upscale_factor"])
            s, o = 1 / r, 0.5 / r - 0.5
            return _Frame(
                frame.sy * s,
                frame.sx * s,
                frame.oy + frame.sy * o,
                frame.ox + frame.sx * o,
                out_hw[0],
                out_hw[1],
            )
        return None


def _to_placement(frame: Optional[_Frame], disagreement: float) -> Optional[Placement]:
    if frame is None:
        return None
    return Placement(
        (frame.sy, frame.sx), (frame.oy, frame.ox), source="traced", disagreement=disagreement
    )


def trace_placement(
    model: nn.Module,
    example: Union[Tensor, Sequence[int]],
    *,
    at: Optional[nn.Module] = None,
    capture: Literal["output", "input"] = "output",
) -> TraceResult:
    """Run ``model`` once and follow where every feature cell is centred (module doc).

    The probe runs in eval mode without autograd and with the global RNG state forked;
    the function mode and every hook are removed afterwards, also on error, and each
    module's train/eval flag is restored.

    Args:
        model: the backbone or the whole classifier.
        example: an input batch, or its size ``(C, H, W)`` (a zero batch of one image is
            used; the placement may depend on ``H, W`` when padding is TF-"same").
        at: optionally a submodule whose output (``capture="output"``) or first input
            (``"input"``) to report as :attr:`TraceResult.at` (e.g. the feature module of a
            CAM adapter).
        capture: which tensor of ``at``.

    Returns:
        A :class:`TraceResult`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace_placement needs an nn.Module, got {type(model).__name__}")
    if isinstance(example, Tensor):
        x = example
    else:
        dims = [int(v) for v in example]
        if len(dims) != 3 or min(dims) < 1:
            raise CAMInputError(f"example must be a tensor or (C, H, W), got {example!r}")
        ref = next(iter(model.parameters()), None)
        x = torch.zeros(
            (1, *dims),
            device=ref.device if ref is not None else None,
            dtype=ref.dtype if ref is not None and ref.is_floating_point() else torch.float32,
        )
    if x.dim() != 4:
        raise CAMInputError(f"the probe input must be (B, C, H, W), got {tuple(x.shape)}")
    in_hw = (int(x.shape[-2]), int(x.shape[-1]))
    stack: list[tuple[str, Optional[nn.Module]]] = []
    tracer = _FrameTracer(stack)
    at_tensor: list[Optional[Tensor]] = [None]
    handles = []

    def push(name: str) -> Any:
        def hook(mod: nn.Module, args: Any) -> None:
            stack.append((name, mod))

        return hook

    def pop(mod: nn.Module, args: Any, output: Any) -> None:
        if stack:
            stack.pop()

    modes = {m: m.training for m in model.modules()}
    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(push(name)))
            handles.append(module.register_forward_hook(pop, always_call=True))
        if at is not None:
            if capture == "output":

                def grab_out(mod: nn.Module, args: Any, output: Any) -> None:
                    at_tensor[0] = _first(output)

                handles.append(at.register_forward_hook(grab_out))
            else:

                def grab_in(mod: nn.Module, args: Any) -> None:
                    at_tensor[0] = _first(args)

                handles.append(at.register_forward_pre_hook(grab_in))
        model.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            tracer.set(x, _Frame(1.0, 1.0, 0.0, 0.0, in_hw[0], in_hw[1]))
            with tracer:
                output = model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    tensors = [t for t in tree_flatten(output)[0] if isinstance(t, Tensor) and t.dim() == 4]
    placements = [_to_placement(tracer.get(t), tracer.disagreement) for t in tensors]
    at_placement = None
    if at_tensor[0] is not None:
        at_placement = _to_placement(tracer.get(at_tensor[0]), tracer.disagreement)
    return TraceResult(
        placements=placements,
        at=at_placement,
        ops=tracer.ops,
        lost=tracer.lost,
        disagreement=tracer.disagreement,
        input_size=in_hw,
    )


def _first(value: Any) -> Optional[Tensor]:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


def feature_placement(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    adapter: Any = None,
) -> Placement:
    """The placement of the CAM feature map of any model the CAM core resolves.

    Traces ``model`` on a zero probe of ``input_size`` and reads the frame of the tensor the
    adapter captures (``adapter.feature_module``'s output or input). When the trace loses
    the frame (token layouts, scripted modules, unknown resizing ops), or the adapter's
    layout is not NCHW, the half-pixel placement of plain bilinear upsampling is returned
    with ``source="assumed"``.

    Args:
        model: the classifier.
        input_size: ``(C, H, W)`` or ``(H, W)`` (then ``C`` from the adapter / 3).
        adapter: a :class:`cam_plugin.Adapter`; resolved with :func:`cam_plugin.resolve`
            when omitted.

    Returns:
        A :class:`Placement` in pixels of an ``H x W`` input.
    """
    from .adapter import Adapter
    from .registry import resolve

    dims = [int(v) for v in input_size]
    if adapter is None:
        adapter = resolve(model, input_size=dims if len(dims) == 3 else None)
    if not isinstance(adapter, Adapter):
        raise TypeError(f"adapter must be a cam_plugin.Adapter, got {type(adapter).__name__}")
    if len(dims) == 2:
        channels = adapter.input_size[0] if adapter.input_size else 3
        dims = [channels, *dims]
    if len(dims) != 3:
        raise CAMInputError(f"input_size must be (C, H, W) or (H, W), got {input_size!r}")
    result = trace_placement(model, dims, at=adapter.feature_module, capture=adapter.capture)
    map_hw: Optional[tuple[int, int]] = None
    if result.at is not None and adapter.layout.kind == "NCHW":
        return result.at
    # the frame was lost: fall back to the half-pixel placement at the map's size
    probe = torch.zeros(1, *dims)
    ref = next(iter(model.parameters()), None)
    if ref is not None:
        probe = probe.to(device=ref.device, dtype=ref.dtype)
    from .hooks import FeatureCapture

    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        capture = FeatureCapture(adapter.feature_module, adapter.capture)
        with torch.no_grad(), torch.random.fork_rng(devices=[]), capture:
            model(probe)
            captured = capture.value
    finally:
        for m, mode in modes.items():
            m.training = mode
    if captured is None:
        raise CAMInputError("the adapter's feature module was not called by the probe forward")
    feats = adapter.features(captured, (dims[1], dims[2]))
    map_hw = (int(feats.shape[-2]), int(feats.shape[-1]))
    half = Placement.half_pixel((dims[1], dims[2]), map_hw)
    return Placement(half.stride, half.offset, source="assumed")
