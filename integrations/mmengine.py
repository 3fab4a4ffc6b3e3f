"""CAM in any mmengine run: a hook, a localization metric and the cluttered-digits data set.

Three lines in a config add class activation maps and WSOL scores to every validation::

    custom_imports = dict(imports=["cam_plugin.integrations.mmengine"],
                          allow_failed_imports=False)
    custom_hooks = [dict(type="CAMVisualizationHook", interval=1, max_samples=8)]
    val_evaluator = [dict(type="Accuracy"), dict(type="CAMLocalizationMetric")]

Importing this module registers, in mmengine's **root** registries (so they build under any
``default_scope``: mmpretrain, mmdet, mmseg or none):

* :class:`CAMVisualizationHook` (``HOOKS``): for the val / test epoch it installs forward
  hooks on the model (removed at the end of the epoch, by the next call of the hook, or by
  its finalizer). During the loop's own ``val_step`` it captures the feature map, and when
  the model's ``forward(..., mode='predict')`` returns its data samples it computes
  ``M_c(x, y) = Σ_k W'_ck f_k(x, y)`` (fp32, outside autocast, no autograd) and adds one
  field, ``cam_maps``, to every predicted data sample, before the evaluator sees them: no
  second forward pass, no change to any existing field. Every ``interval`` iterations the
  main process draws overlays through ``runner.visualizer.add_image``.
* :class:`CAMLocalizationMetric` (``METRICS``): MaxBoxAcc, MaxBoxAccV2, GT-known Loc and
  Top-1 Loc (Choe et al., CVPR 2020) from the ``cam_maps`` and the ground-truth boxes of the
  samples, with per-sample records so that a distributed sampler's padding is not counted.
* :class:`ClutteredDigitsDataset` (``DATASETS``): :class:`cam_plugin.data.ClutteredDigits`
  as an mmengine ``BaseDataset`` producing mmpretrain-style samples (``img`` HWC uint8,
  ``gt_label``, ``gt_bboxes``), ready for mmpretrain's ``PackInputs``.

``cam_maps`` of a sample is a :class:`~mmengine.structures.BaseDataElement` with data fields
``maps`` ``(n, h, w)`` float32 at feature resolution, ``classes`` ``(n,)`` and ``scores``
``(n,)`` (the logits recomputed from the features), and metainfo ``input_shape`` (the
``(H, W)`` of the batch tensor the network saw, padding included) and ``num_targets`` (the
first ``num_targets`` maps are the hook's ``target`` classes; the ground-truth classes
follow when ``target='pred'``, for the metric). :func:`cam_maps_to_image` brings them to
the image.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import random
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.dataset import BaseDataset
from mmengine.dist import is_main_process
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import DATASETS, HOOKS, METRICS
from mmengine.runner import BaseLoop
from mmengine.structures import BaseDataElement
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from cam_plugin.adapter import Adapter
from cam_plugin.errors import CAMInputError
from cam_plugin.heads import FoldedHead
from cam_plugin.hooks import FeatureCapture
from cam_plugin.localize import threshold_boxes
from cam_plugin.metrics import WSOLMetrics
from cam_plugin.registry import resolve
from cam_plugin.result import minmax_normalize
from cam_plugin.viz import draw_box, overlay

__all__ = [
    "CAMLocalizationMetric",
    "CAMVisualizationHook",
    "ClutteredDigitsBase",
    "ClutteredDigitsDataset",
    "cam_maps_to_image",
    "find_boxes",
]

#: where ground-truth boxes are looked for in a data sample (first found wins)
BOX_KEYS = ("gt_instances.bboxes", "gt_bboxes", "gt_boxes")
#: where the class of each box is looked for
BOX_LABEL_KEYS = ("gt_instances.labels", "gt_bboxes_labels", "gt_labels")

_HOOKS_SEEN: weakref.WeakSet[CAMVisualizationHook] = weakref.WeakSet()


# ----------------------------------------------------------------------------- helpers


def _reject_unknown(owner: str, unknown: Mapping[str, Any], valid: Sequence[str]) -> None:
    if not unknown:
        return
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        parts.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise CAMInputError(
        f"{owner} got unknown option(s) {', '.join(parts)}; valid options: {', '.join(valid)}"
    )


def _get(obj: Any, path: str) -> Any:
    """``obj.a.b`` / ``obj['a']['b']`` for a dotted path; ``None`` when absent."""
    cur = obj
    for part in path.split("."):
        if cur is None:
            return None
        if isinstance(cur, Mapping):
            cur = cur.get(part)
        elif isinstance(cur, BaseDataElement):
            cur = cur.get(part, None)
        else:
            cur = getattr(cur, part, None)
    return cur


def _as_array(value: Any) -> Optional[np.ndarray]:
    if value is None:
        return None
    if hasattr(value, "tensor") and isinstance(value.tensor, Tensor):  # mmdet BaseBoxes
        value = value.tensor
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def find_boxes(
    sample: Any, box_key: Optional[str] = None
) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Ground-truth boxes ``(n, 4)`` of a data sample (object or dict) and their labels.

    Looks at ``box_key`` when given, else at :data:`BOX_KEYS` in order
    (``gt_instances.bboxes`` as mmdet packs them, ``gt_bboxes`` as ``PackInputs(
    algorithm_keys=('gt_bboxes',))`` does). Returns ``(None, None)`` when the sample has none.
    """
    keys = (box_key,) if box_key else BOX_KEYS
    for key in keys:
        arr = _as_array(_get(sample, key))
        if arr is None:
            continue
        arr = arr.reshape(-1, 4) if arr.size else arr.reshape(0, 4)
        labels = None
        prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
        for lk in ((prefix + "labels",) if prefix else ()) + BOX_LABEL_KEYS:
            lab = _as_array(_get(sample, lk))
            if lab is not None and lab.size == arr.shape[0]:
                labels = lab.reshape(-1).astype(np.int64)
                break
        return arr, labels
    return None, None


