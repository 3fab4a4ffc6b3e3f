"""A hook-free CAM module for bulk work: ``torch.compile``, ONNX export, ``channels_last``.

:class:`~cam_plugin.CAM` captures the feature map of someone else's model with a forward
hook that lives for one call. For bulk work (a data set, a serving process) the same maths
can be one ordinary ``nn.Module``: :class:`CAMModule` runs the model's trunk, then the
adapter's hook-free head maths, and returns

    logits (B, C),   maps (B, k, h, w) with M_c(x, y) = Σ_k W'_ck f_k(x, y),   classes (B, k)

where ``W'`` is the folded head (:mod:`cam_plugin.heads`), so that at feature resolution
``mean_xy M_c + b'_c = S_c``. Because nothing is installed on the host model, the module
compiles with ``torch.compile`` and exports with ``torch.onnx.export`` (the maps become
graph outputs next to the logits; see :func:`export_onnx`).

The trunk is found once, at construction:

* ``"forward_features"``: the model has ``forward_features`` and ``forward_head`` (timm's
  convention) and ``forward_features`` returns exactly the tensor the adapter captures; then
  ``logits = forward_head(f)`` (the model's own head, so the logits are the model's) and no
  hook is involved at all;
* ``"hook"``: any other model; the feature tensor is captured during ``model(x)`` by a
  :class:`~cam_plugin.hooks.FeatureCapture` that exists only inside ``forward`` (works in
  eager mode, ONNX export and ``torch.compile``, where it may cost a graph break);
* a callable ``trunk(images) -> captured`` that the caller guarantees returns the
  adapter's feature tensor (``logits`` then come from the folded head).

``"auto"`` (the default) picks ``"forward_features"`` when a probe forward confirms it and
``"hook"`` otherwise.

The head is folded when the module is built; after changing the model's weights call
:meth:`CAMModule.refresh`. The module wraps (and shares) the model: ``.to(...)`` on it
moves the model too.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapter import Adapter
from .allocator import keep_freed_memory  # re-exported: it lived here before
from .checks import check_eval_mode, check_images
from .errors import CAMInputError
from .heads import FoldedHead
from .hooks import FeatureCapture
from .probing import probe_input, untouched
from .registry import resolve
from .result import CAMResult, minmax_normalize

__all__ = ["CAMModule", "TrunkSpec", "export_onnx", "keep_freed_memory"]

TrunkSpec = Union[Literal["auto", "forward_features", "hook"], Callable[[Tensor], Tensor]]


class CAMModule(nn.Module):
    """``images -> (logits, maps, classes)`` as a plain module (no hooks on the host model).

    Args:
        model: the classifier, in eval mode (BatchNorm / dropout in the head make the fold
            exact only in eval mode).
        adapter: use this adapter instead of resolving one.
        topk: maps of the ``topk`` highest logits per image (``classes`` is their index);
            ``None`` for the maps of every class (``classes`` is ``0..C-1`` per image).
        upsample: ``False`` (feature resolution), ``True`` (bilinear to the input size,
            ``align_corners=False``, as :meth:`CAMResult.upsample`) or an ``(H, W)`` size.
        relu: clamp negative evidence to zero (after upsampling).
        normalize: per-map min-max scaling to ``[0, 1]`` (last; constant map -> zeros), as
            :func:`~cam_plugin.minmax_normalize`.
        trunk: ``"auto"``, ``"forward_features"``, ``"hook"`` or a callable (module
            docstring).
        input_size: ``(C, H, W)`` for resolution and the construction probe when the model
            does not say.
        example: a batch of your own inputs for that probe (default: a seeded random
            batch at ``input_size``). The probe runs in eval mode without autograd, with the
            RNG and every module's mode restored.

    Example:
        >>> cm = CAMModule(model, topk=1, upsample=True, normalize=True).eval()
        >>> logits, maps, classes = cm(images)               # eager
        >>> fast = torch.compile(cm)                          # or export_onnx(cm, "cam.onnx")
    """

    cam_weight: Tensor
    cam_bias: Tensor

    def __init__(
        self,
        model: nn.Module,
        *,
        adapter: Optional[Adapter] = None,
        topk: Optional[int] = 1,
        upsample: Union[bool, Sequence[int]] = False,
        relu: bool = False,
        normalize: bool = False,
        trunk: TrunkSpec = "auto",
        input_size: Optional[Sequence[int]] = None,
        example: Optional[Tensor] = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"CAMModule needs a torch.nn.Module, got {type(model).__name__}")
        if adapter is not None and not isinstance(adapter, Adapter):
            raise TypeError(f"adapter must be a cam_plugin.Adapter, got {type(adapter).__name__}")
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
            raise CAMInputError(f"topk must be a positive int or None (all classes), got {topk!r}")
        size: Optional[tuple[int, int]] = None
        if not isinstance(upsample, bool):
            try:
                values = [int(v) for v in upsample]
            except (TypeError, ValueError):
                values = []
            if len(values) != 2 or min(values) < 1:
                raise CAMInputError(
                    f"upsample must be a bool or (H, W) with H, W >= 1, got {upsample!r}"
                )
            size = (values[0], values[1])
        self.model = model
        self._example = example
        check_eval_mode(model, None)
        self.adapter = (
            adapter
            if adapter is not None
            else resolve(model, input_size=input_size, example=example)
        )
        self.topk = topk
        self.upsample = bool(upsample) or size is not None
        self.size = size
        self.relu = bool(relu)
        self.normalize = bool(normalize)
        self._input_size = tuple(input_size) if input_size is not None else self.adapter.input_size
        self._trunk_fn: Optional[Callable[[Tensor], Tensor]] = None
        self.trunk: str
        if callable(trunk):
            self._trunk_fn, self.trunk = trunk, "callable"
        elif trunk in ("auto", "forward_features", "hook"):
            self.trunk = self._choose_trunk(trunk)
        else:
            raise CAMInputError(
                f"trunk must be 'auto', 'forward_features', 'hook' or a callable, got {trunk!r}"
            )
        self.register_buffer("cam_weight", torch.empty(0), persistent=False)
        self.register_buffer("cam_bias", torch.empty(0), persistent=False)
        self._pre_weight: Optional[Tensor] = None
        self._pre_bias: Optional[Tensor] = None
        self._norm_eps: Optional[float] = None
        self.refresh()
        # mirror the wrapped model's mode: nn.Module starts in train mode, and exporters
        # that restore the wrapper's mode afterwards would put the host in train mode
        self.training = model.training

    # -- construction ---------------------------------------------------------------------
    def refresh(self) -> CAMModule:
        """Fold the head's *current* parameters again (after training or loading weights)."""
        head = self.adapter.fold()
        ref = self.cam_weight if self.cam_weight.numel() else head.weight
        self.cam_weight = head.weight.detach().to(device=ref.device, dtype=ref.dtype).clone()
        self.cam_bias = head.bias.detach().to(device=ref.device, dtype=ref.dtype).clone()
        if head.pre_weight is not None:
            self.register_buffer("cam_pre_weight", head.pre_weight.detach().clone(), False)
        if head.pre_bias is not None:
            self.register_buffer("cam_pre_bias", head.pre_bias.detach().clone(), False)
        self._norm_eps = head.norm_eps
        return self

    def _choose_trunk(self, trunk: str) -> str:
        has_ff = callable(getattr(self.model, "forward_features", None)) and callable(
            getattr(self.model, "forward_head", None)
        )
        if trunk == "hook":
            return "hook"
        if not has_ff:
            if trunk == "forward_features":
                raise CAMInputError(
                    f"{type(self.model).__name__} has no forward_features / forward_head; use "
                    "trunk='hook' or pass a callable"
                )
            return "hook"
        ok, why = self._probe_forward_features()
        if ok:
            return "forward_features"
        if trunk == "forward_features":
            raise CAMInputError(f"trunk='forward_features' cannot be used: {why}")
        return "hook"

    def _probe_forward_features(self) -> tuple[bool, str]:
        """Does ``forward_features`` return the captured tensor, and ``forward_head`` the
        logits the folded head predicts? One probe forward (no grad, RNG untouched)."""
        adapter = self.adapter
        if self._example is not None:
            x = self._example[:1]
        else:
            x = probe_input(self.model, self._input_size or (3, 224, 224), batch=1)
        model: Any = self.model
        with untouched(self.model):
            with FeatureCapture(adapter.feature_module, adapter.capture) as cap:
                feats = model.forward_features(x)
                captured = cap.value
            if captured is None or not isinstance(feats, Tensor):
                return False, "the feature module is not called inside forward_features"
            if feats.shape != captured.shape or not torch.allclose(feats, captured):
                return False, (
                    f"forward_features returns {tuple(feats.shape)}, not the captured "
                    f"feature map {tuple(captured.shape)}"
                )
            logits = model.forward_head(feats)
            hw = (int(x.shape[-2]), int(x.shape[-1]))
            features = adapter.features(feats, hw)
            head = adapter.fold(features.shape[1])
        if not isinstance(logits, Tensor) or logits.shape != (x.shape[0], head.num_classes):
            return False, "forward_head does not return (B, C) logits"
        if not head.reproduces(features, logits):
            return False, "forward_head's logits differ from the folded head's"
        return True, ""

    def _head(self) -> FoldedHead:
        return FoldedHead(
            weight=self.cam_weight,
            bias=self.cam_bias,
            pre_weight=getattr(self, "cam_pre_weight", None),
            pre_bias=getattr(self, "cam_pre_bias", None),
            norm_eps=self._norm_eps,
        )

    # -- the data path --------------------------------------------------------------------
    def capture(self, images: Tensor) -> tuple[Tensor, Any]:
        """One forward pass: the adapter's captured feature tensor and the model's output
        (``None`` for a callable trunk: the logits then come from the folded head)."""
        adapter = self.adapter
        model: Any = self.model
        if self.trunk == "forward_features":
            captured = model.forward_features(images)
            return captured, model.forward_head(captured)
        if self.trunk == "callable" and self._trunk_fn is not None:
            return self._trunk_fn(images), None
        with FeatureCapture(adapter.feature_module, adapter.capture, detach=False) as cap:
            output = model(images)
            captured = cap.value
        if captured is None:
            raise CAMInputError(
                f"the feature module '{adapter.feature_name or adapter.name}' was not called "
                "during the forward pass"
            )
        return captured, output

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, K, h, w)`` features and ``(B, C)`` logits of one forward pass."""
        step = self.adapter.maps_from_capture(
            *self.capture(images), input_hw=_hw(images), head=self._head(), select=_no_maps
        )
        return step.features, step.logits

    def _select(self, logits: Tensor) -> Optional[Tensor]:
        if self.topk is None:
            return None
        return logits.topk(min(self.topk, logits.shape[1]), dim=1).indices

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One forward pass -> ``(logits, maps, classes)`` (see the class docstring)."""
        # no finite check: it would need the values (a sync, and a graph break when compiled)
        host = None if torch.compiler.is_compiling() else self.model  # no guards on params
        check_images(images, self.adapter, check_finite=False, model=host)
        check_eval_mode(self.model, self.adapter, "or call .eval() on the CAMModule")
        captured, output = self.capture(images)
        step = self.adapter.maps_from_capture(
            captured, output, input_hw=_hw(images), head=self._head(), select=self._select
        )
        logits, maps, classes = step.logits, step.maps, step.classes
        if classes is None:
            classes = torch.arange(logits.shape[1], device=logits.device).expand(
                logits.shape[0], -1
            )
        if self.upsample:
            size = self.size or (int(images.shape[-2]), int(images.shape[-1]))
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        if self.relu:
            maps = torch.relu(maps)
        if self.normalize:
            maps = minmax_normalize(maps)
        return logits, maps, classes

    def result(self, images: Tensor) -> CAMResult:
        """Eager convenience: the outputs of :meth:`forward` as a :class:`CAMResult`."""
        logits, maps, classes = self(images)
        stages = [
            s
            for s, on in (
                ("upsampled", self.upsample),
                ("relu", self.relu),
                ("normalized", self.normalize),
            )
            if on
        ]
        return CAMResult(
            maps=maps,
            logits=logits,
            classes=classes,
            bias=self.cam_bias[classes].to(maps.dtype),
            input_size=(int(images.shape[-2]), int(images.shape[-1])),
            exact=self.adapter.exact,
            stage="+".join(stages) or "feature",
        )

    def extra_repr(self) -> str:
        return (
            f"adapter={self.adapter.name!r}, trunk={self.trunk!r}, topk={self.topk}, "
            f"upsample={self.size or self.upsample}, relu={self.relu}, "
            f"normalize={self.normalize}"
        )


