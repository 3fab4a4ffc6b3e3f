"""One batch of a run: logits, the maps of the chosen classes, and their boxes.

:class:`MapComputer` wraps the model in the hook-free :class:`~cam_plugin.export.CAMModule`
(``forward_features`` for timm models, a feature capture otherwise), folds the head once and
per batch computes, under ``torch.inference_mode`` on the model's device:

* ``logits`` ``(B, C)`` and the ``p = min(max(topk, 5), C)`` best classes with their logits
  and softmax probabilities;
* ``M_c = Σ_k W'_ck f_k`` at feature resolution for the *map classes* of every image (see
  :func:`parse_targets_option`), with the identity ``mean_xy M_c + b'_c = S_c`` checked
  through the pooled features on every batch (:meth:`FoldedHead.check_reproduces`);
* the paper's box of each *box class* (the map classes, or the top-``k`` classes for
  ``--targets all``): the map placed on the model's input (cell ``i`` at ``o + s·i``, the
  traced :class:`~cam_plugin.placement.Placement`), min-max normalized, thresholded at
  ``threshold × max``, largest 8-connected component (:func:`cam_plugin.localize.
  threshold_boxes`, one call per batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..errors import CAMInputError
from ..placement import Placement, place_maps
from ..result import minmax_normalize
from ..units import unit_maps as units_of

__all__ = ["TARGET_MODES", "BatchMaps", "MapComputer", "Targets", "parse_targets_option"]

TARGET_MODES = ("auto", "topk", "gt", "topk+gt", "all")
#: a mode of :data:`TARGET_MODES` (``auto`` resolved) or a fixed list of classes
Targets = Union[str, tuple[int, ...]]


def parse_targets_option(text: str, has_labels: bool) -> Targets:
    """``--targets``: ``auto`` (``topk+gt`` when the data has labels, else ``topk``),
    ``topk``, ``gt`` (the ground-truth classes), ``topk+gt`` (both, top-k first), ``all``
    (every class), or a comma-separated list of class indices (``3,5,7``)."""
    text = text.strip()
    if text == "auto":
        return "topk+gt" if has_labels else "topk"
    if text in TARGET_MODES:
        if "gt" in text and not has_labels:
            raise CAMInputError(
                f"--targets {text} needs ground-truth classes, and --data has none (use "
                "an ImageFolder, COCO, wsolevaluation or labelled data set, or --targets topk)"
            )
        return text
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise CAMInputError(
            f"--targets must be one of {', '.join(TARGET_MODES)} or class indices like "
            f"'3,5,7'; got {text!r}"
        ) from None
    if not values or min(values) < 0:
        raise CAMInputError(f"--targets classes must be >= 0, got {text!r}")
    return values


@dataclass
class BatchMaps:
    """The CPU results of one batch (``B`` images that decoded).

    Attributes:
        top_classes, top_logits, top_probs: ``(B, p)`` the best classes, best first.
        map_classes: ``(B, k)`` class of every map (``-1``: padding, an all-zero map).
        maps: ``(B, k, h, w)`` float32 at feature resolution.
        box_classes, box_probs: ``(B, kb)`` class and probability of every box.
        boxes: ``(B, kb, 4)`` int64 inclusive ``(x0, y0, x1, y1)`` on the model's input.
        unit_maps: ``(B, K', h, w)`` float32 unit maps ``u_k`` of the same forward
            (:func:`cam_plugin.units.unit_maps`) when the computer keeps them, else ``None``.
    """

    top_classes: Tensor
    top_logits: Tensor
    top_probs: Tensor
    map_classes: Tensor
    maps: Tensor
    box_classes: Tensor
    box_probs: Tensor
    boxes: Tensor
    unit_maps: Optional[Tensor] = None


class MapComputer:
    """Maps, classes and boxes of a batch (see the module doc).

    Args:
        model: the classifier in eval mode, on ``device``.
        example: a batch of real preprocessed images (resolves the adapter).
        targets: from :func:`parse_targets_option`.
        topk: classes per image for ``topk`` maps and boxes.
        threshold: box threshold, a fraction of each map's maximum.
        gt_width: maps reserved for ground-truth classes per image (``gt`` modes).
        compile: run the features-and-logits forward through ``torch.compile`` (the
            hook-free :class:`~cam_plugin.export.CAMModule` path compiles without graph
            breaks; the first batch, and the first of each new batch size, pays the
            compilation: worth it for long runs only, see ``docs/benchmarks-run.md``).
        unit_maps: also return every batch's unit maps (``BatchMaps.unit_maps``; for
            ``--units``, :mod:`cam_plugin.run.units`).
    """

    def __init__(
        self,
        model: nn.Module,
        example: Tensor,
        *,
        targets: Targets,
        topk: int,
        threshold: float,
        gt_width: int = 1,
        compile: bool = False,
        unit_maps: bool = False,
    ) -> None:
        from ..export import CAMModule

        self.module = CAMModule(model, topk=None, example=example)
        self.adapter = self.module.adapter
        self.forward = self.module.features_and_logits
        if compile:
            self.forward = torch.compile(self.forward)
        with torch.inference_mode():
            features, _ = self.forward(example)
        self.head = self.adapter.fold(int(features.shape[1]))
        self.num_classes = self.head.num_classes
        self.map_size = (int(features.shape[-2]), int(features.shape[-1]))
        self.input_hw = (int(example.shape[-2]), int(example.shape[-1]))
        self.targets, self.threshold, self.gt_width = targets, threshold, max(1, gt_width)
        self.keep_unit_maps = unit_maps
        self.topk = min(topk, self.num_classes)
        self.num_top = min(max(topk, 5), self.num_classes)
        if isinstance(targets, tuple) and max(targets) >= self.num_classes:
            raise CAMInputError(
                f"--targets {','.join(map(str, targets))}: the model has "
                f"{self.num_classes} classes (0..{self.num_classes - 1})"
            )
        self.placement = self._placement(model, example)

    def _placement(self, model: nn.Module, example: Tensor) -> Placement:
        from ..tracing import feature_placement

        try:
            return feature_placement(model, tuple(example.shape[1:]), adapter=self.adapter)
        except Exception:  # noqa: BLE001 - the half-pixel placement is always valid
            found = Placement.half_pixel(self.input_hw, self.map_size)
            return Placement(found.stride, found.offset, source="assumed")

    @property
    def maps_per_image(self) -> int:
        """``k``: maps stored per image."""
        t = self.targets
        if isinstance(t, tuple):
            return len(t)
        return {
            "topk": self.topk,
            "gt": self.gt_width,
            "topk+gt": self.topk + self.gt_width,
            "all": self.num_classes,
        }[t]

    def check_labels(self, labels: Sequence[Sequence[int]], where: str = "--data") -> None:
        """Raise when a ground-truth class is not a class of the model."""
        bad = [c for row in labels for c in row if not 0 <= c < self.num_classes]
        if bad:
            raise CAMInputError(
                f"{where}: ground-truth class {bad[0]} is outside the model's "
                f"{self.num_classes} classes (0..{self.num_classes - 1}); pass "
                "--num-classes or a model trained on these classes"
            )

    def _gt_rows(self, labels: Sequence[Sequence[int]], device: torch.device) -> Tensor:
        self.check_labels(labels)
        rows = torch.full((len(labels), self.gt_width), -1, dtype=torch.long)
        for i, row in enumerate(labels):
            if len(row) > self.gt_width:
                raise CAMInputError(
                    f"an image has {len(row)} ground-truth classes and the run keeps "
                    f"{self.gt_width} per image"
                )
            rows[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        return rows.to(device)

    def map_classes(self, logits: Tensor, labels: Sequence[Sequence[int]]) -> Tensor:
        """``(B, k)`` classes whose maps are stored (``-1`` pads missing labels)."""
        b, device = logits.shape[0], logits.device
        t = self.targets
        if isinstance(t, tuple):
            return torch.as_tensor(t, device=device).expand(b, -1)
        if t == "all":
            return torch.arange(self.num_classes, device=device).expand(b, -1)
        top = logits.topk(self.topk, dim=1).indices
        if t == "topk":
            return top
        gt = self._gt_rows(labels, device)
        return gt if t == "gt" else torch.cat([top, gt], dim=1)

    def __call__(self, images: Tensor, labels: Sequence[Sequence[int]]) -> BatchMaps:
        """The results of one batch of preprocessed images on the model's device."""
        with torch.inference_mode():
            features, logits = self.forward(images)
            if self.adapter.exact:
                self.head.check_reproduces(features, logits, name=self.adapter.name)
            logits = logits.float()
            probs = logits.softmax(dim=1)
            top = logits.topk(self.num_top, dim=1)
            classes = self.map_classes(logits, labels)
            maps = self.head.maps(features, classes.clamp_min(0)).float()
            maps = maps * (classes >= 0)[:, :, None, None]
            box_classes = top.indices[:, : self.topk] if self.targets == "all" else classes
            box_maps = maps if self.targets != "all" else self.head.maps(features, box_classes)
            boxes = self.boxes(box_maps.float())
            units = None
            if self.keep_unit_maps:
                units = units_of(self.head, features).float().cpu().clone()
            return BatchMaps(
                top_classes=top.indices.cpu(),
                top_logits=top.values.cpu(),
                top_probs=probs.gather(1, top.indices).cpu(),
                map_classes=classes.cpu(),
                maps=maps.cpu(),
                box_classes=box_classes.cpu(),
                box_probs=probs.gather(1, box_classes.clamp_min(0)).cpu(),
                boxes=boxes.cpu(),
                unit_maps=units,
            )

    def boxes(self, maps: Tensor) -> Tensor:
        """``(B, k, 4)`` boxes on the input of ``(B, k, h, w)`` maps (module doc)."""
        from ..localize import threshold_boxes

        if maps.shape[1] == 0:
            return torch.zeros((*maps.shape[:2], 4), dtype=torch.long)
        placed = minmax_normalize(place_maps(maps, self.input_hw, self.placement))
        return threshold_boxes(placed, self.threshold)


def placement_dict(placement: Placement) -> dict[str, object]:
    """JSON-ready fields of a placement."""
    return {
        "stride": list(placement.stride),
        "offset": list(placement.offset),
        "source": placement.source,
    }
