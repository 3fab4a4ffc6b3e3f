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

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Sequence
from typing import Any, Callable, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapter import Adapter
from .discovery import probe_input
from .errors import CAMInputError
from .heads import FoldedHead
from .hooks import FeatureCapture
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
        if model.training:
            raise CAMInputError(
                "the model is in train mode: BatchNorm uses batch statistics and dropout is "
                "random, so the folded head is not exact. Call model.eval() first"
            )
        self.model = model
        self.adapter = adapter if adapter is not None else resolve(model, input_size=input_size)
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
        size = self._input_size or (3, 224, 224)
        x = probe_input(self.model, size, batch=1)
        model: Any = self.model
        with torch.random.fork_rng(devices=[]), torch.no_grad():
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
            predicted, _ = adapter.compute(adapter.features(feats, hw), classes=None)
        if not isinstance(logits, Tensor) or logits.shape != predicted.shape:
            return False, "forward_head does not return (B, C) logits"
        scale = max(1.0, float(logits.abs().max()))
        if float((logits.float() - predicted.float()).abs().max()) > 1e-3 * scale:
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
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, K, h, w)`` features and ``(B, C)`` logits of one forward pass."""
        adapter = self.adapter
        hw = (int(images.shape[-2]), int(images.shape[-1]))
        model: Any = self.model
        if self.trunk == "forward_features":
            captured = model.forward_features(images)
            return adapter.features(captured, hw), model.forward_head(captured)
        if self.trunk == "callable" and self._trunk_fn is not None:
            feats = adapter.features(self._trunk_fn(images), hw)
            return feats, _folded_logits(adapter, self._head(), feats)
        with FeatureCapture(adapter.feature_module, adapter.capture, detach=False) as cap:
            output = model(images)
            captured = cap.value
        if captured is None:
            raise CAMInputError(
                f"the feature module '{adapter.feature_name or adapter.name}' was not called "
                "during the forward pass"
            )
        return adapter.features(captured, hw), adapter.logits_from_output(output)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One forward pass -> ``(logits, maps, classes)`` (see the class docstring)."""
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise CAMInputError("images must be a 4-D (B, C, H, W) tensor")
        if self.model.training:
            raise CAMInputError(
                "the wrapped model is in train mode, so the folded head is not exact; call "
                ".eval() on the CAMModule (or the model)"
            )
        expected = self.adapter.input_size[0] if self.adapter.input_size else None
        if expected is not None and images.shape[1] != expected:
            raise CAMInputError(
                f"images have {images.shape[1]} channels but the model expects {expected}"
            )
        feats, logits = self.features_and_logits(images)
        head = self._head()
        if self.topk is None:
            classes = torch.arange(logits.shape[1], device=logits.device).expand(
                logits.shape[0], -1
            )
            maps = head.maps(feats, None)
        else:
            k = min(self.topk, logits.shape[1])
            classes = logits.topk(k, dim=1).indices
            maps = head.maps(feats, classes)
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


def _folded_logits(adapter: Adapter, head: FoldedHead, feats: Tensor) -> Tensor:
    """Logits of the folded head (average or max pool), as :meth:`Adapter.compute`."""
    if adapter.pool == "max":
        pooled = head.project(feats).amax(dim=(2, 3))
        return pooled @ head.weight.to(pooled.dtype).t() + head.bias.to(pooled.dtype)
    return head.logits(feats)


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
    module = model if isinstance(model, CAMModule) else CAMModule(model, **cam_kwargs)
    if cam_kwargs and isinstance(model, CAMModule):
        raise CAMInputError("pass CAMModule options either in the CAMModule or here, not both")
    if module.model.training:
        raise CAMInputError("the model is in train mode; call model.eval() before exporting")
    if example is None:
        size = module._input_size or (3, 224, 224)
        example = probe_input(module.model, size, batch=2)
    names = {"input_names": ["images"], "output_names": ["logits", "maps", "classes"]}
    target = os.fspath(path)
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


_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Make glibc's ``malloc`` keep and reuse freed memory (opt-in, process-wide, Linux/glibc).

    By default glibc serves every block above its mmap threshold (at most 32 MiB) with a
    fresh ``mmap`` and returns it on ``free``; a batch-16 ResNet-50 forward's activations are
    such blocks, so each call faults in ~1.3 GB of new pages (~340k minor faults on the
    benchmark machine). This calls ``mallopt(M_MMAP_MAX, 0)`` (large blocks come from the
    heap) and ``mallopt(M_TRIM_THRESHOLD, trim_threshold)`` (freed heap memory is not handed
    back below that size), the run-time equivalent of starting the process with
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<bytes>``. Repeated forwards then reuse their
    pages (zero minor faults per call after the first); the price is that the process keeps
    its peak RSS. Measured in ``docs/benchmarks.md``.

    Args:
        trim_threshold: bytes of free memory at the top of the heap kept before trimming.

    Returns:
        True when both options were set; False on a platform without glibc's ``mallopt``.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    trim = max(0, min(int(trim_threshold), 2**31 - 1))
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, trim))
