"""Measuring where each feature cell sits: the frame tracer.

:func:`trace_placement` runs a model once on a probe input under a ``TorchFunctionMode``
that sees every torch call and follows the data flow tensor by tensor. Every tensor carries
a *frame* per axis, ``c(i) = o + s · i`` (the input pixel its cell ``i`` is centred on).
Each convolution, pooling, padding, adaptive pooling, resize or pixel-(un)shuffle updates
the frame from its *actual* kernel size, stride, padding and dilation (TF-"same" padding
done with an ``F.pad`` before the convolution is seen as what it is: a pad, then a valid
convolution); element-wise ops, normalization, activations and concatenations keep it. For
one such layer with kernel ``k``, dilation ``d``, stride ``t`` and left padding ``p``:

    s_out = s_in · t        o_out = o_in + s_in · ((d (k − 1)) / 2 − p)

When two branches with different frames meet (a ResNet-D shortcut averages 2x2 cells,
centre ``2 i + 0.5``, while its main path's 3x3/2 convolution is centred at ``2 i``),
their mean is used and the disagreement is reported.

**The user's model is never run.** The trace runs on a :func:`weightless_copy`: the same
modules with every parameter and buffer on PyTorch's ``meta`` device (shapes, no data, no
memory, no arithmetic) and without any hook — its modules call ``forward`` directly, so
neither the model's own forward hooks nor global module hooks fire, and the model's modes,
parameters and RNG are not touched. Only a forward that reads tensor *values* (``.item()``,
data-dependent shapes) cannot run on ``meta``; with ``fallback=True`` such a model is traced
on a hook-free copy *with* its weights (memory of one more copy, for the trace only).
Measured cost of one trace at 224 x 224 (2-core CPU): 0.03–0.1 s idle, 0.1–0.3 s under load
for ResNet-18/50, EfficientNet-B0/Lite0 and ConvNeXt-T (a tenth to a quarter of one forward
of 8 images), once per input size; no memory for weights.

:func:`feature_placement` reads the frame of the tensor a CAM adapter captures,
:func:`module_placement` that of any module's output or input, and :func:`placement_of`
is the cached, never-failing form the faces use for placed upsampling by default (``None``
where the geometry cannot be traced). The resulting
:class:`~cam_plugin.placement.Placement` is the geometry of :mod:`cam_plugin.placement`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .errors import CAMInputError
from .frames import Frame, FrameTracer, SpatialOp
from .layout import FeatureLayout
from .placement import Placement
from .probing import first_tensor, model_device_dtype, probe_input, untouched

if TYPE_CHECKING:
    from .adapter import Adapter

__all__ = [
    "PlacementFinder",
    "SpatialOp",
    "TraceResult",
    "feature_placement",
    "module_placement",
    "placement_of",
    "trace_placement",
    "weightless_copy",
]


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
        at_tensor: the watched submodule's tensor (``None`` when ``at`` was not given or
            not called); a ``meta`` tensor (its shape, no values) when the trace ran on the
            weightless copy.
        weights: whether the trace needed the copy with weights (``fallback``).
    """

    placements: list[Optional[Placement]]
    at: Optional[Placement]
    ops: list[SpatialOp]
    lost: list[str] = field(default_factory=list)
    disagreement: float = 0.0
    input_size: tuple[int, int] = (0, 0)
    at_tensor: Optional[Tensor] = None
    weights: bool = False


def _to_placement(frame: Optional[Frame], disagreement: float) -> Optional[Placement]:
    if frame is None:
        return None
    return Placement(
        (frame.sy, frame.sx), (frame.oy, frame.ox), source="traced", disagreement=disagreement
    )


# ------------------------------------------------------------------------ the copy

_ACTIVE = threading.local()
_HOOKLESS: dict[type, type] = {}
_HOOKLESS_LOCK = threading.Lock()


class _CallProbe:
    """Stands in for module hooks on a traced copy: keeps the stack of running modules
    (innermost last, as the model's own modules) and records the watched module's tensor."""

    def __init__(
        self,
        originals: dict[int, tuple[str, nn.Module]],
        at: Optional[nn.Module],
        capture: str,
    ) -> None:
        self.originals = originals
        self.at = at
        self.capture = capture
        self.stack: list[tuple[str, Optional[nn.Module]]] = []
        self.sink: Optional[Tensor] = None

    def call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if module is self.at and self.capture == "input":
            self.sink = first_tensor(args[0] if args else next(iter(kwargs.values()), None))
        self.stack.append(self.originals.get(id(module), ("", None)))
        try:
            out = module.forward(*args, **kwargs)
        finally:
            self.stack.pop()
        if module is self.at and self.capture == "output":
            self.sink = first_tensor(out)
        return out


