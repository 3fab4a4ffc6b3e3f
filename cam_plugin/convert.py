"""Turn any backbone into a CAM-exact classifier: features -> [3x3 conv] -> GAP -> Linear.

Image backbones (maps ``(B, K, h, w)``) and 3-D video backbones (maps ``(B, K, T, h, w)``:
torchvision ``r3d_18`` / ``mc3_18`` / ``r2plus1d_18`` / ``s3d`` / ``swin3d_*``, any module
returning a space-time map) are both converted; a video backbone gets a 3x3x3 extra
convolution, a global average over ``(t, x, y)`` (:class:`GlobalPool3d`) and the linear
layer, so ``mean_{t,x,y} M_c + b_c = S_c`` holds exactly.

The paper's recipe (Zhou et al., CVPR 2016, Sec. 2): remove the layers after the last
convolutional stage you want (optionally cut late stages for a finer map), add a
3x3 / stride 1 / pad 1 convolution (1024 units in the paper), global average pooling and
one linear layer, then train with image-level labels. For the feature map ``f`` of the last
block, the logits are ``S_c = Σ_k w_ck mean_xy f_k(x, y) + b_c`` and the class activation
map ``M_c(x, y) = Σ_k w_ck f_k(x, y)`` satisfies ``mean_xy M_c + b_c = S_c`` exactly.

What ``stage`` means depends on the backbone (negative values count from the end):

* timm classifier: ``-1`` (default) is ``forward_features``, the whole trunk (for
  EfficientNet / MobileNet that includes the final 1x1 ``conv_head``); any other value
  indexes ``model.feature_info`` like ``features_only=True, out_indices=(stage,)``
  (ResNet: ``0`` act1 /2, ``1`` layer1 /4, ``2`` layer2 /8, ``3`` layer3 /16, ``4``
  layer4 /32). Later stages and the head are pruned (``prune_intermediate_layers``).
* timm ``features_only`` model, OpenMMLab backbone or anything returning a tuple /
  list / dict of maps (``torchvision.models.feature_extraction``): the position in what it
  returns (for a dict also the key).
* torchvision classifier or ``nn.Sequential``: its layers before the pooling run in
  order (``features`` / ``trunk_output`` / ``layers`` are opened up); a stage is the
  last layer at each resolution, the same convention as timm's ``feature_info``
  (ResNet ``0``..``4`` = relu /2, layer1 /4, layer2 /8, layer3 /16, layer4 /32;
  EfficientNet ``features.1`` /2 ... ``features.8`` /32); its classification layers are
  not kept.
* any other ``nn.Module`` returning one 4-D ``(B, K, h, w)`` map (or one 5-D
  ``(B, K, T, h, w)`` space-time map): only ``-1``.

A backbone is a video backbone when its first convolution is an ``nn.Conv3d`` (or when
``input_size`` is ``(C, T, H, W)``); its stages are counted by spatial stride, as for images
(torchvision ``r3d_18``: ``0`` layer1 /2, ``1`` layer2 /4, ``2`` layer3 /8, ``3`` layer4 /16).

How a family is cut lives with the family: :mod:`cam_plugin.trunks` holds the generic
trunks and the registry of trunk builders (timm's and torchvision's are registered by
their integrations, loaded on first use); :mod:`cam_plugin.surgery` removes the last
stride and prunes the modules the map never uses.

The converted :class:`CAMClassifier` carries ``__cam_adapter__``, so ``cam_plugin.CAM(model)``
resolves it without registration. ``pool="max"`` builds the paper's GMP baseline: its maps
are computed the same way but are not exact, and CAM refuses it unless asked explicitly
(``CAM(model, adapter=model.cam_adapter(allow_inexact=True))``).
"""

from __future__ import annotations

import copy as _copy
import importlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from torch import Tensor, nn

from .adapter import Adapter
from .errors import CAMInputError, UnsupportedHeadError
from .layout import FeatureLayout
from .placement import Placement
from .probing import probe_input, untouched
from .surgery import prune_unused, remove_last_stride
from .tracing import feature_placement
from .trunks import SelectKey, SelectOutput, StageInfo, Trunk, build_trunk, describe_output

__all__ = [
    "CAMClassifier",
    "ConversionInfo",
    "GlobalPool2d",
    "GlobalPool3d",
    "SelectKey",
    "SelectOutput",
    "StageInfo",
    "convert",
]

PoolType = Literal["avg", "max"]