def _hw(images: Tensor) -> tuple[int, int]:
    return int(images.shape[-2]), int(images.shape[-1])


def _no_maps(logits: Tensor) -> Tensor:
    """A selection of zero classes per image (the maps are not needed)."""
    return logits.new_empty((logits.shape[0], 0), dtype=torch.long)


def export_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike[str]],
    *,
    example: Optional[Tensor] = None,
    dynamic_batch: bool = True,
    opset_version: Optional[int] = None,
    dynamo: bool = True,
    **cam_kwargs: Any,
) -> str:
    """Export ``images -> (logits, maps, classes)`` to ONNX, the maps as graph outputs.

    Args:
        model: a :class:`CAMModule`, or a classifier to wrap in one (``cam_kwargs`` are
            passed to :class:`CAMModule`: ``topk``, ``upsample``, ``relu``, ``normalize``...).
        path: the ``.onnx`` file to write (weights are stored inside it).
        example: an example batch (default: a random batch of 2 at the model's input size).
        dynamic_batch: make the batch dimension dynamic.
        opset_version: ONNX opset (the exporter's default when ``None``).
        dynamo: use the ``torch.export``-based exporter (needs ``onnxscript``); ``False``
            uses the TorchScript exporter.

    Returns:
        The path written. Run it with onnxruntime::

            sess = onnxruntime.InferenceSession(path)
            logits, maps, classes = sess.run(None, {"images": images.numpy()})
    """
    _require_onnx(dynamo)
    if cam_kwargs and isinstance(model, CAMModule):
        raise CAMInputError("pass CAMModule options either in the CAMModule or here, not both")
    host = model.model if isinstance(model, CAMModule) else model
    if host.training:
        raise CAMInputError("the model is in train mode; call model.eval() before exporting")
    module = model if isinstance(model, CAMModule) else CAMModule(model, **cam_kwargs)
    if example is None:
        size = module.adapter.input_size or (3, 224, 224)
        example = probe_input(module.model, size, batch=2)
    modes = [(m, m.training) for m in module.modules()]
    try:
        return _export(module, example, os.fspath(path), dynamic_batch, opset_version, dynamo)
    finally:  # exporters switch modes and restore the wrapper's: put every flag back
        for m, mode in modes:
            m.training = mode