def _direct_call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``__call__`` of a traced copy's modules: ``forward`` without any hook."""
    probe: Optional[_CallProbe] = getattr(_ACTIVE, "probe", None)
    if probe is None:
        return self.forward(*args, **kwargs)
    return probe.call(self, args, kwargs)


def _hookless(cls: type) -> type:
    """A subclass of ``cls`` whose instances call ``forward`` directly (cached)."""
    with _HOOKLESS_LOCK:
        sub = _HOOKLESS.get(cls)
        if sub is None:
            sub = type(
                cls.__name__, (cls,), {"__call__": _direct_call, "__module__": cls.__module__}
            )
            _HOOKLESS[cls] = sub
        return sub


def weightless_copy(model: nn.Module, *, weights: bool = False) -> nn.Module:
    """A copy of ``model`` to trace: its parameters and buffers on the ``meta`` device (or,
    with ``weights=True``, copied), every hook dropped, and every module calling ``forward``
    directly (no forward hook of the copy, nor a global module hook, ever fires). The copy
    shares nothing with ``model``; ``model`` is only read.

    Raises:
        CAMInputError: the model cannot be copied (``copy.deepcopy`` failed, a scripted
            module): the message says why.
    """
    memo: dict[int, Any] = {}
    if not weights:
        for t in itertools.chain(model.parameters(), model.buffers()):
            if id(t) not in memo:
                meta = torch.empty_like(t, device="meta")
                if isinstance(t, nn.Parameter):
                    meta = nn.Parameter(meta, requires_grad=t.requires_grad)
                memo[id(t)] = meta
    for m in model.modules():
        for name, value in vars(m).items():
            if "hooks" in name and isinstance(value, dict):
                memo[id(value)] = type(value)()
    try:
        twin = copy.deepcopy(model, memo)
        for m in twin.modules():
            if isinstance(m, torch.jit.ScriptModule):
                raise TypeError(f"scripted module {type(m).__name__} cannot be traced")
            m.__class__ = _hookless(type(m))
    except Exception as err:
        raise CAMInputError(
            f"the model cannot be copied for the placement trace ({type(err).__name__}: "
            f"{err}); give the placement yourself (cam_plugin.placement.Placement) or upsample "
            "with placement='bilinear'"
        ) from err
    return twin


@contextlib.contextmanager
def _active(probe: _CallProbe) -> Iterator[None]:
    previous = getattr(_ACTIVE, "probe", None)
    _ACTIVE.probe = probe
    try:
        yield
    finally:
        _ACTIVE.probe = previous


def _probe_shape(
    model: nn.Module, example: Union[Tensor, Sequence[int]]
) -> tuple[tuple[int, ...], Optional[Tensor]]:
    if isinstance(example, Tensor):
        if example.dim() != 4:
            raise CAMInputError(f"the probe input must be (B, C, H, W), got {tuple(example.shape)}")
        return tuple(int(v) for v in example.shape), example
    dims = [int(v) for v in example]
    if len(dims) != 3 or min(dims) < 1:
        raise CAMInputError(f"example must be a tensor or (C, H, W), got {example!r}")
    return (1, *dims), None


def _trace_copy(
    model: nn.Module,
    shape: tuple[int, ...],
    example: Optional[Tensor],
    at: Optional[nn.Module],
    capture: str,
    weights: bool,
) -> TraceResult:
    twin = weightless_copy(model, weights=weights)
    pairs = list(zip(twin.named_modules(), model.named_modules()))
    originals = {id(c): (name, o) for (name, c), (_, o) in pairs}
    at_twin = next((c for (_, c), (_, o) in pairs if o is at), None) if at is not None else None
    _, dtype = model_device_dtype(model)
    if not weights:
        x = torch.empty(shape, dtype=example.dtype if example is not None else dtype, device="meta")
    else:
        x = example if example is not None else probe_input(model, shape[1:], batch=1)
    in_hw = (int(shape[-2]), int(shape[-1]))
    probe = _CallProbe(originals, at_twin, capture)
    tracer = FrameTracer(probe.stack)
    with untouched(twin), _active(probe):
        tracer.set(x, Frame(1.0, 1.0, 0.0, 0.0, in_hw[0], in_hw[1]))
        with tracer:
            output = twin(x)
    tensors = [t for t in tree_flatten(output)[0] if isinstance(t, Tensor) and t.dim() == 4]
    return TraceResult(
        placements=[_to_placement(tracer.get(t), tracer.disagreement) for t in tensors],
        at=_to_placement(tracer.get(probe.sink), tracer.disagreement),
        ops=tracer.ops,
        lost=tracer.lost,
        disagreement=tracer.disagreement,
        input_size=in_hw,
        at_tensor=probe.sink,
        weights=weights,
    )


