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
import numbers
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from .adapter import Adapter, CaptureMaps
from .branches import ConcatBranchAdapter, branch_result
from .capture import ForwardCapture, resolve_without_forward
from .discovery import expected_channels
from .errors import CAMInputError
from .hooks import CaptureKind
from .layout import FeatureLayout
from .probing import model_device_dtype
from .registry import resolve
from .result import CAMResult
from .tracing import PlacementFinder, feature_placement
from .units import UnitRanking, UnitResult, rank_units

if TYPE_CHECKING:
    from .placement import Placement

__all__ = ["CAM", "Targets", "all_finite", "check_eval_mode", "check_images", "parse_targets"]

Targets = Union[None, int, str, Tensor, Sequence[int], Sequence[Sequence[int]]]
Contrast = Union[None, str, int, Tensor, Sequence[int]]


def all_finite(t: Tensor) -> bool:
    """True when no element of ``t`` is NaN or ±inf.

    One reduction instead of an elementwise mask: a NaN or ±inf anywhere makes the sum NaN
    or ±inf, so a finite sum proves every element finite. Only when the sum is not finite
    (a bad element, or a finite overflow) is the exact ``isfinite(t).all()`` run.
    """
    low = t.dtype in (torch.float16, torch.bfloat16)
    total = t.sum(dtype=torch.float32) if low else t.sum()
    if bool(torch.isfinite(total)):
        return True
    return bool(torch.isfinite(t).all())


def _check_class(values: Tensor, num_classes: int, what: str) -> None:
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
        bad = values[(values < 0) | (values >= num_classes)][0].item()
        raise CAMInputError(
            f"{what} {bad} is out of range: the model has {num_classes} classes "
            f"(valid: 0..{num_classes - 1})"
        )


def _class_index(value: Any, where: str) -> int:
    """One class index: a Python / numpy integer or a 0-d integer tensor, not negative."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise CAMInputError(
            f"{where} is {type(value).__name__}; expected a class index (an int), or for "
            "targets one int or one list of ints per image (no deeper nesting)"
        )
    if int(value) < 0:
        raise CAMInputError(
            f"{where} is {int(value)}: class indices are >= 0 (only ragged per-image lists "
            "are padded, internally)"
        )
    return int(value)


def _target_row(value: Any, i: int) -> list[int]:
    """The classes of image ``i``: an int, or a list / 1-d array / tensor of ints."""
    if isinstance(value, (np.ndarray, Tensor)) and value.ndim == 1:
        value = value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            raise CAMInputError(f"targets[{i}] is empty: give at least one class")
        return [_class_index(c, f"targets[{i}][{j}]") for j, c in enumerate(value)]
    return [_class_index(value, f"targets[{i}]")]


def _targets_from_tensor(
    targets: Tensor, batch: int, num_classes: int, device: torch.device
) -> Tensor:
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise CAMInputError(
            f"target tensor must hold integer class indices, got dtype {targets.dtype}"
        )
    t = targets.to(device=device, dtype=torch.long)
    if t.dim() == 0:
        t = t.expand(batch).reshape(batch, 1)
    elif t.dim() == 1:
        t = t.reshape(-1, 1)
    elif t.dim() != 2:
        raise CAMInputError(f"target tensor must be (B,) or (B, k), got {tuple(t.shape)}")
    if t.shape[0] != batch:
        raise CAMInputError(
            f"targets has {t.shape[0]} entries but the batch has {batch} images; give "
            "one target (or one list of targets) per image"
        )
    _check_class(t, num_classes, "target")
    return t


def parse_targets(targets: Targets, logits: Tensor, topk: int = 1) -> Optional[Tensor]:
    """Turn the ``targets`` argument into a ``(B, k)`` long tensor (``-1`` = padding).

    ``None`` -> the ``topk`` highest logits of each image; ``"all"`` -> ``None`` (every
    class, one einsum); an int -> that class for every image; one int per image; a list
    of class lists per image (multi-label, ragged lists are padded with ``-1``); a
    ``(B,)`` or ``(B, k)`` integer tensor.
    """
    batch, num_classes = logits.shape
    device = logits.device
    if targets is None:
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= num_classes:
            raise CAMInputError(f"topk must be an int in 1..{num_classes}, got {topk!r}")
        return logits.topk(topk, dim=1).indices
    if isinstance(targets, str):
        if targets != "all":
            raise CAMInputError(
                f"targets={targets!r}: the only string accepted is 'all' (every class)"
            )
        return None
    if isinstance(targets, bool):
        raise CAMInputError("targets must be class indices, not a bool")
    if isinstance(targets, np.ndarray):
        targets = torch.as_tensor(targets)
    if isinstance(targets, numbers.Integral):
        _check_class(torch.tensor([int(targets)]), num_classes, "target")
        return torch.full((batch, 1), int(targets), dtype=torch.long, device=device)
    if isinstance(targets, Tensor):
        return _targets_from_tensor(targets, batch, num_classes, device)
    if isinstance(targets, Sequence):
        items = list(targets)
        if len(items) != batch:
            raise CAMInputError(
                f"targets has {len(items)} entries but the batch has {batch} images; give "
                "one target (or one list of targets) per image"
            )
        rows = [_target_row(v, i) for i, v in enumerate(items)]
        width = max(len(r) for r in rows)
        t = torch.full((batch, width), -1, dtype=torch.long)
        for i, row in enumerate(rows):
            t[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        _check_class(t[t >= 0], num_classes, "target")
        return t.to(device)
    raise CAMInputError(
        f"targets must be None, 'all', an int, a list or a tensor; got {type(targets).__name__}"
    )


def _check_placement(images: Tensor, model: nn.Module, name: str) -> None:
    """Same device and dtype as the model's parameters (autocast may lower the dtype)."""
    device, dtype = model_device_dtype(model)
    if not any(True for _ in model.parameters()):
        return
    if images.device != device:
        raise CAMInputError(
            f"{name} are on {images.device} but the model is on {device}: move them first, "
            f"e.g. {name}.to('{device}')"
        )
    if images.dtype != dtype and not torch.is_autocast_enabled(images.device.type):
        raise CAMInputError(
            f"{name} are {images.dtype} but the model's parameters are {dtype}: convert them "
            f"({name}.to({dtype})) or run the call under torch.autocast"
        )