#: names that moved to the integration of their framework; resolved lazily so that
#: importing this module never imports timm / torchvision
_MOVED = {
    "TimmFeatures": "cam_plugin.integrations.timm",
    "TimmIntermediate": "cam_plugin.integrations.timm",
    "InputTransform": "cam_plugin.integrations.torchvision",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'cam_plugin.convert' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------------ modules


class GlobalPool2d(nn.Module):
    """Global pooling over the spatial dims: ``"avg"`` (``mean_xy f``) or ``"max"`` (``max_xy f``).

    Every dim after the channels is pooled, so a 5-D map is pooled over ``(t, x, y)``
    (:class:`GlobalPool3d` is the same module under its video name).

    Args:
        pool_type: ``"avg"`` or ``"max"``.
    """

    def __init__(self, pool_type: str = "avg") -> None:
        super().__init__()
        if pool_type not in ("avg", "max"):
            raise CAMInputError(f"pool must be 'avg' or 'max', got {pool_type!r}")
        self.pool_type = pool_type

    def forward(self, x: Tensor) -> Tensor:
        """``(B, K, h, w) -> (B, K)`` (``(B, K, T, h, w) -> (B, K)``)."""
        dims = [2, 3, 4] if x.dim() == 5 else [2, 3]  # a list: TorchScript-compatible
        if self.pool_type == "max":
            return x.amax(dim=dims)
        return x.mean(dim=dims)

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}"


class GlobalPool3d(GlobalPool2d):
    """Global pooling of a space-time map ``(B, K, T, h, w) -> (B, K)``: ``"avg"``
    (``mean_{t,x,y} f``, CAM-exact) or ``"max"``."""


@dataclass(frozen=True)
class ConversionInfo:
    """What :func:`convert` built.

    Attributes:
        family: ``"timm"``, ``"timm-features"``, ``"torchvision"``, ``"sequential"``,
            ``"multi-output"`` or ``"module"``.
        video: True for a 3-D backbone (maps ``(B, K, T, h, w)``).
        backbone: the backbone's class name.
        stage: the resolved ``stage`` (``-1`` for a timm model's whole ``forward_features``).
        stage_name: the module / output the map comes from.
        stages: every selectable stage (empty when the backbone has one output).
        channels: channels of the backbone's map (before ``extra_conv``).
        input_size: ``(C, H, W)`` (video: ``(C, T, H, W)``) of the probe used to measure the
            sizes below.
        map_size: ``(h, w)`` of the CAM at ``input_size``.
        reduction: ``H / h``: input pixels per feature cell.
        last_stride: 1 when the last kept stage's stride was removed, else ``None``.
        pruned: modules with parameters that the features never use, dropped (the
            original classifier, auxiliary heads, ...).
        map_frames: ``T'``, the map's frames at ``input_size`` (video; ``None`` for images).
    """

    family: str
    backbone: str
    stage: int
    stage_name: str
    stages: tuple[StageInfo, ...]
    channels: int
    input_size: tuple[int, ...]
    map_size: tuple[int, int]
    reduction: float
    last_stride: Optional[int] = None
    pruned: tuple[str, ...] = field(default_factory=tuple)
    video: bool = False
    map_frames: Optional[int] = None