# ------------------------------------------------------------------------ the public API


def trace_placement(
    model: nn.Module,
    example: Union[Tensor, Sequence[int]],
    *,
    at: Optional[nn.Module] = None,
    capture: Literal["output", "input"] = "output",
    fallback: bool = True,
) -> TraceResult:
    """Follow where every feature cell of ``model`` is centred, from one traced forward of
    a :func:`weightless_copy` (module doc): ``model`` itself never runs.

    Args:
        model: the backbone or the whole classifier.
        example: an input batch (only its shape and dtype are used on the ``meta`` copy), or
            its size ``(C, H, W)`` (the placement may depend on ``H, W`` when padding is
            TF-"same").
        at: optionally a submodule whose output (``capture="output"``) or first input
            (``"input"``) to report as :attr:`TraceResult.at` (e.g. the feature module of a
            CAM adapter).
        capture: which tensor of ``at``.
        fallback: when the forward cannot run on ``meta`` (it reads tensor values), trace a
            hook-free copy with the weights (on ``example`` or a deterministic probe batch,
            :func:`cam_plugin.probing.probe_input`) instead of raising.

    Returns:
        A :class:`TraceResult`.

    Raises:
        CAMInputError: a bad ``example``, or the copy cannot be made or run (the message
            lists what was tried).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace_placement needs an nn.Module, got {type(model).__name__}")
    shape, tensor = _probe_shape(model, example)
    tried: list[str] = []
    for weights in (False, True) if fallback else (False,):
        try:
            return _trace_copy(model, shape, tensor, at, capture, weights)
        except CAMInputError:
            raise
        except Exception as err:  # noqa: BLE001 - reported with what was tried
            what = "a copy with weights" if weights else "a weightless (meta) copy"
            tried.append(f"on {what}: {type(err).__name__}: {err}")
    raise CAMInputError(
        "the placement could not be traced " + "; ".join(tried) + ". Give the placement "
        "yourself (cam_plugin.placement.Placement) or upsample with placement='bilinear'"
    )


def module_placement(
    model: nn.Module,
    input_size: Sequence[int],
    module: nn.Module,
    *,
    capture: Literal["output", "input"] = "output",
    layout: Optional[FeatureLayout] = None,
    fallback: bool = True,
) -> Placement:
    """The placement of the map that ``module``'s output (or input) gives on a
    ``(C, H, W)`` input of ``model``.

    Traced (:func:`trace_placement`, ``source="traced"``) when ``layout`` is NCHW and the
    trace follows the frame to ``module``; otherwise (token / channels-last layouts, a lost
    frame) the half-pixel placement of plain bilinear upsampling at the map's size, with
    ``source="assumed"``.

    Raises:
        CAMInputError: a bad ``input_size``, a trace that cannot run, or a module the
            forward never calls.
    """
    layout = layout if layout is not None else FeatureLayout()
    dims = [int(v) for v in input_size]
    if len(dims) != 3 or min(dims) < 1:
        raise CAMInputError(f"input_size must be (C, H, W) or (H, W), got {input_size!r}")
    result = trace_placement(model, dims, at=module, capture=capture, fallback=fallback)
    if result.at is not None and layout.kind == "NCHW":
        return result.at
    if result.at_tensor is None:
        raise CAMInputError(
            f"the module {type(module).__name__} was not called by the traced forward; is it "
            "a module of this model?"
        )
    feats = layout.to_nchw(result.at_tensor, (dims[1], dims[2]))
    half = Placement.half_pixel((dims[1], dims[2]), (int(feats.shape[-2]), int(feats.shape[-1])))
    return Placement(half.stride, half.offset, source="assumed")


def _full_size(input_size: Sequence[int], adapter: Optional[Adapter]) -> list[int]:
    dims = [int(v) for v in input_size]
    if len(dims) == 2:
        dims = [adapter.input_size[0] if adapter is not None and adapter.input_size else 3, *dims]
    if len(dims) != 3 or min(dims) < 1:
        raise CAMInputError(f"input_size must be (C, H, W) or (H, W), got {input_size!r}")
    return dims


def feature_placement(
    model: nn.Module, input_size: Sequence[int], adapter: Adapter, *, fallback: bool = True
) -> Placement:
    """The placement of the CAM feature map of ``model`` read by ``adapter``.

    :func:`module_placement` of the adapter's feature module (its output or input, as the
    adapter captures it, in the adapter's layout): traced for NCHW features, the half-pixel
    placement of plain bilinear upsampling with ``source="assumed"`` when the trace loses
    the frame (token layouts, scripted modules, unknown resizing ops).

    Args:
        model: the classifier.
        input_size: ``(C, H, W)`` or ``(H, W)`` (then ``C`` from the adapter, else 3).
        adapter: the :class:`cam_plugin.Adapter` of ``model`` (for example
            :func:`cam_plugin.resolve` ``(model)``, or ``CAM(model).adapter``).
        fallback: as in :func:`trace_placement`.

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
    dims = _full_size(input_size, adapter)
    try:
        return module_placement(
            model,
            dims,
            adapter.feature_module,
            capture=adapter.capture,
            layout=adapter.layout,
            fallback=fallback,
        )
    except CAMInputError as err:
        if "was not called" not in str(err):
            raise
        raise CAMInputError(
            f"the adapter's feature module '{adapter.feature_name or adapter.name}' was not "
            "called by the probe forward; is the adapter for this model?"
        ) from None


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], Optional[Placement]]] = (
    weakref.WeakKeyDictionary()
)
_CACHE_LOCK = threading.Lock()


