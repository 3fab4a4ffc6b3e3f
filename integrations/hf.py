"""HuggingFace ``transformers`` image classifiers: zero-configuration adapters.

Loaded by the registry the first time it meets a model whose class comes from
``transformers`` (extra ``cam-plugin[hf]``). Every ``*ForImageClassification`` model
returns an ``ImageClassifierOutput``; its ``logits`` (:func:`hf_logits`) are what the
identity ``mean_xy M_c + b_c = S_c`` is checked against.

How a model is read (:func:`hf_adapter`):

* heads that are a global average followed by an affine map are read off one forward by
  :func:`cam_plugin.discovery.discover` (the user's first real call inside
  :class:`cam_plugin.CAM`; no probe of ours): ResNet, RegNet, BiT, MobileNetV1/V2,
  ConvNeXt / ConvNeXtV2 (the LayerNorm after the pool folded exactly), Swin / Swinv2 /
  FocalNet (tokens after the final LayerNorm, pooled by ``AdaptiveAvgPool1d``),
  MobileViT / MobileViTV2, EfficientNet (``pooling_type='mean'``), BEiT / Data2VecVision
  (``use_mean_pooling=True``), CvT without a final CLS token, and any other family whose
  head discovery proves affine after an average;
* ``TimmWrapperForImageClassification`` goes through the timm adapter
  (:func:`cam_plugin.integrations.timm.timm_adapter`) on its ``timm_model``, reading the
  same forward;
* DINOv2 classifies ``[CLS, mean(patch tokens)]``: ``S = W_cls·cls + W_p·mean_xy f + b``.
  :class:`ClassTokenSplitAdapter` splits it exactly: the map is the patch half
  ``M_c = Σ_k W_p,ck f_k(x, y)``, and the CLS half ``W_cls,c·cls`` is a per-image constant
  that the result reports in its ``bias`` (``b_c + W_cls,c·cls``), so
  ``mean_xy M_c + bias_c = S_c`` still holds per image;
* heads that classify a token (ViT, DeiT, ViT-Hybrid, ViT-MSN, PVT, CvT with a CLS token,
  BEiT / Data2VecVision without mean pooling), max pooling, latent attention or
  non-image inputs are refused by name (:data:`REFUSED`) with the ``convert`` hint.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import transformers
from torch import Tensor, nn

from cam_plugin.adapter import Adapter, CaptureMaps
from cam_plugin.discovery import discover, guess_input_size
from cam_plugin.errors import CONVERT_HINT, AdapterNotFoundError, UnsupportedHeadError
from cam_plugin.forward import (
    ForwardTrace,
    ResolutionRequest,
    current_request,
    resolution_context,
)
from cam_plugin.heads import FoldedHead
from cam_plugin.layout import FeatureLayout, LayoutKind
from cam_plugin.registry import register_adapter

__all__ = [
    "REFUSED",
    "ClassTokenSplitAdapter",
    "ClassTokenSplitHead",
    "ClassTokenSplitLayout",
    "dinov2_adapter",
    "hf_adapter",
    "hf_input_size",
    "hf_logits",
    "is_hf_model",
    "refusal",
    "timm_wrapper_adapter",
    "token_mean_adapter",
]

_CLS = "classifies the CLS token (sequence_output[:, 0]), not a global average of the tokens"
_LATENTS = "classifies latents read by cross-attention, not a global average of a feature map"

#: classes refused whatever their configuration: class name -> what their head does
REFUSED: dict[str, str] = {
    "ViTForImageClassification": _CLS,
    "ViTHybridForImageClassification": _CLS,
    "ViTMSNForImageClassification": _CLS,
    "DeiTForImageClassification": _CLS,
    "DeiTForImageClassificationWithTeacher": (
        "averages the heads of the CLS and the distillation token, not a global average"
    ),
    "PvtForImageClassification": "classifies the CLS token of its last stage",
    "PerceiverForImageClassificationLearned": _LATENTS,
    "PerceiverForImageClassificationFourier": _LATENTS,
    "PerceiverForImageClassificationConvProcessing": _LATENTS,
    "ImageGPTForImageClassification": (
        "takes colour-cluster token ids (input_ids), not a (B, C, H, W) image tensor"
    ),
    "Siglip2ForImageClassification": (
        "takes pre-patchified pixel_values with spatial_shapes, not a (B, C, H, W) image tensor"
    ),
    "ShieldGemma2ForImageClassification": (
        "scores the answer of a vision-language model, not a pooled feature map"
    ),
}


def is_hf_model(model: nn.Module) -> bool:
    """True for a ``transformers.PreTrainedModel``."""
    return isinstance(model, transformers.PreTrainedModel)


def hf_logits(output: Any) -> Tensor:
    """The ``(B, C)`` logits in what a HuggingFace classifier returns: the ``logits`` of its
    ``ImageClassifierOutput`` (any output with a ``logits`` field), the first element of the
    tuple it returns with ``return_dict=False``, or the tensor itself.

    Raises:
        AdapterNotFoundError: the output carries no logits (not a classifier).
    """
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if logits is None and isinstance(output, Tensor):
        logits = output
    if not isinstance(logits, Tensor):
        raise AdapterNotFoundError(
            f"the model returned {type(output).__name__} without logits: CAM needs an image "
            "classifier (a transformers *ForImageClassification model)"
        )
    return logits


def hf_input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` from the model's config (``num_channels``, ``image_size``; those of its
    ``vision_config`` for CLIP-style models), else
    :func:`cam_plugin.discovery.guess_input_size`. Used only when a probe must run."""
    config = getattr(model, "config", None)
    if getattr(config, "image_size", None) is None:
        config = getattr(config, "vision_config", None) or config
    fallback = guess_input_size(model)
    size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", None) or fallback[0]
    if isinstance(size, int):
        return int(channels), size, size
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(channels), int(size[0]), int(size[1])
    return fallback


