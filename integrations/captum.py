"""Captum integration: :class:`ClassActivationMap`, CAM as a ``captum.attr.LayerAttribution``.

``ClassActivationMap`` is a thin face on the core path of :class:`cam_plugin.CAM`: the
adapter comes from :func:`cam_plugin.resolve`, the feature map ``f`` (``(N, K, h, w)``) is
captured by :class:`cam_plugin.FeatureCapture` during one forward pass without autograd,
and the map of the target class ``c`` of every example is

    M_c(x, y) = Σ_k W'_ck f_k(x, y)

with ``W'`` the folded head (:meth:`cam_plugin.Adapter.fold`). It is returned as
``N x 1 x h x w``, the shape of Captum's ``LayerGradCam``, so
``LayerAttribution.interpolate`` and Captum's visualization and metrics take it
unchanged. For a global-average-pool + linear head it equals ``LayerGradCam`` on the same
layer times ``h·w``: the gradient of ``S_c = Σ_k w_ck mean_xy f_k + b_c`` with respect to
``f_k(x, y)`` is ``w_ck / (h·w)`` at every position.

    from cam_plugin.integrations.captum import ClassActivationMap
    cam = ClassActivationMap(model)                     # the layer is found by the registry
    attr = cam.attribute(images, target=None)           # (N, 1, h, w), predicted classes
    up = cam.attribute(images, target=3, upsample=True) # (N, 1, H, W)
    why = cam.attribute(images, target=(967, 968))      # M_c − M_c': espresso, not cup

Contrastive targets: a pair ``(c, c')`` (or one pair per example, or an ``(N, 2)`` tensor)
gives ``M_c − M_c'``, which decomposes the logit margin exactly:
``mean_xy (M_c − M_c') = S_c − S_c' − (b'_c − b'_c')`` (``contrast="second"`` contrasts
each target with its highest-logit other class, as :class:`cam_plugin.CAM` does).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution
from torch import Tensor, nn

from cam_plugin.adapter import Adapter
from cam_plugin.capture import ForwardCapture, resolve_without_forward
from cam_plugin.checks import check_eval_mode, check_images
from cam_plugin.discovery import expected_channels
from cam_plugin.errors import CAMInputError, UnsupportedHeadError
from cam_plugin.hooks import CaptureKind, FeatureCapture
from cam_plugin.registry import resolve
from cam_plugin.targets import Contrast, contrast_classes

__all__ = ["CaptumTarget", "ClassActivationMap", "target_classes", "target_pairs"]

#: what Captum's ``TargetType`` accepts: an int, a tuple of ints, a tensor, a list of ints
#: or a list of tuples (``None``: each example's predicted class). A two-element tuple
#: ``(c, c')``, a list of them or an ``(N, 2)`` tensor are contrast pairs
#: (:func:`target_pairs`).
CaptumTarget = Union[None, int, tuple[int, ...], Tensor, list[int], list[tuple[int, ...]]]

_PARALLEL = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def _index(value: Any, where: str) -> int:
    """One class index (Python / NumPy / 0-d integer tensor; never a bool or a float)."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise CAMInputError(f"{where} is a bool; give a class index (an int)")
    if isinstance(value, Tensor) and (value.dim() != 0 or value.is_floating_point()):
        raise CAMInputError(
            f"{where} is a tensor of shape {tuple(value.shape)} and dtype {value.dtype}; "
            "give an integer class index"
        )
    if isinstance(value, tuple):
        if len(value) != 1:
            raise CAMInputError(
                f"{where} is the tuple {value!r}: a tuple indexes the dimensions of the "
                f"output after the batch, and a classifier's logits are (N, C), so it must "
                f"have exactly one element, the class (e.g. ({value[0] if value else 0},)), "
                "or, as a whole target, two: a contrast pair (c, c') for M_c − M_c'"
            )
        return _index(value[0], where)
    try:
        return operator.index(value)
    except TypeError:
        raise CAMInputError(
            f"{where} is {type(value).__name__} {value!r}; give an integer class index"
        ) from None