def contrast_classes(contrast: Contrast, logits: Tensor, classes: Tensor) -> Tensor:
    """The class ``c'`` of every map for contrastive maps ``M_c − M_c'`` (``(B, k)``,
    ``-1`` where ``classes`` is padding).

    ``"second"``: per map, the highest-logit class other than ``c`` (the runner-up for the
    top-1 class); an int: that class for every map; one int per image (list, array or
    ``(B,)`` tensor): that image's class for all its maps.
    """
    batch, num_classes = logits.shape
    if isinstance(contrast, str):
        if contrast != "second":
            raise CAMInputError(
                f"contrast={contrast!r}: the only string accepted is 'second' (the runner-up)"
            )
        if num_classes < 2:
            raise CAMInputError("contrast='second' needs a model with at least two classes")
        top2 = logits.topk(2, dim=1).indices  # (B, 2)
        out = torch.where(classes == top2[:, :1], top2[:, 1:], top2[:, :1])
    elif isinstance(contrast, bool) or contrast is None:
        raise CAMInputError("contrast must be 'second', a class index or one class per image")
    elif isinstance(contrast, numbers.Integral):
        _check_class(torch.tensor([int(contrast)]), num_classes, "contrast class")
        out = torch.full_like(classes, int(contrast))
    else:
        values = contrast if isinstance(contrast, Tensor) else torch.as_tensor(contrast)
        per_image = _targets_from_tensor(values, batch, num_classes, logits.device)
        if per_image.shape[1] != 1:
            raise CAMInputError("contrast takes one class per image, not a list per image")
        out = per_image.expand_as(classes)
    same = (out == classes) & (classes >= 0)
    if bool(same.any()):
        raise CAMInputError(
            f"contrast class {int(out[same][0])} equals the map's own class: M_c − M_c is zero"
        )
    return torch.where(classes >= 0, out, torch.full_like(out, -1))


def check_images(
    images: Any,
    adapter: Optional[Adapter],
    *,
    name: str = "images",
    batch: str = "B",
    check_finite: bool = True,
    model: Optional[nn.Module] = None,
    channels: Optional[int] = None,
) -> Tensor:
    """Reject what the model cannot take before torch fails inside it: not a tensor, not
    ``(B, C, H, W)``, an empty batch, an integer dtype, a channel count other than the
    adapter's (or ``channels``), NaN / inf values (when ``check_finite``), and — when
    ``model`` is given — a device or floating dtype other than the model's parameters'
    (outside autocast). ``name`` and ``batch`` word the messages (Captum calls them
    ``inputs`` and ``N``). Returns ``images``."""
    if not isinstance(images, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape ({batch}, C, H, W), got "
            f"{type(images).__name__}"
        )
    if images.dim() not in (4, 5):
        hint = f" (one image? use {name}.unsqueeze(0))" if images.dim() == 3 else ""
        raise CAMInputError(
            f"{name} must be 4-D ({batch}, C, H, W) (or 5-D ({batch}, C, T, H, W) clips for a "
            f"video model), got shape {tuple(images.shape)}{hint}"
        )
    if images.shape[0] == 0:
        raise CAMInputError(f"{name} is an empty batch ({batch} = 0); give at least one image")
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (normalized as the model expects), "
            f"got dtype {images.dtype}"
        )
    expected = adapter.input_size[0] if adapter is not None and adapter.input_size else channels
    if expected is not None and images.shape[1] != expected:
        raise CAMInputError(
            f"{name} have {images.shape[1]} channels but the model expects {expected}"
        )
    if model is not None:
        _check_placement(images, model, name)
    if check_finite and not all_finite(images):
        raise CAMInputError(f"{name} contain NaN or inf values; clean the input first")
    return images