def _require_onnx(dynamo: bool) -> None:
    needed = ["onnx", "onnxscript"] if dynamo else ["onnx"]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"export_onnx needs {' and '.join(missing)}: pip install 'cam-plugin[onnx]' "
            "(onnx, onnxscript, onnxruntime)"
        )


def _export(
    module: CAMModule,
    example: Tensor,
    target: str,
    dynamic_batch: bool,
    opset_version: Optional[int],
    dynamo: bool,
) -> str:
    names = {"input_names": ["images"], "output_names": ["logits", "maps", "classes"]}
    with torch.no_grad():
        if dynamo:
            shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                dynamic_shapes=shapes,
                verbose=False,
                opset_version=opset_version,
                **names,  # type: ignore[arg-type]
            )
            if program is None:  # pragma: no cover - the dynamo exporter returns a program
                raise RuntimeError("torch.onnx.export returned no program")
            program.save(target, external_data=False)
        else:
            axes = (
                {
                    "images": {0: "batch"},
                    "logits": {0: "batch"},
                    "maps": {0: "batch"},
                    "classes": {0: "batch"},
                }
                if dynamic_batch
                else None
            )
            torch.onnx.export(
                module,
                (example,),
                target,
                dynamo=False,
                dynamic_axes=axes,
                verbose=False,
                opset_version=opset_version or 17,
                **names,  # type: ignore[arg-type]
            )
    return target
