"""Trunks: the part of a backbone that computes the feature map :func:`cam_plugin.convert` uses.

A trunk is a module ``x -> (B, K, h, w)`` (a 3-D video trunk: ``x -> (B, K, T, h, w)``) cut
at the requested ``stage``, with the list of every selectable stage (:class:`StageInfo`).
:func:`build_trunk` finds it in this order:

1. trunk builders registered with :func:`register_trunk_builder`, newest first (a builder
   returns a :class:`Trunk`, or ``None`` when it does not handle this model / stage);
2. the integration for the package that defined the model's class, imported lazily on first
   use with the same package -> module table as the adapters
   (:data:`cam_plugin.registry.INTEGRATIONS`: a timm model loads
   ``cam_plugin.integrations.timm``, which registers timm's builder); then step 1 again;
3. the generic trunks of this module: a plain ``nn.Sequential`` is cut between its children
   (:func:`sequential_trunk`); any other module is run once: a tuple / list / dict of maps
   gives one stage per item (:func:`multi_output_trunk`), a single map is used as it is.

Stages follow timm's ``feature_info`` convention: a stage is the last layer at each
resolution, ``reduction`` its stride in input pixels, negative ``stage`` values count from
the end. For space-time maps the resolution is the spatial one (a layer that only halves the
frames does not end a stage). Every probe forward runs under :func:`cam_plugin.probing.untouched`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from torch import Tensor, nn

from .errors import CAMInputError
from .probing import untouched
from .registry import load_integrations_for

__all__ = [
    "SelectKey",
    "SelectOutput",
    "StageInfo",
    "Trunk",
    "TrunkBuilder",
    "build_trunk",
    "describe_output",
    "is_feature_map",
    "multi_output_trunk",
    "probe_backbone",
    "register_trunk_builder",
    "registered_trunk_builders",
    "resolve_stage",
    "sequential_trunk",
]

Stage = Union[int, str]


@dataclass(frozen=True)
class StageInfo:
    """One selectable stage of a backbone.

    Attributes:
        index: the value of ``stage`` that selects it.
        name: the module (or output) it comes from.
        channels: channels ``K`` of its map.
        reduction: input pixels per feature cell (its stride).
    """

    index: int
    name: str
    channels: int
    reduction: float


@dataclass
class Trunk:
    """What a trunk builder returns.

    Attributes:
        module: ``x -> (B, K, h, w)`` (video: ``(B, K, T, h, w)``), the backbone cut at the
            stage.
        family: a label for :attr:`cam_plugin.convert.ConversionInfo.family` (``"timm"``,
            ``"torchvision"``, ``"sequential"``, ``"multi-output"``, ``"module"``, ...).
        stage: the resolved stage index (``-1`` for a whole single-map backbone).
        stage_name: the module / output the map comes from.
        stages: every selectable stage (empty when there is one output).
    """

    module: nn.Module
    family: str
    stage: int
    stage_name: str
    stages: tuple[StageInfo, ...]


class SelectOutput(nn.Module):
    """Pick one map from a backbone that returns a tuple / list (by position).

    Args:
        module: the backbone.
        index: position in the returned sequence (``>= 0``; a constant for TorchScript).
    """

    __constants__ = ["index"]

    def __init__(self, module: nn.Module, index: int) -> None:
        super().__init__()
        self.module = module
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        """The selected map."""
        return self.module(x)[self.index]


class SelectKey(nn.Module):
    """Pick one map from a backbone that returns a dict (by key).

    Args:
        module: the backbone.
        key: the key.
    """

    __constants__ = ["key"]

    def __init__(self, module: nn.Module, key: str) -> None:
        super().__init__()
        self.module = module
        self.key = key

    def forward(self, x: Tensor) -> Tensor:
        """The selected map."""
        return self.module(x)[self.key]


# ------------------------------------------------------------------------ helpers


def describe_output(out: Any) -> str:
    """A short description of what a backbone returned, for error messages (a tensor's
    shape; a tuple / list / dict item by item)."""

    def short(v: Any) -> str:
        return f"tensor{tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__

    if isinstance(out, Tensor):
        return f"a {out.dim()}-D tensor of shape {tuple(out.shape)}"
    if isinstance(out, dict):
        items = ", ".join(f"{k!r}: {short(v)}" for k, v in out.items())
        return f"a dict {{{items}}}"
    if isinstance(out, (tuple, list)):
        items = ", ".join(short(v) for v in out)
        return f"a {type(out).__name__} of {len(out)} items [{items}]"
    return f"a {type(out).__name__}"


def resolve_stage(stage: int, stages: Sequence[StageInfo], what: str) -> int:
    """``stage`` as an index into ``stages`` (negative counts from the end).

    Raises:
        CAMInputError: out of range; the message lists every stage with its channels and
            stride.
    """
    count = len(stages)
    if not -count <= stage < count:
        rows = ", ".join(
            f"{s.index}: {s.name} ({s.channels} ch, stride {s.reduction:g})" for s in stages
        )
        listing = f"Stages: {rows}." if stages else ""
        raise CAMInputError(
            f"stage={stage} is out of range: {what} has {count} stages "
            f"(valid: {-count}..{count - 1}). {listing}"
        )
    return stage % count


def probe_backbone(model: nn.Module, x: Tensor) -> Any:
    """``model(x)`` under :func:`cam_plugin.probing.untouched`.

    Raises:
        CAMInputError: the forward failed (the message names the probe's shape and says to
            pass an ``input_size`` the backbone accepts).
    """
    try:
        with untouched(model):
            return model(x)
    except Exception as err:
        raise CAMInputError(
            f"the backbone {type(model).__name__} failed on a probe input of shape "
            f"{tuple(x.shape)} ({type(err).__name__}: {err}); pass input_size=(C, H, W) (or "
            "(C, T, H, W) for a video backbone) that it accepts"
        ) from err


def is_feature_map(x: Tensor, out: Any) -> bool:
    """True when ``out`` is a feature map of the probe ``x``: ``(B, K, h, w)`` for an image
    batch, ``(B, K, T, h, w)`` for a clip batch."""
    return isinstance(out, Tensor) and out.dim() == x.dim() and out.dim() in (4, 5)


def _reduction(x: Tensor, out: Any) -> Optional[tuple[float, int]]:
    """``(spatial stride, channels)`` of a feature map (:func:`is_feature_map`), else
    ``None``."""
    if is_feature_map(x, out):
        return float(x.shape[-2]) / float(out.shape[-2]), int(out.shape[1])
    return None


# ------------------------------------------------------------------------ generic trunks

_Layer = tuple[str, nn.Module, Optional[tuple[float, int]]]


def _run_in_order(
    model: nn.Module,
    children: Sequence[tuple[str, nn.Module]],
    prefix: Sequence[tuple[str, nn.Module]],
    x: Tensor,
) -> list[_Layer]:
    """Run ``prefix`` then ``children`` in order on ``x``; a plain ``nn.Sequential`` child
    whose own children span several resolutions is opened up one level. Returns every
    layer with the ``(stride, channels)`` of its output (``None`` when not a feature map)."""
    flat: list[_Layer] = []
    try:
        with untouched(model):
            h = x
            for _, mod in prefix:
                h = mod(h)
            for name, child in children:
                if type(child) is nn.Sequential and len(child) > 1:
                    inner: list[_Layer] = []
                    g = h
                    for sub_name, sub in child.named_children():
                        g = sub(g)
                        inner.append((f"{name}.{sub_name}", sub, _reduction(x, g)))
                    if len({r[0] if r else None for _, _, r in inner}) > 1:
                        flat.extend(inner)
                        h = g
                        continue
                h = child(h)
                flat.append((name, child, _reduction(x, h)))
    except Exception as err:
        raise CAMInputError(
            f"running the layers of {type(model).__name__} in order "
            f"({', '.join(n for n, _ in children)}) failed ({type(err).__name__}: {err}); "
            "convert supports convolutional backbones whose layers run in sequence: pass a "
            "module that returns the feature map (or a tuple of stage maps) instead"
        ) from err
    return flat


def _stage_ends(flat: Sequence[_Layer]) -> list[int]:
    """Positions of the last layer at each resolution (empty when a layer is not a feature map)."""
    ends: list[int] = []
    for i, (_, _, r) in enumerate(flat):
        if r is None:
            return []
        nxt = flat[i + 1][2] if i + 1 < len(flat) else None
        if nxt is None or nxt[0] != r[0]:
            ends.append(i)
    return ends


def sequential_trunk(
    model: nn.Module,
    children: Sequence[tuple[str, nn.Module]],
    stage: int,
    x: Tensor,
    family: str,
    *,
    prefix: Sequence[tuple[str, nn.Module]] = (),
    tail: Sequence[tuple[str, nn.Module]] = (),
) -> Trunk:
    """A trunk of layers that run one after the other.

    ``children`` run in order (plain ``nn.Sequential`` children spanning several
    resolutions are flattened one level); a stage is the last layer at each resolution.
    The trunk is ``nn.Sequential(prefix..., layers up to the stage...)``, plus ``tail``
    when the last layer is kept (a family's own code after its layers, e.g. DenseNet's
    final ReLU).

    Args:
        model: the model the children belong to (named in errors, its modes kept).
        children: ``(name, module)`` in execution order.
        stage: ``-1`` for every layer, else an index into the stages.
        x: the probe batch.
        family: the :attr:`Trunk.family` label.
        prefix: layers applied to the input first (not selectable).
        tail: layers appended when the last layer is kept.
    """
    flat = _run_in_order(model, children, prefix, x)
    ends = _stage_ends(flat)
    stages = tuple(
        StageInfo(si, flat[end][0], flat[end][2][1], flat[end][2][0])  # type: ignore[index]
        for si, end in enumerate(ends)
    )
    if stage == -1:
        cut = len(flat) - 1
    elif not ends:
        raise CAMInputError(
            f"{type(model).__name__}'s layers do not all return feature maps, so stage={stage} "
            "cannot be resolved; use stage=-1"
        )
    else:
        stage = resolve_stage(stage, stages, type(model).__name__)
        cut = ends[stage]
    layers = OrderedDict((n, m) for n, m in prefix)
    for name, mod, _ in flat[: cut + 1]:
        layers[name.replace(".", "_")] = mod
    if cut == len(flat) - 1:
        layers.update(tail)
    return Trunk(nn.Sequential(layers), family, stage, flat[cut][0], stages)


def multi_output_trunk(
    model: nn.Module,
    stage: Stage,
    out: Union[Sequence[Any], dict[Any, Any]],
    x: Tensor,
    *,
    family: str = "multi-output",
    names: Optional[Sequence[str]] = None,
) -> Trunk:
    """A trunk that picks one map of a backbone returning a tuple / list / dict of maps.

    Args:
        model: the backbone.
        stage: a position (negative from the end), or a key of a dict output.
        out: what the backbone returned on ``x``.
        x: the probe batch.
        family: the :attr:`Trunk.family` label for a tuple / list output (a dict output is
            always ``"multi-output"``).
        names: a name per item of a tuple / list output (default ``output[i]``).
    """
    is_dict = isinstance(out, dict)
    keys = [str(k) for k in out] if isinstance(out, dict) else []
    values = list(out.values()) if isinstance(out, dict) else list(out)
    if not is_dict:
        keys = list(names) if names and len(names) == len(values) else []
        keys = keys or [f"output[{i}]" for i in range(len(values))]
    bad = [i for i, v in enumerate(values) if not is_feature_map(x, v)]
    if bad:
        want = "5-D (B, K, T, h, w)" if x.dim() == 5 else "4-D (B, K, h, w)"
        raise CAMInputError(
            f"the backbone returned {describe_output(out)}; every output must be a {want} "
            f"feature map, but item {bad[0]} is not"
        )
    stages = tuple(
        StageInfo(i, keys[i], int(v.shape[1]), float(x.shape[-2]) / float(v.shape[-2]))
        for i, v in enumerate(values)
    )
    if isinstance(stage, str):
        if not is_dict:
            raise CAMInputError(
                f"stage={stage!r}: a string selects a key of a dict output, but the backbone "
                f"returned {describe_output(out)}; give an int"
            )
        if stage not in out:
            raise CAMInputError(f"stage={stage!r} is not one of the backbone's outputs {keys}")
        idx = keys.index(stage)
    else:
        idx = resolve_stage(stage, stages, type(model).__name__)
    if is_dict:
        key = keys[idx]
        return Trunk(SelectKey(model, key), "multi-output", idx, key, stages)
    return Trunk(SelectOutput(model, idx), family, idx, keys[idx], stages)


def _generic_trunk(model: nn.Module, stage: Stage, x: Tensor) -> Trunk:
    if type(model) is nn.Sequential and isinstance(stage, int):
        return sequential_trunk(model, list(model.named_children()), stage, x, "sequential")
    out = probe_backbone(model, x)
    if isinstance(out, (tuple, list, dict)):
        return multi_output_trunk(model, stage, out, x)
    if stage not in (-1, 0):
        raise CAMInputError(
            f"stage={stage!r}: the backbone {type(model).__name__} returns one map "
            f"({describe_output(out)}), so there is no stage to choose; cut it yourself, pass "
            "an nn.Sequential, or a module that returns a tuple of stage maps"
        )
    return Trunk(model, "module", -1, type(model).__name__, ())


# ------------------------------------------------------------------------ registry

TrunkBuilder = Callable[[nn.Module, Stage, Tensor], Optional[Trunk]]
Matcher = Union[type, tuple, Callable[[nn.Module], bool]]


@dataclass(frozen=True)
class _Builder:
    name: str
    matcher: Matcher
    builder: TrunkBuilder

    def matches(self, model: nn.Module) -> bool:
        if isinstance(self.matcher, (type, tuple)):
            return isinstance(model, self.matcher)
        return bool(self.matcher(model))


_BUILDERS: list[_Builder] = []


def register_trunk_builder(
    match: Matcher, builder: TrunkBuilder, *, name: Optional[str] = None
) -> None:
    """Register how :func:`cam_plugin.convert` cuts the models of one family.

    Args:
        match: a class (or tuple of classes) matched with ``isinstance``, or a predicate
            ``model -> bool``.
        builder: ``(model, stage, x) -> Trunk``, or ``None`` to leave the model to the next
            builder / the generic trunks (``x`` is the probe batch; probe with
            :func:`probe_backbone` or :func:`cam_plugin.probing.untouched`).
        name: a label; defaults to the builder's name.

    Later registrations take precedence over earlier ones.
    """
    if not (isinstance(match, (type, tuple)) or callable(match)):
        raise CAMInputError(
            "register_trunk_builder: match must be a class or a predicate, got "
            f"{type(match).__name__}"
        )
    if not callable(builder):
        raise CAMInputError(
            f"register_trunk_builder: builder must be callable, got {type(builder).__name__}"
        )
    label = name or str(getattr(builder, "__qualname__", repr(builder)))
    _BUILDERS.append(_Builder(label, match, builder))


def registered_trunk_builders() -> list[str]:
    """Names of the registered trunk builders, newest first."""
    return [b.name for b in reversed(_BUILDERS)]


def _from_registered(model: nn.Module, stage: Stage, x: Tensor) -> Optional[Trunk]:
    for entry in reversed(_BUILDERS):
        if entry.matches(model):
            trunk = entry.builder(model, stage, x)
            if trunk is not None:
                return trunk
    return None


def _load_integrations(model: nn.Module) -> bool:
    """Import the integration of the model's framework (the registry's table and bookkeeping);
    True when one was imported now. A framework that cannot be imported leaves its models to
    the generic trunks."""
    return load_integrations_for(model)


def build_trunk(model: nn.Module, stage: Stage, x: Tensor) -> Trunk:
    """The :class:`Trunk` of ``model`` at ``stage``, measured on the probe batch ``x``
    (resolution order in the module doc)."""
    trunk = _from_registered(model, stage, x)
    if trunk is None and _load_integrations(model):
        trunk = _from_registered(model, stage, x)
    return trunk if trunk is not None else _generic_trunk(model, stage, x)