class CAMClassifier(nn.Module):
    """``backbone -> [3x3 conv + BN + ReLU] -> global pool -> dropout -> Linear``.

    With ``video=True`` the backbone returns ``(B, K, T, h, w)``, the extra convolution is
    3x3x3 (``nn.Conv3d`` + ``nn.BatchNorm3d``), the pool is :class:`GlobalPool3d` and the
    maps are ``M_c(t, x, y) = Σ_k w_ck f_k(t, x, y)`` (layout ``NCTHW``).

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
        video: a 3-D backbone (default: ``info.video``, else False).
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
        video: Optional[bool] = None,
    ) -> None:
        super().__init__()
        _check_int(num_classes, "num_classes")
        _check_int(in_channels, "in_channels")
        self.video = bool(info.video if video is None and info is not None else video)
        self.backbone = backbone
        if extra_conv is None:
            self.neck: nn.Module = nn.Identity()
            features = in_channels
        else:
            _check_int(extra_conv, "extra_conv")
            self.neck = _extra_conv(in_channels, extra_conv, self.video)
            features = extra_conv
        self.global_pool = GlobalPool3d(pool) if self.video else GlobalPool2d(pool)
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
        """The CAM feature map ``f``: ``(B, num_features, h, w)`` (video:
        ``(B, num_features, T', h, w)``)."""
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
            layout=FeatureLayout("NCTHW" if self.video else "NCHW"),
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
        :mod:`cam_plugin.tracing`); pass it to ``CAMResult.upsample(placement=...)``.

        Args:
            input_size: ``(H, W)`` or ``(C, H, W)`` of the images.

        Raises:
            CAMInputError: on a video classifier (clips are upsampled plainly).
        """
        if self.video:
            raise CAMInputError(
                "placement is traced for image maps; a video classifier's clips are upsampled "
                "plainly (res.upsample() resizes (T', h, w) to (T, H, W))"
            )
        dims = [int(v) for v in input_size]
        hw = (dims[-2], dims[-1])
        if hw not in self._placements:
            channels = self.info.input_size[0] if self.info is not None else 3
            full = dims if len(dims) == 3 else [channels, *hw]
            self._placements[hw] = feature_placement(
                self, full, self.cam_adapter(allow_inexact=True)
            )
        return self._placements[hw]

    def extra_repr(self) -> str:
        if self.info is None:
            return f"num_classes={self.num_classes}, pool={self.pool_type!r}"
        i = self.info
        frames = f"{i.map_frames}x" if i.map_frames is not None else ""
        clip = f"{i.input_size[1]}x" if i.video else ""
        return (
            f"family={i.family!r}, stage={i.stage} ({i.stage_name}), "
            f"map={frames}{i.map_size[0]}x{i.map_size[1]} at "
            f"{clip}{i.input_size[-2]}x{i.input_size[-1]}, pool={self.pool_type!r}"
        )


def _extra_conv(in_channels: int, channels: int, video: bool) -> nn.Module:
    """The paper's extra 3x3 (video: 3x3x3) / stride 1 / pad 1 convolution + BN + ReLU."""
    conv_type = nn.Conv3d if video else nn.Conv2d
    norm_type = nn.BatchNorm3d if video else nn.BatchNorm2d
    conv = conv_type(in_channels, channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(OrderedDict(conv=conv, bn=norm_type(channels), act=nn.ReLU(inplace=False)))


def _check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CAMInputError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise CAMInputError(f"{name} must be >= {minimum}, got {value}")
    return value


# ------------------------------------------------------------------------ convert


def _check_arguments(
    num_classes: Any,
    stage: Any,
    extra_conv: Any,
    dropout: Any,
    pool: Any,
    last_stride: Any,
) -> None:
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


#: the probe clip of a 3-D backbone when no input_size is given: (T, H, W) of torchvision's
#: video classifiers' training clips
VIDEO_PROBE = (16, 112, 112)


def is_video_backbone(backbone: nn.Module) -> bool:
    """True when the backbone's first convolution is an ``nn.Conv3d`` (a 3-D video backbone
    taking ``(B, C, T, H, W)`` clips)."""
    for m in backbone.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return isinstance(m, nn.Conv3d)
    return False


def _probe_size(backbone: nn.Module, input_size: Optional[Sequence[int]]) -> tuple[int, ...]:
    """``(C, H, W)``, or ``(C, T, H, W)`` for a video backbone (default ``VIDEO_PROBE``)."""
    if input_size is None:
        from .discovery import guess_input_size

        c, h, w = guess_input_size(backbone)
        if is_video_backbone(backbone):
            return (int(c), *VIDEO_PROBE)
        return int(c), int(h), int(w)
    dims = [int(v) for v in input_size]
    if len(dims) not in (3, 4) or min(dims) < 1:
        raise CAMInputError(
            f"input_size must be (C, H, W) (images) or (C, T, H, W) (video clips), got "
            f"{input_size!r}"
        )
    return tuple(dims)


def _feature_map(module: nn.Module, x: Tensor, backbone: nn.Module) -> Tensor:
    """The trunk's map on the probe; refuses anything that is not ``(B, K, h, w)`` (for a
    clip probe, ``(B, K, T', h, w)``)."""
    with untouched(module):
        out = module(x)
    rank = x.dim()
    if not (isinstance(out, Tensor) and out.dim() == rank):
        want = "5-D (B, K, T, h, w) space-time" if rank == 5 else "4-D (B, K, h, w)"
        raise CAMInputError(
            f"the backbone {type(backbone).__name__} returned {describe_output(out)}, not a "
            f"{want} feature map. Pass a convolutional feature extractor (timm: the "
            "model or features_only=True; torchvision: the classifier; OpenMMLab: the "
            "backbone), or a module that returns the map"
        )
    return out


def _conversion_info(
    trunk: Trunk,
    backbone: nn.Module,
    out: Tensor,
    size: tuple[int, ...],
    last_stride: Optional[int],
    pruned: tuple[str, ...],
) -> ConversionInfo:
    return ConversionInfo(
        family=trunk.family,
        backbone=type(backbone).__name__,
        stage=trunk.stage,
        stage_name=trunk.stage_name,
        stages=trunk.stages,
        channels=int(out.shape[1]),
        input_size=size,
        map_size=(int(out.shape[-2]), int(out.shape[-1])),
        reduction=float(size[-2]) / float(out.shape[-2]),
        last_stride=last_stride,
        pruned=pruned,
        video=out.dim() == 5,
        map_frames=int(out.shape[2]) if out.dim() == 5 else None,
    )


def _remove_last_stride(module: nn.Module, x: Tensor, out: Tensor) -> None:
    """:func:`cam_plugin.surgery.remove_last_stride` on an image trunk; refused on 3-D."""
    if out.dim() == 5:
        raise CAMInputError(
            "last_stride=1 is implemented for image backbones; for a 3-D video backbone cut "
            "at an earlier stage (stage=-2) for a finer space-time map"
        )
    remove_last_stride(module, x)


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
    ``mean_xy M_c + b_c = S_c`` exactly (``pool="avg"``). What ``stage`` selects for each
    kind of backbone is in the module doc; ``info.stages`` lists the stages with channels
    and strides, and an out-of-range ``stage`` raises with that list.

    Args:
        backbone: any of the module doc's kinds; deep-copied unless ``copy=False``.
        num_classes: classes ``C >= 1``.
        stage: which stage's map to use; cut late stages for a finer map (the paper's
            14x14 instead of 7x7 at 224 px).
        extra_conv: add a 3x3 / stride 1 / pad 1 convolution with this many channels +
            BatchNorm + ReLU before the pool (the paper: 1024); ``None`` for none.
        dropout: dropout before the linear layer (identity in eval mode, folded exactly).
        pool: ``"avg"`` (GAP, CAM-exact) or ``"max"`` (GMP, the paper's baseline; CAM on
            it needs ``model.cam_adapter(allow_inexact=True)``).
        last_stride: ``1`` gives every convolution / pooling that downsamples into the final
            map stride 1 (:func:`cam_plugin.surgery.remove_last_stride`), doubling the map's
            side (ResNet-50 at 224: 14x14 with 2048 channels); refused when the result would
            not be exactly twice the size (e.g. ConvNeXt's 2x2/2 downsampling).
        input_size: ``(C, H, W)`` of the probe that measures the backbone (default: its
            pretrained config, else 224 x 224 with its first convolution's channels);
            ``(C, T, H, W)`` for a video backbone (default ``(C, 16, 112, 112)``; a small
            clip makes the conversion faster).
        copy: work on a deep copy (default); ``False`` changes ``backbone`` in place
            (classifier and unused layers removed, ``last_stride`` applied).

    Returns:
        A :class:`CAMClassifier` in the backbone's train / eval mode; ``.info`` says what
        was built.

    Raises:
        CAMInputError: bad ``num_classes`` / ``stage`` / ``extra_conv`` / ``dropout`` /
            ``pool`` / ``last_stride`` / ``input_size``, a backbone whose output is not a
            4-D map (5-D for a clip; the message shows what came out), or ``last_stride=1``
            on a video backbone (cut at an earlier stage instead).
    """
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"convert needs an nn.Module backbone, got {type(backbone).__name__}")
    _check_arguments(num_classes, stage, extra_conv, dropout, pool, last_stride)
    size = _probe_size(backbone, input_size)
    was_training = backbone.training
    model = _copy.deepcopy(backbone) if copy else backbone
    x = probe_input(model, size, batch=1)
    trunk = build_trunk(model, stage, x)
    module = trunk.module
    out = _feature_map(module, x, backbone)
    if last_stride == 1:
        _remove_last_stride(module, x, out)
        out = _feature_map(module, x, backbone)
    info = _conversion_info(trunk, backbone, out, size, last_stride, prune_unused(module, x))
    classifier = CAMClassifier(
        module,
        info.channels,
        num_classes,
        extra_conv=extra_conv,
        dropout=float(dropout),
        pool=pool,
        info=info,
    )
    classifier.to(device=x.device)
    classifier.train(was_training)
    return classifier