def target_classes(target: CaptumTarget, logits: Tensor) -> Tensor:
    """Captum's ``target`` argument as one class index per example, ``(N,)`` long.

    The forms and their meaning are Captum's ``TargetType`` for ``(N, C)`` outputs
    (``captum._utils.common._select_targets``):

    * ``None``: each example's predicted class, ``argmax_c logits[i, c]`` (Captum itself
      would explain the whole output; CAM needs a class, as in :class:`cam_plugin.CAM`);
    * an int, a one-element tuple ``(c,)``, or a tensor with one element: that class for
      every example;
    * a list of ``N`` ints or ``N`` one-element tuples, or a 1-D tensor of ``N`` integers:
      one class per example.

    Args:
        target: the target, as passed to ``attribute``.
        logits: ``(N, C)`` scores of the batch (for ``None`` and the range check).

    Raises:
        CAMInputError: a class out of ``0..C-1``, a list or tensor whose length is not
            ``N``, a tuple of several indices, a list of lists (several classes per example:
            use :class:`cam_plugin.CAM`), a float / bool target.
        TypeError: a target of an unsupported type.
    """
    batch, num_classes = int(logits.shape[0]), int(logits.shape[1])
    device = logits.device
    if target is None:
        return logits.argmax(dim=1)
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise CAMInputError(
                f"target tensor must hold integer class indices, got dtype {target.dtype}"
            )
        if target.numel() == 1:
            classes = target.reshape(1).to(device=device, dtype=torch.long).expand(batch)
        elif target.dim() == 1 and target.numel() == batch:
            classes = target.to(device=device, dtype=torch.long)
        else:
            raise CAMInputError(
                f"target tensor of shape {tuple(target.shape)} does not fit a batch of {batch}: "
                f"give one class for all examples (a scalar) or a 1-D tensor of {batch} classes"
            )
    elif isinstance(target, list):
        if len(target) != batch:
            raise CAMInputError(
                f"target has {len(target)} entries but the batch has {batch} examples; give "
                "one class per example (or a single int for all)"
            )
        values = []
        for i, item in enumerate(target):
            if isinstance(item, (list, Tensor)) and not (
                isinstance(item, Tensor) and item.dim() == 0
            ):
                raise CAMInputError(
                    f"target[{i}] is a {type(item).__name__}: ClassActivationMap gives one map "
                    "per example, so each entry must be one class. For several classes per "
                    "image use cam_plugin.CAM(model)(images, targets=[[...], ...]) or call "
                    "attribute once per class"
                )
            values.append(_index(item, f"target[{i}]"))
        classes = torch.tensor(values, dtype=torch.long, device=device)
    elif isinstance(target, (tuple, int)) or hasattr(target, "__index__"):
        classes = torch.full((batch,), _index(target, "target"), dtype=torch.long, device=device)
    else:
        raise TypeError(
            f"target must be None, an int, a tuple, a tensor or a list (Captum's TargetType); "
            f"got {type(target).__name__}"
        )
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        bad = int(classes[(classes < 0) | (classes >= num_classes)][0])
        raise CAMInputError(
            f"target {bad} is out of range: the model has {num_classes} classes "
            f"(valid: 0..{num_classes - 1})"
        )
    return classes


def _is_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2


