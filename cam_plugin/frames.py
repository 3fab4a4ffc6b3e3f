"""Frame arithmetic: how one spatial torch call moves the centres of feature cells.

A *frame* says, per axis, where cell ``i`` of a tensor is centred on the input image:
``c(i) = o + s · i`` (input pixel coordinates), together with the tensor's spatial size and
where its spatial dims are. :func:`spatial_frame` gives the frame of a call's output from
its input's frame and the call's *actual* arguments. For a sliding window (convolution,
pooling) with kernel ``k``, dilation ``d``, stride ``t`` and left padding ``p``:

    s_out = s_in · t        o_out = o_in + s_in · ((d (k − 1)) / 2 − p)

A pad shifts ``o`` by ``−s · p``; adaptive pooling and resizes compose the affine fit of
their window / sample centres; pixel-(un)shuffle is a ``r x r`` window / its inverse. The
tracer (:class:`FrameTracer`, run by :mod:`cam_plugin.tracing`) applies these rules tensor by
tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["Frame", "FrameTracer", "SpatialOp", "spatial_frame", "spatial_op"]


@dataclass(frozen=True)
class Frame:
    """One tensor's placement on the input while tracing: per-axis ``c(i) = o + s i``, the
    spatial size ``(h, w)``, and where the spatial dims are (negative indices: ``(-2, -1)``
    for NCHW, ``(-3, -2)`` for NHWC)."""

    sy: float
    sx: float
    oy: float
    ox: float
    h: int
    w: int
    dy: int = -2
    dx: int = -1

    def fits(self, t: Tensor) -> bool:
        """True when ``t`` has this frame's spatial size at its spatial dims."""
        return (
            t.dim() >= max(-self.dy, -self.dx)
            and int(t.shape[self.dy]) == self.h
            and int(t.shape[self.dx]) == self.w
        )

    def moved(self, dy: int, dx: int) -> Frame:
        """The same frame with the spatial dims at ``(dy, dx)`` (after a permute)."""
        return Frame(self.sy, self.sx, self.oy, self.ox, self.h, self.w, dy, dx)


def _two(v: Any) -> tuple[int, int]:
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


