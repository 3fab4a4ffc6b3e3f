"""The CAM probe at validation / test: its scores over an epoch and the pictures it draws.

:class:`ProbeEvaluation` keeps one ``(scores, targets)`` record per labelled image, reports
the multi-label mAP of the epoch (gathered over processes) as ``cam_probe/mAP``, and draws
the strips of the batches the hook chose (:mod:`.probe_pictures`).
"""

from __future__ import annotations

import math
import os.path as osp
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch
from mmengine.dist import broadcast_object_list, collect_results, get_world_size, is_main_process
from mmengine.runner import BaseLoop
from torch import Tensor, nn

from .common import WarnOnce, no_autocast, safe_name
from .probe_model import CAMProbe, multilabel_average_precision
from .probe_options import ProbeOptions
from .probe_pictures import classes_to_draw, input_picture, probe_picture, read_picture, write_png
from .samples import gt_labels, metainfo

__all__ = ["ProbeEvaluation", "gathered_map"]


def gathered_map(records: list[tuple[np.ndarray, np.ndarray]], size: int) -> float:
    """The multi-label mAP of every process's ``(scores, targets)`` records (``nan`` when
    there are none), the same value on every process."""
    gathered = collect_results(records, size, "cpu")
    value = [float("nan")]
    if is_main_process() and gathered:
        scores = torch.from_numpy(np.stack([r[0] for r in gathered]))
        targets = torch.from_numpy(np.stack([r[1] for r in gathered]))
        value = [multilabel_average_precision(scores, targets)[0]]
    if get_world_size() > 1:
        broadcast_object_list(value)
    return value[0]


class ProbeEvaluation:
    """Scores and pictures of the probe for one val / test epoch at a time.

    Args:
        options: the hook's options (``num_images``, ``max_classes``, ``threshold``,
            ``alpha``, ``colormap``, ``out_dir``, ``backend_args``).
        warn: the hook's one-warning-per-kind logger.
    """

    def __init__(self, options: ProbeOptions, warn: WarnOnce) -> None:
        self.options = options
        self.warn = warn
        self.records: list[tuple[np.ndarray, np.ndarray]] = []
        self.without_labels = 0
        self.drawn = 0

    def reset(self) -> None:
        """Start a new epoch's records."""
        self.records = []
        self.without_labels = 0

    def score(self, probe: CAMProbe, pooled: Tensor, targets: Tensor, has: Tensor) -> Tensor:
        """The probe's logits ``(B, C)`` of a batch; one record per image with labels."""
        with torch.no_grad(), no_autocast(pooled.device):
            logits = probe.fc(pooled)
        scores = logits.float().cpu().numpy()
        tgt = targets.cpu().numpy().astype(np.uint8)
        for i in range(len(scores)):
            if bool(has[i]):
                self.records.append((scores[i], tgt[i]))
            else:
                self.without_labels += 1
        return logits

    def finish(self, runner: Any, metrics: Optional[dict], mode: str) -> None:
        """Report the epoch's mAP (``{mode}/cam_probe/mAP`` in the message hub and
        ``cam_probe/mAP`` in ``metrics``) and clear the records."""
        dataset = getattr(getattr(runner, f"{mode}_dataloader", None), "dataset", None)
        size = len(dataset) if dataset is not None else len(self.records)
        value = gathered_map(self.records, size)
        self.records = []
        if self.without_labels:
            self.warn(
                f"{mode}-labels",
                f"{self.without_labels} {mode} samples have no gt_instances.labels and are not "
                "counted in cam_probe/mAP",
            )
        if math.isnan(value):
            return
        runner.message_hub.update_scalar(f"{mode}/cam_probe/mAP", value)
        if metrics is not None:
            metrics["cam_probe/mAP"] = value

    def _picture(
        self, meta: Mapping[str, Any], batch: dict[str, Any], index: int, model: nn.Module
    ) -> np.ndarray:
        """The original image (``img_path``), else the network input un-padded and resized."""
        path = meta.get("img_path")
        if path:
            try:
                picture = read_picture(path, self.options.backend_args)
                if picture is not None:
                    return picture
            except Exception as err:  # a picture is never worth a crash
                self.warn("read", f"could not read {path} ({err}); drawing the input")
        pre = getattr(model, "data_preprocessor", None)
        bgr = not getattr(pre, "_channel_conversion", True)  # mmcv loads BGR
        inputs = batch.get("inputs")
        image = inputs[index] if inputs is not None else None
        return input_picture(image, batch["input_hw"], meta, bgr)

    def draw(
        self,
        runner: Any,
        probe: CAMProbe,
        batch: dict[str, Any],
        logits: Tensor,
        mode: str,
        classes: Optional[tuple[str, ...]],
        model: nn.Module,
    ) -> None:
        """Draw the strips of the first ``num_images`` images of a batch kept with its maps
        and send them to ``runner.visualizer`` (and ``out_dir``), step = the training
        iteration (0 in a val / test-only run)."""
        opts = self.options
        loop = getattr(runner, "_train_loop", None)  # no train loop built in val/test runs
        step = int(runner.iter) if isinstance(loop, BaseLoop) else 0
        features, samples = batch["features"], batch["samples"]
        probs = logits.sigmoid().cpu()
        for i in range(min(opts.num_images, len(samples))):
            chosen = classes_to_draw(gt_labels(samples[i]), probs[i], opts.max_classes)
            if chosen.numel() == 0:
                continue
            meta = metainfo(samples[i])
            captions = [
                f"{classes[c] if classes is not None and c < len(classes) else c} "
                f"p={float(probs[i, c]):.2f}"
                for c in chosen.tolist()
            ]
            strip = probe_picture(
                probe,
                features[i : i + 1],
                chosen,
                captions,
                self._picture(meta, batch, i, model),
                batch["input_hw"],
                meta,
                threshold=opts.threshold,
                alpha=opts.alpha,
                colormap=opts.colormap,
            )
            ident = meta.get("img_id", meta.get("sample_idx", f"{self.drawn}"))
            self.drawn += 1
            name = f"cam_probe_{mode}_{safe_name(ident)}"
            runner.visualizer.add_image(name, strip, step=step)
            if opts.out_dir is not None and is_main_process():
                write_png(osp.join(runner.work_dir, opts.out_dir), f"{name}_{step}", strip)
