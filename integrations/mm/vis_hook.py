"""The mmengine hook that adds class activation maps to every validation / test batch.

:class:`CAMVisualizationHook` decides *when*: it installs a feature capture for the val /
test epoch, turns each predict forward's capture into the ``cam_maps`` of its samples
(:func:`.sample_maps.attach_cam_maps`; the field's contract is in :mod:`.samples`) and, every
``interval`` iterations, hands the pictures to the runner's visualizer. The pictures are
drawn by :func:`cam_plugin.viz.annotated_overlay`. For the epoch it also binds the runner's
(unwrapped) model to the evaluator's :class:`~.faith_metric.CAMFaithfulnessMetric` (which
runs the perturbed images) and unbinds it when the epoch ends. A plain class here;
``cam_plugin.integrations.mmengine`` registers it in mmengine's root ``HOOKS``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.runner import BaseLoop
from mmengine.structures import BaseDataElement
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from cam_plugin.adapter import Adapter
from cam_plugin.errors import CAMInputError
from cam_plugin.heads import FoldedHead
from cam_plugin.hooks import FeatureCapture
from cam_plugin.localize import threshold_boxes
from cam_plugin.placement import Placement
from cam_plugin.registry import resolve
from cam_plugin.tracing import placement_of
from cam_plugin.viz import annotated_overlay, to_uint8_image

from .common import WarnOnce, check_colormap, check_fraction, check_int, reject_unknown, unwrap
from .faith_metric import CAMFaithfulnessMetric, bind_faithfulness_metrics
from .geometry import boxes_to_frame, cam_maps_to_image
from .loc_metric import CAMLocalizationMetric
from .sample_maps import attach_cam_maps, placed_maps
from .samples import find_boxes, has_cam_maps, mark_all

__all__ = ["CAMVisualizationHook", "sample_pictures"]

_OWNER = "CAMVisualizationHook"


def _remove_installed(handles: list[RemovableHandle], captures: list[FeatureCapture]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
    for cap in captures:
        cap.remove()
    captures.clear()


def _predicted_samples(args: Any, kwargs: Mapping[str, Any], output: Any) -> Optional[list]:
    """The data samples of a ``forward(inputs, data_samples, mode='predict')`` call, ``None``
    for any other call."""
    mode = kwargs.get("mode", args[2] if len(args) > 2 else "tensor")
    if mode != "predict" or not isinstance(output, (list, tuple)) or not output:
        return None
    if not all(isinstance(s, BaseDataElement) for s in output):
        return None
    return list(output)


def _input_hw(args: Any, kwargs: Mapping[str, Any]) -> Optional[tuple[int, int]]:
    inputs = kwargs.get("inputs", args[0] if args else None)
    if not isinstance(inputs, Tensor) or inputs.dim() < 3:
        return None
    return int(inputs.shape[-2]), int(inputs.shape[-1])


def _batch_placement(
    ref: Optional[weakref.ref[nn.Module]],
    adapter: Optional[Adapter],
    args: Any,
    kwargs: Mapping[str, Any],
) -> Optional[Placement]:
    """Where the feature cells sit on this forward's batch tensor: traced once per input size
    on a weightless copy of the model (:func:`cam_plugin.tracing.placement_of`; the model
    does not run, no hook fires), ``None`` where it cannot be traced."""
    model = ref() if ref is not None else None
    inputs = kwargs.get("inputs", args[0] if args else None)
    if model is None or adapter is None or not isinstance(inputs, Tensor):
        return None
    size = tuple(int(v) for v in inputs.shape[1:])
    kind, layout = adapter.capture, adapter.layout
    return placement_of(model, size, adapter.feature_module, capture=kind, layout=layout)


def _model_hooks(
    model: nn.Module, ref: weakref.ref[CAMVisualizationHook], clear_first: bool
) -> list[RemovableHandle]:
    """The hooks on the model for one epoch: (with ``clear_first``) a pre-hook that drops
    a stale capture, and a forward hook that hands every output to the hook object (held
    weakly, so a forgotten hook object can be collected and its finalizer run)."""

    def clear(module: nn.Module, args: Any, kwargs: Any) -> None:
        obj = ref()
        if obj is not None:
            for cap in obj._captures:
                cap.value = None

    def attach(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        obj = ref()
        if obj is not None:
            obj._on_output(args, kwargs, output)

    handles = [model.register_forward_pre_hook(clear, with_kwargs=True)] if clear_first else []
    handles.append(model.register_forward_hook(attach, with_kwargs=True))
    return handles


class CAMVisualizationHook(Hook):
    """Class activation maps of every validation / test batch, from the loop's own forward.

    For the val (test) epoch the hook installs a feature capture on the adapter's feature
    module and a forward hook on the model; when ``forward(..., mode='predict')`` returns its
    data samples, the maps ``M_c = Σ_k W'_ck f_k`` of the chosen classes are added to each
    sample as ``cam_maps`` (see :mod:`cam_plugin.integrations.mm.samples`). Both hooks are
    removed at the end of the epoch. The model's outputs, losses, gradients, parameters,
    modes and RNG streams are never touched; a model whose head cannot give an exact CAM gets
    one warning and the hook disables itself (training goes on; the samples then carry a
    ``cam_maps`` without maps whose ``reason`` says why).

    Every ``interval`` iterations, until ``max_samples`` pictures were drawn in the epoch,
    the main process draws for each sample and each of its ``topk`` target maps the overlay
    ``(1 − α)·image + α·jet(m̂)`` at the size of the image the model saw, with the paper's box
    (``threshold`` × max, largest component; green) and the ground-truth boxes (red), and
    sends it to ``runner.visualizer.add_image`` (name ``cam_<val|test>_<sample_idx>``, with
    ``_pred<j>`` / ``_gt<j>`` appended when ``topk > 1``; step ``runner.iter``), so every vis
    backend receives it (``LocalVisBackend`` writes ``<name>_<step>.png``).

    Args:
        interval: draw every ``interval`` val/test iterations (``>= 1``).
        max_samples: at most this many samples drawn per epoch (``0``: compute the maps for
            the metric, draw nothing).
        topk: maps per sample: the ``topk`` highest-scoring classes (``target='pred'``) or at
            most ``topk`` ground-truth classes (``target='gt'``).
        target: ``"pred"`` (the model's top-k) or ``"gt"`` (the ground-truth class).
        draw_boxes: draw the CAM box and the ground-truth boxes.
        threshold: box threshold, a fraction of the map's max in ``[0, 1]`` (paper: 0.2).
        alpha: weight of the heat map in the overlay, in ``[0, 1]``.
        colormap: a matplotlib colormap name.
        adapter: an explicit :class:`cam_plugin.Adapter` (default: resolved by the registry).
    """

    priority = "NORMAL"
    _OPTIONS = (
        "interval",
        "max_samples",
        "topk",
        "target",
        "draw_boxes",
        "threshold",
        "alpha",
        "colormap",
        "adapter",
    )

    def __init__(
        self,
        interval: int = 1,
        max_samples: int = 16,
        topk: int = 1,
        target: str = "pred",
        draw_boxes: bool = True,
        threshold: float = 0.2,
        alpha: float = 0.5,
        colormap: str = "jet",
        adapter: Optional[Adapter] = None,
        **unknown: Any,
    ) -> None:
        reject_unknown(_OWNER, unknown, self._OPTIONS)
        self.interval = check_int(
            _OWNER, "interval", interval, 1, "draw every `interval` iterations"
        )
        self.max_samples = check_int(_OWNER, "max_samples", max_samples, 0)
        self.topk = check_int(_OWNER, "topk", topk, 1)
        if target not in ("pred", "gt"):
            raise CAMInputError(
                f"{_OWNER}: target must be 'pred' (top-k predicted classes) or 'gt' "
                f"(ground-truth class), got {target!r}"
            )
        self.target = target
        self.draw_boxes = bool(draw_boxes)
        self.threshold = check_fraction(_OWNER, "threshold", threshold)
        self.alpha = check_fraction(_OWNER, "alpha", alpha)
        self.colormap = check_colormap(_OWNER, colormap)
        if adapter is not None and not isinstance(adapter, Adapter):
            raise CAMInputError(
                f"{_OWNER}: adapter must be a cam_plugin.Adapter, got {type(adapter).__name__}"
            )
        self.disabled_reason: Optional[str] = None
        self._explicit_adapter = adapter
        self._adapter: Optional[Adapter] = adapter
        self._model_ref: Optional[weakref.ref[nn.Module]] = None
        self._folded: Optional[FoldedHead] = None
        self._handles: list[RemovableHandle] = []
        self._captures: list[FeatureCapture] = []
        self._bound: list[CAMFaithfulnessMetric] = []
        self._finalizer = weakref.finalize(self, _remove_installed, self._handles, self._captures)
        self._drawn = 0
        self._draw_failed = False
        self._warn_once = WarnOnce(_OWNER)

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def installed(self) -> bool:
        """Whether the hook's forward hooks are installed on the model right now."""
        return bool(self._handles or self._captures)

    def remove(self) -> None:
        """Remove every forward hook installed, unbind the metrics bound (idempotent)."""
        _remove_installed(self._handles, self._captures)
        for metric in self._bound:
            metric.unbind_model()
        self._bound.clear()

    def _disable(self, reason: str) -> None:
        if self.disabled_reason is None:
            self.disabled_reason = reason
            print_log(
                f"{_OWNER} disabled: {reason}. Training and validation go on without class "
                "activation maps.",
                logger="current",
                level=logging.WARNING,
            )

    def before_run(self, runner: Any) -> None:
        """Clear anything left by an interrupted run; check that a
        :class:`CAMLocalizationMetric` in the val / test evaluator has boxes to score."""
        self.remove()
        for attr in ("_val_loop", "_test_loop"):
            loop = getattr(runner, attr, None)
            if not isinstance(loop, BaseLoop):
                continue
            metrics = getattr(getattr(loop, "evaluator", None), "metrics", None) or []
            dataset = getattr(getattr(loop, "dataloader", None), "dataset", None)
            for metric in metrics:
                if isinstance(metric, CAMLocalizationMetric) and dataset is not None:
                    metric.check_dataset(dataset)

    def before_train_epoch(self, runner: Any) -> None:
        """Make sure nothing of an interrupted validation stays installed while training."""
        self.remove()

    def after_run(self, runner: Any) -> None:
        """Remove everything (also when a loop ended early)."""
        self.remove()

    def before_val_epoch(self, runner: Any) -> None:
        """Install the capture; bind the model to the evaluator's faithfulness metrics."""
        self._start(runner, getattr(runner.val_loop, "evaluator", None))

    def before_test_epoch(self, runner: Any) -> None:
        """Install the capture; bind the model to the evaluator's faithfulness metrics."""
        self._start(runner, getattr(runner.test_loop, "evaluator", None))

    def after_val_epoch(self, runner: Any, metrics: Optional[dict[str, float]] = None) -> None:
        """Remove the capture; unbind the model from the metrics."""
        self.remove()

    def after_test_epoch(self, runner: Any, metrics: Optional[dict[str, float]] = None) -> None:
        """Remove the capture; unbind the model from the metrics."""
        self.remove()

    def after_val_iter(
        self,
        runner: Any,
        batch_idx: int,
        data_batch: Any = None,
        outputs: Optional[Sequence[Any]] = None,
    ) -> None:
        """Draw the overlays of this batch (main process, every ``interval`` iterations)."""
        self._draw(runner, batch_idx, data_batch, outputs, "val")

    def after_test_iter(
        self,
        runner: Any,
        batch_idx: int,
        data_batch: Any = None,
        outputs: Optional[Sequence[Any]] = None,
    ) -> None:
        """Draw the overlays of this batch (main process, every ``interval`` iterations)."""
        self._draw(runner, batch_idx, data_batch, outputs, "test")

    def resolve_adapter(self, model: nn.Module) -> Adapter:
        """The adapter of ``model``: the one given to the hook, else the registry's
        :func:`cam_plugin.resolve` (kept while the model stays the same object).

        The one place where the hook decides which adapter it uses: change the resolution
        strategy here (e.g. to read the adapter from the loop's first real forward)."""
        known = self._model_ref() if self._model_ref is not None else None
        if self._adapter is None or known is not model:
            self._adapter = self._explicit_adapter or resolve(model)
            self._model_ref = weakref.ref(model)
        return self._adapter

    def _start(self, runner: Any, evaluator: Any = None) -> None:
        self.remove()
        self._drawn = 0
        model = unwrap(runner.model)
        self._bound.extend(bind_faithfulness_metrics(evaluator, model))
        if self.disabled_reason is None:
            try:
                adapter = self.resolve_adapter(model)
                with torch.no_grad():
                    self._folded = adapter.fold()
                capture = FeatureCapture(adapter.feature_module, adapter.capture, detach=True)
                self._captures.append(capture)
                capture.install()
            except Exception as err:  # never crash the user's run
                self.remove()
                self._disable(f"no exact CAM for this model ({type(err).__name__}: {err})")
        self._handles.extend(_model_hooks(model, weakref.ref(self), bool(self._captures)))

    # -- maps -------------------------------------------------------------------------------
    def _on_output(self, args: Any, kwargs: Mapping[str, Any], output: Any) -> None:
        samples = _predicted_samples(args, kwargs, output)
        captured = self._captures[0].pop() if self._captures else None
        if samples is None:
            return
        if self.disabled_reason is not None:
            mark_all(samples, f"{_OWNER} is disabled: {self.disabled_reason}")
            return
        hw = _input_hw(args, kwargs)
        if captured is None or hw is None or captured.shape[0] != len(samples):
            mark_all(samples, "the forward's feature map does not match its predicted samples")
            return
        try:
            assert self._adapter is not None and self._folded is not None
            problem, missing_gt = attach_cam_maps(
                samples,
                captured,
                self._adapter,
                self._folded,
                hw,
                topk=self.topk,
                target=self.target,
                placement=_batch_placement(self._model_ref, self._adapter, args, kwargs),
            )
        except Exception as err:  # never crash the user's run
            problem, missing_gt = f"computing the maps failed ({type(err).__name__}: {err})", False
        if problem is not None:  # keep marking this epoch's samples, stop capturing
            _remove_installed([], self._captures)
            self._disable(problem)
            mark_all(samples, f"{_OWNER} is disabled: {problem}")
        if missing_gt:
            message = "target='gt' but a sample has no gt_label; its predicted classes are mapped"
            self._warn_once("gt", message + " instead.")

    # -- pictures ---------------------------------------------------------------------------
    def _draw(
        self,
        runner: Any,
        batch_idx: int,
        data_batch: Any,
        outputs: Optional[Sequence[Any]],
        mode: str,
    ) -> None:
        if self.disabled_reason is not None or self._draw_failed or not outputs:
            return
        if self.max_samples == 0 or self._drawn >= self.max_samples:
            return
        if batch_idx % self.interval != 0 or not is_main_process():
            return
        try:
            self._draw_batch(runner, data_batch, outputs, mode)
        except Exception as err:  # pictures must never crash the run
            self._draw_failed = True
            print_log(
                f"{_OWNER}: drawing failed ({type(err).__name__}: {err}); the maps are still "
                "computed for the metrics, no more pictures this run.",
                logger="current",
                level=logging.WARNING,
            )

    def _draw_batch(self, runner: Any, data_batch: Any, outputs: Sequence[Any], mode: str) -> None:
        images = data_batch.get("inputs") if isinstance(data_batch, Mapping) else None
        if images is None:
            return
        pre = getattr(unwrap(runner.model), "data_preprocessor", None)
        bgr = bool(getattr(pre, "to_rgb", False) or getattr(pre, "_channel_conversion", False))
        meta = getattr(runner.visualizer, "dataset_meta", None) or {}
        names = meta.get("classes")
        for i, sample in enumerate(outputs):
            if self._drawn >= self.max_samples:
                break
            cam = sample.get("cam_maps", None) if isinstance(sample, BaseDataElement) else None
            if not has_cam_maps(cam) or i >= len(images):
                continue
            self._drawn += 1
            picture = to_uint8_image(images[i], bgr=bgr)
            idx = sample.metainfo.get("sample_idx", f"{runner.iter}_{i}")
            pictures = sample_pictures(
                picture,
                sample,
                cam,
                names,
                draw_boxes=self.draw_boxes,
                threshold=self.threshold,
                alpha=self.alpha,
                colormap=self.colormap,
            )
            for j, pic in enumerate(pictures):
                suffix = f"_{self.target}{j + 1}" if len(pictures) > 1 else ""
                runner.visualizer.add_image(f"cam_{mode}_{idx}{suffix}", pic, step=runner.iter)


def sample_pictures(
    picture: np.ndarray,
    sample: BaseDataElement,
    cam: BaseDataElement,
    names: Optional[Sequence[str]],
    *,
    draw_boxes: bool,
    threshold: float,
    alpha: float,
    colormap: str,
) -> list[np.ndarray]:
    """One :func:`~cam_plugin.viz.annotated_overlay` per target map of ``sample`` (the
    first ``num_targets`` of its ``cam_maps``) at the size of ``picture``: the map brought
    to the image (placed by :func:`~.sample_maps.placed_maps` where the hook traced the
    placement, then :func:`~.geometry.cam_maps_to_image`), with the paper's box at
    ``threshold`` and the ground-truth boxes when ``draw_boxes``, captioned with the class
    name and the model's score."""
    h, w = picture.shape[:2]
    img_shape = sample.metainfo.get("img_shape") or (h, w)
    k = int(cam.metainfo.get("num_targets", len(cam.classes)))
    maps = cam_maps_to_image(placed_maps(cam, cam.maps[:k]), cam.input_shape, img_shape, (h, w))
    boxes = threshold_boxes(maps, threshold).cpu() if draw_boxes else None
    gt_boxes, _ = find_boxes(sample) if draw_boxes else (None, None)
    frame_gt = boxes_to_frame(gt_boxes, img_shape, (h, w)) if gt_boxes is not None else []
    score = sample.get("pred_score", None)
    pictures = []
    for j in range(k):
        cls = int(cam.classes[j])
        text = names[cls] if names is not None and 0 <= cls < len(names) else str(cls)
        if isinstance(score, Tensor) and score.dim() == 1:
            text = f"{text} {float(score[cls]):.2f}"
        box = boxes[j].tolist() if boxes is not None else None
        pictures.append(
            annotated_overlay(
                picture,
                maps[j],
                alpha=alpha,
                colormap=colormap,
                box=box,
                gt_boxes=frame_gt,
                text=text,
            )
        )
    return pictures
