"""``cam-plugin evaluate RUN_DIR``: WSOL metrics of a run's saved maps, without the model.

For every manifest row that decoded and has ground truth (matched by name: the path
relative to the data root, e.g. a COCO ``file_name`` or a wsolevaluation image id), and for
each of its ground-truth classes ``c`` whose map the run stored (``--targets gt``,
``topk+gt`` -- the default for labelled data -- or ``all``):

1. the stored map ``M_c`` (feature resolution) is placed on the original image with the
   recorded geometry (:func:`~cam_plugin.run.outputs.maps_on_image`: cell ``i`` centred at
   ``(offset + stride·i + left + 0.5) / scale − 0.5``) and min-max normalized;
2. it is one sample (id ``"<name>#<c>"``) of :class:`cam_plugin.metrics.WSOLMetrics` with
   the ground-truth boxes of class ``c`` (inclusive original pixels), the label ``c``, the
   run's top-1 and top-5 classes, and the mask of class ``c`` when the ground truth has
   masks (PxAP).

The metrics (top-1 Loc, GT-known Loc, MaxBoxAcc, MaxBoxAccV2, PxAP, Top-5 Loc, ...) are
those of :func:`cam_plugin.metrics.evaluate_wsol` on the same maps; per-class numbers come
from one metric object per class, merged by sample id for the totals. Ground truth without
boxes (ImageFolder) gives the classification numbers only. Written to
``RUN_DIR/evaluation/``: ``metrics.json``, ``report.md`` and ``worst/*.png`` (the samples
with the lowest IoU of the paper's box at the fixed threshold: ground truth red, CAM box
green).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import CAMInputError
from .datasets import GroundTruth, RunData, open_data
from .outputs import maps_on_image, read_manifest, read_maps, run_placement
from .shards import atomic_write_text

__all__ = ["Sample", "evaluate_run", "evaluation_samples", "load_ground_truth"]


@dataclass
class Sample:
    """One (image, ground-truth class) pair ready for the metrics."""

    sample_id: str
    row: dict[str, Any]
    cls: int
    map: np.ndarray  # (h0, w0) normalized, original image
    boxes: np.ndarray  # (n, 4) inclusive, class cls
    mask: Optional[np.ndarray]  # (h0, w0) uint8 0 / 1 / 255, or None


def load_ground_truth(
    run_dir: Path, spec: Optional[str], kind: str, root: Optional[str]
) -> RunData:
    """The ground truth named by ``--gt`` (default: the run's own ``--data``)."""
    meta = json.loads((run_dir / "run.json").read_text())
    if spec is None:
        spec = meta["data"]["spec"]
        kind = meta["data"]["kind"] if kind == "auto" else kind
        root = root or meta["data"]["root"]
    data = open_data(spec, kind, root)
    if data.kind in ("folder", "glob", "list", "dataset"):
        raise CAMInputError(
            f"--gt {spec} is a {data.kind} without ground truth; give a wsolevaluation "
            "metadata folder, a COCO instances JSON or an ImageFolder root"
        )
    return data


def _mask(truth: GroundTruth, cls: int) -> Optional[np.ndarray]:
    if truth.masks is None:
        return None
    mask, ignore = truth.masks(cls)
    out = mask.astype(np.uint8)
    if ignore is not None:
        out[ignore & ~mask] = 255
    return out


def evaluation_samples(
    run_dir: Path, data: RunData, counts: dict[str, int], rank: int = 0, world: int = 1
) -> Iterator[Sample]:
    """The samples of the module doc, in manifest order (the rows with ``index % world ==
    rank``); ``counts`` records what was skipped (``failed``, ``no_ground_truth``,
    ``no_map``)."""
    from ..result import minmax_normalize

    placement = run_placement(run_dir)
    for row in read_manifest(run_dir).to_pylist():
        if int(row["index"]) % world != rank:
            continue
        truth = data.truth.get(row["name"])
        if row["status"] != "ok":
            counts["failed"] += 1
            continue
        if truth is None or not truth.labels:
            counts["no_ground_truth"] += 1
            continue
        maps: Optional[np.ndarray] = None
        for cls in truth.labels:
            if cls not in row["map_classes"]:
                counts["no_map"] += 1
                continue
            if maps is None:
                maps = read_maps(run_dir, row)
            slot = row["map_classes"].index(cls)
            placed = minmax_normalize(maps_on_image(maps[slot : slot + 1], row, placement))[0]
            boxes = truth.boxes[truth.box_classes == cls]
            yield Sample(f"{row['name']}#{cls}", row, cls, placed.numpy(), boxes, _mask(truth, cls))


def _paper_iou(sample: Sample, threshold: float) -> float:
    import torch

    from ..localize import threshold_boxes
    from ..metrics import box_iou

    if not len(sample.boxes):
        return float("nan")
    box = threshold_boxes(torch.from_numpy(sample.map)[None], threshold)[0].numpy()
    return float(box_iou(box[None], sample.boxes).max())


class _Records:
    """One process's share of the samples: per-class metric records, whether the top-1
    class was right, the lowest IoUs, and the skip counts."""

    def __init__(self, interval: float, worst: int) -> None:
        self.interval, self.worst = interval, worst
        self.counts = {"failed": 0, "no_ground_truth": 0, "no_map": 0, "samples": 0}
        self.per_class: dict[int, Any] = {}
        self.right: dict[int, list[bool]] = {}
        self.lows: list[tuple[float, Sample]] = []

    def _metric(self, cls: int) -> Any:
        from ..metrics import WSOLMetrics

        return self.per_class.setdefault(cls, WSOLMetrics(cam_curve_interval=self.interval))

    def add(self, s: Sample) -> None:
        """Record one sample."""
        self.counts["samples"] += 1
        top = s.row["top_classes"]
        self.right.setdefault(s.cls, []).append(top[0] == s.cls)
        if not len(s.boxes) and s.mask is None:
            return
        metric = self._metric(s.cls)
        metric.update(
            s.map[None],
            [s.boxes] if len(s.boxes) else None,
            labels=[s.cls],
            pred_classes=[top[0]],
            top5_classes=np.asarray([top[:5]]) if len(top) >= 5 else None,
            gt_masks=s.mask[None] if s.mask is not None else None,
            sample_ids=[s.sample_id],
        )
        if len(s.boxes):
            self.lows.append((_paper_iou(s, metric.fixed_threshold), s))
            self._trim()

    def _trim(self) -> None:
        self.lows = sorted(self.lows, key=lambda t: (t[0], t[1].sample_id))[: self.worst]

    def share(self) -> dict[str, Any]:
        """A picklable summary (metric states instead of metric objects)."""
        states = {c: m.state() for c, m in self.per_class.items()}
        return {"states": states, "right": self.right, "lows": self.lows, "counts": self.counts}

    def merge(self, share: dict[str, Any]) -> None:
        """Add another process's :meth:`share` (metric records merged by sample id)."""
        for cls, state in share["states"].items():
            self._metric(cls).merge(state)
        for cls, values in share["right"].items():
            self.right.setdefault(cls, []).extend(values)
        self.lows += share["lows"]
        self._trim()
        for k, v in share["counts"].items():
            self.counts[k] += v

    def document(self, run_dir: Path) -> dict[str, Any]:
        """``metrics.json`` (without the pictures)."""
        from ..metrics import WSOLMetrics

        if not self.counts["samples"]:
            raise CAMInputError(
                f"no image of {run_dir} has ground truth with a stored map (skipped: "
                f"{self.counts}); match the run's --data to --gt, and run with --targets gt "
                "or topk+gt"
            )
        total = WSOLMetrics(cam_curve_interval=self.interval)
        total.merge([m.state() for m in self.per_class.values()])
        right = [r for rows in self.right.values() for r in rows]
        metrics: dict[str, Any] = {"Top-1 Cls (all samples)": 100.0 * float(np.mean(right))}
        if self.per_class:
            metrics.update(total.compute())
        classes = {}
        for cls in sorted(self.right):
            entry: dict[str, float] = {
                "samples": len(self.right[cls]),
                "Top-1 Cls": 100.0 * float(np.mean(self.right[cls])),
            }
            if cls in self.per_class:
                entry.update(self.per_class[cls].compute())
            classes[str(cls)] = entry
        return {
            "metrics": metrics,
            "per_class": classes,
            "counts": self.counts,
            "config": total.config(),
        }


def _scaled(box: Any, f: int) -> list[int]:
    """An inclusive box on an image enlarged ``f`` times (each pixel an ``f × f`` block)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return [x0 * f, y0 * f, (x1 + 1) * f - 1, (y1 + 1) * f - 1]


def _draw_worst(
    lows: list[tuple[float, Sample]], data: RunData, folder: Path, threshold: float
) -> list[str]:
    import torch
    from PIL import Image

    from ..images import decode_image
    from ..localize import threshold_boxes
    from ..viz import annotated_overlay
    from .datasets import uint8_rgb

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # a previous evaluation's pictures
        old.unlink()
    items = {it.name: it for it in data.items}
    names = []
    for n, (iou, s) in enumerate(lows):
        item = items.get(s.row["name"])
        if item is None or item.source is None:
            continue
        try:
            decoded = decode_image(item.source)
        except CAMInputError:
            continue
        f = max(1, -(-192 // min(s.map.shape)))  # at least 192 px on the short side
        px = uint8_rgb(decoded).repeat(f, axis=0).repeat(f, axis=1)
        box = threshold_boxes(torch.from_numpy(s.map)[None], threshold)[0].tolist()
        pic = annotated_overlay(
            px,
            s.map.repeat(f, axis=0).repeat(f, axis=1),
            box=_scaled(box, f),
            gt_boxes=[_scaled(b, f) for b in s.boxes],
            text=f"{s.sample_id[-30:]} IoU {iou:.2f}",
        )
        name = f"worst/{n:02d}.png"
        Image.fromarray(pic).save(folder / f"{n:02d}.png")
        names.append(name)
    return names


def _markdown(doc: dict[str, Any], pictures: list[str], run_dir: Path) -> str:
    lines = [f"# Evaluation of `{run_dir}`", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in doc["metrics"].items()]
    lines += ["", f"Samples: {doc['counts']}", "", "## Per class", ""]
    keys = ["samples", "Top-1 Cls", "GT-known Loc", "Top-1 Loc", "MaxBoxAccV2", "PxAP"]
    lines += ["| class | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for cls, entry in doc["per_class"].items():
        cells = [f"{entry[k]:.1f}" if k in entry else "" for k in keys]
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    if pictures:
        lines += ["", "## Worst examples (lowest IoU of the paper's box at 20%)", ""]
        lines += [f"![{p}]({p})" for p in pictures]
    return "\n".join(lines) + "\n"


def evaluate_run(args: argparse.Namespace) -> int:
    """Run ``cam-plugin evaluate`` (module doc); returns the exit status. Under torchrun
    every rank scores the rows ``index % world == rank`` and rank 0 merges the records by
    sample id and writes the files."""
    from .engines import open_group

    run_dir = Path(args.run_dir)
    status = None
    if (run_dir / "run.json").is_file():
        status = json.loads((run_dir / "run.json").read_text()).get("status")
    if status != "complete":
        raise CAMInputError(
            f"{run_dir} is not a finished cam-plugin run (no complete run.json); run "
            "cam-plugin run --out there first, or rerun it to finish"
        )
    if not 0 < args.cam_curve_interval < 1:
        raise CAMInputError(
            f"--cam-curve-interval must be in (0, 1), got {args.cam_curve_interval}"
        )
    data = load_ground_truth(run_dir, args.gt, args.gt_format, args.data_root)
    group = open_group("auto", "cpu")
    try:
        records = _Records(args.cam_curve_interval, max(args.worst, 0))
        for sample in evaluation_samples(run_dir, data, records.counts, group.rank, group.world):
            records.add(sample)
        shares = group.gather(records.share())
        if group.is_main:
            total = _Records(args.cam_curve_interval, max(args.worst, 0))
            for share in shares:
                total.merge(share)
            _write(run_dir, data, total, group.world)
        group.barrier()
    finally:
        group.close()
    return 0


def _write(run_dir: Path, data: RunData, records: _Records, world: int) -> None:
    doc = records.document(run_dir)
    doc["world_size"] = world
    folder = run_dir / "evaluation"
    folder.mkdir(exist_ok=True)
    threshold = float(doc["config"]["fixed_threshold"])
    lows = records.lows
    pictures = _draw_worst(lows, data, folder / "worst", threshold) if lows else []
    doc["worst"] = [
        {"sample": s.sample_id, "iou": iou, "picture": p} for (iou, s), p in zip(lows, pictures)
    ]
    atomic_write_text(folder / "metrics.json", json.dumps(doc, indent=1))
    atomic_write_text(folder / "report.md", _markdown(doc, pictures, run_dir))
    keys = ("Top-1 Loc", "GT-known Loc", "MaxBoxAccV2", "PxAP", "Top-1 Cls (all samples)")
    shown = {k: round(v, 2) for k, v in doc["metrics"].items() if k in keys}
    print(
        f"cam-plugin evaluate: {doc['counts']['samples']} samples: {shown}; wrote "
        f"{folder}/metrics.json, report.md"
    )
