"""Turn any backbone into a CAM-exact classifier: features -> [3x3 conv] -> GAP -> Linear.

The paper's recipe (Zhou et al., CVPR 2016, Sec. 2): remove the layers after the last
convolutional stage you want (optionally cut late stages for a finer map), add a
3x3 / stride 1 / pad 1 convolution (1024 units in the paper), global average pooling and
one linear layer, then train with image-level labels. For the feature map ``f`` of the last
block, the logits are ``S_c = Σ_k w_ck mean_xy f_k(x, y) + b_c`` and the class activation
map ``M_c(x, y) = Σ_k w_ck f_k(x, y)`` satisfies ``mean_xy M_c + b_c = S_c`` exactly.

:func:`convert` accepts

* a timm model (a classifier: ``forward_features`` and ``feature_info`` are used; or a
  ``features_only=True`` model, which returns one map per ``out_indices`` entry),
* a torchvision classification model (its classification layers are not kept),
* a backbone that returns a tuple / list / dict of stage maps (OpenMMLab backbones,
  ``torchvision.models.feature_extraction``), ``stage`` picks one,
* a plain ``nn.Sequential`` (its children are cut at ``stage`` like torchvision's), and
* any ``nn.Module`` that returns a 4-D ``(B, K, h, w)`` feature map.

The converted :class:`CAMClassifier` carries ``__cam_adapter__``, so ``cam_plugin.CAM(model)``
resolves it without registration. ``pool="max"`` builds the paper's GMP baseline: its maps
are computed the same way but are not exact, and CAM refuses it unless asked explicitly
(``CAM(model, adapter=model.cam_adapter(allow_inexact=True))``).
"""

from __future__ import annotations

import copy as _copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .adapter import Adapter
from .errors import CAMInputError, UnsupportedHeadError
from .placement import Placement, feature_placement, trace_placement

__all__ = [
    "CAMClassifier",
    "ConversionInfo",
    "GlobalPool2d",
    "SelectKey",
    "SelectOutput",
    "StageInfo",
    "TimmFeatures",
    "convert",
]

PoolType = Literal["avg", "max"]


# ------------------------------------------------------------------------ modules


class GlobalPool2d(nn.Module):
    """Global pooling over the spatial dims: ``"avg"`` (``mean_xy f``) or ``"max"`` (``max_xy f``).

    Args:
        pool_type: ``"avg"`` or ``"max"``.
    """

    def __init__(self, pool_type: str = "avg") -> None:
        super().__init__()
        if pool_type not in ("avg", "max"):
            raise CAMInputError(f"pool must be 'avg' or 'max', got {pool_type!r}")
        self.pool_type = pool_type

    def forward(self, x: Tensor) -> Tensor:
        """``(B, K, h, w) -> (B, K)``."""
        if self.pool_type == "max":
            return x.amax(dim=(2, 3))
        return x.mean(dim=(2, 3))

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}"


