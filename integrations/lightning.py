"""A Lightning ``Callback`` that adds class activation maps to an existing run.

:class:`CAMCallback` never runs the model: around a validation / test step it keeps (a
picture every ``every_n_batches`` batches on rank 0; WSOL metrics when the batch carries
labels and boxes) it installs a :class:`cam_plugin.capture.ForwardCapture` on the classifier
plus a forward hook keeping the classifier's input and output, removes both after the step
(also when it raises), and runs the core step :meth:`cam_plugin.Adapter.maps_from_capture`
on that forward: ``M_c = Σ_k W'_ck f_k`` with ``mean_xy M_c + b'_c = S_c`` checked. Pictures
go to the trainer's loggers (:func:`log_picture`); every rank's WSOL records are merged by
sample id at epoch end (:func:`merged_wsol_metrics`). No mode is set, no gradient made, no
RNG drawn from (:func:`cam_plugin.probing.rng_guard`); batch and outputs are only read.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from cam_plugin.adapter import Adapter, CaptureMaps
from cam_plugin.capture import ForwardCapture
from cam_plugin.errors import AdapterNotFoundError, CAMInputError, UnsupportedHeadError
from cam_plugin.metrics import WSOLMetrics
from cam_plugin.probing import first_tensor, model_device_dtype, rng_guard
from cam_plugin.result import CAMResult
from cam_plugin.targets import parse_targets
from cam_plugin.viz import annotated_overlay, enlarge, hstack, to_uint8_image
from cam_plugin.wsol_inputs import check_gt_boxes

__all__ = [
    "CAMCallback",
    "PictureStyle",
    "batch_boxes",
    "batch_labels",
    "batch_sample_ids",
    "log_picture",
    "merged_wsol_metrics",
]

BatchReader = Callable[[Any], Any]
_OWNER = "CAMCallback"
_SELF = "<the LightningModule>"
_LABEL_KEYS = ("label", "target", "targets", "y", "labels")
_BOX_KEYS = ("boxes", "gt_boxes", "bboxes")
_ID_KEYS = ("index", "sample_id", "sample_idx", "idx", "id")
_HALF = (torch.float16, torch.bfloat16)
#: relative tolerance of the identity check when the forward ran in fp16 / bf16
LOW_PRECISION_RTOL = 3e-2


def _class_vector(value: Any) -> Optional[Tensor]:
    """``value`` when it is a ``(B,)`` integer tensor, else ``None``."""
    ok = isinstance(value, Tensor) and value.dim() == 1 and not value.is_floating_point()
    return value if ok else None


def _looks_like_boxes(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.dim() in (2, 3) and value.shape[-1] == 4
    if isinstance(value, (list, tuple)) and value:
        return all(isinstance(v, Tensor) and v.shape[-1:] == (4,) for v in value)
    return False


def batch_labels(batch: Any) -> Optional[Tensor]:
    """Default reader of the ground-truth classes: ``batch[1]`` of an ``(images, labels,
    ...)`` tuple, or the first of ``label``, ``target``, ``targets``, ``y``, ``labels`` of a
    dict, when it is a ``(B,)`` integer tensor; else ``None``."""
    if isinstance(batch, Mapping):
        found = (_class_vector(batch.get(key)) for key in _LABEL_KEYS)
        return next((f for f in found if f is not None), None)
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return _class_vector(batch[1])
    return None


def batch_boxes(batch: Any) -> Optional[Any]:
    """Default reader of the ground-truth boxes (inclusive ``(x0, y0, x1, y1)`` in the
    classifier input's pixels): ``boxes`` / ``gt_boxes`` / ``bboxes`` of a dict, or
    ``batch[2]`` of an ``(images, labels, boxes)`` tuple, when it is a list of ``(n_i, 4)``
    tensors or a ``(B, 4)`` / ``(B, n, 4)`` tensor; else ``None``."""
    if isinstance(batch, Mapping):
        return next((batch[k] for k in _BOX_KEYS if _looks_like_boxes(batch.get(k))), None)
    if isinstance(batch, (list, tuple)) and len(batch) >= 3 and _looks_like_boxes(batch[2]):
        return batch[2]
    return None


def batch_sample_ids(batch: Any) -> Optional[list[Hashable]]:
    """Default reader of sample ids (metrics are merged across ranks by them): ``index`` /
    ``sample_id`` / ``sample_idx`` / ``idx`` / ``id`` of a dict; ``None`` otherwise (every
    row is then a new sample)."""
    if not isinstance(batch, Mapping):
        return None
    for key in _ID_KEYS:
        value = batch.get(key)
        if isinstance(value, (Tensor, list, tuple)):
            return list(value.tolist() if isinstance(value, Tensor) else value)
    return None


class _Watch:
    """One candidate classifier during one step: a :class:`ForwardCapture` (its feature
    map, or every call of its forward while the adapter is unknown) and a forward hook that
    keeps its last input tensor and output (this thread's calls only)."""

    def __init__(self, name: str, module: nn.Module, adapter: Optional[Adapter]) -> None:
        self.name, self.module = name, module
        self.capture = ForwardCapture(module, adapter)
        self.inp: Optional[Tensor] = None
        self.out: Any = None
        self._handle: Optional[RemovableHandle] = None
        self._installed = False

    def install(self) -> None:
        owner = threading.get_ident()

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            if threading.get_ident() == owner:
                self.inp, self.out = first_tensor(args), output

        self._installed = True
        self.capture.__enter__()
        self._handle = self.module.register_forward_hook(keep)

    def remove(self) -> None:
        """Remove both hooks (idempotent; what was captured stays readable)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._installed:
            self._installed = False
            self.capture.__exit__(None, None, None)


def _remove_all(watches: list[_Watch]) -> None:
    for watch in watches:
        watch.remove()
    watches.clear()


class _Classifier:
    """Which module of a ``LightningModule`` is the classifier (``option``: ``None``, a dotted
    attribute path or a module), and its adapter. The first step that gives exact maps fixes
    the choice (kept while the ``LightningModule`` is the same object)."""

    def __init__(self, option: Union[None, str, nn.Module], adapter: Optional[Adapter]) -> None:
        self.option, self.explicit = option, adapter
        self.adapter: Optional[Adapter] = adapter
        self.module: Optional[nn.Module] = None
        self.name = ""
        self._owner: Optional[weakref.ref[LightningModule]] = None

    def candidates(self, pl_module: LightningModule) -> list[tuple[str, nn.Module]]:
        """The modules to watch: the known classifier, or every candidate."""
        if (self._owner() if self._owner is not None else None) is not pl_module:
            self.module, self.adapter, self._owner = None, self.explicit, weakref.ref(pl_module)
        if self.module is not None:
            return [(self.name, self.module)]
        if isinstance(self.option, nn.Module):
            return [(type(self.option).__name__, self.option)]
        if isinstance(self.option, str):
            try:
                return [(self.option or _SELF, pl_module.get_submodule(self.option))]
            except AttributeError as err:
                raise CAMInputError(
                    f"{_OWNER}: classifier={self.option!r} is not a submodule of "
                    f"{type(pl_module).__name__} ({err})"
                ) from err
        return [(_SELF, pl_module), *pl_module.named_children()]

    def core_step(
        self, watches: Sequence[_Watch], select: Callable[[Tensor], Tensor], owner: str
    ) -> Optional[tuple[_Watch, CaptureMaps]]:
        """:func:`_exact_step` on the first watched module whose forward ran and gives exact
        maps; ``None`` when the known classifier did not run in this step. Raises
        :class:`AdapterNotFoundError` listing every candidate when none does."""
        tried: list[str] = []
        for watch in watches:
            if watch.out is None and self.module is not None:
                return None
            try:
                adapter, step = _exact_step(watch, select)
            except (CAMInputError, UnsupportedHeadError, AdapterNotFoundError) as err:
                if self.module is not None or len(watches) == 1:
                    raise
                tried.append(f"{watch.name}: {type(err).__name__}: {err}")
                continue
            self.adapter, self.module, self.name = adapter, watch.module, watch.name
            return watch, step
        lines = "\n  - ".join(tried)
        raise AdapterNotFoundError(
            f"{_OWNER} found no classifier in {owner} (a module whose forward maps the images "
            f"to logits with an exact CAM); tried:\n  - {lines}\nPass "
            "CAMCallback(classifier='<attribute>') or an explicit adapter=."
        )


def _exact_step(watch: _Watch, select: Callable[[Tensor], Tensor]) -> tuple[Adapter, CaptureMaps]:
    """The adapter and :meth:`Adapter.maps_from_capture` of one watched forward, with the
    identity checked in eval mode (to :data:`LOW_PRECISION_RTOL` when the forward ran in
    fp16 / bf16: :meth:`FoldedHead.check_reproduces`)."""
    inp = watch.inp
    if watch.out is None or inp is None or inp.dim() < 4 or not inp.is_floating_point():
        what = "did not run in the step" if watch.out is None else "got no float image batch"
        raise CAMInputError(f"{_OWNER}: the forward of '{watch.name}' {what}")
    adapter, captured = watch.capture.finish(inp, watch.out)
    out = first_tensor(watch.out)
    low = captured.dtype in _HALF or (out is not None and out.dtype in _HALF)
    check = not watch.module.training and adapter.exact
    hw = (int(inp.shape[-2]), int(inp.shape[-1]))
    verify = check and not low
    step = adapter.maps_from_capture(captured, watch.out, input_hw=hw, select=select, verify=verify)
    if check and low:
        logits = step.logits.float()
        step.head.check_reproduces(
            step.features, logits, name=adapter.name, rtol=LOW_PRECISION_RTOL
        )
    return adapter, step


@dataclass(frozen=True)
class PictureStyle:
    """A batch's picture: each of its first ``max_images`` images enlarged ``s = ceil(min_side
    / min(H, W))`` times, :func:`cam_plugin.viz.annotated_overlay` of its map with the boxes
    scaled to it, the panels side by side (:func:`cam_plugin.viz.hstack`)."""

    max_images: int = 8
    threshold: float = 0.2
    alpha: float = 0.5
    colormap: str = "jet"
    class_names: Optional[tuple[str, ...]] = None
    min_side: int = 128

    def draw(self, images: Tensor, shown: CAMResult, raw: CAMResult, gt_boxes: Any) -> np.ndarray:
        """``shown``: normalized maps at input size (map 0 is drawn); ``raw``: the same
        result before upsampling (classes, probabilities); ``gt_boxes`` or ``None``."""
        b, hw = len(shown), shown.input_size
        n = min(self.max_images, b)
        if not isinstance(images, Tensor) or images.shape[0] < n or images.shape[-2:] != hw:
            raise CAMInputError(
                f"{_OWNER}: the images to draw must be a (B, C, {hw[0]}, {hw[1]}) tensor in "
                "the classifier input's pixel frame (see the images= option)"
            )
        gt = check_gt_boxes(gt_boxes, b, *hw) if gt_boxes is not None else None
        boxes = shown.boxes(self.threshold)[:n, 0].cpu().tolist()
        probs = raw.probabilities[:n, 0].cpu().tolist()
        scale = max(1, math.ceil(self.min_side / max(1, min(hw))))
        panels = []
        for i in range(n):
            cls = int(raw.classes[i, 0])
            name = self.class_names[cls] if self.class_names else str(cls)
            panels.append(
                annotated_overlay(
                    enlarge(to_uint8_image(images[i]), scale),
                    shown.maps[i, 0],
                    alpha=self.alpha,
                    colormap=self.colormap,
                    box=_scaled(boxes[i], scale),
                    gt_boxes=[_scaled(g, scale) for g in (gt[i].tolist() if gt else [])],
                    text=f"{name} {probs[i]:.2f}",
                )
            )
        return hstack(panels)


def _scaled(box: Sequence[float], s: int) -> list[float]:
    """An inclusive pixel box on an image enlarged ``s`` times: ``(s·x0, s·y0, s·(x1 + 1) − 1,
    s·(y1 + 1) − 1)``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [s * x0, s * y0, s * (x1 + 1) - 1, s * (y1 + 1) - 1]


def log_picture(trainer: Trainer, tag: str, stem: str, picture: np.ndarray) -> list[str]:
    """Send an ``(H, W, 3)`` uint8 ``picture`` to the trainer's loggers: ``CSVLogger`` ->
    ``<log_dir>/cam_images/<stem>.png``; ``experiment.add_image`` (TensorBoard) or ``log_image``
    -> ``tag`` at ``trainer.global_step``. Returns the class names of loggers that took none."""
    step = int(trainer.global_step)
    skipped = []
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            folder = Path(logger.log_dir) / "cam_images"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture).save(folder / f"{stem}.png")
            continue
        experiment: Any = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(tag, picture, global_step=step, dataformats="HWC")
        elif callable(getattr(logger, "log_image", None)):
            logger.log_image(key=tag, images=[picture], step=step)  # type: ignore[attr-defined]
        else:
            skipped.append(type(logger).__name__)
    return skipped