def check_eval_mode(
    model: Optional[nn.Module], adapter: Optional[Adapter], alternative: str = ""
) -> None:
    """Refuse a model (or head module) in train mode: BatchNorm would use batch statistics
    and dropout would be random, so the identity would not hold. ``alternative`` ends the
    message with what else the caller may do."""
    head = adapter.head_modules if adapter is not None else ()
    training = [n for n, m in head if m.training]
    if (model is not None and model.training) or training:
        tail = f", {alternative}" if alternative else ""
        raise CAMInputError(
            "the model is in train mode: BatchNorm uses batch statistics and dropout is "
            f"random, so CAM is not exact. Call model.eval() first{tail}"
        )


class CAM:
    """Class Activation Mapping for a model whose head is affine after a global average pool.

    Args:
        model: the classifier (timm, torchvision, mmpretrain, converted, or any model the
            registry or the generic probe resolves).
        adapter: skip resolution and use this adapter.
        input_size: ``(C, H, W)`` for the generic probe when the model does not say.
        allow_train: allow a model in train mode (for training-time use). The identity then
            holds only if the head has no BatchNorm / Dropout (maps use the eval-mode fold).
        differentiable: keep autograd on (when it is enabled by the caller) so the maps can
            feed a loss; otherwise the forward runs under ``torch.no_grad()``.
        verify: check ``mean_xy M_c + b_c == logit_c`` (via the pooled features) on every
            call and raise if the fold no longer matches the model.
        check_finite: reject inputs with NaN / inf.
        placement: ``"auto"`` (default): ``res.upsample()`` centres cell ``i`` on its
            receptive field ``o + s·i``, traced at its first need, once per input size, on a
            weightless copy (:func:`cam_plugin.tracing.placement_of`: the model never runs;
            0.03–0.3 s for a 224 px CNN on a CPU); plain bilinear where nothing can be
            traced. ``True``: traced at the call into ``res.placement`` (a converted model's
            own). ``False`` / ``"bilinear"``: never trace. See ``res.upsampled_with``.

    Use it as a context manager or call it directly; either way the forward hook lives only
    during each call and is removed even when the forward raises::

        with CAM(model) as cam:
            res = cam(images, topk=1)
        boxes = res.upsample().normalize().boxes(0.2)
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
            images: ``(B, C, H, W)`` float tensor, preprocessed as the model expects.
            targets: ``None`` (top-``topk`` predicted classes), an int, one int per image,
                a list of class lists per image (multi-label), a ``(B,)``/``(B, k)`` tensor,
                or ``"all"`` (every class in one einsum).
            topk: how many top classes when ``targets is None``.
            contrast: ``None`` (plain maps), or contrastive maps ``M_c − M_c'`` against
                ``"second"`` (per map, the highest-logit other class), a class index, or one
                class per image; exactly ``mean_xy (M_c − M_c') + b_c − b_c' = S_c − S_c'``
                (see :func:`contrast_classes` and ``CAMResult.contrast``).
        """
        images, adapter = self._prepare(images)
        hw = (int(images.shape[-2]), int(images.shape[-1]))
        grad_ctx: Any = contextlib.nullcontext() if self.differentiable else torch.no_grad()
        if isinstance(adapter, ConcatBranchAdapter):
            with grad_ctx:
                return self._branch_call(images, adapter, targets, topk, contrast)
        with grad_ctx:
            step, adapter = self._forward_step(
                images, adapter, lambda logits: parse_targets(targets, logits, topk)
            )
            return self._result(step, images, hw, adapter, contrast)

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
            step, adapter = self._forward_step(
                images, adapter, lambda logits: parse_targets(targets, logits, topk)
            )
            classes = step.classes
            if classes is None:
                classes = torch.arange(step.logits.shape[1], device=step.logits.device).expand(
                    step.logits.shape[0], -1
                )
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
        if classes is None:
            classes = torch.arange(logits.shape[1], device=logits.device).expand(
                logits.shape[0], -1
            )
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
            maps = maps * keep[:, :, None, None]
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