class TimmFeatures(nn.Module):
    """A timm model's ``forward_features`` as a module (NHWC outputs made NCHW).

    Args:
        model: the timm model (its classifier already removed).
        channels_last: the model returns ``(B, h, w, K)`` (e.g. Swin); permute to NCHW.
    """

    def __init__(self, model: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.model = model
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> Tensor:
        """``forward_features(x)`` as ``(B, K, h, w)``."""
        f = self.model.forward_features(x)  # type: ignore[operator]
        if self.channels_last:
            f = f.permute(0, 3, 1, 2)
        return f


class TimmIntermediate(nn.Module):
    """One intermediate of a timm model through ``forward_intermediates`` (used when the
    pruned ``forward_features`` does not end at the requested stage).

    Args:
        model: the timm model, pruned after ``index``.
        index: the ``feature_info`` index to return.
    """

    def __init__(self, model: nn.Module, index: int) -> None:
        super().__init__()
        self.model = model
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        """The ``index``-th intermediate feature map."""
        out = self.model.forward_intermediates(  # type: ignore[operator]
            x, indices=[self.index], intermediates_only=True
        )
        return out[-1]


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


class InputTransform(nn.Module):
    """Per-channel affine map ``x_c · a_c + b_c`` (torchvision GoogLeNet / Inception v3 apply
    one when ``transform_input=True``: ImageNet normalization re-expressed as ``mean = std
    = 0.5``)."""

    def __init__(self, scale: Sequence[float], shift: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(list(scale)).view(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor(list(shift)).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """``x · scale + shift``."""
        return x * self.scale + self.shift  # type: ignore[operator]


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


@dataclass(frozen=True)
class ConversionInfo:
    """What :func:`convert` built.

    Attributes:
        family: ``"timm"``, ``"timm-features"``, ``"torchvision"``, ``"sequential"``,
            ``"multi-output"`` or ``"module"``.
        backbone: the backbone's class name.
        stage: the resolved ``stage`` (``-1`` for a timm model's whole ``forward_features``).
        stage_name: the module / output the map comes from.
        stages: every selectable stage (empty when the backbone has one output).
        channels: channels of the backbone's map (before ``extra_conv``).
        input_size: ``(C, H, W)`` of the probe used to measure the sizes below.
        map_size: ``(h, w)`` of the CAM at ``input_size``.
        reduction: ``H / h``: input pixels per feature cell.
        last_stride: 1 when the last kept stage's stride was removed, else ``None``.
        pruned: modules with parameters that the features never use, dropped (the
            original classifier, auxiliary heads, ...).
    """

    family: str
    backbone: str
    stage: int
    stage_name: str
    stages: tuple[StageInfo, ...]
    channels: int
    input_size: tuple[int, int, int]
    map_size: tuple[int, int]
    reduction: float
    last_stride: Optional[int] = None
    pruned: tuple[str, ...] = field(default_factory=tuple)


class CAMClassifier(nn.Module):
    """``backbone -> [3x3 conv + BN + ReLU] -> global pool -> dropout -> Linear``.

    ``forward(x)`` returns ``(B, num_classes)`` logits; ``forward_features(x)`` the map ``f``
    (after the extra conv) whose class activation maps are ``M_c = Σ_k w_ck f_k``;
    ``forward_head(f)`` the logits from it. Built by :func:`convert`.

    Args:
        backbone: a module returning ``(B, K, h, w)``.
        in_channels: ``K``.
        num_classes: number of classes ``C >= 1``.
        extra_conv: channels of the extra 3x3 / stride 1 / pad 1 convolution + BatchNorm +
            ReLU (the paper's 1024 units), or ``None`` for none.
        dropout: dropout probability before the linear layer.
        pool: ``"avg"`` (CAM-exact) or ``"max"`` (the paper's GMP baseline).
        info: the :class:`ConversionInfo` (set by :func:`convert`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        in_channels: int,
        num_classes: int,
        *,
        extra_conv: Optional[int] = None,
        dropout: float = 0.0,
        pool: PoolType = "avg",
        info: Optional[ConversionInfo] = None,
    ) -> None:
        super().__init__()
        _check_int(num_classes, "num_classes")
        _check_int(in_channels, "in_channels")
        self.backbone = backbone
        if extra_conv is None:
            self.neck: nn.Module = nn.Identity()
            features = in_channels
        else:
            _check_int(extra_conv, "extra_conv")
            conv = nn.Conv2d(in_channels, extra_conv, 3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            self.neck = nn.Sequential(
                OrderedDict(
                    conv=conv,
                    bn=nn.BatchNorm2d(extra_conv),
                    act=nn.ReLU(inplace=False),
                )
            )
            features = extra_conv
        self.global_pool = GlobalPool2d(pool)
        self.dropout = nn.Dropout(p=float(dropout))
        self.fc = nn.Linear(features, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        self.num_classes = int(num_classes)
        self.num_features = int(features)
        self.pool_type: str = pool
        self.info = info
        self._placements: dict[tuple[int, int], Placement] = {}

    def forward_features(self, x: Tensor) -> Tensor:
        """The CAM feature map ``f``: ``(B, num_features, h, w)``."""
        return self.neck(self.backbone(x))

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """``fc(dropout(pool(f)))``; ``pre_logits=True`` returns the pooled vector."""
        pooled = self.dropout(self.global_pool(features))
        if pre_logits:
            return pooled
        return self.fc(pooled)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))

    # -- CAM -------------------------------------------------------------------------------
    def cam_adapter(self, allow_inexact: bool = False) -> Adapter:
        """The :class:`~cam_plugin.Adapter` of this classifier.

        Args:
            allow_inexact: required for ``pool="max"``: the maps ``M_c = Σ_k w_ck f_k`` are
                computed the same way, but ``max_xy`` pooling breaks the identity
                ``mean_xy M_c + b_c = S_c`` (``CAMResult.exact`` is then False).
        """
        if self.pool_type == "max" and not allow_inexact:
            raise UnsupportedHeadError(
                "this converted classifier uses global max pooling (pool='max', the paper's "
                "GMP baseline): M_c = Σ_k w_ck f_k can be computed the same way but "
                "mean_xy M_c + b_c != logit_c. Opt in explicitly with "
                "CAM(model, adapter=model.cam_adapter(allow_inexact=True))"
            )
        input_size = self.info.input_size if self.info is not None else None
        return Adapter(
            feature_module=self.neck,
            head=[("dropout", self.dropout), ("fc", self.fc)],
            pool="max" if self.pool_type == "max" else "avg",
            input_size=input_size,
            num_features=self.num_features,
            name=f"converted:{self.info.backbone if self.info else 'backbone'}",
            feature_name="neck",
        )

    def __cam_adapter__(self) -> Adapter:
        """Used by :func:`cam_plugin.resolve`: :meth:`cam_adapter` (average pooling only)."""
        return self.cam_adapter()

    def placement(self, input_size: Sequence[int]) -> Placement:
        """Where each cell of the CAM sits on an ``(H, W)`` input (traced once per size, see
        :mod:`cam_plugin.placement`); pass it to ``CAMResult.upsample(placement=...)``.

        Args:
            input_size: ``(H, W)`` or ``(C, H, W)`` of the images.
        """
        dims = [int(v) for v in input_size]
        hw = (dims[-2], dims[-1])
        if hw not in self._placements:
            channels = self.info.input_size[0] if self.info is not None else 3
            full = dims if len(dims) == 3 else [channels, *hw]
            self._placements[hw] = feature_placement(
                self, full, adapter=self.cam_adapter(allow_inexact=True)
            )
        return self._placements[hw]

    def extra_repr(self) -> str:
        if self.info is None:
            return f"num_classes={self.num_classes}, pool={self.pool_type!r}"
        i = self.info
        return (
            f"family={i.family!r}, stage={i.stage} ({i.stage_name}), "
            f"map={i.map_size[0]}x{i.map_size[1]} at {i.input_size[1]}x{i.input_size[2]}, "
            f"pool={self.pool_type!r}"
        )


# ------------------------------------------------------------------------ helpers


def _check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CAMInputError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise CAMInputError(f"{name} must be >= {minimum}, got {value}")
    return value


def _describe(out: Any) -> str:
    if isinstance(out, Tensor):
        return f"a {out.dim()}-D tensor of shape {tuple(out.shape)}"
    if isinstance(out, dict):
        items = ", ".join(f"{k!r}: {_short(v)}" for k, v in out.items())
        return f"a dict {{{items}}}"
    if isinstance(out, (tuple, list)):
        items = ", ".join(_short(v) for v in out)
        return f"a {type(out).__name__} of {len(out)} items [{items}]"
    return f"a {type(out).__name__}"


def _short(v: Any) -> str:
    return f"tensor{tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__


def _probe(module: nn.Module, x: Tensor) -> Any:
    """Run ``module(x)`` in eval mode without autograd, RNG forked, modes restored."""
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            return module(x)
    finally:
        for m, mode in modes.items():
            m.training = mode


def _probe_input(model: nn.Module, input_size: Sequence[int]) -> Tensor:
    ref = next(iter(model.parameters()), None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, *[int(v) for v in input_size]), generator=gen)
    if ref is not None:
        x = x.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else x.dtype)
    return x


def _guess_input_size(model: nn.Module) -> tuple[int, int, int]:
    from .discovery import guess_input_size

    c, h, w = guess_input_size(model)
    return int(c), int(h), int(w)


def _resolve_index(stage: int, count: int, what: str, listing: str) -> int:
    if not -count <= stage < count:
        raise CAMInputError(
            f"stage={stage} is out of range: {what} has {count} stages "
            f"(valid: {-count}..{count - 1}). {listing}"
        )
    return stage % count


def _listing(stages: Sequence[StageInfo]) -> str:
    if not stages:
        return ""
    rows = ", ".join(
        f"{s.index}: {s.name} ({s.channels} ch, stride {s.reduction:g})" for s in stages
    )
    return f"Stages: {rows}."


def _is_timm(model: nn.Module) -> bool:
    return type(model).__module__.split(".")[0] == "timm"


def _is_torchvision(model: nn.Module) -> bool:
    return type(model).__module__.startswith("torchvision.models")


def _set_child(root: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, attr = qualified.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


class _ParameterUse(TorchFunctionMode):
    """Records the ids of every tensor passed to a torch function while active: a
    parameter read directly by its owner's parent (``nn.MultiheadAttention`` passes
    ``out_proj.weight`` to ``F.multi_head_attention_forward`` and never calls ``out_proj``)
    shows up here although its module's ``forward`` never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def __torch_function__(
        self, func: Any, types: Any, args: Any = (), kwargs: Optional[dict[str, Any]] = None
    ) -> Any:
        leaves, _ = tree_flatten((args, kwargs or {}))
        self.seen.update(id(v) for v in leaves if isinstance(v, Tensor))
        return func(*args, **(kwargs or {}))


def _prune_unused(trunk: nn.Module, x: Tensor) -> tuple[str, ...]:
    """Replace every module with parameters that the probe forward neither calls nor
    reads a parameter of by ``nn.Identity`` (classifiers, auxiliary heads): only what
    computes the map trains."""
    called: set[int] = set()
    handles = []
    for m in trunk.modules():
        handles.append(m.register_forward_pre_hook(lambda mod, args: called.add(id(mod))))
    use = _ParameterUse()
    try:
        with use:
            _probe(trunk, x)
    finally:
        for h in handles:
            h.remove()
    pruned: list[str] = []
    for name, module in list(trunk.named_modules()):
        if not name or any(id(m) in called for m in module.modules()):
            continue
        if any(name.startswith(p + ".") for p in pruned):
            continue
        params = list(module.parameters())
        if not params or any(id(p) in use.seen for p in params):
            continue
        _set_child(trunk, name, nn.Identity())
        pruned.append(name)
    return tuple(pruned)


# ------------------------------------------------------------------------ families


@dataclass
class _Trunk:
    module: nn.Module
    family: str
    stage: int
    stage_name: str
    stages: tuple[StageInfo, ...]


def _timm_stages(model: nn.Module) -> tuple[StageInfo, ...]:
    info = getattr(model, "feature_info", None)
    if info is None:
        return ()
    entries: list[Any]
    if isinstance(info, list):
        entries = info
    else:
        entries = [info.info[i] for i in range(len(info.info))] if hasattr(info, "info") else []
    return tuple(
        StageInfo(i, str(e.get("module", i)), int(e.get("num_chs", 0)), float(e["reduction"]))
        for i, e in enumerate(entries)
    )


def _timm_trunk(model: nn.Module, stage: int, x: Tensor) -> _Trunk:
    stages = _timm_stages(model)
    if stage == -1:
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(0, "")  # type: ignore[operator]
        features = TimmFeatures(model)
        out = _probe(features, x)
        num = getattr(model, "num_features", None)
        if (
            isinstance(out, Tensor)
            and out.dim() == 4
            and isinstance(num, int)
            and out.shape[1] != num
            and out.shape[-1] == num
        ):
            features.channels_last = True
        return _Trunk(features, "timm", -1, "forward_features", stages)
    if not stages:
        raise CAMInputError(
            f"timm model {type(model).__name__} has no feature_info, so stage={stage} cannot "
            "be resolved; use stage=-1"
        )
    idx = _resolve_index(stage, len(stages), type(model).__name__, _listing(stages))
    name = stages[idx].name
    if hasattr(model, "prune_intermediate_layers") and hasattr(model, "forward_intermediates"):
        try:
            reference = _probe_intermediate(model, idx, x)
            model.prune_intermediate_layers(  # type: ignore[operator]
                [idx], prune_norm=True, prune_head=True
            )
        except (NotImplementedError, AssertionError, TypeError, AttributeError):
            pass
        else:
            trunk: nn.Module = TimmFeatures(model)
            try:
                got = _probe(trunk, x)
                same = (
                    isinstance(got, Tensor)
                    and got.shape == reference.shape
                    and torch.allclose(got, reference, rtol=1e-4, atol=1e-5)
                )
            except Exception:
                same = False
            if not same:
                trunk = TimmIntermediate(model, idx)
            return _Trunk(trunk, "timm", idx, name, stages)
    from timm.models import FeatureListNet  # the model is from timm, so timm is installed

    return _Trunk(
        SelectOutput(FeatureListNet(model, out_indices=(idx,)), 0),
        "timm",
        idx,
        name,
        stages,
    )


def _probe_intermediate(model: nn.Module, idx: int, x: Tensor) -> Tensor:
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = model.forward_intermediates(  # type: ignore[operator]
                x, indices=[idx], intermediates_only=True
            )
    finally:
        for m, mode in modes.items():
            m.training = mode
    return out[-1]


_HEAD_NAMES = {"avgpool", "fc", "classifier", "head", "heads", "global_pool", "dropout"}
_HEAD_TYPES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Linear, nn.Flatten)