def merged_wsol_metrics(
    local: Optional[WSOLMetrics], options: Mapping[str, Any]
) -> Optional[dict[str, float]]:
    """Every rank's :meth:`WSOLMetrics.state` (``all_gather_object``: every rank must call
    this) merged by sample id, then :meth:`WSOLMetrics.compute` plus ``samples`` (distinct
    samples); ``None`` when no rank recorded a box sample."""
    states: list[Any] = [(local or WSOLMetrics(**options)).state()]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        mine, states = states[0], [None] * dist.get_world_size()
        dist.all_gather_object(states, mine)
    merged = WSOLMetrics(**options)
    merged.merge(states)
    if not merged.num_box_samples:
        return None
    return {**merged.compute(), "samples": float(merged.num_box_samples)}


@dataclass
class _Pending:
    """What ``on_*_batch_start`` decided for a batch, and the installed watches."""

    stage: str
    batch_idx: int
    dataloader_idx: int
    draw: bool
    labels: Optional[Tensor]
    boxes: Any
    watches: list[_Watch] = field(default_factory=list)


class CAMCallback(Callback):
    """Class activation maps of the validation / test forward a ``LightningModule`` already
    runs: pictures to the trainer's loggers, WSOL metrics per epoch (see the module doc).

    Args:
        classifier: the module whose forward maps images ``(B, C, H, W)`` to logits
            ``(B, num_classes)``: a module, or a dotted attribute path of the
            ``LightningModule`` (``""``: the module itself). Default: the module itself when
            its forward runs in the step and gives exact maps, else the first child (in
            definition order) that does, read from the first batch's forward (an error lists
            every candidate tried).
        adapter: an explicit :class:`cam_plugin.Adapter` (default: read from the forward).
        every_n_batches: draw batch ``i`` of an epoch when ``i % every_n_batches == 0``.
        max_images: images of a drawn batch in its picture (a strip); ``0`` draws nothing.
        targets: the class mapped in the pictures: top-1 predicted (``"pred"``) or ground
            truth (``"gt"``). The metrics always use the ground-truth class.
        images: ``batch -> (B, C, H, W)`` images to draw on, in the classifier input's pixel
            frame (e.g. before normalization); default: the classifier's own input.
        labels: ``batch -> (B,)`` ground-truth classes or ``None`` (:func:`batch_labels`).
        boxes: ``batch -> `` ground-truth boxes or ``None`` (:func:`batch_boxes`).
        sample_ids: ``batch -> B`` hashable ids or ``None`` (:func:`batch_sample_ids`).
        threshold: CAM box threshold, a fraction of the map's max (paper: 0.2).
        metrics: compute WSOL metrics for batches with labels and boxes.
        metric_options: keyword arguments of :class:`~cam_plugin.metrics.WSOLMetrics`.
        class_names: names for the captions (default: class indices).
        alpha: heat-map weight of the overlay, in ``[0, 1]``.
        colormap: a matplotlib colormap name.
        min_side: images are enlarged (integer factor) to a shorter side of at least this.
    """

    def __init__(
        self,
        classifier: Union[None, str, nn.Module] = None,
        *,
        adapter: Optional[Adapter] = None,
        every_n_batches: int = 1,
        max_images: int = 8,
        targets: Literal["pred", "gt"] = "pred",
        images: Optional[BatchReader] = None,
        labels: BatchReader = batch_labels,
        boxes: BatchReader = batch_boxes,
        sample_ids: BatchReader = batch_sample_ids,
        threshold: float = 0.2,
        metrics: bool = True,
        metric_options: Optional[Mapping[str, Any]] = None,
        class_names: Optional[Sequence[str]] = None,
        alpha: float = 0.5,
        colormap: str = "jet",
        min_side: int = 128,
    ) -> None:
        if classifier is not None and not isinstance(classifier, (str, nn.Module)):
            raise CAMInputError(
                f"{_OWNER}: classifier must be None, an nn.Module or an attribute path of the "
                f"LightningModule (e.g. 'model'), got {type(classifier).__name__}"
            )
        if adapter is not None and not isinstance(adapter, Adapter):
            raise CAMInputError(f"{_OWNER}: adapter must be a cam_plugin.Adapter or None")
        if targets not in ("pred", "gt"):
            raise CAMInputError(f"{_OWNER}: targets must be 'pred' or 'gt', got {targets!r}")
        if not all(map(callable, (images or len, labels, boxes, sample_ids))):
            raise CAMInputError(
                f"{_OWNER}: images (or None), labels, boxes and sample_ids must be callables "
                "batch -> value"
            )
        self.every_n_batches: int = _check("every_n_batches", every_n_batches, int, 1)
        self.style = PictureStyle(
            max_images=_check("max_images", max_images, int, 0),
            threshold=_check("threshold", threshold, float, 0, 1),
            alpha=_check("alpha", alpha, float, 0, 1),
            colormap=colormap,
            class_names=tuple(class_names) if class_names is not None else None,
            min_side=_check("min_side", min_side, int, 1),
        )
        self.metric_options = dict(metric_options or {})
        WSOLMetrics(**self.metric_options)  # wrong options fail here, not at epoch end
        self.targets = targets
        self.metrics = bool(metrics)
        self.read_images, self.read_labels = images, labels
        self.read_boxes, self.read_ids = boxes, sample_ids
        self.classifier = _Classifier(classifier, adapter)
        self._pending: Optional[_Pending] = None
        self._watches: list[_Watch] = []
        self._scores: dict[str, WSOLMetrics] = {}
        self._warned: set[str] = set()
        self._finalizer = weakref.finalize(self, _remove_all, self._watches)

    @property
    def adapter(self) -> Optional[Adapter]:
        """The classifier's adapter (``None`` until the first batch resolved it)."""
        return self.classifier.adapter

    @property
    def installed(self) -> bool:
        """Whether hooks of this callback are on a model now (only inside a step)."""
        return bool(self._watches)

    def remove(self) -> None:
        """Remove every hook this callback installed (idempotent)."""
        _remove_all(self._watches)
        self._pending = None

    # -- Lightning hooks (arguments as in lightning.pytorch.Callback) ------------------------
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exc: BaseException
    ) -> None:
        """The step (or anything) raised: remove the hooks, drop the epoch's records."""
        self.remove()
        self._scores.clear()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remove the hooks (an interrupted run may leave some)."""
        self.remove()

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, *args: Any
    ) -> None:
        """Install the capture when the batch is drawn or scored."""
        self._begin("val", trainer, pl_module, *args)

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        """As :meth:`on_validation_batch_start`."""
        self._begin("test", trainer, pl_module, *args)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        """Remove the capture; the batch's maps, picture and metric records."""
        self._end(trainer, pl_module, batch)

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        """As :meth:`on_validation_batch_end`."""
        self._end(trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Merge the ranks' metric records by sample id and log the WSOL metrics."""
        self._log_metrics(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """As :meth:`on_validation_epoch_end`."""
        self._log_metrics(trainer, pl_module, "test")

    # -- one step ---------------------------------------------------------------------------
    def _begin(
        self,
        stage: str,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.remove()
        if trainer.sanity_checking:
            return
        draw = trainer.is_global_zero and self.style.max_images > 0 and bool(trainer.loggers)
        draw = draw and batch_idx % self.every_n_batches == 0
        labels = self.read_labels(batch)
        boxes = self.read_boxes(batch) if self.metrics and labels is not None else None
        if not draw and boxes is None:
            return
        pending = _Pending(stage, batch_idx, dataloader_idx, draw, labels, boxes)
        try:
            for name, module in self.classifier.candidates(pl_module):
                pending.watches.append(_Watch(name, module, self.classifier.adapter))
                self._watches.append(pending.watches[-1])
                pending.watches[-1].install()
        except BaseException:
            self.remove()
            raise
        self._pending = pending

    def _end(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        pending, self._pending = self._pending, None
        try:
            _remove_all(self._watches)
            if pending is not None:
                device, _ = model_device_dtype(pending.watches[0].module)
                cuda = [device] if device.type == "cuda" else []
                with torch.no_grad(), rng_guard(all_rngs=True, devices=cuda):
                    self._process(trainer, pl_module, batch, pending)
        finally:
            _remove_all(self._watches)

    def _process(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, pending: _Pending
    ) -> None:
        select = functools.partial(self._select, pending)
        found = self.classifier.core_step(pending.watches, select, type(pl_module).__name__)
        if found is None:
            message = f"the classifier did not run in a {pending.stage} step: no maps for it"
            self._warn_once("not-called", f"{_OWNER}: {message}.")
            return
        watch, step = found
        assert watch.inp is not None and step.classes is not None
        hw = (int(watch.inp.shape[-2]), int(watch.inp.shape[-1]))
        bias = step.head.class_bias(step.classes).to(step.maps.dtype)
        exact = self.adapter.exact if self.adapter is not None else True
        raw = CAMResult(step.maps, step.logits, step.classes, bias, hw, exact=exact)
        shown = raw.upsample().normalize()
        if pending.boxes is not None and pending.labels is not None:
            ids = self.read_ids(batch)
            metric = self._scores.setdefault(pending.stage, WSOLMetrics(**self.metric_options))
            metric.update(
                shown.maps[:, -1],
                pending.boxes,
                labels=pending.labels,
                pred_classes=step.logits.argmax(dim=1),
                sample_ids=None if ids is None else [(pending.dataloader_idx, i) for i in ids],
            )
        if pending.draw:
            images = watch.inp if self.read_images is None else self.read_images(batch)
            picture = self.style.draw(images, shown, raw, pending.boxes)
            where = f"batch{pending.batch_idx}"
            where += f"_dl{pending.dataloader_idx}" if pending.dataloader_idx else ""
            stem = f"{pending.stage}_epoch{trainer.current_epoch}_step{trainer.global_step}_{where}"
            for name in log_picture(trainer, f"cam_{pending.stage}/{where}", stem, picture):
                self._warn_once(name, f"{_OWNER}: {name} takes no images; pictures skipped.")

    def _select(self, pending: _Pending, logits: Tensor) -> Tensor:
        """``(B, 1)`` or ``(B, 2)`` classes: the picture's target, then the ground truth."""
        gt = None
        if pending.labels is not None:
            gt = parse_targets(pending.labels.to(logits.device), logits)
        if self.targets == "pred":
            pred = parse_targets(None, logits, topk=1)
            assert pred is not None
            return pred if pending.boxes is None or gt is None else torch.cat([pred, gt], dim=1)
        if gt is None:
            raise CAMInputError(
                f"{_OWNER}: targets='gt' but the labels reader found no labels in the batch; "
                "pass labels=<callable batch -> (B,) classes>"
            )
        return gt

    def _log_metrics(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Every rank logs the same merged values (so any rank can monitor them)."""
        local = self._scores.pop(stage, None)
        if trainer.sanity_checking or not self.metrics:
            return
        with rng_guard(all_rngs=True):
            values = merged_wsol_metrics(local, self.metric_options)
        for key, value in (values or {}).items():
            name = f"cam_{stage}/{key.replace(' ', '_')}"
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=2)


def _check(name: str, value: Any, kind: type, low: int, high: float = math.inf) -> Any:
    """``value`` as ``kind`` (int or float; an int passes as a float) when in ``[low, high]``."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if bad or (kind is int and not isinstance(value, int)) or not low <= value <= high:
        what = "an int" if kind is int else "a number"
        raise CAMInputError(f"{_OWNER}: {name} must be {what} in [{low}, {high}], got {value!r}")
    return kind(value)
