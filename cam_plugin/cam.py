"""``CAM``: one forward pass of the user's model -> class activation maps.

For captured features ``f`` (B, K, h, w) and the folded head ``W'``, ``b'``
(:mod:`cam_plugin.heads`), the map of class ``c`` is

    M_c(x, y) = Σ_k W'_ck f_k(x, y)          (one batched matmul / einsum)

and ``mean_xy M_c + b'_c`` equals the model's logit ``S_c`` (checked on every call
unless ``verify=False``). No backward pass is needed; tensors stay on the model's
device.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import Tensor, nn

from .adapter import Adapter, CaptureMaps
from .branches import ConcatBranchAdapter, branch_result
from .capture import ForwardCapture, resolve_without_forward
from .checks import all_finite, check_eval_mode, check_images
from .discovery import expected_channels
from .errors import CAMInputError
from .hooks import CaptureKind
from .layout import FeatureLayout
from .probing import model_device_dtype
from .registry import resolve
from .result import CAMResult
from .targets import Contrast, Targets, contrast_classes, parse_targets
from .tracing import PlacementFinder, feature_placement
from .units import UnitRanking, UnitResult, rank_units

if TYPE_CHECKING:
    from .placement import Placement

__all__ = [
    "CAM",
    "Contrast",
    "Targets",
    "all_finite",
    "check_eval_mode",
    "check_images",
    "contrast_classes",
    "every_class",
    "parse_targets",
    "pictures_to_input",
]


def every_class(logits: Tensor) -> Tensor:
    """``(B, C)`` class indices ``0..C-1`` for every image (the classes of ``targets="all"``)."""
    return torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)


def pictures_to_input(images: Any, preprocess: Any, model: nn.Module) -> tuple[Any, Any]:
    """Pictures (PIL, numpy, paths, or a list) -> ``(model input, per-image geometry)`` with
    ``preprocess`` (see :class:`CAM`); anything else is returned as is, with ``None``."""
    from .image_inputs import is_picture_input, prepare_pictures

    if not is_picture_input(images):
        return images, None
    if preprocess is None:
        raise CAMInputError(
            "images are pictures, not a tensor, and this CAM was built with preprocess=None: "
            "pass a (B, C, H, W) tensor, or build CAM(model, preprocess='auto')"
        )
    if preprocess == "auto":
        from .preprocess import DataConfig

        preprocess = DataConfig.for_model(model)
    device, dtype = model_device_dtype(model)
    return prepare_pictures(images, preprocess, device=device, dtype=dtype)


class CAM:
    """Class Activation Mapping for a model whose head is affine after a global average pool.

    Args:
        model: a classifier the registry resolves (timm, torchvision, HF, mmpretrain, ...).
        adapter: skip resolution and use this adapter.
        input_size: ``(C, H, W)`` for the generic probe when the model does not say.
        allow_train: allow a model in train mode (for training-time use). The identity then
            holds only if the head has no BatchNorm / Dropout (maps use the eval-mode fold).
        differentiable: keep autograd on (when it is enabled by the caller) so the maps can
            feed a loss; otherwise the forward runs under ``torch.no_grad()``.
        verify: check ``mean_xy M_c + b_c == logit_c`` (via the pooled features) on every
            call and raise if the fold no longer matches the model.
        check_finite: reject inputs with NaN / inf.
        preprocess: how pictures (PIL images, numpy arrays, paths) become the model's input:
            ``"auto"`` (the model's evaluation preprocessing,
            :meth:`cam_plugin.preprocess.DataConfig.for_model`), a ``DataConfig``, a callable
            ``DecodedImage -> Prepared``, or ``None`` to accept tensors only.
        placement: ``"auto"`` (default): ``res.upsample()`` centres cell ``i`` on its
            receptive field ``o + s·i``, traced at its first need, once per input size, on a
            weightless copy (:func:`cam_plugin.tracing.placement_of`: the model never runs;
            0.03–0.3 s for a 224 px CNN on a CPU); plain bilinear where nothing can be
            traced. ``True``: traced at the call into ``res.placement`` (a converted model's
            own). ``False`` / ``"bilinear"``: never trace. See ``res.upsampled_with``.

    Every hook lives only during a call (removed even when the forward raises):
    ``res = CAM(model)(images, topk=1); res.upsample().normalize().boxes(0.2)``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        adapter: Optional[Adapter] = None,
        input_size: Optional[Sequence[int]] = None,
        allow_train: bool = False,
        differentiable: bool = False,
        verify: bool = True,
        check_finite: bool = True,
        placement: Union[bool, str] = "auto",
        preprocess: Any = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"CAM needs a torch.nn.Module, got {type(model).__name__}; pass the model object"
            )
        if adapter is not None and not isinstance(adapter, Adapter):
            raise TypeError(f"adapter must be a cam_plugin.Adapter, got {type(adapter).__name__}")
        self.model = model
        self.input_size = tuple(int(v) for v in input_size) if input_size is not None else None
        # no forward here: an adapter that needs one is read from the first call's forward
        self._adapter = adapter if adapter is not None else resolve_without_forward(model)
        self._lock = threading.Lock()
        self.allow_train = allow_train
        self.differentiable = differentiable
        self.verify = verify
        self.check_finite = check_finite
        self.preprocess = preprocess
        if placement not in (True, False, "auto", "bilinear"):
            raise CAMInputError(
                f"placement must be 'auto', True, False or 'bilinear', got {placement!r}"
            )
        self.placement: Union[bool, str] = (
            placement if isinstance(placement, str) else bool(placement)
        )
        self._placements: dict[tuple[int, ...], Placement] = {}

    def __enter__(self) -> CAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing outlives a call (every hook is removed when its call ends); kept so the
        object can be used as a context manager."""

    @property
    def resolved(self) -> bool:
        """Whether the adapter is known (given, found without a forward, or read from a
        call)."""
        return self._adapter is not None

    @property
    def adapter(self) -> Adapter:
        """The adapter. Resolved at construction when that needs no forward pass, else on the
        first call (from that call's forward); before that, :meth:`resolve` gives it."""
        if self._adapter is None:
            raise CAMInputError(
                "the adapter of this model is read from its first forward pass, and none has "
                "run yet: call cam(images) once, or cam.resolve(example=images) with a batch "
                "of your own inputs"
            )
        return self._adapter

    def resolve(self, example: Optional[Tensor] = None) -> Adapter:
        """Resolve the adapter now (idempotent), from one forward of ``example`` — a batch
        of the user's own inputs (eval mode, no grad, RNG and modes restored) — or, when
        ``example`` is ``None``, from a random probe at ``input_size``."""
        if self._adapter is None:
            if example is not None:
                example = check_images(example, None, name="example", model=self.model)
            found = resolve(self.model, example=example, input_size=self.input_size)
            with self._lock:
                if self._adapter is None:
                    self._adapter = found
        return self._adapter  # type: ignore[return-value]

    def __repr__(self) -> str:
        name = self._adapter.name if self._adapter is not None else "unresolved"
        return f"CAM({name})"

    # -- input checks -------------------------------------------------------------------
    def _check_mode(self, adapter: Optional[Adapter]) -> None:
        if not self.allow_train:
            check_eval_mode(
                self.model,
                adapter,
                "or pass CAM(model, allow_train=True) for training-time use",
            )

    # -- the one data path ---------------------------------------------------------------
    def __call__(
        self, images: Tensor, targets: Targets = None, topk: int = 1, contrast: Contrast = None
    ) -> CAMResult:
        """Run the model once and return the maps of the requested classes.

        Args:
            images: ``(B, C, H, W)`` float tensor, preprocessed as the model expects; or
                pictures — a PIL image, a numpy ``(H, W[, C])`` array, an image path, or a
                list of them — preprocessed with ``preprocess`` (the result then keeps
                each image's geometry: :meth:`CAMResult.to_original`).
            targets: ``None`` (top-``topk`` predicted classes), an int, one int per image,
                a list of class lists per image (multi-label), a ``(B,)``/``(B, k)`` tensor,
                or ``"all"`` (every class in one einsum).
            topk: how many top classes when ``targets is None``.
            contrast: ``None`` (plain maps), or contrastive maps ``M_c − M_c'`` against
                ``"second"`` (per map, the highest-logit other class), a class index, or one
                class per image; exactly ``mean_xy (M_c − M_c') + b_c − b_c' = S_c − S_c'``
                (see :func:`contrast_classes` and ``CAMResult.contrast``).
        """
        originals = None
        if not isinstance(images, Tensor):
            images, originals = pictures_to_input(images, self.preprocess, self.model)
        images, adapter = self._prepare(images)
        hw = (int(images.shape[-2]), int(images.shape[-1]))
        grad_ctx: Any = contextlib.nullcontext() if self.differentiable else torch.no_grad()
        with grad_ctx:
            if isinstance(adapter, ConcatBranchAdapter):
                res = self._branch_call(images, adapter, targets, topk, contrast)
            else:
                step, adapter = self._forward_step(
                    images, adapter, lambda logits: parse_targets(targets, logits, topk)
                )
                res = self._result(step, images, hw, adapter, contrast)
        return res if originals is None else replace(res, originals=originals)

    def _prepare(self, images: Any) -> tuple[Tensor, Optional[Adapter]]:
        """Checked images and the adapter so far (resolved first for a train-mode model)."""
        adapter = self._adapter
        if adapter is None and self.model.training:
            adapter = self.resolve(images.detach() if isinstance(images, Tensor) else images)
        images = check_images(
            images,
            adapter,
            check_finite=self.check_finite,
            model=self.model,
            channels=self.input_size[0] if self.input_size else expected_channels(self.model),
        )
        self._check_mode(adapter)
        return images, adapter

    def _forward_step(
        self,
        images: Tensor,
        adapter: Optional[Adapter],
        select: Callable[[Tensor], Optional[Tensor]],
    ) -> tuple[CaptureMaps, Adapter]:
        """One forward of the user's model (resolving the adapter from it on the first call)
        and the core step on its capture."""
        forward = ForwardCapture(
            self.model, adapter, detach=not self.differentiable, input_size=self.input_size
        )
        with forward:
            output = self.model(images)
        adapter, captured = forward.finish(images, output)
        if self._adapter is None:
            with self._lock:
                if self._adapter is None:
                    self._adapter = adapter
        step = adapter.maps_from_capture(
            captured,
            output,
            input_hw=(int(images.shape[-2]), int(images.shape[-1])),
            select=select,
            verify=self.verify and not self.model.training,
        )
        return step, adapter

    def units(
        self,
        images: Tensor,
        targets: Targets = None,
        topk: int = 1,
        top: int = 5,
        by: UnitRanking = "contribution",
    ) -> UnitResult:
        """The class-specific units of the paper's Sec. 5 for the requested classes, from
        one forward: per map, the ``top`` feature units ranked by their contribution
        ``W'_ck · mean_xy u_k`` to the logit (``by="contribution"``) or by the class weight
        ``W'_ck`` (``by="weight"``), with their activation maps ``u_k``. Summed over all
        units, ``Σ_k W'_ck u_k = M_c`` (see :mod:`cam_plugin.units`)."""
        images, adapter = self._prepare(images)
        with torch.no_grad():
            step, _ = self._forward_step(images, adapter, lambda s: parse_targets(targets, s, topk))
            classes = step.classes if step.classes is not None else every_class(step.logits)
            return rank_units(step.head, step.features, classes, top=top, by=by)

    def _result(
        self,
        step: CaptureMaps,
        images: Tensor,
        hw: tuple[int, int],
        adapter: Adapter,
        contrast: Contrast = None,
    ) -> CAMResult:
        """Wrap the core step's output: contrast subtracted, padding zeroed, bias per map."""
        maps, logits, classes = step.maps, step.logits, step.classes
        classes = classes if classes is not None else every_class(logits)
        bias = step.head.class_bias(classes.clamp_min(0)).to(maps.dtype)
        other: Optional[Tensor] = None
        if contrast is not None:
            other = contrast_classes(contrast, logits, classes)
            maps = maps - step.head.maps(step.features, other.clamp_min(0))
            bias = bias - step.head.class_bias(other.clamp_min(0)).to(maps.dtype)
        if not self.differentiable:
            bias = bias.detach()  # computed outside no_grad: no graph into the host's head
        if bool((classes < 0).any()):
            keep = classes >= 0
            maps = maps * keep.reshape(*keep.shape, *([1] * (maps.dim() - 2)))
            bias = bias * keep
        return CAMResult(
            maps=maps,
            logits=logits,
            classes=classes,
            bias=bias,
            input_size=hw,
            exact=adapter.exact,
            placement=self._placement_for(images)
            if self.placement is True and images.dim() == 4
            else None,
            contrast=other,
            frames=int(images.shape[2]) if images.dim() == 5 else None,
            locate=self._locate(images, adapter.feature_module, adapter.capture, adapter.layout),
        )

    def _branch_call(
        self, images: Tensor, adapter: ConcatBranchAdapter, targets: Targets, topk: int, c: Contrast
    ) -> CAMResult:
        """A fused head (:mod:`cam_plugin.branches`): every branch captured in one forward."""
        hw = (int(images.shape[-2]), int(images.shape[-1]))
        with adapter.capture_branches(detach=not self.differentiable) as captured:
            output = self.model(images)
        step = adapter.branch_maps(
            captured(),
            output,
            input_hw=hw,
            select=lambda logits: parse_targets(targets, logits, topk),
            verify=self.verify and not self.model.training,
        )
        return branch_result(
            step,
            input_size=hw,
            contrast=None if c is None else lambda s, k: contrast_classes(c, s, k),
            locate=lambda b: self._locate(images, b.module, b.capture, b.layout),
            eager=self.placement is True,
            detach=not self.differentiable,
        )

    def _locate(
        self, images: Tensor, module: nn.Module, capture: CaptureKind, layout: FeatureLayout
    ) -> Optional[PlacementFinder]:
        """A lazy :class:`~cam_plugin.tracing.PlacementFinder`; ``None`` if nothing to trace."""
        if self.placement in (False, "bilinear") or images.dim() != 4 or layout.kind != "NCHW":
            return None
        return PlacementFinder(self.model, images.shape[1:], module, capture, layout)

    def _placement_for(self, images: Tensor) -> Placement:
        """The placement of the feature map for inputs of ``images``' size (cached)."""
        key = tuple(int(v) for v in images.shape[1:])
        if key not in self._placements:
            own = getattr(self.model, "placement", None)
            if callable(own) and hasattr(self.model, "cam_adapter"):
                found = own(key)
            else:
                found = feature_placement(self.model, key, adapter=self.adapter)
            self._placements[key] = found
        return self._placements[key]