def target_pairs(target: CaptumTarget, logits: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """``(classes, others)``: the class ``c`` of every example and, for contrast targets, the
    class ``c'`` it is contrasted with (``None`` for plain targets).

    Contrast targets (each gives the map ``M_c − M_c'``):

    * a pair ``(c, c')``: the same pair for every example;
    * a list of ``N`` pairs: one per example;
    * an ``(N, 2)`` integer tensor: row ``i`` is example ``i``'s pair.

    Anything else is a plain target (:func:`target_classes`).

    Raises:
        CAMInputError: a class out of range, ``c == c'``, a list mixing pairs and classes,
            a number of pairs that is not ``N``.
    """
    batch, num_classes = int(logits.shape[0]), int(logits.shape[1])
    device = logits.device
    if _is_pair(target):
        pair = [_index(v, f"target[{j}]") for j, v in enumerate(target)]  # type: ignore[arg-type]
        both = torch.tensor(pair, dtype=torch.long, device=device).expand(batch, 2)
    elif isinstance(target, list) and any(_is_pair(t) for t in target):
        if not all(_is_pair(t) for t in target):
            raise CAMInputError(
                "target mixes contrast pairs (c, c') with single classes: give a pair for "
                "every example, or a class for every example"
            )
        if len(target) != batch:
            raise CAMInputError(f"target has {len(target)} pairs but the batch has {batch}")
        items: list[Any] = list(target)
        rows = [
            [_index(v, f"target[{i}][{j}]") for j, v in enumerate(t)] for i, t in enumerate(items)
        ]
        both = torch.tensor(rows, dtype=torch.long, device=device)
    elif isinstance(target, Tensor) and target.dim() == 2 and target.shape[1] == 2:
        if target.is_floating_point() or target.dtype == torch.bool or target.shape[0] != batch:
            raise CAMInputError(
                f"a contrast target tensor must be ({batch}, 2) integers, got "
                f"{tuple(target.shape)} of {target.dtype}"
            )
        both = target.to(device=device, dtype=torch.long)
    else:
        return target_classes(target, logits), None
    if both.numel() and (int(both.min()) < 0 or int(both.max()) >= num_classes):
        bad = int(both[(both < 0) | (both >= num_classes)][0])
        raise CAMInputError(
            f"target {bad} is out of range: the model has {num_classes} classes "
            f"(valid: 0..{num_classes - 1})"
        )
    if bool((both[:, 0] == both[:, 1]).any()):
        raise CAMInputError("a contrast pair (c, c') needs two different classes: M_c − M_c = 0")
    return both[:, 0], both[:, 1]


def _format_additional(args: Any) -> tuple[Any, ...]:
    """Captum's convention: ``None`` -> no arguments, a tuple -> those, anything else -> one."""
    if args is None:
        return ()
    return args if isinstance(args, tuple) else (args,)


def _same_tensor(a: Optional[Tensor], b: Tensor) -> bool:
    if a is None or a.shape != b.shape:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.dtype == b.dtype:
        return True
    return bool(torch.equal(a, b))


def _logits_source(output: Any, batch: int, adapter: Adapter, forward_is_model: bool) -> Any:
    """What the core step reads the logits from: the model's output when ``forward_func``
    is the model; a ``(N, C)`` tensor a wrapping function returned; else ``None`` (the
    folded head's logits ``W' mean_xy f + b'`` are used)."""
    if forward_is_model:
        return output
    num_classes = adapter.fold().num_classes
    if isinstance(output, Tensor) and output.shape == (batch, num_classes):
        return output
    return None


def _upsample(maps: Tensor, images: Tensor, model: Optional[nn.Module], adapter: Adapter) -> Tensor:
    """Maps at the input size, as :meth:`cam_plugin.CAMResult.upsample` does by default:
    every feature cell on its traced receptive field where the placement can be traced
    (:func:`cam_plugin.tracing.placement_of`, cached), else plain bilinear."""
    from cam_plugin.placement import place_maps
    from cam_plugin.tracing import placement_of

    hw = (int(images.shape[-2]), int(images.shape[-1]))
    found = None
    if model is not None:
        size, module = tuple(images.shape[1:]), adapter.feature_module
        kind, layout = adapter.capture, adapter.layout
        found = placement_of(model, size, module, capture=kind, layout=layout)
    if found is not None:
        return place_maps(maps, hw, found)
    return F.interpolate(maps, size=hw, mode="bilinear", align_corners=False)


def _check_user_layer(
    adapter: Adapter,
    names: tuple[str, str],
    kind: CaptureKind,
    features: Tensor,
    seen: dict[str, Optional[Tensor]],
) -> None:
    """The user's layer must give the very tensor the head pools (else: name the right one).

    ``names``: the user's layer and the adapter's feature module, as the model names them;
    ``seen``: what the user's layer gave as ``"input"`` / ``"output"`` in the forward."""
    own = seen.get(kind)
    if _same_tensor(own, features):
        return
    name, feature_name = names
    right = f"the {adapter.capture} of '{feature_name}' (shape {tuple(features.shape)})"
    fix = (
        "pass layer=None"
        if adapter.capture == "output"
        else "pass layer=None (or that module with attribute_to_layer_input=True)"
    )
    other: CaptureKind = "input" if kind == "output" else "output"
    if _same_tensor(seen.get(other), features):
        flag = "True" if other == "input" else "False"
        raise CAMInputError(
            f"the {kind} of layer '{name}' is not the feature map but its {other} is: "
            f"pass attribute_to_layer_input={flag}"
        )
    got = tuple(own.shape) if own is not None else "nothing (not called)"
    raise UnsupportedHeadError(
        f"layer '{name}' ({kind}: {got}) is not the feature layer of this model's CAM-exact "
        f"head: the head average-pools {right}, and CAM is exact only there. {fix} (or "
        f"layer=<that module>)"
    )


class ClassActivationMap(LayerAttribution):
    """Class Activation Mapping (Zhou et al., CVPR 2016) as a Captum layer attribution.

    For the feature map ``f`` (``N x K x h x w``) that the model's head average-pools and the
    folded head weights ``W'`` (Linear, BatchNorm, LayerNorm after the pool are folded
    exactly, see :mod:`cam_plugin.heads`), the attribution of class ``c`` is

        M_c(x, y) = Σ_k W'_ck f_k(x, y),      mean_xy M_c + b'_c = S_c (the logit).

    One forward pass under ``torch.no_grad()``, no backward. For a GAP + linear head
    ``M_c = h·w · LayerGradCam_c`` on the same layer (before ReLU); through a LayerNorm head
    (ConvNeXt, avg-pooled ViT) Grad-CAM differentiates the norm's mean and std and the two
    differ (see the Captum page of the docs).

    Args:
        forward_func: the model (an ``nn.Module``, resolved by :func:`cam_plugin.resolve`;
            ``DataParallel`` / ``DistributedDataParallel`` wrappers are unwrapped), or a
            function of ``(inputs, *additional_forward_args)`` that calls it, in which case
            ``model`` or ``adapter`` must say where the head is.
        layer: the feature layer. Optional: by default the adapter's feature module (whose
            output, or for some models whose input, is the feature map). When given, its
            output (or its input with ``attribute_to_layer_input=True``) must be the feature
            map the head pools: e.g. ``model.layer4`` or ``model.layer4[-1]`` of a ResNet;
            anything else raises, naming the right layer.
        device_ids: accepted for Captum's signature; CAM needs one forward pass on one
            device, so a ``DataParallel`` model is run through its ``.module``.
        model: the classifier whose head is folded, when ``forward_func`` is a function.
        adapter: an explicit :class:`cam_plugin.Adapter` (skips resolution).
        verify: when ``forward_func`` is the model, check ``mean_xy M_c + b'_c == S_c`` on
            every call (as :class:`cam_plugin.CAM` does).

    Raises:
        CAMInputError: ``forward_func`` is a function and neither ``model`` nor ``adapter``
            is given; ``layer`` is not a module of the model.
        UnsupportedHeadError / AdapterNotFoundError: from :func:`cam_plugin.resolve`.
    """

    def __init__(
        self,
        forward_func: Callable[..., Any],
        layer: Optional[nn.Module] = None,
        device_ids: Optional[list[int]] = None,
        *,
        model: Optional[nn.Module] = None,
        adapter: Optional[Adapter] = None,
        verify: bool = True,
    ) -> None:
        if not callable(forward_func):
            raise TypeError(
                f"forward_func must be the model or a callable, got {type(forward_func).__name__}"
            )
        if adapter is not None and not isinstance(adapter, Adapter):
            raise TypeError(f"adapter must be a cam_plugin.Adapter, got {type(adapter).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        is_module = isinstance(forward_func, nn.Module)
        host: Optional[nn.Module] = model
        if host is None and is_module:
            host = forward_func  # type: ignore[assignment]
        while isinstance(host, _PARALLEL):
            host = host.module
        if adapter is None:
            if host is None:
                raise CAMInputError(
                    "ClassActivationMap needs the model's head: forward_func is a plain "
                    f"function ({getattr(forward_func, '__name__', type(forward_func).__name__)})"
                    ", so pass model=<the nn.Module it calls> (its adapter is found by the "
                    "registry) or adapter=cam_plugin.Adapter(feature_module=..., head=[...])"
                )
            # no forward here: an adapter that needs one is read from the first attribute()
            adapter = resolve_without_forward(host)
        self._layer_defaulted = layer is None
        if layer is None and adapter is not None:
            layer = adapter.feature_module
        if layer is not None and not isinstance(layer, nn.Module):
            raise TypeError(
                f"layer must be one nn.Module (the feature layer) or None, got "
                f"{type(layer).__name__}"
            )
        if layer is not None and host is not None and not any(m is layer for m in host.modules()):
            where = f"'{adapter.feature_name or adapter.name}'" if adapter is not None else ""
            raise CAMInputError(
                f"layer {type(layer).__name__} is not a module of the model "
                f"{type(host).__name__}; pass layer=None to use the feature layer {where}".rstrip()
            )
        super().__init__(forward_func, layer, device_ids)  # type: ignore[arg-type]
        self._adapter: Optional[Adapter] = adapter
        self.model = host
        self.verify = verify
        self._forward_is_model = is_module and (
            model is None or forward_func is model or getattr(forward_func, "module", None) is model
        )

    @property
    def adapter(self) -> Adapter:
        """The adapter: given, found without a forward, or read from the first
        :meth:`attribute` call's forward (before that call it raises)."""
        if self._adapter is None:
            raise CAMInputError(
                "the adapter of this model is read from the forward of the first attribute() "
                "call, and none has run yet: call attribute(inputs) once, or pass "
                "adapter=cam_plugin.resolve(model, example=inputs)"
            )
        return self._adapter

    def _set_adapter(self, adapter: Adapter) -> None:
        if self._adapter is None:
            self._adapter = adapter
            if self._layer_defaulted:
                self.layer = adapter.feature_module

    # -- Captum's contract ---------------------------------------------------------------
    def has_convergence_delta(self) -> bool:
        """CAM is exact for its head: there is no approximation error to report."""
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        """CAM does not multiply by the inputs (it has no baseline); always ``False``."""
        return False

    # -- helpers -------------------------------------------------------------------------
    def _name_of(self, module: nn.Module) -> str:
        if module is self.adapter.feature_module and self.adapter.feature_name:
            return self.adapter.feature_name
        if self.model is not None:
            for name, m in self.model.named_modules():
                if m is module:
                    return name or type(module).__name__
        return type(module).__name__

    def _format_inputs(self, inputs: Any) -> Tensor:
        if isinstance(inputs, tuple):
            if len(inputs) != 1:
                raise CAMInputError(
                    f"inputs is a tuple of {len(inputs)} tensors: ClassActivationMap explains an "
                    "image classifier with one input tensor. Pass the images as inputs and the "
                    "model's other arguments as additional_forward_args"
                )
            inputs = inputs[0]
        return check_images(
            inputs,
            self._adapter,
            name="inputs",
            batch="N",
            model=self.model,
            channels=expected_channels(self.model) if self.model is not None else None,
        )

    def _check_mode(self) -> None:
        check_eval_mode(self.model, self._adapter)

    def _forward(self, inputs: Tensor, extra: tuple[Any, ...]) -> Any:
        func: Callable[..., Any] = self.forward_func
        while isinstance(func, _PARALLEL):
            func = func.module
        return func(inputs, *extra)

    def _one_forward(
        self, images: Tensor, extra: tuple[Any, ...], to_layer_input: bool
    ) -> tuple[Adapter, Tensor, Any]:
        """One forward of ``forward_func``: the adapter (read from this forward on the first
        call), the captured feature map, the output, and where the user's layer is read.
        A layer given by the user is captured in the same forward and must hold the very
        tensor the head pools (:func:`_check_user_layer`)."""
        user_layer = None if self._layer_defaulted else self.layer
        capture = ForwardCapture(self.model, self._adapter) if self.model is not None else None
        if capture is None:  # an explicit adapter and a plain function
            capture = ForwardCapture(self.adapter.feature_module, self.adapter)
        seen: dict[str, Optional[Tensor]] = {}
        with contextlib.ExitStack() as stack:
            stack.enter_context(capture)
            layer_caps: dict[str, FeatureCapture] = {}
            if user_layer is not None:
                for k in ("output", "input"):
                    layer_caps[k] = stack.enter_context(FeatureCapture(user_layer, k))  # type: ignore[arg-type]
            output = self._forward(images, extra)
            seen = {k: c.value for k, c in layer_caps.items()}
        adapter, captured = capture.finish(images, output)
        self._set_adapter(adapter)
        kind: CaptureKind = "input" if to_layer_input else "output"
        if self._layer_defaulted and adapter.capture == "input":
            kind = "input"  # the default layer is wherever the adapter reads the features
        own_layer = user_layer is None or (
            user_layer is adapter.feature_module and kind == adapter.capture
        )
        if not own_layer:
            names = (self._name_of(self.layer), self._name_of(adapter.feature_module))
            _check_user_layer(adapter, names, kind, captured, seen)
        return adapter, captured, output

    # -- the attribution -------------------------------------------------------------------
    def attribute(
        self,
        inputs: Union[Tensor, tuple[Tensor, ...]],
        target: CaptumTarget = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        relu_attributions: bool = False,
        upsample: bool = False,
        contrast: Contrast = None,
    ) -> Union[Tensor, tuple[Tensor]]:
        """Class activation maps of the target classes, ``N x 1 x h x w``.

        ``M_c(x, y) = Σ_k W'_ck f_k(x, y)`` at feature resolution, for ``c`` the target of
        each example; ``mean_xy M_c + b'_c`` equals the model's logit ``S_c``.

        Args:
            inputs: ``(N, C, H, W)`` images, or a tuple holding that one tensor.
            target: Captum's ``TargetType`` (see :func:`target_classes`); ``None`` gives each
                example's predicted class. A contrast pair ``(c, c')`` (one for all, a list
                of ``N`` pairs, or an ``(N, 2)`` tensor; :func:`target_pairs`) gives
                ``M_c − M_c'``, with ``mean_xy (M_c − M_c') = S_c − S_c' − (b'_c − b'_c')``.
            additional_forward_args: passed to ``forward_func`` after the inputs (a tuple for
                several arguments).
            attribute_to_layer_input: read the feature map from the layer's input instead of
                its output (valid only when that is where the head's feature map is).
            relu_attributions: clamp negative evidence to zero (applied after upsampling).
            upsample: return ``N x 1 x H x W`` at the input size, as
                :meth:`cam_plugin.CAMResult.upsample` does by default: every feature cell
                centred on its receptive field (the placement traced once per input size on
                a weightless copy of the model, :func:`cam_plugin.tracing.placement_of`),
                plain bilinear (``align_corners=False``) where it cannot be traced. For plain
                bilinear use ``LayerAttribution.interpolate(attr, (H, W))``.
            contrast: contrast every (plain) target ``c`` with ``"second"`` (its
                highest-logit other class), a class, or one class per example
                (:func:`cam_plugin.targets.contrast_classes`); not with pair targets.

        Returns:
            ``N x 1 x h x w`` (or ``N x 1 x H x W``) float tensor, without autograd history;
            a one-tensor tuple when ``inputs`` is a tuple (Captum's convention, which
            ``captum.metrics.sensitivity_max`` relies on).
        """
        images = self._format_inputs(inputs)
        extra = _format_additional(additional_forward_args)
        self._check_mode()
        if self._adapter is None and not self._forward_is_model and self.model is not None:
            # forward_func wraps the model: its output need not be the logits the reading
            # checks, so the model itself is read once on these inputs
            self._set_adapter(resolve(self.model, example=images))
        with torch.no_grad():
            maps, adapter = self._target_maps(
                images, extra, target, contrast, attribute_to_layer_input
            )
            if upsample:
                maps = _upsample(maps, images, self.model, adapter)
            if relu_attributions:
                maps = torch.relu(maps)
        # Captum's convention: a tuple of inputs gives a tuple of attributions
        return (maps,) if isinstance(inputs, tuple) else maps

    def _target_maps(
        self,
        images: Tensor,
        extra: tuple[Any, ...],
        target: CaptumTarget,
        contrast: Contrast,
        to_layer_input: bool,
    ) -> tuple[Tensor, Adapter]:
        """``(N, 1, h, w)`` maps of the targets (contrasted when asked) from one forward
        through the core step (:meth:`cam_plugin.adapter.Adapter.maps_from_capture`)."""
        adapter, captured, output = self._one_forward(images, extra, to_layer_input)
        batch = int(images.shape[0])
        if captured.shape[0] != batch:
            raise CAMInputError(
                f"the feature map has {captured.shape[0]} examples for a batch of {batch}: "
                "the forward split the batch (DataParallel inside forward_func?). Pass the "
                "underlying model as forward_func"
            )
        hw = (int(images.shape[-2]), int(images.shape[-1]))
        others: list[Optional[Tensor]] = []

        def select(logits: Tensor) -> Tensor:
            classes, other = target_pairs(target, logits)
            if contrast is not None:
                if other is not None:
                    raise CAMInputError("give contrast pairs in target or contrast=, not both")
                other = contrast_classes(contrast, logits, classes[:, None])[:, 0]
            others.append(other)
            return classes[:, None]

        step = adapter.maps_from_capture(
            captured,
            _logits_source(output, batch, adapter, self._forward_is_model),
            input_hw=hw,
            select=select,
            verify=self.verify and self._forward_is_model,
        )
        maps = step.maps
        if others and others[-1] is not None:
            other_maps = step.head.maps(step.features, others[-1][:, None])
            maps = maps - other_maps.to(maps.dtype)
        return maps, adapter

    def __repr__(self) -> str:
        name = self._adapter.name if self._adapter is not None else "unresolved"
        return f"ClassActivationMap({name})"