def refusal(model: nn.Module) -> Optional[str]:
    """Why ``model``'s head gives no exact CAM, read from its class and config, or ``None``
    when nothing says so up front (discovery then reads the head)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if name in REFUSED:
        return REFUSED[name]
    if getattr(config, "num_labels", 1) == 0:
        return "has no classifier (num_labels=0): there is no class to map"
    if name == "CvtForImageClassification" and _last(getattr(config, "cls_token", None)):
        return f"{_CLS} (config.cls_token[-1] is True; False averages the tokens)"
    beit = name in ("BeitForImageClassification", "Data2VecVisionForImageClassification")
    if beit and not getattr(config, "use_mean_pooling", True):
        return f"{_CLS} (config.use_mean_pooling=False; True averages the patch tokens)"
    pooling = getattr(config, "pooling_type", "mean")
    if name == "EfficientNetForImageClassification" and pooling != "mean":
        return f"pools by a global max (config.pooling_type={pooling!r}; 'mean' is exact)"
    return None


def _last(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return bool(value[-1]) if value else False
    return bool(value)


# ------------------------------------------------------------------------------ DINOv2


@dataclass(frozen=True)
class ClassTokenSplitLayout(FeatureLayout):
    """Tokens ``[CLS, registers, patches]`` as ``(B, 3K, h, w)``: the CLS token broadcast
    over the patch grid, the registers' share ``R'/(R'+N) · mean(registers)`` broadcast, and
    the patch tokens scaled by their share ``N/(R'+N)``, where ``R'`` is the number of
    register tokens the model's mean includes (those from ``pooled_from`` on). Averaged
    over the grid this is ``[cls, mean(tokens[pooled_from:])]`` split in two, so a head
    ``[W_cls, W_p, W_p]`` gives exactly ``W_cls·cls + W_p·mean(tokens[pooled_from:])``.

    Attributes:
        pooled_from: the first token the model's mean includes (``num_prefix_tokens`` when
            it averages the patch tokens only).
    """

    kind: LayoutKind = "tokens"
    pooled_from: int = 1

    def to_nchw(self, captured: Tensor, input_hw: Optional[tuple[int, int]] = None) -> Tensor:
        """``(B, N', K)`` tokens -> ``(B, 3K, h, w)`` (class doc)."""
        patch_layout = FeatureLayout("tokens", self.num_prefix_tokens, grid=self.grid)
        patches = patch_layout.to_nchw(captured, input_hw)
        b, k, h, w = patches.shape
        registers = captured[:, self.pooled_from : self.num_prefix_tokens]
        n, r = h * w, registers.shape[1]
        cls = captured[:, 0, :, None, None].expand(b, k, h, w)
        if r:
            reg = (registers.mean(dim=1) * (r / (r + n)))[:, :, None, None].expand(b, k, h, w)
        else:
            reg = torch.zeros_like(cls)
        return torch.cat([cls, reg, patches * (n / (r + n))], dim=1)

    def pool(self, captured: Tensor) -> Tensor:
        """``[cls, mean(tokens[pooled_from:])]``, ``(B, 2K)``: the classifier's input."""
        return torch.cat([captured[:, 0], captured[:, self.pooled_from :].mean(dim=1)], dim=1)


@dataclass
class ClassTokenSplitHead(FoldedHead):
    """The fold of ``[W_cls, W_p, W_p]`` on :class:`ClassTokenSplitLayout` features.

    ``logits`` use every channel (``S = W_cls·cls + W_p·mean(pooled tokens) + b``);
    ``maps`` use the patch channels only (``M_c = Σ_k W_p,ck N/(R'+N) f_k(x, y)``); with
    ``image_bias`` set (:meth:`for_features`), ``class_bias`` is ``b_c`` plus the per-image
    constant ``W_cls,c·cls + W_p,c·R'/(R'+N)·mean(registers)``, so
    ``mean_xy M_c + class_bias_c = S_c`` for every image.

    Attributes:
        split: ``K``, the channels of each of the three groups.
        image_bias: ``(B, C)`` per-image constants of the last batch, or ``None``.
    """

    split: int = 0
    image_bias: Optional[Tensor] = None

    def _patch_head(self) -> FoldedHead:
        return FoldedHead(weight=self.weight[:, 2 * self.split :], bias=self.bias)

    def maps(self, features: Tensor, classes: Optional[Tensor] = None) -> Tensor:
        """The patch half: ``M_c(x, y) = Σ_k W_p,ck f'_k(x, y)`` on the patch channels."""
        return self._patch_head().maps(features[:, 2 * self.split :], classes)

    def class_bias(self, classes: Optional[Tensor] = None) -> Tensor:
        """``b_c`` plus the per-image constant when known: ``(B, C)`` or ``(B, k)``."""
        if self.image_bias is None:
            return super().class_bias(classes)
        if classes is None:
            return self.bias[None] + self.image_bias
        return self.bias[classes] + self.image_bias.gather(1, classes)

    def for_features(self, features: Tensor) -> ClassTokenSplitHead:
        """This head with the per-image constants of ``features`` (``(B, 3K, h, w)``)."""
        constant = features[:, : 2 * self.split, 0, 0]
        image_bias = constant @ self.weight[:, : 2 * self.split].to(constant.dtype).t()
        return dataclasses.replace(self, image_bias=image_bias)


@dataclass
class ClassTokenSplitAdapter(Adapter):
    """An adapter whose classifier takes ``[CLS, mean(tokens)]`` (DINOv2): the head is
    ``Linear(2K, C)`` read as ``[W_cls, W_p, W_p]`` on :class:`ClassTokenSplitLayout`
    features; maps and per-image bias come from :class:`ClassTokenSplitHead`.

    Attributes:
        split: ``K``, the token width.
    """

    split: int = 0

    def fold(self, num_features: Optional[int] = None) -> FoldedHead:
        """``[W_cls, W_p, W_p]`` and ``b`` from the ``Linear(2K, C)``."""
        plain = super().fold(2 * self.split)
        w = plain.weight
        weight = torch.cat([w, w[:, self.split :]], dim=1)
        return ClassTokenSplitHead(weight=weight, bias=plain.bias, split=self.split)

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
        """:meth:`Adapter.maps_from_capture` with the head's per-image constants set from
        this capture (when no head is given)."""
        if head is None:
            split_head = self.fold()
            assert isinstance(split_head, ClassTokenSplitHead)
            head = split_head.for_features(self.features(captured, input_hw))
        return super().maps_from_capture(
            captured, output, input_hw=input_hw, select=select, head=head, verify=verify
        )


def _registers_pooled() -> bool:
    """transformers < 4.52 averages the register tokens of DINOv2-with-registers together
    with the patch tokens (``sequence_output[:, 1:]``); later versions skip them."""
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return (major, minor) < (4, 52)


def dinov2_adapter(model: nn.Module) -> Adapter:
    """The exact split adapter of ``Dinov2ForImageClassification`` /
    ``Dinov2WithRegistersForImageClassification`` (module doc): tokens after the final
    LayerNorm, ``[CLS, mean(patches)]`` into the classifier."""
    base: Any = getattr(model, "dinov2", None) or getattr(model, "dinov2_with_registers", None)
    classifier = getattr(model, "classifier", None)
    norm = getattr(base, "layernorm", None)
    if not isinstance(classifier, nn.Linear) or not isinstance(norm, nn.Module):
        raise UnsupportedHeadError(
            f"transformers {type(model).__name__}: expected a final layernorm and a Linear "
            f"classifier on [CLS, mean(patches)]. {CONVERT_HINT}"
        )
    registers = int(getattr(model.config, "num_register_tokens", 0) or 0)
    prefix = 1 + registers
    pooled_from = 1 if registers and _registers_pooled() else prefix
    k = int(classifier.in_features) // 2
    adapter = ClassTokenSplitAdapter(
        feature_module=norm,
        head=[("classifier", classifier)],
        layout=ClassTokenSplitLayout(num_prefix_tokens=prefix, pooled_from=pooled_from),
        capture="output",
        input_size=hf_input_size(model),
        num_features=3 * k,
        name=f"transformers:{type(model).__name__}: layernorm -> [CLS | avg pool] -> classifier",
        feature_name="layernorm",
        output_fn=hf_logits,
        split=k,
    )
    return _verified(model, adapter)


# -------------------------------------------------------------- mean of encoder tokens


def _verified(model: nn.Module, adapter: Adapter) -> Adapter:
    """``adapter`` after checking it on the active resolution's recorded forward of
    ``model`` when there is one (the fold must reproduce that forward's logits); without a
    recorded forward, :class:`cam_plugin.CAM` checks it on every call (``verify=True``)."""
    request = current_request(model)
    trace = request.trace if request is not None else None
    if trace is None:
        return adapter
    captured = trace.last_value(adapter.feature_module, adapter.capture)
    if captured is None:
        raise UnsupportedHeadError(
            f"'{adapter.name}': the feature module '{adapter.feature_name}' was not called in "
            f"the forward. {CONVERT_HINT}"
        )
    hw = (int(trace.example.shape[-2]), int(trace.example.shape[-1]))
    with torch.no_grad():
        adapter.maps_from_capture(
            captured.detach(), trace.output, input_hw=hw, select=_first_class, verify=True
        )
    return adapter


def _first_class(logits: Tensor) -> Tensor:
    return torch.zeros(logits.shape[0], 1, dtype=torch.long, device=logits.device)


def token_mean_adapter(model: nn.Module) -> Adapter:
    """CLIP / SigLIP classifiers: ``classifier(mean(tokens))`` over the vision encoder's
    patch tokens (CLIP: the last encoder layer's output without its CLS token; SigLIP: the
    ``post_layernorm`` output). Read structurally, because their vision towers also compute
    a pooled output the classifier never uses (CLIP's ``post_layernorm`` of the CLS token,
    SigLIP's attention-pooling head), which a reading of the forward would take for the
    head."""
    vision: Any = getattr(model, "vision_model", None)
    classifier = getattr(model, "classifier", None)
    if type(model).__name__.startswith("CLIP"):
        layers = getattr(getattr(vision, "encoder", None), "layers", None)
        module: Any = layers[-1] if layers is not None and len(layers) else None
        prefix, where = 1, f"vision_model.encoder.layers.{len(layers or []) - 1}"
    else:
        module = getattr(vision, "post_layernorm", None)
        prefix, where = 0, "vision_model.post_layernorm"
    if not isinstance(module, nn.Module) or not isinstance(classifier, nn.Linear):
        raise UnsupportedHeadError(
            f"transformers {type(model).__name__}: expected '{where}' and a Linear classifier "
            f"on the mean of its tokens. {CONVERT_HINT}"
        )
    adapter = Adapter(
        feature_module=module,
        head=[("classifier", classifier)],
        layout=FeatureLayout("tokens", num_prefix_tokens=prefix),
        capture="output",
        input_size=hf_input_size(model),
        name=f"transformers:{type(model).__name__}: {where} -> avg pool -> classifier",
        feature_name=where,
        output_fn=hf_logits,
    )
    return _verified(model, adapter)


# ------------------------------------------------------------------------- timm wrapper


def _inner_trace(trace: ForwardTrace, inner: nn.Module, prefix: str) -> ForwardTrace:
    """The calls of ``trace`` inside ``inner`` (named relative to it), as ``inner``'s own
    forward: same input, its logits as output."""
    owned = {id(m) for m in inner.modules() if m is not inner}
    calls = [
        dataclasses.replace(c, name=c.name.removeprefix(prefix))
        for c in trace.calls
        if id(c.module) in owned
    ]
    return ForwardTrace(inner, trace.example, calls, hf_logits(trace.output))


def timm_wrapper_adapter(model: nn.Module) -> Adapter:
    """``TimmWrapperForImageClassification`` through the timm adapter on its
    ``timm_model``, reading the wrapper's own forward (the active resolution's trace,
    example or input size); the adapter reads the logits with :func:`hf_logits`."""
    from cam_plugin.integrations.timm import timm_adapter

    inner: Any = model.timm_model
    request = current_request(model)
    context: Any = contextlib.nullcontext()
    if request is not None:
        trace = request.trace
        sub = ResolutionRequest(
            inner,
            _inner_trace(trace, inner, "timm_model.") if trace is not None else None,
            request.example,
            request.input_size,
            request.allow_probe,
        )
        context = resolution_context(sub)
    with context:
        adapter = timm_adapter(inner)
    if adapter is None:  # not reachable for a timm model; keeps the contract explicit
        raise AdapterNotFoundError(f"the timm adapter declined {type(inner).__name__}")
    return dataclasses.replace(
        adapter,
        name=f"transformers:TimmWrapperForImageClassification -> {adapter.name}",
        output_fn=hf_logits,
    )


# ------------------------------------------------------------------------------ factory

_SPECIAL: dict[str, Callable[[nn.Module], Adapter]] = {
    "Dinov2ForImageClassification": dinov2_adapter,
    "Dinov2WithRegistersForImageClassification": dinov2_adapter,
    "TimmWrapperForImageClassification": timm_wrapper_adapter,
    "CLIPForImageClassification": token_mean_adapter,
    "SiglipForImageClassification": token_mean_adapter,
}


def hf_adapter(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> Optional[Adapter]:
    """Adapter for a transformers image classifier, or ``None`` for other models.

    Refusals (:func:`refusal`) are raised before any forward; DINOv2 and the timm wrapper
    have their own readings; every other family is read by
    :func:`cam_plugin.discovery.discover` from the active resolution's forward (inside
    :class:`cam_plugin.CAM`: the user's first call), else from a probe at ``input_size``
    (default :func:`hf_input_size`).

    Raises:
        UnsupportedHeadError: the head is not affine after a global average (names the
            class and what its head does; points to ``cam_plugin.convert``).
    """
    if not is_hf_model(model):
        return None
    name = type(model).__name__
    why = refusal(model)
    if why is not None:
        raise UnsupportedHeadError(f"transformers {name} {why}. {CONVERT_HINT}")
    special = _SPECIAL.get(name)
    if special is not None:
        return special(model)
    size = tuple(int(v) for v in input_size) if input_size is not None else hf_input_size(model)
    return discover(model, input_size=size, name=f"transformers:{name}", output_fn=hf_logits)


register_adapter(is_hf_model, hf_adapter, name="transformers")
