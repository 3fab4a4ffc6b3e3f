"""Measuring where each feature cell sits: the frame tracer.

:func:`trace_placement` runs a backbone once on a probe input (through
:func:`cam_plugin.probing.untouched`: eval mode, no autograd, RNG forked, every mode and
hook restored afterwards) under a ``TorchFunctionMode`` that sees every torch call and
follows the data flow tensor by tensor. Every tensor carries a *frame* per axis,
``c(i) = o + s · i`` (the input pixel its cell ``i`` is centred on). Each convolution,
pooling, padding, adaptive pooling, resize or pixel-(un)shuffle updates the frame from its
*actual* kernel size, stride, padding and dilation (TF-"same" padding done with an
``F.pad`` before the convolution is seen as what it is: a pad, then a valid convolution);
element-wise ops, normalization, activations and concatenations keep it. For one such
layer with kernel ``k``, dilation ``d``, stride ``t`` and left padding ``p``:

    s_out = s_in · t        o_out = o_in + s_in · ((d (k − 1)) / 2 − p)

When two branches with different frames meet (a ResNet-D shortcut averages 2x2 cells,
centre ``2 i + 0.5``, while its main path's 3x3/2 convolution is centred at ``2 i``),
their mean is used and the disagreement is reported.

:func:`feature_placement` reads the frame of the tensor a CAM adapter captures; the
resulting :class:`~cam_plugin.placement.Placement` is the geometry of
:mod:`cam_plugin.placement`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .errors import CAMInputError
from .frames import Frame, spatial_frame, spatial_op
from .placement import Placement
from .probing import first_tensor, probe_input, untouched

if TYPE_CHECKING:
    from .adapter import Adapter

__all__ = [
    "SpatialOp",
    "TraceResult",
    "feature_placement",
    "trace_placement",
]


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
        at_tensor: the watched submodule's tensor itself (``None`` when ``at`` was not
            given or not called).
    """

    placements: list[Optional[Placement]]
    at: Optional[Placement]
    ops: list[SpatialOp]
    lost: list[str] = field(default_factory=list)
    disagreement: float = 0.0
    input_size: tuple[int, int] = (0, 0)
    at_tensor: Optional[Tensor] = None


class _FrameTracer(TorchFunctionMode):
    """Follows every tensor's frame through one forward pass (see the module doc)."""

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


def _to_placement(frame: Optional[Frame], disagreement: float) -> Optional[Placement]:
    if frame is None:
        return None
    return Placement(
        (frame.sy, frame.sx), (frame.oy, frame.ox), source="traced", disagreement=disagreement
    )


def _probe_tensor(model: nn.Module, example: Union[Tensor, Sequence[int]]) -> Tensor:
    if isinstance(example, Tensor):
        x = example
    else:
        dims = [int(v) for v in example]
        if len(dims) != 3 or min(dims) < 1:
            raise CAMInputError(f"example must be a tensor or (C, H, W), got {example!r}")
        x = probe_input(model, dims, batch=1)
    if x.dim() != 4:
        raise CAMInputError(f"the probe input must be (B, C, H, W), got {tuple(x.shape)}")
    return x


@contextlib.contextmanager
def _module_hooks(
    model: nn.Module,
    stack: list[tuple[str, Optional[nn.Module]]],
    at: Optional[nn.Module],
    capture: str,
    sink: list[Optional[Tensor]],
) -> Iterator[None]:
    """Keep ``stack`` = the modules whose forward is running (innermost last) and put
    ``at``'s output / first input into ``sink[0]``; only this thread's forwards are seen
    (another thread running the same model is ignored); every hook removed on exit."""
    owner = threading.get_ident()
    handles = []

    def push(name: str) -> Any:
        def hook(mod: nn.Module, args: Any) -> None:
            if threading.get_ident() == owner:
                stack.append((name, mod))

        return hook

    def pop(mod: nn.Module, args: Any, output: Any) -> None:
        if stack and threading.get_ident() == owner:
            stack.pop()

    def grab_out(mod: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() == owner:
            sink[0] = first_tensor(output)

    def grab_in(mod: nn.Module, args: Any) -> None:
        if threading.get_ident() == owner:
            sink[0] = first_tensor(args[0] if args else None)

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(push(name)))
            handles.append(module.register_forward_hook(pop, always_call=True))
        if at is not None:
            if capture == "output":
                handles.append(at.register_forward_hook(grab_out))
            else:
                handles.append(at.register_forward_pre_hook(grab_in))
        yield
    finally:
        for h in handles:
            h.remove()