def _windowed(
    frame: Frame,
    out_hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pad_left: tuple[float, float],
    dilation: tuple[int, int] = (1, 1),
) -> Frame:
    """Frame after a sliding window: centre of output ``j`` is at input index
    ``t j + d (k − 1) / 2 − p`` (``p`` the left / top padding)."""
    cy = dilation[0] * (kernel[0] - 1) / 2 - pad_left[0]
    cx = dilation[1] * (kernel[1] - 1) / 2 - pad_left[1]
    return Frame(
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


# ------------------------------------------------------------------------ per-op rules

_OutHW = tuple[int, int]


def _conv_rule(a: dict[str, Any], frame: Frame, out_hw: _OutHW) -> Frame:
    weight = a["weight"]
    kernel = (int(weight.shape[-2]), int(weight.shape[-1]))
    stride = _two(a.get("stride", 1))
    dilation = _two(a.get("dilation", 1))
    padding = a.get("padding", 0)
    if isinstance(padding, str):
        if padding == "valid":
            pad: tuple[float, float] = (0, 0)
        else:  # 'same': total d (k - 1), the smaller half on the left / top
            pad = ((dilation[0] * (kernel[0] - 1)) // 2, (dilation[1] * (kernel[1] - 1)) // 2)
    else:
        pad = _two(padding)
    return _windowed(frame, out_hw, kernel, stride, pad, dilation)


def _pool_rule(name: str) -> Callable[[dict[str, Any], Frame, _OutHW], Frame]:
    def rule(a: dict[str, Any], frame: Frame, out_hw: _OutHW) -> Frame:
        kernel = _two(a["kernel_size"])
        stride_arg = a.get("stride")
        stride = kernel if stride_arg is None or stride_arg == [] else _two(stride_arg)
        pad = _two(a.get("padding", 0)) if name != "lp_pool2d" else (0, 0)
        dilation = _two(a.get("dilation", 1)) if name == "max_pool2d" else (1, 1)
        return _windowed(frame, out_hw, kernel, stride, pad, dilation)

    return rule


def _pad_rule(a: dict[str, Any], frame: Frame, out_hw: _OutHW) -> Frame:
    pads = list(a["pad"])
    left = pads[0] if len(pads) >= 1 else 0
    top = pads[2] if len(pads) >= 3 else 0
    return Frame(frame.sy, frame.sx, frame.oy - frame.sy * top, frame.ox - frame.sx * left, *out_hw)


def _composed(
    frame: Frame, y: tuple[float, float], x: tuple[float, float], out_hw: _OutHW
) -> Frame:
    """Frame after a resampling whose output ``j`` sits at input index ``o + s j`` per axis
    (``y``, ``x`` are ``(s, o)``)."""
    (ky, cy), (kx, cx) = y, x
    return Frame(
        frame.sy * ky, frame.sx * kx, frame.oy + frame.sy * cy, frame.ox + frame.sx * cx, *out_hw
    )


def _adaptive_rule(a: dict[str, Any], frame: Frame, out_hw: _OutHW) -> Frame:
    y, x = _adaptive_axis(frame.h, out_hw[0]), _adaptive_axis(frame.w, out_hw[1])
    return _composed(frame, y, x, out_hw)


def _resize_rule(a: dict[str, Any], frame: Frame, out_hw: _OutHW) -> Frame:
    ac = bool(a.get("align_corners") or False)
    y, x = _resize_axis(frame.h, out_hw[0], ac), _resize_axis(frame.w, out_hw[1], ac)
    return _composed(frame, y, x, out_hw)


def _unshuffle_rule(a: dict[str, Any], frame: Frame, out_hw: _OutHW) -> Frame:
    r = int(a["downscale_factor"])
    return _windowed(frame, out_hw, (r, r), (r, r), (0, 0))


def _shuffle_rule(a: dict[str, Any], frame: Frame, out_hw: _OutHW) -> Frame:
    r = int(a["upscale_factor"])
    s, o = 1 / r, 0.5 / r - 0.5
    return _composed(frame, (s, o), (s, o), out_hw)


_RULES: dict[str, Callable[[dict[str, Any], Frame, _OutHW], Frame]] = {
    "conv2d": _conv_rule,
    "max_pool2d": _pool_rule("max_pool2d"),
    "avg_pool2d": _pool_rule("avg_pool2d"),
    "lp_pool2d": _pool_rule("lp_pool2d"),
    "pad": _pad_rule,
    "adaptive_avg_pool2d": _adaptive_rule,
    "adaptive_max_pool2d": _adaptive_rule,
    "interpolate": _resize_rule,
    "pixel_unshuffle": _unshuffle_rule,
    "pixel_shuffle": _shuffle_rule,
}


def spatial_op(func: Any) -> Optional[str]:
    """The canonical name of a torch function that moves frames (``"conv2d"``,
    ``"max_pool2d"``, ``"pad"``, ``"interpolate"``, ...), aliases resolved; ``None`` for
    any other function."""
    name = getattr(func, "__name__", "")
    name = _ALIASES.get(name, name)
    return name if name in _RULES else None


def spatial_frame(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], frame: Frame, out: Tensor
) -> Frame:
    """The frame of ``out``, the result of the spatial call ``name`` (from
    :func:`spatial_op`) with ``args`` / ``kwargs`` on an input of ``frame``."""
    bound = dict(zip(_SIGNATURES[name], args))
    bound.update(kwargs)
    return _RULES[name](bound, frame, (int(out.shape[-2]), int(out.shape[-1])))


# ------------------------------------------------------------------------ the tracer


@dataclass(frozen=True)
class SpatialOp:
    """One call that changed the frame (convolution, pooling, padding, resize, ...).

    Attributes:
        op: the torch function's name (``"conv2d"``, ``"max_pool2d"``, ``"pad"``, ...).
        module_name: qualified name of the innermost module that made the call ("" at the
            top level).
        module: that module of the traced model (``None`` at the top level); the model's
            own module, not the copy's.
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


class FrameTracer(TorchFunctionMode):
    """Follows every tensor's frame through one forward pass, tensor by tensor.

    Spatial calls (:func:`spatial_op`) give their outputs :func:`spatial_frame`; a permute /
    transpose moves the spatial dims; any other call gives outputs of a framed input's
    spatial size that input's frame (several different frames are averaged and the spread
    kept in :attr:`disagreement`). ``stack`` is the list of ``(name, module)`` of the
    modules running now (innermost last), kept by the caller, that :attr:`ops` records.
    Start it with :meth:`set` on the input (``Frame(1, 1, 0, 0, H, W)``); read a tensor's
    frame with :meth:`get`."""

    def __init__(self, stack: list[tuple[str, Optional[nn.Module]]]) -> None:
        super().__init__()
        self.frames: dict[int, Frame] = {}
        self.keep: list[Tensor] = []
        self.ops: list[SpatialOp] = []
        self.lost: list[str] = []
        self.disagreement = 0.0
        self.stack = stack

    def set(self, t: Tensor, frame: Optional[Frame]) -> None:
        if frame is None:
            return
        self.frames[id(t)] = frame
        self.keep.append(t)

    def get(self, t: Any) -> Optional[Frame]:
        if isinstance(t, Tensor):
            fr = self.frames.get(id(t))
            if fr is not None and fr.fits(t):
                return fr
        return None

    def _record(self, name: str, before: Frame, after: Frame, stride: tuple[int, int]) -> None:
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
        spatial = spatial_op(func)
        if spatial is not None and args and isinstance(args[0], Tensor):
            frame = self.get(args[0])
            if frame is None or (frame.dy, frame.dx) != (-2, -1):
                if args[0].dim() == 4:
                    self.lost.append(f"{spatial}: its input's frame is unknown")
                return
            new = spatial_frame(spatial, args, kwargs, frame, outs[0])
            if new != frame:
                stride = (round(new.sy / frame.sy), round(new.sx / frame.sx))
                self._record(spatial, frame, new, stride)
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

    def _merge(self, frames: list[Frame]) -> Frame:
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
        return Frame(first.sy, first.sx, oy, ox, first.h, first.w, first.dy, first.dx)