def _children_before_head(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if name.lower().startswith("aux"):
            continue  # auxiliary classifiers (GoogLeNet, Inception v3) run in training only
        if name in _HEAD_NAMES or isinstance(child, _HEAD_TYPES):
            break
        out.append((name, child))
    return out


def _reduction(x: Tensor, out: Any) -> Optional[tuple[float, int]]:
    """``(stride, channels)`` of a 4-D output, else ``None``."""
    if isinstance(out, Tensor) and out.dim() == 4:
        return float(x.shape[-2]) / float(out.shape[-2]), int(out.shape[1])
    return None


def _sequential_trunk(
    model: nn.Module, children: list[tuple[str, nn.Module]], stage: int, x: Tensor, family: str
) -> _Trunk:
    """Children run in order; plain ``nn.Sequential`` children that span several
    resolutions are flattened one level; a stage is the last child at each resolution."""
    flat: list[tuple[str, nn.Module, Any]] = []
    prefix: list[tuple[str, nn.Module]] = []
    if getattr(model, "transform_input", False) is True:
        std, mean = (0.229, 0.224, 0.225), (0.485, 0.456, 0.406)
        prefix.append(
            (
                "transform_input",
                InputTransform([s / 0.5 for s in std], [(m - 0.5) / 0.5 for m in mean]),
            )
        )
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            h = x
            for _, mod in prefix:
                h = mod(h)
            for name, child in children:
                if type(child) is nn.Sequential and len(child) > 1:
                    inner: list[tuple[str, nn.Module, Any]] = []
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
    finally:
        for m, mode in modes.items():
            m.training = mode
    # a stage = the last child at each resolution (timm's feature_info convention)
    ends: list[int] = []
    for i, (_, _, r) in enumerate(flat):
        if r is None:
            ends = []
            break
        nxt = flat[i + 1][2] if i + 1 < len(flat) else None
        if nxt is None or nxt[0] != r[0]:
            ends.append(i)
    stages = [
        StageInfo(si, flat[end][0], flat[end][2][1], flat[end][2][0])  # type: ignore[index]
        for si, end in enumerate(ends)
    ]
    if stage == -1:
        cut = len(flat) - 1
        stage_name = flat[-1][0]
    else:
        if not ends:
            raise CAMInputError(
                f"{type(model).__name__}'s layers do not all return 4-D maps, so stage={stage} "
                "cannot be resolved; use stage=-1"
            )
        idx = _resolve_index(stage, len(ends), type(model).__name__, _listing(stages))
        cut = ends[idx]
        stage_name = flat[cut][0]
        stage = idx
    layers = OrderedDict((n, m) for n, m in prefix)
    for name, mod, _ in flat[: cut + 1]:
        layers[name.replace(".", "_")] = mod
    if type(model).__name__ == "DenseNet" and cut == len(flat) - 1:
        layers["relu"] = nn.ReLU(inplace=False)  # DenseNet's forward applies F.relu
    return _Trunk(nn.Sequential(layers), family, stage, stage_name, tuple(stages))


def _multi_output_trunk(model: nn.Module, stage: Union[int, str], out: Any, x: Tensor) -> _Trunk:
    names: list[str]
    values: list[Any]
    if isinstance(out, dict):
        names = [str(k) for k in out]
        values = list(out.values())
    else:
        info = getattr(model, "feature_info", None)
        module_names = (
            info.module_name() if info is not None and hasattr(info, "module_name") else None
        )
        names = (
            list(module_names)
            if module_names and len(module_names) == len(out)
            else [f"output[{i}]" for i in range(len(out))]
        )
        values = list(out)
    bad = [i for i, v in enumerate(values) if not (isinstance(v, Tensor) and v.dim() == 4)]
    if bad:
        raise CAMInputError(
            f"the backbone returned {_describe(out)}; every output must be a 4-D (B, K, h, w) "
            f"feature map, but item {bad[0]} is not"
        )
    stages = tuple(
        StageInfo(i, names[i], int(v.shape[1]), float(x.shape[-2]) / float(v.shape[-2]))
        for i, v in enumerate(values)
    )
    if isinstance(out, dict):
        if isinstance(stage, str):
            if stage not in out:
                raise CAMInputError(
                    f"stage={stage!r} is not one of the backbone's outputs {list(out)}"
                )
            idx = list(out).index(stage)
        else:
            idx = _resolve_index(stage, len(values), type(model).__name__, _listing(stages))
        key = list(out)[idx]
        return _Trunk(SelectKey(model, str(key)), "multi-output", idx, str(key), stages)
    if isinstance(stage, str):
        raise CAMInputError(
            f"stage={stage!r}: a string selects a key of a dict output, but the backbone "
            f"returned {_describe(out)}; give an int"
        )
    idx = _resolve_index(stage, len(values), type(model).__name__, _listing(stages))
    family = "timm-features" if _is_timm(model) else "multi-output"
    return _Trunk(SelectOutput(model, idx), family, idx, names[idx], stages)


def _build_trunk(model: nn.Module, stage: Union[int, str], x: Tensor) -> _Trunk:
    if _is_timm(model) and hasattr(model, "forward_features") and isinstance(stage, int):
        return _timm_trunk(model, stage, x)
    if _is_torchvision(model) and isinstance(stage, int):
        name = type(model).__name__
        if name in ("VisionTransformer", "SwinTransformer", "MaxVit") and stage != -1:
            raise CAMInputError(
                f"torchvision {name} supports only stage=-1 here (its stages are not NCHW "
                "maps); timm's versions with features_only=True give NCHW stages"
            )
        return _sequential_trunk(model, _children_before_head(model), stage, x, "torchvision")
    if type(model) is nn.Sequential and isinstance(stage, int):
        return _sequential_trunk(model, list(model.named_children()), stage, x, "sequential")
    try:
        out = _probe(model, x)
    except Exception as err:
        raise CAMInputError(
            f"the backbone {type(model).__name__} failed on a probe input of shape "
            f"{tuple(x.shape)} ({type(err).__name__}: {err}); pass input_size=(C, H, W) that "
            "it accepts"
        ) from err
    if isinstance(out, (tuple, list, dict)):
        return _multi_output_trunk(model, stage, out, x)
    if stage not in (-1, 0):
        raise CAMInputError(
            f"stage={stage!r}: the backbone {type(model).__name__} returns one map "
            f"({_describe(out)}), so there is no stage to choose; cut it yourself, pass an "
            "nn.Sequential, or a module that returns a tuple of stage maps"
        )
    return _Trunk(model, "module", -1, type(model).__name__, ())


# ------------------------------------------------------------------------ last stride


_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def _apply_last_stride(trunk: nn.Module, x: Tensor) -> None:
    """Give every convolution / pooling that downsamples into the final map stride 1."""
    trace = trace_placement(trunk, x)
    before = _probe(trunk, x)
    final = (int(before.shape[-2]), int(before.shape[-1]))
    ops = [op for op in trace.ops if op.out_size == final and max(op.stride) > 1 and op.op != "pad"]
    if not ops:
        raise CAMInputError(
            "last_stride=1: no strided convolution or pooling produces the final map of this "
            "backbone, so there is no stride to remove"
        )
    target = ops[0].in_size
    undo: list[tuple[nn.Module, str, Any]] = []
    replaced: list[tuple[str, nn.Module]] = []
    names = {id(m): n for n, m in trunk.named_modules()}
    try:
        for op in ops:
            mod = op.module
            if isinstance(mod, nn.Conv2d):
                undo.append((mod, "stride", mod.stride))
                mod.stride = (1, 1)
            elif isinstance(mod, _POOLS):
                k = _pair_of(mod.kernel_size)
                s = _pair_of(mod.stride if mod.stride is not None else mod.kernel_size)
                if k == s and _pair_of(mod.padding) == (0, 0):
                    qual = names[id(mod)]
                    _set_child(trunk, qual, nn.Identity())
                    replaced.append((qual, mod))
                else:
                    undo.append((mod, "stride", mod.stride))
                    mod.stride = 1
            else:
                raise CAMInputError(
                    f"last_stride=1: the downsampling '{op.op}' in "
                    f"'{op.module_name or 'the top-level forward'}' is not an nn.Conv2d / "
                    "pooling module, so its stride cannot be changed; cut the backbone at an "
                    "earlier stage instead"
                )
        after = _probe(trunk, x)
        got = (int(after.shape[-2]), int(after.shape[-1]))
        if got != target:
            raise CAMInputError(
                f"last_stride=1 would turn the {final[0]}x{final[1]} map into "
                f"{got[0]}x{got[1]} instead of {target[0]}x{target[1]}: this backbone's last "
                "downsampling is not a padded 'same' convolution (e.g. a 2x2/2 patchify); use "
                "an earlier stage instead (or timm's output_stride=16 at creation)"
            )
    except Exception:
        for mod, attr, old in undo:
            setattr(mod, attr, old)
        for qual, mod in replaced:
            _set_child(trunk, qual, mod)
        raise


def _pair_of(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[-1])
    return int(v), int(v)


# ------------------------------------------------------------------------ convert


def convert(
    backbone: nn.Module,
    num_classes: int,
    *,
    stage: Union[int, str] = -1,
    extra_conv: Optional[int] = None,
    dropout: float = 0.0,
    pool: PoolType = "avg",
    last_stride: Optional[int] = None,
    input_size: Optional[Sequence[int]] = None,
    copy: bool = True,
) -> CAMClassifier:
    """Build a CAM-exact classifier on ``backbone``: map -> [3x3 conv] -> GAP -> Linear.

    ``S_c = Σ_k w_ck mean_xy f_k + b_c`` and ``M_c(x, y) = Σ_k w_ck f_k(x, y)``, so
    ``mean_xy M_c + b_c = S_c`` exactly (``pool="avg"``).

    What ``stage`` means (negative values count from the end, like Python):

    * timm classifier: ``-1`` (default) is ``forward_features``, the whole trunk (for
      EfficientNet / MobileNet that includes the final 1x1 ``conv_head``); any other value
      indexes ``model.feature_info`` like ``features_only=True, out_indices=(stage,)``
      (ResNet: ``0`` act1 /2, ``1`` layer1 /4, ``2`` layer2 /8, ``3`` layer3 /16, ``4``
      layer4 /32). Later stages and the head are pruned (``prune_intermediate_layers``).
    * timm ``features_only`` model, OpenMMLab backbone or anything returning a tuple /
      list / dict of maps: the position in what it returns (for a dict also the key).
    * torchvision classifier or ``nn.Sequential``: its layers before the pooling run in
      order (``features`` / ``trunk_output`` / ``layers`` are opened up); a stage is the
      last layer at each resolution, the same convention as timm's ``feature_info``
      (ResNet ``0``..``4`` = relu /2, layer1 /4, layer2 /8, layer3 /16, layer4 /32;
      EfficientNet ``features.1`` /2 ... ``features.8`` /32).
    * any other module returning one map: only ``-1``.

    ``info.stages`` lists them with channels and strides; an out-of-range ``stage`` raises
    with that list.

    Args:
        backbone: the network (see above). It is deep-copied unless ``copy=False``.
        num_classes: classes ``C >= 1``.
        stage: which stage's map to use (see above); cut late stages for a finer map (the
            paper's 14x14 instead of 7x7 at 224 px).
        extra_conv: add a 3x3 / stride 1 / pad 1 convolution with this many channels +
            BatchNorm + ReLU before the pool (the paper: 1024); ``None`` for none.
        dropout: dropout before the linear layer (identity in eval mode, folded exactly).
        pool: ``"avg"`` (GAP, CAM-exact) or ``"max"`` (GMP, the paper's baseline; CAM on
            it needs ``model.cam_adapter(allow_inexact=True)``).
        last_stride: ``1`` removes the stride of the last kept stage (every convolution /
            pooling that downsamples into the final map gets stride 1; a kernel-equals-stride
            pooling becomes identity), doubling the map's side (ResNet-50 at 224: 14x14 with
            2048 channels). Refused when the result would not be exactly twice the size
            (e.g. ConvNeXt's 2x2/2 downsampling). timm ResNets can instead be created with
            ``output_stride=16`` (dilated).
        input_size: ``(C, H, W)`` of the probe used to measure the backbone (default: the
            model's pretrained config, else 224 x 224 with the first convolution's channels).
        copy: work on a deep copy (default) so ``backbone`` is never modified; ``False``
            reuses it in place (saves memory; its classifier and unused layers are removed
            and ``last_stride`` changes it).

    Returns:
        A :class:`CAMClassifier` in train mode; ``.info`` says what was built.

    Raises:
        CAMInputError: bad ``num_classes`` / ``stage`` / ``extra_conv`` / ``dropout`` /
            ``pool``, or a backbone whose output is not a 4-D map (the message shows what
            came out).
    """
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"convert needs an nn.Module backbone, got {type(backbone).__name__}")
    _check_int(num_classes, "num_classes")
    if isinstance(stage, bool) or not isinstance(stage, (int, str)):
        raise CAMInputError(f"stage must be an int (or a dict key), got {stage!r}")
    if extra_conv is not None:
        _check_int(extra_conv, "extra_conv")
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, (int, float))
        or not (0.0 <= float(dropout) < 1.0)
    ):
        raise CAMInputError(f"dropout must be a float in [0, 1), got {dropout!r}")
    if pool not in ("avg", "max"):
        raise CAMInputError(f"pool must be 'avg' (GAP, exact) or 'max' (GMP), got {pool!r}")
    if last_stride not in (None, 1):
        raise CAMInputError(f"last_stride must be None or 1, got {last_stride!r}")
    if input_size is None:
        size = _guess_input_size(backbone)
    else:
        dims = [int(v) for v in input_size]
        if len(dims) != 3 or min(dims) < 1:
            raise CAMInputError(f"input_size must be (C, H, W), got {input_size!r}")
        size = (dims[0], dims[1], dims[2])
    model = _copy.deepcopy(backbone) if copy else backbone
    was_training = backbone.training
    x = _probe_input(model, size)
    trunk = _build_trunk(model, stage, x)
    module = trunk.module
    if last_stride == 1:
        _apply_last_stride(module, x)
    out = _probe(module, x)
    if not (isinstance(out, Tensor) and out.dim() == 4):
        raise CAMInputError(
            f"the backbone {type(backbone).__name__} returned {_describe(out)}, not a 4-D "
            "(B, K, h, w) feature map. Pass a convolutional feature extractor (timm: the model "
            "or features_only=True; torchvision: the classifier; OpenMMLab: the backbone), "
            "or a module that returns the map"
        )
    pruned = _prune_unused(module, x)
    info = ConversionInfo(
        family=trunk.family,
        backbone=type(backbone).__name__,
        stage=trunk.stage,
        stage_name=trunk.stage_name,
        stages=trunk.stages,
        channels=int(out.shape[1]),
        input_size=size,
        map_size=(int(out.shape[-2]), int(out.shape[-1])),
        reduction=float(size[1]) / float(out.shape[-2]),
        last_stride=last_stride,
        pruned=pruned,
    )
    classifier = CAMClassifier(
        module,
        int(out.shape[1]),
        num_classes,
        extra_conv=extra_conv,
        dropout=float(dropout),
        pool=pool,
        info=info,
    )
    ref = next(iter(module.parameters()), None)
    if ref is not None:
        classifier.to(device=ref.device)
    classifier.train(was_training)
    return classifier