def _gt_classes(sample: Any) -> list[int]:
    """Ground-truth classes of a sample: ``gt_label`` (mmpretrain), else the box labels."""
    label = _as_array(_get(sample, "gt_label"))
    if label is not None and label.size:
        return [int(v) for v in label.reshape(-1)]
    for key in BOX_LABEL_KEYS:
        lab = _as_array(_get(sample, key))
        if lab is not None and lab.size:
            return list(dict.fromkeys(int(v) for v in lab.reshape(-1)))
    return []


def cam_maps_to_image(
    maps: Tensor,
    input_shape: Sequence[int],
    img_shape: Optional[Sequence[int]] = None,
    out_shape: Optional[Sequence[int]] = None,
) -> Tensor:
    """Bring feature-resolution maps ``(n, h, w)`` to the image and min-max normalize them.

    The maps cover the batch tensor the network saw, ``input_shape = (H, W)`` (padding
    included: mmengine pads at the bottom and right). They are upsampled bilinearly
    (``align_corners=False``) to ``(H, W)``, cropped to ``img_shape`` (the image before
    padding), resized to ``out_shape`` when given (e.g. ``ori_shape``), then scaled per map
    to ``[0, 1]``: ``(m − min) / (max − min)``.

    Returns:
        float32 ``(n, H', W')``.
    """
    if maps.dim() != 3:
        raise CAMInputError(f"maps must be (n, h, w), got shape {tuple(maps.shape)}")
    size = (int(input_shape[0]), int(input_shape[1]))
    up = F.interpolate(maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    if img_shape is not None:
        up = up[:, : int(img_shape[0]), : int(img_shape[1])]
    if out_shape is not None and tuple(up.shape[-2:]) != (int(out_shape[0]), int(out_shape[1])):
        target = (int(out_shape[0]), int(out_shape[1]))
        up = F.interpolate(up[None], size=target, mode="bilinear", align_corners=False)[0]
    return minmax_normalize(up)


def _unwrap(model: nn.Module) -> nn.Module:
    while is_model_wrapper(model) or isinstance(
        model, (nn.DataParallel, nn.parallel.DistributedDataParallel)
    ):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _no_autocast(device: torch.device) -> Any:
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type without autocast support
        return contextlib.nullcontext()


def _remove_installed(handles: list[RemovableHandle], captures: list[FeatureCapture]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
    for cap in captures:
        cap.remove()
    captures.clear()


@contextlib.contextmanager
def _rng_guard() -> Any:
    """Leave the torch / numpy / python RNG streams exactly as they were."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


# ----------------------------------------------------------------------------- the hook


@HOOKS.register_module()
class CAMVisualizationHook(Hook):
    """Class activation maps of every validation / test batch, from the loop's own forward.

    For the val (test) epoch the hook installs a feature capture on the adapter's feature
    module and a forward hook on the model; when ``forward(..., mode='predict')`` returns its
    data samples, the maps ``M_c = Σ_k W'_ck f_k`` of the chosen classes are added to each
    sample as ``cam_maps`` (see the module doc). Both hooks are removed at the end of the
    epoch. The model's outputs, losses, gradients, parameters, modes and RNG streams are
    never touched; a model whose head cannot give an exact CAM gets one warning and the hook
    disables itself (training goes on).

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
        _reject_unknown("CAMVisualizationHook", unknown, self._OPTIONS)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise CAMInputError(
                f"CAMVisualizationHook: interval must be an int >= 1 (draw every `interval` "
                f"iterations), got {interval!r}"
            )
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 0:
            raise CAMInputError(
                f"CAMVisualizationHook: max_samples must be an int >= 0, got {max_samples!r}"
            )
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise CAMInputError(f"CAMVisualizationHook: topk must be an int >= 1, got {topk!r}")
        if target not in ("pred", "gt"):
            raise CAMInputError(
                f"CAMVisualizationHook: target must be 'pred' (top-k predicted classes) or "
                f"'gt' (ground-truth class), got {target!r}"
            )
        for name, value in (("threshold", threshold), ("alpha", alpha)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CAMInputError(f"CAMVisualizationHook: {name} must be a number in [0, 1]")
            if not 0.0 <= float(value) <= 1.0:
                raise CAMInputError(
                    f"CAMVisualizationHook: {name} must be in [0, 1], got {value!r}"
                )
        import matplotlib

        if colormap not in matplotlib.colormaps:
            raise CAMInputError(f"CAMVisualizationHook: unknown matplotlib colormap {colormap!r}")
        if adapter is not None and not isinstance(adapter, Adapter):
            raise CAMInputError(
                f"CAMVisualizationHook: adapter must be a cam_plugin.Adapter, got "
                f"{type(adapter).__name__}"
            )
        self.interval = interval
        self.max_samples = max_samples
        self.topk = topk
        self.target = target
        self.draw_boxes = bool(draw_boxes)
        self.threshold = float(threshold)
        self.alpha = float(alpha)
        self.colormap = colormap
        self.disabled_reason: Optional[str] = None
        self._explicit_adapter = adapter
        self._adapter: Optional[Adapter] = adapter
        self._model_ref: Optional[weakref.ref[nn.Module]] = None
        self._folded: Optional[FoldedHead] = None
        self._handles: list[RemovableHandle] = []
        self._captures: list[FeatureCapture] = []
        self._finalizer = weakref.finalize(self, _remove_installed, self._handles, self._captures)
        self._drawn = 0
        self._draw_failed = False
        self._warned_gt = False
        _HOOKS_SEEN.add(self)

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def installed(self) -> bool:
        """Whether the hook's forward hooks are installed on the model right now."""
        return bool(self._handles or self._captures)

    def remove(self) -> None:
        """Remove every forward hook this object installed (idempotent)."""
        _remove_installed(self._handles, self._captures)

    def _disable(self, reason: str) -> None:
        self.remove()
        if self.disabled_reason is None:
            self.disabled_reason = reason
            print_log(
                f"CAMVisualizationHook disabled: {reason}. Training and validation go on "
                "without class activation maps.",
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
        """Install the capture for the validation epoch."""
        self._start(runner)

    def before_test_epoch(self, runner: Any) -> None:
        """Install the capture for the test epoch."""
        self._start(runner)

    def after_val_epoch(self, runner: Any, metrics: Optional[dict[str, float]] = None) -> None:
        """Remove the capture."""
        self.remove()

    def after_test_epoch(self, runner: Any, metrics: Optional[dict[str, float]] = None) -> None:
        """Remove the capture."""
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

    def _start(self, runner: Any) -> None:
        self.remove()
        self._drawn = 0
        if self.disabled_reason is not None:
            return
        try:
            model = _unwrap(runner.model)
            known = self._model_ref() if self._model_ref is not None else None
            if self._adapter is None or known is not model:
                self._adapter = self._explicit_adapter or resolve(model)
                self._model_ref = weakref.ref(model)
            adapter = self._adapter
            with torch.no_grad():
                self._folded = adapter.fold()
            capture = FeatureCapture(adapter.feature_module, adapter.capture, detach=True)
            self._captures.append(capture)
            capture.install()
            ref = weakref.ref(self)

            def clear(module: nn.Module, args: Any, kwargs: Any) -> None:
                obj = ref()
                if obj is not None:
                    for cap in obj._captures:
                        cap.value = None

            def attach(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
                obj = ref()
                if obj is not None:
                    obj._on_output(args, kwargs, output)

            self._handles.append(model.register_forward_pre_hook(clear, with_kwargs=True))
            self._handles.append(model.register_forward_hook(attach, with_kwargs=True))
        except Exception as err:  # never crash the user's run
            self._disable(f"no exact CAM for this model ({type(err).__name__}: {err})")

    # -- maps -------------------------------------------------------------------------------
    def _on_output(self, args: Any, kwargs: Mapping[str, Any], output: Any) -> None:
        if not self._captures or self.disabled_reason is not None:
            return
        captured = self._captures[0].pop()
        if captured is None:
            return
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "tensor")
        inputs = kwargs.get("inputs", args[0] if args else None)
        if mode != "predict" or not isinstance(inputs, Tensor) or inputs.dim() < 3:
            return
        if not isinstance(output, (list, tuple)) or not output:
            return
        if not all(isinstance(s, BaseDataElement) for s in output):
            return
        try:
            self._attach(list(output), captured, (int(inputs.shape[-2]), int(inputs.shape[-1])))
        except Exception as err:  # never crash the user's run
            self._disable(f"computing the maps failed ({type(err).__name__}: {err})")

    def _attach(
        self, samples: list[BaseDataElement], captured: Tensor, hw: tuple[int, int]
    ) -> None:
        adapter, folded = self._adapter, self._folded
        assert adapter is not None and folded is not None
        low_precision = captured.dtype in (torch.float16, torch.bfloat16) or _autocast_active(
            captured.device
        )
        with torch.no_grad(), _no_autocast(captured.device):
            feats = adapter.features(captured, hw).float()
            if feats.shape[0] != len(samples):
                return
            logits = folded.logits(feats)
            model_scores = _stack_scores(samples, logits.shape[1], logits.device)
            if model_scores is not None and not _scores_match(logits, model_scores, low_precision):
                self._disable(
                    f"the folded head of '{adapter.name}' does not reproduce the model's "
                    "pred_score (the adapter does not fit this model)"
                )
                return
            classes, counts = self._select(samples, logits, model_scores)
            safe = classes.clamp_min(0)
            maps = folded.maps(feats, safe)
            scores = logits.gather(1, safe)
        for i, sample in enumerate(samples):
            n = int((classes[i] >= 0).sum())
            element = BaseDataElement(
                metainfo=dict(input_shape=hw, num_targets=counts[i], target=self.target),
                maps=maps[i, :n].contiguous(),
                classes=classes[i, :n].clone(),
                scores=scores[i, :n].clone(),
            )
            sample.set_field(element, "cam_maps")

    def _select(
        self, samples: list[BaseDataElement], logits: Tensor, model_scores: Optional[Tensor]
    ) -> tuple[Tensor, list[int]]:
        """``(B, n)`` classes (``-1`` padded): the targets first, then missing gt classes."""
        num_classes = logits.shape[1]
        k = min(self.topk, num_classes)
        ranking = model_scores if model_scores is not None else logits
        top = ranking.topk(k, dim=1).indices.tolist()
        rows: list[list[int]] = []
        counts: list[int] = []
        for i, sample in enumerate(samples):
            gt = [c for c in _gt_classes(sample) if 0 <= c < num_classes]
            if self.target == "gt" and gt:
                targets = gt[:k]
            else:
                if self.target == "gt" and not self._warned_gt:
                    self._warned_gt = True
                    print_log(
                        "CAMVisualizationHook: target='gt' but a sample has no gt_label; "
                        "its predicted classes are mapped instead.",
                        logger="current",
                        level=logging.WARNING,
                    )
                targets = top[i]
            row = list(dict.fromkeys(targets + gt))
            rows.append(row)
            counts.append(len(targets))
        width = max(len(r) for r in rows)
        classes = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, row in enumerate(rows):
            classes[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return classes.to(logits.device), counts

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
                f"CAMVisualizationHook: drawing failed ({type(err).__name__}: {err}); the "
                "maps are still computed for the metrics, no more pictures this run.",
                logger="current",
                level=logging.WARNING,
            )

    def _draw_batch(self, runner: Any, data_batch: Any, outputs: Sequence[Any], mode: str) -> None:
        images = data_batch.get("inputs") if isinstance(data_batch, Mapping) else None
        if images is None:
            return
        model = _unwrap(runner.model)
        pre = getattr(model, "data_preprocessor", None)
        bgr = bool(getattr(pre, "to_rgb", False) or getattr(pre, "_channel_conversion", False))
        meta = getattr(runner.visualizer, "dataset_meta", None) or {}
        names = meta.get("classes")
        for i, sample in enumerate(outputs):
            if self._drawn >= self.max_samples:
                break
            cam = sample.get("cam_maps", None) if isinstance(sample, BaseDataElement) else None
            if cam is None or i >= len(images):
                continue
            picture = _to_hwc_uint8(images[i], bgr)
            self._drawn += 1
            h, w = picture.shape[:2]
            img_shape = sample.metainfo.get("img_shape") or (h, w)
            k = int(cam.metainfo.get("num_targets", len(cam.classes)))
            maps = cam_maps_to_image(cam.maps[:k], cam.input_shape, img_shape, (h, w))
            boxes = threshold_boxes(maps, self.threshold).cpu() if self.draw_boxes else None
            gt_boxes, _ = find_boxes(sample) if self.draw_boxes else (None, None)
            probs = _sample_probs(sample, cam)
            idx = sample.metainfo.get("sample_idx", f"{runner.iter}_{i}")
            for j in range(k):
                cls = int(cam.classes[j])
                pic = overlay(picture, maps[j], alpha=self.alpha, colormap=self.colormap)
                if gt_boxes is not None:
                    for box in _frame_boxes(gt_boxes, img_shape, (h, w)):
                        pic = draw_box(pic, box, color=(255, 0, 0), width=1)
                if boxes is not None:
                    pic = draw_box(pic, boxes[j].tolist(), color=(0, 255, 0), width=1)
                label = names[cls] if names is not None and 0 <= cls < len(names) else str(cls)
                text = f"{label} {probs[j]:.2f}" if probs is not None else label
                pic = _caption(pic, text)
                name = f"cam_{mode}_{idx}" + (f"_{self.target}{j + 1}" if k > 1 else "")
                runner.visualizer.add_image(name, pic, step=runner.iter)


def _stack_scores(
    samples: Sequence[BaseDataElement], num_classes: int, device: torch.device
) -> Optional[Tensor]:
    rows = []
    for s in samples:
        score = s.get("pred_score", None)
        if not isinstance(score, Tensor) or score.numel() != num_classes:
            return None
        rows.append(score.reshape(-1))
    return torch.stack(rows).to(device=device, dtype=torch.float32)


def _scores_match(logits: Tensor, scores: Tensor, low_precision: bool) -> bool:
    """The model's scores are softmax (single-label) or sigmoid (multi-label) of the logits
    the folded head gives: compared on the logit scale, ``log p = S − logsumexp(S)`` or
    ``log(p / (1 − p)) = S``, where ``1e-6 < p < 1 − 1e-6``, to ``tol · max(1, |S|)``."""
    usable = (scores > 1e-6) & (scores < 1 - 1e-6)
    if not bool(usable.any()):
        return True
    tol = (3e-2 if low_precision else 1e-3) * max(1.0, float(logits.abs().max()))
    log_p = scores.clamp_min(1e-12).log()
    err_soft = float((log_p - logits.log_softmax(dim=1))[usable].abs().max())
    err_sig = float((log_p - (1 - scores).clamp_min(1e-12).log() - logits)[usable].abs().max())
    return min(err_soft, err_sig) <= tol


def _autocast_active(device: torch.device) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device.type))
    except TypeError:  # torch < 2.4
        return bool(torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled())


def _sample_probs(sample: BaseDataElement, cam: BaseDataElement) -> Optional[list[float]]:
    score = sample.get("pred_score", None)
    if isinstance(score, Tensor) and score.dim() == 1:
        return [float(score[int(c)]) for c in cam.classes]
    return None


def _to_hwc_uint8(image: Any, bgr: bool) -> np.ndarray:
    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if bgr and arr.shape[2] == 3:
        arr = arr[:, :, ::-1]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 255.0:
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        elif hi <= 1.0:
            arr = arr * 255.0
        arr = arr.clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr[:, :, :3])


def _frame_boxes(
    boxes: np.ndarray, img_shape: Sequence[int], hw: tuple[int, int]
) -> list[list[float]]:
    sy, sx = hw[0] / float(img_shape[0]), hw[1] / float(img_shape[1])
    out = []
    for x0, y0, x1, y1 in boxes.astype(np.float64).tolist():
        out.append([x0 * sx, y0 * sy, max(x0 * sx, x1 * sx - 1), max(y0 * sy, y1 * sy - 1)])
    return out


def _caption(picture: np.ndarray, text: str) -> np.ndarray:
    pil = Image.fromarray(picture)
    draw = ImageDraw.Draw(pil)
    left, top, right, bottom = draw.textbbox((1, 0), text)
    draw.rectangle([0, 0, min(right + 1, pil.width - 1), bottom + 1], fill=(0, 0, 0))
    draw.text((1, 0), text, fill=(255, 255, 255))
    return np.asarray(pil)


# ----------------------------------------------------------------------------- the metric


@METRICS.register_module()
class CAMLocalizationMetric(BaseMetric):
    """Weakly supervised localization scores of the CAMs (Choe et al., CVPR 2020).

    For every sample the map of its ground-truth class (from the ``cam_maps`` field that
    :class:`CAMVisualizationHook` adds) is brought to the image with
    :func:`cam_maps_to_image` and scored against the sample's ground-truth boxes with
    :class:`cam_plugin.metrics.WSOLMetrics`; per-sample records keyed by ``sample_idx`` are
    gathered across processes, so a distributed sampler's padding is counted once. Logged
    (with the prefix ``cam/``): ``MaxBoxAcc``, ``MaxBoxAccV2`` (mean over the IoU levels of
    ``max_t BoxAcc(t, d)`` with every contour), ``MaxBoxAccV2@d``, ``GT-known_Loc`` (box IoU
    ≥ 0.5 at the best threshold), ``Top-1_Loc`` (that and a correct top-1 class), their
    ``@fixed`` variants at ``fixed_threshold``, ``Top-1_Cls`` and ``best_threshold``; all in
    percent except the threshold.

    Args:
        cam_curve_interval: step of the threshold sweep ``np.arange(0, 1, step)``.
        iou_thresholds: IoU levels (percent) of MaxBoxAccV2.
        fixed_threshold: threshold of the ``@fixed`` numbers (paper: 0.2).
        box_key: dotted path of the boxes in a sample (default: ``gt_instances.bboxes``,
            ``gt_bboxes``, ``gt_boxes``, the first present).
        box_convention: ``"exclusive"`` (OpenMMLab's ``x2 = x1 + width``, float) or
            ``"inclusive"`` (integer pixels ``x0..x1``, as Choe et al.).
        box_frame: ``"img"`` (boxes in the frame of ``img_shape``, transformed with the image
            as OpenMMLab pipelines do) or ``"ori"`` (boxes in ``ori_shape``).
        collect_device: ``"cpu"`` or ``"gpu"``, as any mmengine metric.
        prefix: metric name prefix (default ``"cam"``).
        collect_dir: temporary folder for ``collect_device="cpu"``.
    """

    default_prefix: Optional[str] = "cam"
    _OPTIONS = (
        "cam_curve_interval",
        "iou_thresholds",
        "fixed_threshold",
        "box_key",
        "box_convention",
        "box_frame",
        "collect_device",
        "prefix",
        "collect_dir",
    )

    def __init__(
        self,
        cam_curve_interval: float = 0.01,
        iou_thresholds: Sequence[int] = (30, 50, 70),
        fixed_threshold: float = 0.2,
        box_key: Optional[str] = None,
        box_convention: str = "exclusive",
        box_frame: str = "img",
        collect_device: str = "cpu",
        prefix: Optional[str] = None,
        collect_dir: Optional[str] = None,
        **unknown: Any,
    ) -> None:
        _reject_unknown("CAMLocalizationMetric", unknown, self._OPTIONS)
        if box_convention not in ("exclusive", "inclusive"):
            raise CAMInputError(
                f"CAMLocalizationMetric: box_convention must be 'exclusive' (OpenMMLab) or "
                f"'inclusive', got {box_convention!r}"
            )
        if box_frame not in ("img", "ori"):
            raise CAMInputError(
                f"CAMLocalizationMetric: box_frame must be 'img' or 'ori', got {box_frame!r}"
            )
        if box_key is not None and not isinstance(box_key, str):
            raise CAMInputError("CAMLocalizationMetric: box_key must be a dotted path string")
        super().__init__(collect_device=collect_device, prefix=prefix, collect_dir=collect_dir)
        self.config: dict[str, Any] = dict(
            cam_curve_interval=cam_curve_interval,
            iou_thresholds=tuple(iou_thresholds),
            fixed_threshold=fixed_threshold,
        )
        WSOLMetrics(**self.config)  # validates the settings now, at build time
        self.box_key = box_key
        self.box_convention = box_convention
        self.box_frame = box_frame
        self._missing = 0

    @property
    def dataset_meta(self) -> Optional[dict]:
        """Meta info of the data set; one that declares ``with_boxes=False`` is refused."""
        return self._dataset_meta

    @dataset_meta.setter
    def dataset_meta(self, dataset_meta: Optional[dict]) -> None:
        if isinstance(dataset_meta, Mapping) and dataset_meta.get("with_boxes") is False:
            raise CAMInputError(
                "CAMLocalizationMetric needs ground-truth boxes, but the evaluated data set "
                "declares with_boxes=False. Use a data set with boxes or remove the metric "
                "from the evaluator."
            )
        self._dataset_meta = dataset_meta  # type: ignore[assignment]

    def check_dataset(self, dataset: Any) -> None:
        """Raise a clear error when the data set's samples carry no ground-truth boxes.

        Loads the first sample through the data set's pipeline (RNG streams left untouched)
        and looks for the boxes where :meth:`process` will.
        """
        meta = getattr(dataset, "metainfo", None)
        self.dataset_meta = meta if isinstance(meta, dict) else self._dataset_meta
        try:
            if len(dataset) == 0:
                return
        except TypeError:
            return
        with _rng_guard():
            item = dataset[0]
        sample = item.get("data_samples", item) if isinstance(item, Mapping) else item
        boxes, _ = find_boxes(sample, self.box_key)
        if boxes is None:
            fields = sorted(sample.keys()) if hasattr(sample, "keys") else []
            where = f"'{self.box_key}'" if self.box_key else " or ".join(BOX_KEYS)
            raise CAMInputError(
                f"CAMLocalizationMetric needs ground-truth boxes, but the samples of "
                f"{type(dataset).__name__} have none at {where} (fields: {fields}). Pack the "
                "boxes into the data samples (mmpretrain: PackInputs(algorithm_keys="
                "('gt_bboxes',))), set box_key=..., or remove the metric."
            )

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        """Score the ground-truth-class map of every sample and keep a per-sample record."""
        for sample in data_samples:
            cam = _get(sample, "cam_maps")
            if cam is None:
                if not list(_HOOKS_SEEN):
                    raise CAMInputError(
                        "CAMLocalizationMetric: the predictions carry no 'cam_maps'. Add "
                        "dict(type='CAMVisualizationHook') to custom_hooks: the metric sees "
                        "no model, the hook computes the maps during the forward pass."
                    )
                self._missing += 1
                continue
            self.results.append(self._record(sample, cam))

    def _record(self, sample: Mapping[str, Any], cam: Any) -> dict[str, Any]:
        boxes, box_labels = find_boxes(sample, self.box_key)
        sid = _get(sample, "sample_idx")
        if boxes is None or boxes.shape[0] == 0:
            raise CAMInputError(
                f"CAMLocalizationMetric: sample {sid} has no ground-truth boxes (looked at "
                f"{self.box_key or ', '.join(BOX_KEYS)})."
            )
        gt = _gt_classes(sample)
        if not gt:
            raise CAMInputError(
                f"CAMLocalizationMetric: sample {sid} has no ground-truth class (gt_label or "
                "box labels); the map of the true class is what is scored."
            )
        cls = gt[0]
        classes = _as_array(_get(cam, "classes"))
        maps = _get(cam, "maps")
        assert classes is not None and isinstance(maps, Tensor)
        where = np.flatnonzero(classes.reshape(-1) == cls)
        if where.size == 0:
            raise CAMInputError(
                f"CAMLocalizationMetric: the cam_maps of sample {sid} hold no map of its "
                f"ground-truth class {cls}."
            )
        img_shape = _get(sample, "img_shape")
        out_shape = _get(sample, "ori_shape") if self.box_frame == "ori" else None
        m = cam_maps_to_image(
            maps[int(where[0]) : int(where[0]) + 1].detach().cpu(),
            _get(cam, "input_shape"),
            img_shape,
            out_shape,
        )[0]
        height, width = int(m.shape[0]), int(m.shape[1])
        if box_labels is not None and (box_labels == cls).any():
            boxes = boxes[box_labels == cls]
        pixel_boxes = _to_inclusive(boxes, self.box_convention, height, width)
        pred = _as_array(_get(sample, "pred_label"))
        metric = WSOLMetrics(**self.config)
        metric.update(
            m[None],
            [pixel_boxes],
            labels=[cls] if pred is not None and pred.size else None,
            pred_classes=[int(pred.reshape(-1)[0])] if pred is not None and pred.size else None,
            sample_ids=[int(sid) if isinstance(sid, (int, np.integer)) else sid]
            if sid is not None
            else None,
        )
        return metric.state()

    def compute_metrics(self, results: list) -> dict[str, float]:
        """Merge the per-sample records of every process and compute the scores."""
        if not results:
            print_log(
                "CAMLocalizationMetric: no sample carried cam_maps "
                f"({self._missing} without); no localization scores this time.",
                logger="current",
                level=logging.WARNING,
            )
            self._missing = 0
            return {}
        self._missing = 0
        metric = WSOLMetrics(**self.config)
        metric.merge(results)
        return {key.replace(" ", "_"): float(v) for key, v in metric.compute().items()}


def _to_inclusive(boxes: np.ndarray, convention: str, height: int, width: int) -> np.ndarray:
    """Integer inclusive ``(x0, y0, x1, y1)`` pixel boxes clipped to the map.

    OpenMMLab boxes are edges (``x2 = x1 + width``): ``x0 = floor(x1)``,
    ``x1' = ceil(x2) − 1``.
    """
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if convention == "exclusive":
        out = np.stack(
            [
                np.floor(arr[:, 0]),
                np.floor(arr[:, 1]),
                np.ceil(arr[:, 2]) - 1,
                np.ceil(arr[:, 3]) - 1,
            ],
            axis=1,
        )
    else:
        out = np.round(arr)
    out[:, 0::2] = out[:, 0::2].clip(0, width - 1)
    out[:, 1::2] = out[:, 1::2].clip(0, height - 1)
    out[:, 2] = np.maximum(out[:, 2], out[:, 0])
    out[:, 3] = np.maximum(out[:, 3], out[:, 1])
    return out.astype(np.int64)


# ----------------------------------------------------------------------------- the data set


class ClutteredDigitsBase(BaseDataset):
    """What the digits data sets for mmengine (classification) and mmdet (detection) share:
    a :class:`cam_plugin.data.ClutteredDigits` generator as ``self.digits``, no annotation
    file, samples rendered on access. Subclasses give ``load_data_list`` and
    ``get_data_info``; :meth:`render` returns one sample's image as OpenMMLab expects it
    (HWC uint8, grey in three channels) with its boxes (inclusive pixel edges) and labels."""

    def __init__(
        self,
        split: str,
        length: Optional[int],
        canvas_size: int,
        digit_size: Sequence[int],
        seed: int,
        pipeline: Sequence[Union[dict, Any]],
        test_mode: bool,
        lazy_init: bool,
        max_refetch: int,
        metainfo: Optional[dict] = None,
        **digits: Any,
    ) -> None:
        from cam_plugin.data import ClutteredDigits

        lo, hi = (int(v) for v in digit_size)
        self.digits = ClutteredDigits(
            split,  # type: ignore[arg-type]
            length,
            canvas_size=canvas_size,
            digit_size=(lo, hi),
            seed=seed,
            **digits,
        )
        super().__init__(
            ann_file="",
            metainfo=metainfo,
            serialize_data=False,
            pipeline=list(pipeline),
            test_mode=test_mode,
            lazy_init=lazy_init,
            max_refetch=max_refetch,
        )

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(img, boxes, labels)`` of sample ``index``: ``img`` HWC uint8, ``boxes``
        ``(n, 4)`` inclusive pixel edges ``[x0, y0, x1, y1]``, ``labels`` ``(n,)``."""
        image, boxes, labels, _ = self.digits.render(int(index))
        img = np.repeat((image * 255.0 + 0.5).astype(np.uint8)[:, :, None], 3, axis=2)
        return img, boxes, labels


@DATASETS.register_module()
class ClutteredDigitsDataset(ClutteredDigitsBase):
    """:class:`cam_plugin.data.ClutteredDigits` as an mmengine data set.

    Each data info is an mmpretrain-style dict: ``img`` (HWC uint8, grey in three channels),
    ``img_shape`` = ``ori_shape`` = ``(S, S)``, ``gt_label`` (the digit), ``gt_bboxes``
    float32 ``(n, 4)`` in OpenMMLab's convention (``x2 = x1 + width``: a digit covering
    pixels ``x0..x1`` gives ``[x0, y0, x1 + 1, y1 + 1]``), ``gt_bboxes_labels`` and
    ``sample_idx``. With mmpretrain, pack it with
    ``PackInputs(algorithm_keys=('gt_bboxes', 'gt_bboxes_labels'))``. Samples are generated
    on the fly, deterministically from ``(seed, split, index)``.

    Args:
        split: ``"train"`` or ``"test"`` (disjoint source digits).
        length: number of samples.
        canvas_size: image side ``S``.
        digit_size: ``(min, max)`` side of a digit.
        seed: generator seed.
        with_boxes: emit ``gt_bboxes`` (``False`` models a data set without boxes).
        pipeline: the transforms (e.g. ``[dict(type='PackInputs', ...)]``).
        test_mode: mmengine's test mode flag.
        lazy_init: defer building the index list.
        max_refetch: mmengine's refetch limit.
        **digits: further :class:`~cam_plugin.data.ClutteredDigits` options
            (``num_fragments``, ``num_strokes``, ``noise_std``, ``touch_prob``, ...).
    """

    METAINFO: dict = dict(classes=tuple(str(i) for i in range(10)), with_boxes=True)

    def __init__(
        self,
        split: str = "train",
        length: Optional[int] = None,
        canvas_size: int = 64,
        digit_size: Sequence[int] = (20, 36),
        seed: int = 0,
        with_boxes: bool = True,
        pipeline: Sequence[Union[dict, Any]] = (),
        test_mode: bool = False,
        lazy_init: bool = False,
        max_refetch: int = 1000,
        **digits: Any,
    ) -> None:
        self.with_boxes = bool(with_boxes)
        super().__init__(
            split,
            length,
            canvas_size,
            digit_size,
            seed,
            pipeline,
            test_mode,
            lazy_init,
            max_refetch,
            metainfo=dict(with_boxes=self.with_boxes),
            **digits,
        )

    def load_data_list(self) -> list[dict]:
        """One entry per sample (images are rendered on access)."""
        return [dict(index=i) for i in range(len(self.digits))]

    def get_data_info(self, idx: int) -> dict:
        """Render sample ``idx`` as an mmpretrain-style data info dict."""
        info = super().get_data_info(idx)
        img, boxes, labels = self.render(info["index"])
        size = (int(img.shape[0]), int(img.shape[1]))
        info.update(img=img, img_shape=size, ori_shape=size, gt_label=int(labels[0]))
        if self.with_boxes:
            edges = boxes.astype(np.float32).copy()
            edges[:, 2:] += 1.0
            info.update(gt_bboxes=edges, gt_bboxes_labels=labels.astype(np.int64))
        return info