def placement_of(
    model: nn.Module,
    input_size: Sequence[int],
    module: nn.Module,
    *,
    capture: Literal["output", "input"] = "output",
    layout: Optional[FeatureLayout] = None,
) -> Optional[Placement]:
    """The *traced* placement of ``module``'s map for ``(C, H, W)`` inputs of ``model``, or
    ``None`` where the geometry cannot be traced — what placed upsampling by default uses.

    ``None`` for a layout other than NCHW (no trace is run), a trace that loses the frame,
    or a forward that cannot run on the weightless copy (no copy with weights is made).
    Traced once per ``(model, input size, module,
    capture)`` and cached for as long as the model lives (a model whose structure changes
    afterwards keeps its old entry: call :func:`module_placement` for a fresh trace).
    Never raises for a model that cannot be traced; thread safe.
    """
    layout = layout if layout is not None else FeatureLayout()
    if layout.kind != "NCHW":
        return None
    dims = tuple(int(v) for v in input_size)
    key = (dims, id(module), capture, layout)
    with _CACHE_LOCK:
        entry = _CACHE.setdefault(model, {})
        if key in entry:
            return entry[key]
    found: Optional[Placement]
    try:
        found = module_placement(
            model, dims, module, capture=capture, layout=layout, fallback=False
        )
    except Exception:  # noqa: BLE001 - not traceable: plain bilinear upsampling
        found = None
    if found is not None and found.source != "traced":
        found = None
    with _CACHE_LOCK:
        _CACHE.setdefault(model, {})[key] = found
    return found


class PlacementFinder:
    """:func:`placement_of` deferred: calling it traces at that moment (once per model and
    input size, cached) and returns the placement or ``None``. What
    :attr:`cam_plugin.CAMResult.locate` holds: copying a result shares the finder, and
    pickling one keeps only a finder that knows nothing (returns ``None``), so a model is
    never pickled with its results.

    Args:
        model: the model (``None``: nothing to trace).
        input_size: ``(C, H, W)`` of its inputs.
        module: the module whose output (or input) is the map.
        capture: ``"output"`` or ``"input"``.
        layout: the map's layout (non-NCHW: ``None`` without tracing).
    """

    __slots__ = ("capture", "input_size", "layout", "model", "module")

    def __init__(
        self,
        model: Optional[nn.Module],
        input_size: Sequence[int],
        module: Optional[nn.Module],
        capture: Literal["output", "input"] = "output",
        layout: Optional[FeatureLayout] = None,
    ) -> None:
        self.model, self.module = model, module
        self.input_size = tuple(int(v) for v in input_size)
        self.capture: Literal["output", "input"] = capture
        self.layout = layout

    def __call__(self) -> Optional[Placement]:
        if self.model is None or self.module is None:
            return None
        return placement_of(
            self.model, self.input_size, self.module, capture=self.capture, layout=self.layout
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> PlacementFinder:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (PlacementFinder, (None, self.input_size, None))
