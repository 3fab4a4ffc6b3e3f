"""The mmengine hook that trains a CAM probe inside a detection run.

:class:`CAMProbeHook` decides *when*: it checks the setup before the first iteration
(:mod:`.probe_setup`), arms a capture for each forward of the detector
(:class:`~.probe_capture.ProbeCapture`), takes one step of its own probe per training
iteration, scores and draws at validation (:mod:`.probe_pictures`) and keeps the probe in
its own files (:mod:`.probe_storage`). A plain class here; ``cam_plugin.integrations.mmdet``
registers it in mmengine's root ``HOOKS``.
"""

from __future__ import annotations

import os.path as osp
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from mmengine.dist import (
    all_reduce,
    get_world_size,
    is_main_process,
)
from mmengine.hooks import Hook
from mmengine.logging import print_log
from torch import Tensor

from cam_plugin.errors import CAMInputError

from .common import WarnOnce, no_autocast, unwrap
from .probe_capture import ProbeCapture
from .probe_eval import ProbeEvaluation
from .probe_model import CAMProbe, multi_hot
from .probe_options import parse_probe_options
from .probe_setup import (
    build_probe,
    check_train_labels,
    dataset_classes,
    find_submodule,
    probe_feature_map,
    probe_image_size,
    probe_num_classes,
)
from .probe_storage import (
    find_probe_file,
    probe_folders,
    probe_path,
    probe_state,
    prune_probe_files,
    read_probe_file,
    restore_probe,
    write_probe_file,
)
from .samples import gt_labels

__all__ = ["CAMProbeHook"]

_OWNER = "CAMProbeHook"


def _train_step(
    probe: CAMProbe, optim: torch.optim.Optimizer, pooled: Tensor, targets: Tensor
) -> float:
    """One step of the probe on pooled features ``(n, K)`` and multi-hot ``targets``:
    binary cross-entropy summed over classes, averaged over the ``n`` images; gradients
    averaged over processes. Returns the loss."""
    probe.train()
    with torch.enable_grad(), no_autocast(pooled.device):
        logits = probe.fc(pooled)
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
        loss = loss / pooled.shape[0]
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if get_world_size() > 1:
            for p in probe.parameters():
                if p.grad is not None:
                    all_reduce(p.grad, op="mean")
        optim.step()
    return float(loss.detach())


def _image_targets(
    samples: Sequence[Any], num_classes: Optional[int], device: torch.device, warn: WarnOnce
) -> tuple[Tensor, Tensor]:
    """Multi-hot ``(B, C)`` image-level labels (from ``gt_instances.labels``) and which
    samples have labels ``(B,)``; labels outside ``[0, C)`` are ignored with a warning."""
    assert num_classes is not None
    c = num_classes
    targets, has, dropped = multi_hot([gt_labels(s) for s in samples], c)
    if dropped:
        warn("range", f"labels outside [0, {c}) are ignored (num_classes={c})")
    return targets.to(device), has.to(device)


