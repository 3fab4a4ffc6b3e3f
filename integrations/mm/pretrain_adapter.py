"""How the registry reads mmpretrain models: ``ImageClassifier`` (and any mmpretrain
classifier with a ``backbone`` / ``neck`` / ``head``).

The usual mmpretrain classifier is ``backbone -> GlobalAveragePooling neck -> head``:
the backbone returns a tuple with one feature map per ``out_indices`` entry, the neck
average-pools every element (``neck.gap`` is called once per element, in order) and the
head uses the *last* pooled vector (``pre_logits`` returns ``feats[-1]``). So the feature
map ``f`` of the CAM is the input of the **last call** of ``neck.gap``; capturing that
input (a forward pre-hook keeps the last call's value) gives exactly the tensor the head
sees, for any backbone and any ``out_indices``.

The head is read with a small probe of the head alone (a random pooled vector, run through
:func:`cam_plugin.probing.untouched`: eval mode, no autograd, the RNG state forked, modes
restored; every probe hook removed): the leaf modules it calls are folded by
:func:`cam_plugin.heads.fold_head` (``LinearClsHead``, ``MultiLabelLinearClsHead``,
``VisionTransformerClsHead`` without hidden layer, ``StackedLinearClsHead`` without
activation, BatchNorm-Linear heads, ...), and the fold must reproduce the head's output.
Distillation heads that average two affine branches in eval mode
(``EfficientFormerClsHead(distillation=True)``, ``LeViTClsHead(distillation=True)``) are
folded branch by branch and averaged: ``S = (W_1 p + b_1 + W_2 p + b_2) / 2``, so
``M_c = Σ_k ½ (W_1 + W_2)_ck f_k`` and the identity ``mean_xy M_c + b_c = S_c`` still holds.

Models without a 2-D ``GlobalAveragePooling`` neck (e.g. a ViT with ``out_type='avg_featmap'``
and no neck) fall back to the generic probe of :func:`cam_plugin.discovery.discover` in
``mode='tensor'`` at the model's input size. The input size comes from the backbone
(``img_size`` of transformers) or 224, and the channel count from the model's
``data_preprocessor`` (the length of its ``mean``), i.e. what the network actually sees:
``CAM(model)`` expects images *after* ``model.data_preprocessor``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from mmpretrain.models.necks import GlobalAveragePooling
from torch import Tensor, nn

from cam_plugin.adapter import Adapter, BranchAverageAdapter
from cam_plugin.discovery import discover
from cam_plugin.errors import CONVERT_HINT, UnsupportedHeadError
from cam_plugin.heads import FoldedHead, fold_head, logits_error
from cam_plugin.layout import FeatureLayout
from cam_plugin.probing import probe_input, untouched

__all__ = [
    "is_mmpretrain_model",
    "mmpretrain_adapter",
    "model_input_size",
]

NamedModules = tuple[tuple[str, nn.Module], ...]


def is_mmpretrain_model(model: nn.Module) -> bool:
    """True when the model's class comes from mmpretrain."""
    return type(model).__module__.split(".")[0] == "mmpretrain"


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` the network sees after its ``data_preprocessor``.

    ``C`` is the length of the preprocessor's ``mean`` (or the first convolution's input
    channels); ``H, W`` are the backbone's ``img_size`` when it has one (transformers), else
    ``224 x 224`` (convolutional backbones take any size).
    """
    channels: Optional[int] = None
    pre = getattr(model, "data_preprocessor", None)
    mean = getattr(pre, "mean", None)
    if isinstance(mean, Tensor) and mean.dim() >= 1 and mean.numel() > 1:
        channels = int(mean.numel())
    if channels is None:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        channels = conv.in_channels if conv is not None else 3
    backbone = getattr(model, "backbone", None)
    img = getattr(backbone, "img_size", None)
    if isinstance(img, int):
        return channels, img, img
    if isinstance(img, (tuple, list)) and len(img) == 2:
        return channels, int(img[0]), int(img[1])
    return channels, 224, 224


def _is_gap_2d(neck: Any) -> bool:
    if not isinstance(neck, GlobalAveragePooling):
        return False
    gap = getattr(neck, "gap", None)
    return isinstance(gap, nn.AdaptiveAvgPool2d) and tuple(
        gap.output_size if isinstance(gap.output_size, tuple) else (gap.output_size,) * 2
    ) == (1, 1)


def _head_in_features(head: nn.Module) -> Optional[int]:
    value = getattr(head, "in_channels", None)
    if isinstance(value, int) and value > 0:
        return value
    for m in head.modules():
        if isinstance(m, nn.Linear):
            return int(m.in_features)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return int(m.num_features)
        if isinstance(m, nn.LayerNorm):
            return int(m.normalized_shape[0])
    return None


def _leaves(module: nn.Module, prefix: str) -> NamedModules:
    """The leaf modules of ``module`` in registration order (the call order of the simple
    branch modules this is used for: ``Linear`` or ``BatchNorm -> Linear``)."""
    found = [
        (f"{prefix}.{n}" if n else prefix, m)
        for n, m in module.named_modules()
        if next(m.children(), None) is None
    ]
    return tuple(found)


def _distillation_branches(head: nn.Module) -> Optional[tuple[NamedModules, ...]]:
    """The two branches of the distillation heads that average them in eval mode."""
    name = type(head).__name__
    if name == "EfficientFormerClsHead" and getattr(head, "dist", False):
        pair = ("head", "dist_head")
    elif name == "LeViTClsHead" and getattr(head, "distillation", False):
        pair = ("head", "head_dist")
    else:
        return None
    branches = tuple(getattr(head, attr, None) for attr in pair)
    if not all(isinstance(b, nn.Module) for b in branches):
        return None
    return tuple(_leaves(b, f"head.{attr}") for b, attr in zip(branches, pair))  # type: ignore[arg-type]


def _probe_head(head: nn.Module, k: int) -> tuple[NamedModules, Tensor, Tensor]:
    """Run the head alone on a random pooled vector ``(2, k)``; return its leaf calls in
    order, the probe input and the head's output. The head is left as it was
    (:func:`cam_plugin.probing.untouched`: eval mode, no autograd, RNG forked, modes
    restored); the recording hooks are removed also when the head raises."""
    names = {id(m): f"head.{n}" if n else "head" for n, m in head.named_modules()}
    calls: list[tuple[str, nn.Module]] = []
    handles = []

    def hook(mod: nn.Module, args: Any, output: Any) -> None:
        calls.append((names.get(id(mod), "?"), mod))

    x = probe_input(head, (k,), batch=2, dist="normal")
    try:
        for m in head.modules():
            if m is not head and next(m.children(), None) is None:
                handles.append(m.register_forward_hook(hook))
        with untouched(head):
            out = head((x,))
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise UnsupportedHeadError(
            f"mmpretrain head {type(head).__name__} returned {got} for a pooled input, not "
            f"(B, num_classes) logits. {CONVERT_HINT}"
        )
    return tuple(calls), x, out


def _check_fold(folded: FoldedHead, x: Tensor, out: Tensor, what: str) -> None:
    """The fold must reproduce the head's output on the probe vector ``x`` (a pooled vector
    is a 1x1 feature map): :meth:`FoldedHead.reproduces`, else :class:`UnsupportedHeadError`."""
    feats = x.detach().float()[:, :, None, None]
    with torch.no_grad():
        if folded.reproduces(feats, out):
            return
        err, _ = logits_error(folded.logits(feats), out)
    raise UnsupportedHeadError(
        f"{what} is not affine after the average pool: its fold reproduces the head's "
        f"output only to {err:.3g} (a non-linearity or an op no module shows). " + CONVERT_HINT
    )


def _gap_adapter(model: nn.Module, neck: nn.Module, head: nn.Module) -> Adapter:
    arch = f"mmpretrain:{type(model).__name__}"
    k = _head_in_features(head)
    if k is None:
        raise UnsupportedHeadError(
            f"{arch}: cannot tell how many pooled features the head {type(head).__name__} "
            f"takes (no in_channels, no Linear). {CONVERT_HINT}"
        )
    calls, x, out = _probe_head(head, k)
    branches = _distillation_branches(head)
    common: dict[str, Any] = dict(
        feature_module=neck.gap,
        layout=FeatureLayout("NCHW"),
        capture="input",
        input_size=model_input_size(model),
        num_features=k,
        feature_name="neck.gap",
    )
    if branches is not None:
        adapter: Adapter = BranchAverageAdapter(
            head=[pair for branch in branches for pair in branch],
            branches=branches,
            name=f"{arch}: neck.gap input -> avg pool -> mean of "
            + " | ".join("+".join(n for n, _ in b) for b in branches),
            **common,
        )
    else:
        if not calls:
            raise UnsupportedHeadError(
                f"{arch}: the head {type(head).__name__} calls no module, so there are no "
                f"class weights to map. {CONVERT_HINT}"
            )
        try:
            fold_head(calls, k)
        except UnsupportedHeadError as err:
            raise UnsupportedHeadError(f"{arch}: {err}") from None
        adapter = Adapter(
            head=list(calls),
            name=f"{arch}: neck.gap input -> avg pool -> " + " -> ".join(n for n, _ in calls),
            **common,
        )
    _check_fold(adapter.fold(k), x, out, f"{arch}: the head {type(head).__name__}")
    return adapter


def mmpretrain_adapter(model: nn.Module) -> Optional[Adapter]:
    """Adapter for an mmpretrain classifier, or ``None`` for models it does not handle.

    ``backbone -> GlobalAveragePooling -> head`` is read directly (feature map = input of
    the neck's last ``gap`` call, head folded from a head-only probe); other structures go
    through the generic probe in ``mode='tensor'`` at :func:`model_input_size`.

    Raises:
        UnsupportedHeadError: the head is not affine after the pool, or the model has no
            head; the message says what to change.
    """
    if not is_mmpretrain_model(model):
        return None
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        return None
    head = getattr(model, "head", None)
    arch = type(model).__name__
    if not isinstance(head, nn.Module):
        raise UnsupportedHeadError(
            f"mmpretrain model {arch} has no head (head=None): there is no class to map. "
            + CONVERT_HINT
        )
    neck = getattr(model, "neck", None)
    if _is_gap_2d(neck):
        return _gap_adapter(model, neck, head)  # type: ignore[arg-type]
    if neck is not None and not isinstance(neck, GlobalAveragePooling):
        kind = type(neck).__name__
        if kind in {"GeneralizedMeanPooling", "HRFuseScales", "LinearNeck", "NonLinearNeck"}:
            raise UnsupportedHeadError(
                f"mmpretrain model {arch} pools with a {kind} neck, not a global average. "
                "Use neck=dict(type='GlobalAveragePooling'). " + CONVERT_HINT
            )
    out_type = getattr(backbone, "out_type", None)
    if out_type in ("cls_token", "raw"):
        # mmpretrain's ViT family (VisionTransformer, DeiT, EVA, ...): the head reads the
        # CLS token by default; averaging the patch tokens is a config switch away
        raise UnsupportedHeadError(
            f"mmpretrain model {arch}: its {type(backbone).__name__} backbone has "
            f"out_type={out_type!r}, so the head reads the class token (or the raw tokens), not "
            "an average of the patch tokens, and CAM cannot be exact. Build it with "
            "backbone=dict(..., out_type='avg_featmap') (then fine-tune the head) to get an "
            "exact CAM. " + CONVERT_HINT
        )
    return discover(model, input_size=model_input_size(model), name=f"mmpretrain:{arch}")
