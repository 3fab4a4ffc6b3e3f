"""Adapters: where a model family's feature map is, and what its head does after the pool.

An :class:`Adapter` names the module whose output (or input) is the final feature
map, the layout of that tensor, and the head modules applied after the global
pool. Everything after capture is a plain function of the adapter:
:meth:`Adapter.compute` maps features to ``(logits, maps)`` without hooks, so a
model can also be wrapped as an ordinary module for export and compilation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn

from .errors import CONVERT_HINT, CAMInputError, UnsupportedHeadError
from .heads import FoldedHead, fold_head
from .hooks import CaptureKind
from .layout import FeatureLayout

__all__ = ["Adapter", "BranchAverageAdapter", "CaptureMaps", "PoolKind"]

PoolKind = Literal["avg", "max"]
HeadSpec = Sequence[Union[nn.Module, tuple[str, nn.Module]]]


def _named(head: HeadSpec) -> tuple[tuple[str, nn.Module], ...]:
    out = []
    for i, item in enumerate(head):
        if isinstance(item, nn.Module):
            out.append((f"head[{i}]", item))
        else:
            name, module = item
            out.append((str(name), module))
    return tuple(out)


def _infer_in_features(head: Sequence[tuple[str, nn.Module]]) -> Optional[int]:
    for _, m in head:
        if isinstance(m, nn.Linear):
            return m.in_features
        if isinstance(m, nn.Conv2d):
            return m.in_channels
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return m.num_features
        if isinstance(m, nn.LayerNorm):
            return int(m.normalized_shape[0])
    return None


@dataclass
class CaptureMaps:
    """What the core step makes of one forward's capture (:meth:`Adapter.maps_from_capture`).

    Attributes:
        features: ``(B, K, h, w)`` feature map ``f``.
        head: the folded head ``W'``, ``b'`` used for the maps.
        logits: ``(B, C)`` — the model's own logits when its output was given, else the
            folded head's ``W' mean_xy f + b'``.
        classes: ``(B, k)`` class indices of the maps (``-1`` = padding), or ``None`` for
            every class.
        maps: ``(B, k, h, w)`` (or ``(B, C, h, w)``) with ``M_c = Σ_k W'_ck f_k``.
    """

    features: Tensor
    head: FoldedHead
    logits: Tensor
    classes: Optional[Tensor]
    maps: Tensor


@dataclass
class Adapter:
    """How to get an exact CAM out of one model.

    Attributes:
        feature_module: the module whose output (``capture="output"``) or first input
            (``capture="input"``) is the final feature map ``f``.
        head: the modules applied after the global pool, in call order, as modules or
            ``(name, module)`` pairs; folded by :func:`cam_plugin.heads.fold_head`.
        layout: layout of the captured tensor (NCHW, NHWC, tokens with prefix tokens).
        capture: ``"output"`` or ``"input"`` of ``feature_module``.
        pool: ``"avg"`` (exact) or ``"max"`` (the paper's GMP baseline; maps are computed the
            same way but the identity ``mean_xy M_c + b_c = S_c`` does not hold).
        input_size: ``(C, H, W)`` (``(C, T, H, W)`` for clips) the model expects, when known.
        num_features: ``K``; inferred from the head when omitted.
        name: a readable description (shown in errors and ``repr``).
        output_fn: turns the model's return value into the logits tensor (default: it must
            already be a ``(B, C)`` tensor).
    """

    feature_module: nn.Module
    head: HeadSpec
    layout: FeatureLayout = field(default_factory=FeatureLayout)
    capture: CaptureKind = "output"
    pool: PoolKind = "avg"
    input_size: Optional[tuple[int, ...]] = None
    num_features: Optional[int] = None
    name: str = "custom"
    feature_name: str = ""
    output_fn: Optional[Callable[[Any], Tensor]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.feature_module, nn.Module):
            raise CAMInputError(
                "Adapter.feature_module must be an nn.Module, got "
                f"{type(self.feature_module).__name__}"
            )
        if self.pool not in ("avg", "max"):
            raise CAMInputError(f"Adapter.pool must be 'avg' or 'max', got {self.pool!r}")
        self.head = _named(self.head)
        if self.num_features is None:
            self.num_features = _infer_in_features(self.head)

    @property
    def exact(self) -> bool:
        """True when ``mean_xy M_c + b_c == logit_c`` holds (average pooling)."""
        return self.pool == "avg"

    @property
    def head_modules(self) -> tuple[tuple[str, nn.Module], ...]:
        """The head as ``(name, module)`` pairs."""
        return tuple(self.head)  # type: ignore[arg-type]

    def fold(self, num_features: Optional[int] = None) -> FoldedHead:
        """Fold the head's current parameters into CAM weights (see :mod:`cam_plugin.heads`)."""
        k = num_features or self.num_features
        if k is None:
            raise CAMInputError(
                "cannot tell the number of feature channels: give Adapter(num_features=K)"
            )
        return fold_head(self.head_modules, k)

    def features(self, captured: Tensor, input_hw: Optional[tuple[int, int]] = None) -> Tensor:
        """The captured tensor as ``(B, K, h, w)`` (fp16/bf16 upcast to fp32)."""
        feats = self.layout.to_nchw(captured, input_hw)
        if feats.dtype in (torch.float16, torch.bfloat16):
            feats = feats.float()
        return feats

    def logits_from_output(self, output: Any) -> Tensor:
        """The logits inside the model's return value."""
        if self.output_fn is not None:
            return self.output_fn(output)
        if not isinstance(output, Tensor) or output.dim() != 2:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise CAMInputError(
                f"the model returned {shape}, not (B, num_classes) logits; give the adapter an "
                "output_fn that extracts them"
            )
        return output

    def maps_from_capture(
        self,
        captured: Tensor,
        output: Any = None,
        *,
        input_hw: Optional[tuple[int, int]] = None,
        select: Optional[Callable[[Tensor], Optional[Tensor]]] = None,
        head: Optional[FoldedHead] = None,
        verify: bool = False,
    ) -> CaptureMaps:
        """The core step every face calls: one forward's capture -> features, folded head,
        logits, maps.

        ``f = layout(captured)``; ``S`` = the logits in ``output`` (or ``W' mean_xy f + b'``
        when ``output`` is ``None``); ``classes = select(S)`` (``None``: every class);
        ``M_c = Σ_k W'_ck f_k`` for those classes. With ``verify`` (and average pooling) the
        fold must reproduce ``S`` (:meth:`FoldedHead.check_reproduces`), which is the
        identity ``mean_xy M_c + b'_c = S_c``.

        Args:
            captured: the tensor the feature capture recorded.
            output: the model's return value (its logits are read with
                :meth:`logits_from_output`), or ``None``.
            input_hw: the input's ``(H, W)``, for token layouts that need the grid.
            select: ``logits -> (B, k)`` class indices, or ``None`` for every class.
            head: a folded head to use (default: fold the head's current parameters).
            verify: check the identity through the pooled features.
        """
        features = self.features(captured, input_hw)
        head = head if head is not None else self.fold(features.shape[1])
        if output is None:
            logits = self.compute(features, classes=None, head=head, maps=False)[0]
        else:
            logits = self.logits_from_output(output)
        classes = select(logits) if select is not None else None
        maps = head.maps(features, classes)
        if verify and self.exact:
            head.check_reproduces(features, logits, name=self.name)
        return CaptureMaps(features, head, logits, classes, maps)

    def compute(
        self,
        features: Tensor,
        classes: Optional[Tensor] = None,
        head: Optional[FoldedHead] = None,
        maps: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Hook-free: ``(B, K, h, w)`` features -> ``(logits, maps)``.

        ``logits = W' pool(f) + b'`` (average or max pool); ``maps`` is
        ``M_c = Σ_k W'_ck f_k`` for every class (``classes=None``, ``(B, C, h, w)``) or
        for a ``(B, k)`` selection (an empty tensor when ``maps=False``).
        """
        head = head if head is not None else self.fold(features.shape[1])
        if self.pool == "max":
            pooled = head.project(features).flatten(2).amax(dim=2)
            logits = pooled @ head.weight.to(pooled.dtype).t() + head.bias.to(pooled.dtype)
        else:
            logits = head.logits(features)
        if not maps:
            return logits, features.new_empty(0)
        return logits, head.maps(features, classes)


NamedModules = tuple[tuple[str, nn.Module], ...]


@dataclass
class BranchAverageAdapter(Adapter):
    """An adapter whose head averages several affine branches on the same pooled vector
    (distillation heads: LeViT, EfficientFormer, RepViT, SwiftFormer in eval mode).

    Attributes:
        branches: each branch's modules in call order (modules shared before the fork are
            repeated in every branch); the folded head is the mean of the branch folds,
            ``W = (1/n) Σ_i W_i``, ``b = (1/n) Σ_i b_i``, so ``mean_xy M_c + b_c`` equals
            ``(1/n) Σ_i S_c^(i)``, the averaged logit.
    """

    branches: tuple[NamedModules, ...] = field(default_factory=tuple)

    def fold(self, num_features: Optional[int] = None) -> FoldedHead:
        """Fold every branch and average the folds (branches with a LayerNorm are refused)."""
        k = num_features or self.num_features
        if k is None or not self.branches:
            return super().fold(num_features)
        folds = [fold_head(branch, k) for branch in self.branches]
        if any(f.norm_eps is not None or f.pre_weight is not None for f in folds):
            raise UnsupportedHeadError(
                f"'{self.name}': averaged head branches with a LayerNorm cannot be folded into "
                f"one CAM weight. {CONVERT_HINT}"
            )
        weight = torch.stack([f.weight for f in folds]).mean(dim=0)
        bias = torch.stack([f.bias for f in folds]).mean(dim=0)
        return FoldedHead(weight=weight, bias=bias)