class CAMProbeHook(Hook):
    """Train a CAM probe on a detector's features during its own training run.

    Every training iteration the hook reads, from the detector's own forward pass, the
    feature map ``f`` of ``feature`` (a submodule of the detector: ``"backbone"``,
    ``"neck"``, ``"backbone.layer3"``, ...; output ``index`` when it returns a tuple, e.g.
    the FPN level of the neck) and the image-level labels (every class in the sample's
    ``gt_instances.labels``), then takes one optimizer step of its own probe
    (:class:`~.probe_model.CAMProbe`: masked GAP + linear, multi-label binary cross-entropy
    summed over classes and averaged over images) on ``f.detach()``. Nothing flows back into the
    detector: its losses, gradients, parameters, modes and RNG streams are exactly those of
    the same run without the hook.

    At validation (and test) it records the probe's scores and reports its multi-label mAP
    as ``cam_probe/mAP`` (logged, and added to the metrics so ``save_best`` can use it), and
    every ``interval`` batches it draws, for the first ``num_images`` images, the CAM of each
    class present (up to ``max_classes``; the probe's top classes when the sample has no
    labels) over the original image, with the paper's box at ``threshold``, through
    ``runner.visualizer.add_image`` (and into ``out_dir`` when given).

    The probe's weights and optimizer state go to their own file,
    ``{work_dir}/cam_probe/iter_{n}.pth``, whenever the runner saves a checkpoint (never
    into the detector's checkpoint), and are loaded back when the runner resumes or loads
    the checkpoint of iteration ``n`` (or from ``load_from``).

    Forward hooks exist only for the detector's forward pass of an iteration: installed
    before it, removed when that forward ends, also when it raises (``always_call``).

    Everything that can be checked is checked before the first iteration: the feature
    module, the output index and that it is a 4-D map (one forward of a random image in
    eval mode, no autograd, RNG streams restored), the training set's labels (one sample
    through the pipeline, RNG streams restored), the number of classes.

    Args:
        feature: dotted path of the submodule whose output is probed.
        index: which output when the module returns a tuple / list (an int, negative counts
            from the end) or a dict (a key); ignored for a single tensor.
        num_classes: classes ``C``; default: the length of the data set's
            ``metainfo['classes']``, else the detector head's ``num_classes``.
        optimizer: the probe's optimizer config (built by mmengine's ``OPTIMIZERS``, e.g.
            ``dict(type='SGD', lr=0.1, momentum=0.9)``).
        interval: draw every ``interval``-th val / test batch.
        num_images: images drawn per drawn batch (0 draws nothing).
        max_classes: overlays per image.
        threshold: the paper's box threshold (fraction of the map's max); ``None``: no box.
        alpha: heat-map weight of the overlays.
        colormap: matplotlib colormap name.
        out_dir: also write the pictures as PNG files to ``{work_dir}/{out_dir}``.
        probe_input_size: ``(H, W)`` of the random image used for the checks (default: 224
            rounded up to the data preprocessor's ``pad_size_divisor``).
        load_from: a probe file to start from (otherwise the file saved with the loaded or
            resumed checkpoint, when it exists).
        max_keep: probe files kept in ``{work_dir}/cam_probe`` (``-1``: all).
        backend_args: mmengine file backend arguments for reading ``img_path``.
    """

    priority = "NORMAL"

    def __init__(
        self,
        feature: str = "backbone",
        index: Union[int, str] = -1,
        num_classes: Optional[int] = None,
        optimizer: Optional[Mapping[str, Any]] = None,
        interval: int = 1,
        num_images: int = 1,
        max_classes: int = 4,
        threshold: Optional[float] = 0.2,
        alpha: float = 0.5,
        colormap: str = "jet",
        out_dir: Optional[str] = None,
        probe_input_size: Optional[Sequence[int]] = None,
        load_from: Optional[str] = None,
        max_keep: int = -1,
        backend_args: Optional[dict] = None,
        **unknown: Any,
    ) -> None:
        given = dict(locals())  # every option under its signature name
        given.pop("self")
        given.update(given.pop("unknown"))
        opts = parse_probe_options(given)
        self.options = opts
        self.feature, self.index = opts.feature, opts.index
        self.num_classes = opts.num_classes
        self.load_from = opts.load_from
        self.probe: Optional[CAMProbe] = None
        self.optim: Optional[torch.optim.Optimizer] = None
        self.classes: Optional[tuple[str, ...]] = None
        self.steps = 0
        self.last_loss: Optional[float] = None
        self.loaded_from: Optional[str] = None
        self._capture: Optional[ProbeCapture] = None
        self._warn_once = WarnOnce(_OWNER)
        self._eval = ProbeEvaluation(opts, self._warn_once)

    # ------------------------------------------------------------------ set-up and checks

    def before_run(self, runner: Any) -> None:
        """Find the probed module, check its output with one forward, build the probe and
        its optimizer (and load ``load_from``)."""
        if self.probe is not None:
            return
        model = unwrap(runner.model)
        module = find_submodule(model, self.feature)
        size = self.options.probe_input_size
        value = probe_feature_map(model, module, self.feature, self.index, size)
        self.classes = dataset_classes(runner)
        self.num_classes = probe_num_classes(self.num_classes, self.classes, model)
        self._capture = ProbeCapture(model, module, self.feature, self.index)
        num_features = int(value.shape[1])
        self.probe, self.optim = build_probe(
            num_features, self.num_classes, value.device, self.options.optimizer or {}
        )
        _, h, w = probe_image_size(model, size)
        print_log(
            f"{_OWNER}: probing {type(model).__name__}.{self.feature}[{self.index}] "
            f"({value.shape[1]} channels, {value.shape[-2]}x{value.shape[-1]} at {h}x{w}) "
            f"for {self.num_classes} classes",
            logger="current",
        )
        if self.load_from is not None:
            self.load(self.load_from)

    def before_train(self, runner: Any) -> None:
        """Check that training samples carry ``gt_instances.labels`` (one sample through the
        pipeline, RNG streams restored)."""
        check_train_labels(runner.train_dataloader.dataset)

    # ------------------------------------------------------------------ capture

    def _arm(self, keep_maps: bool) -> None:
        if self._capture is not None:
            self._capture.arm(keep_maps)

    def _take(self) -> dict[str, Any]:
        batch = self._capture.take() if self._capture is not None else {}
        if "skipped" in batch:
            self._warn_once(*batch["skipped"])
        return batch

    # ------------------------------------------------------------------ training

    def before_train_iter(
        self, runner: Any, batch_idx: int, data_batch: Optional[Any] = None
    ) -> None:
        """Arm the capture for this iteration's forward pass."""
        self._arm(keep_maps=False)

    def after_train_iter(
        self,
        runner: Any,
        batch_idx: int,
        data_batch: Optional[Any] = None,
        outputs: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """Remove the capture and take one probe step on the captured (detached) features."""
        batch = self._take()
        pooled, samples = batch.get("pooled"), batch.get("samples")
        if self.probe is None or self.optim is None or pooled is None or samples is None:
            return
        if len(samples) != pooled.shape[0]:
            self._warn_once("size", "features and data samples differ in batch size; skipped")
            return
        targets, has = _image_targets(samples, self.num_classes, pooled.device, self._warn_once)
        if not bool(has.all()):
            self._warn_once("nolabel", "samples without gt_instances.labels are left out")
        if not bool(has.any()):
            return
        self.last_loss = _train_step(self.probe, self.optim, pooled[has], targets[has])
        self.steps += 1
        runner.message_hub.update_scalar("train/cam_probe_loss", self.last_loss)

    # ------------------------------------------------------------------ evaluation

    def before_val_epoch(self, runner: Any) -> None:
        """Start a new set of probe scores."""
        self._eval.reset()

    before_test_epoch = before_val_epoch

    def before_val_iter(
        self, runner: Any, batch_idx: int, data_batch: Optional[Any] = None
    ) -> None:
        """Arm the capture (keeping the maps when this batch is drawn)."""
        opts = self.options
        self._arm(keep_maps=opts.num_images > 0 and batch_idx % opts.interval == 0)

    before_test_iter = before_val_iter

    def after_val_iter(
        self,
        runner: Any,
        batch_idx: int,
        data_batch: Optional[Any] = None,
        outputs: Optional[Sequence[Any]] = None,
    ) -> None:
        """Score the batch with the probe and draw its CAMs."""
        self._evaluate_batch(runner, "val")

    def after_test_iter(
        self,
        runner: Any,
        batch_idx: int,
        data_batch: Optional[Any] = None,
        outputs: Optional[Sequence[Any]] = None,
    ) -> None:
        """Score the batch with the probe and draw its CAMs."""
        self._evaluate_batch(runner, "test")

    def _evaluate_batch(self, runner: Any, mode: str) -> None:
        batch = self._take()
        pooled, samples = batch.get("pooled"), batch.get("samples")
        if self.probe is None or pooled is None or samples is None:
            return
        if len(samples) != pooled.shape[0]:
            return
        targets, has = _image_targets(samples, self.num_classes, pooled.device, self._warn_once)
        logits = self._eval.score(self.probe, pooled, targets, has)
        drawn = batch.get("features") is not None and batch.get("input_hw") is not None
        if drawn and self._capture is not None:
            model = self._capture.model
            self._eval.draw(runner, self.probe, batch, logits, mode, self.classes, model)

    def after_val_epoch(self, runner: Any, metrics: Optional[dict] = None) -> None:
        """Report the probe's multi-label mAP (``cam_probe/mAP``)."""
        if self.probe is not None:
            self._eval.finish(runner, metrics, "val")

    def after_test_epoch(self, runner: Any, metrics: Optional[dict] = None) -> None:
        """Report the probe's multi-label mAP (``cam_probe/mAP``)."""
        if self.probe is not None:
            self._eval.finish(runner, metrics, "test")

    def after_run(self, runner: Any) -> None:
        """Remove any capture hook still installed."""
        self._take()

    # ------------------------------------------------------------------ saving

    def state_dict(self) -> dict[str, Any]:
        """The probe file's content: weights, optimizer state and what they were trained on."""
        if self.probe is None or self.optim is None:
            raise CAMInputError(f"{_OWNER}: no probe yet (it is built in before_run)")
        classes = list(self.classes) if self.classes else None
        meta = dict(feature=self.feature, index=self.index, classes=classes, steps=self.steps)
        return probe_state(self.probe, self.optim, meta)

    def save(self, path: str) -> None:
        """Write :meth:`state_dict` to ``path``."""
        write_probe_file(path, self.state_dict())

    def load(self, path: str) -> None:
        """Load a probe file written by :meth:`save` (weights and optimizer state).

        Raises:
            CAMInputError: the file is not a probe file, or was trained on another feature
                shape or class count.
        """
        if self.probe is None or self.optim is None:
            raise CAMInputError(f"{_OWNER}: no probe yet (it is built in before_run)")
        what = f"{self.feature}[{self.index}]"
        state = read_probe_file(path, self.probe.num_features, self.probe.num_classes, what)
        self.steps = restore_probe(self.probe, self.optim, state)
        self.loaded_from = path
        print_log(f"{_OWNER}: loaded the probe from {path}", logger="current")

    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        """Save the probe next to the checkpoint, as ``cam_probe/iter_{n}.pth`` (own file)."""
        if self.probe is None or not is_main_process():
            return
        path = probe_path(runner.work_dir, int(checkpoint.get("meta", {}).get("iter", runner.iter)))
        self.save(path)
        prune_probe_files(osp.dirname(path), self.options.max_keep)

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        """Load the probe saved with this checkpoint (resume / ``load_from``), if any."""
        if self.probe is None or self.load_from is not None:
            return
        it = checkpoint.get("meta", {}).get("iter")
        if it is None:
            return
        source = runner.cfg.get("load_from") if getattr(runner, "cfg", None) else None
        folders = probe_folders(runner.work_dir, source)
        path = find_probe_file(folders, int(it))
        if path is not None:
            self.load(path)
            return
        self._warn_once(
            "resume",
            f"no probe file for iteration {it} in {' or '.join(folders)}; the probe starts "
            "from scratch",
        )