def trace_placement(
    model: nn.Module,
    example: Union[Tensor, Sequence[int]],
    *,
    at: Optional[nn.Module] = None,
    capture: Literal["output", "input"] = "output",
) -> TraceResult:
    """Run ``model`` once and follow where every feature cell is centred (module doc).

    The probe runs under :func:`cam_plugin.probing.untouched` (eval mode, no autograd,
    the RNG forked, every module's train/eval flag restored); the function mode and every
    hook are removed afterwards, also on error.

    Args:
        model: the backbone or the whole classifier.
        example: an input batch, or its size ``(C, H, W)`` (a deterministic probe batch of
            one image is used, :func:`cam_plugin.probing.probe_input`; the placement may
            depend on ``H, W`` when padding is TF-"same").
        at: optionally a submodule whose output (``capture="output"``) or first input
            (``"input"``) to report as :attr:`TraceResult.at` (e.g. the feature module of a
            CAM adapter).
        capture: which tensor of ``at``.

    Returns:
        A :class:`TraceResult`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace_placement needs an nn.Module, got {type(model).__name__}")
    x = _probe_tensor(model, example)
    in_hw = (int(x.shape[-2]), int(x.shape[-1]))
    stack: list[tuple[str, Optional[nn.Module]]] = []
    tracer = _FrameTracer(stack)
    sink: list[Optional[Tensor]] = [None]
    with _module_hooks(model, stack, at, capture, sink), untouched(model):
        tracer.set(x, Frame(1.0, 1.0, 0.0, 0.0, in_hw[0], in_hw[1]))
        with tracer:
            output = model(x)
    tensors = [t for t in tree_flatten(output)[0] if isinstance(t, Tensor) and t.dim() == 4]
    at_tensor = sink[0]
    return TraceResult(
        placements=[_to_placement(tracer.get(t), tracer.disagreement) for t in tensors],
        at=_to_placement(tracer.get(at_tensor), tracer.disagreement),
        ops=tracer.ops,
        lost=tracer.lost,
        disagreement=tracer.disagreement,
        input_size=in_hw,
        at_tensor=at_tensor,
    )


def feature_placement(model: nn.Module, input_size: Sequence[int], adapter: Adapter) -> Placement:
    """The placement of the CAM feature map of ``model`` read by ``adapter``.

    Traces ``model`` once on a probe of ``input_size`` and reads the frame of the tensor the
    adapter captures (``adapter.feature_module``'s output or input). When the trace loses
    the frame (token layouts, scripted modules, unknown resizing ops), or the adapter's
    layout is not NCHW, the half-pixel placement of plain bilinear upsampling at the
    captured map's size is returned with ``source="assumed"``.

    Args:
        model: the classifier.
        input_size: ``(C, H, W)`` or ``(H, W)`` (then ``C`` from the adapter, else 3).
        adapter: the :class:`cam_plugin.Adapter` of ``model`` (for example
            :func:`cam_plugin.resolve` ``(model)``, or ``CAM(model).adapter``).

    Returns:
        A :class:`~cam_plugin.placement.Placement` in pixels of an ``H x W`` input.

    Raises:
        CAMInputError: a bad ``input_size``, or an adapter whose feature module the
            forward never calls.
    """
    from .adapter import Adapter

    if not isinstance(adapter, Adapter):
        raise TypeError(
            f"adapter must be a cam_plugin.Adapter (e.g. cam_plugin.resolve(model)), got "
            f"{type(adapter).__name__}"
        )
    dims = [int(v) for v in input_size]
    if len(dims) == 2:
        dims = [adapter.input_size[0] if adapter.input_size else 3, *dims]
    if len(dims) != 3 or min(dims) < 1:
        raise CAMInputError(f"input_size must be (C, H, W) or (H, W), got {input_size!r}")
    result = trace_placement(model, dims, at=adapter.feature_module, capture=adapter.capture)
    if result.at is not None and adapter.layout.kind == "NCHW":
        return result.at
    # the frame was lost: the half-pixel placement at the map's size, from the same trace
    if result.at_tensor is None:
        raise CAMInputError(
            f"the adapter's feature module '{adapter.feature_name or adapter.name}' was not "
            "called by the probe forward; is the adapter for this model?"
        )
    feats = adapter.features(result.at_tensor, (dims[1], dims[2]))
    half = Placement.half_pixel((dims[1], dims[2]), (int(feats.shape[-2]), int(feats.shape[-1])))
    return Placement(half.stride, half.offset, source="assumed")
