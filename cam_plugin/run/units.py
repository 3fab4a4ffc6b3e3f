"""``cam-plugin run --units N``: per-unit top patches over the data set (paper Sec. 5).

While the run computes its maps, every process keeps, for *every* feature unit ``k`` (the
unit maps ``u_k`` of :func:`cam_plugin.units.unit_maps`, so that ``M_c = Σ_k W'_ck u_k``),
the ``--unit-patches`` images where ``max_xy u_k`` is largest and the cell where it is
(:class:`~cam_plugin.unit_patches.UnitPatchCollector`, one per shard). Each shard commits
its collector as ``shards/NNNNN/units.npz`` with its other files, so a resumed run, torchrun
and Ray give the same state. At the end, rank 0 merges the shards' collectors (the merge
does not depend on the split), picks the classes (``--unit-classes``: a list, or ``auto`` =
the run's fixed ``--targets`` list, else its most frequent top-1 classes), their top ``N``
units by weight ``W'_ck`` (:func:`cam_plugin.units.class_units`), decodes the few images
those patches come from and cuts each patch from the *original* image (the box of ``span``
cells around the cell's traced centre, mapped through the preprocessing's resize and crop:
:func:`cam_plugin.unit_patches.box_to_original`). It writes::

    OUT/units/
      class_CCCC_<name>.png   one picture per class: a row per unit, its top patches
      index.json              classes -> units (weight) -> patches, with boxes and images
      patches.parquet         the same, one row per (class, unit, patch)

The unit maps come from the same forward as the class maps: a
:class:`~cam_plugin.run.compute.MapComputer` built with ``unit_maps=True`` returns them with
each batch (``BatchMaps.unit_maps``), and :meth:`RunUnits.add` takes them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from torch import Tensor

from ..errors import CAMInputError
from ..unit_patches import UnitPatchCollector, box_to_original, crop_picture
from ..units import class_units
from .shards import atomic_write_bytes, atomic_write_text, shard_dir

__all__ = [
    "AUTO_CLASSES",
    "UNITS_DIR",
    "UNITS_FILE",
    "RunUnits",
    "check_unit_options",
    "merged_collector",
    "unit_identity",
    "write_unit_patches",
]

UNITS_FILE = "units.npz"
UNITS_DIR = "units"
#: classes drawn by ``--unit-classes auto`` when the run has no fixed ``--targets`` list
AUTO_CLASSES = 8
#: side of every patch in the pictures (pixels)
PATCH_PIXELS = 80


def check_unit_options(options: Any) -> None:
    """Raise :class:`CAMInputError` for ``--units`` / ``--unit-patches`` / ``--unit-span`` /
    ``--unit-classes`` out of range."""
    if options.units < 0:
        raise CAMInputError(f"--units must be >= 0 (0: off), got {options.units}")
    if options.unit_patches < 1:
        raise CAMInputError(f"--unit-patches must be >= 1, got {options.unit_patches}")
    if not options.unit_span > 0:
        raise CAMInputError(f"--unit-span must be > 0 (feature cells), got {options.unit_span}")
    parse_unit_classes(options.unit_classes)


def parse_unit_classes(text: str) -> Optional[tuple[int, ...]]:
    """``--unit-classes``: ``auto`` (``None``) or class indices ``3,5``."""
    if text.strip() == "auto":
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise CAMInputError(
            f"--unit-classes must be 'auto' or class indices like '3,5', got {text!r}"
        ) from None
    if not values or min(values) < 0:
        raise CAMInputError(f"--unit-classes must be classes >= 0, got {text!r}")
    return values


def unit_identity(options: Any) -> dict[str, Any]:
    """What ``--units`` adds to a run's identity: the per-shard state depends only on the
    number of patches kept per unit (classes, ``N`` and span are chosen when drawing)."""
    return {"unit_patches": options.unit_patches} if options.units > 0 else {}


class RunUnits:
    """One process's per-shard collectors of every unit's top images (module doc)."""

    def __init__(
        self, per_unit: int, span: float, classes: Optional[tuple[int, ...]] = None
    ) -> None:
        self.per_unit, self.span, self.classes = per_unit, span, classes
        self.collectors: dict[int, UnitPatchCollector] = {}
        self.computer: Any = None

    @classmethod
    def from_options(cls, options: Any) -> Optional[RunUnits]:
        """``None`` when ``--units`` is 0."""
        if options.units <= 0:
            return None
        return cls(
            options.unit_patches, options.unit_span, parse_unit_classes(options.unit_classes)
        )

    def attach(self, computer: Any) -> None:
        """Use ``computer`` (a :class:`~cam_plugin.run.compute.MapComputer` built with
        ``unit_maps=True``): its classes are checked and its placement and input size give the
        patches' geometry."""
        if self.computer is computer:
            return
        _check_classes(self.classes or (), computer.num_classes)
        self.computer = computer

    def add(self, shard: int, indices: Sequence[int], maps: Optional[Tensor]) -> None:
        """The unit maps ``(B, K', h, w)`` of a batch (``BatchMaps.unit_maps``), for these
        data indices."""
        if maps is None or self.computer is None:
            raise CAMInputError(
                "no unit maps for this batch: build the MapComputer with unit_maps=True and "
                "attach() it first"
            )
        col = self.collectors.get(shard)
        if col is None:
            c = self.computer
            col = UnitPatchCollector(
                per_unit=self.per_unit, placement=c.placement, input_size=c.input_hw, span=self.span
            )
            self.collectors[shard] = col
        col.update(maps, list(indices))

    def write(self, shard: int, folder: Path) -> None:
        """Write the shard's collector into its (temporary) folder and forget it."""
        col = self.collectors.pop(shard, None)
        if col is None:
            return
        import io

        buf = io.BytesIO()
        np.savez(buf, **col.state_dict())  # type: ignore[arg-type]
        atomic_write_bytes(folder / UNITS_FILE, buf.getvalue())


def merged_collector(out: Path, shards: Sequence[int]) -> Optional[UnitPatchCollector]:
    """The merge of every shard's ``units.npz`` (``None`` when none has one)."""
    merged: Optional[UnitPatchCollector] = None
    for s in shards:
        path = shard_dir(out, s) / UNITS_FILE
        if not path.exists():
            continue
        with np.load(path) as state:
            col = UnitPatchCollector.from_state(state)
        merged = col if merged is None else merged.merge(col)
    return merged


def _choose_classes(ctx: Any, table: Any) -> list[int]:
    """``--unit-classes``, else the fixed ``--targets``, else the most frequent top-1."""
    fixed = parse_unit_classes(ctx.options.unit_classes)
    if fixed is None and isinstance(ctx.targets, tuple):
        fixed = ctx.targets
    if fixed is not None:
        return list(dict.fromkeys(fixed))
    rows = table.select(["status", "top_classes"]).to_pylist()
    top1 = [r["top_classes"][0] for r in rows if r["status"] == "ok" and r["top_classes"]]
    counts = np.bincount(np.asarray(top1, np.int64)) if top1 else np.zeros(0, np.int64)
    order = sorted(np.nonzero(counts)[0].tolist(), key=lambda c: (-counts[c], c))
    return order[:AUTO_CLASSES]


def _check_classes(classes: Sequence[int], num_classes: int) -> None:
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise CAMInputError(
            f"--unit-classes {bad[0]} is not a class of the model (0..{num_classes - 1})"
        )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "class"


def _originals(ctx: Any, indices: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Decode the images the patches come from: the original picture and its geometry."""
    from .datasets import RunSamples

    samples = RunSamples(ctx.data, ctx.transform, keep_original=len(ctx.data.items))
    out = {}
    for i in sorted(set(indices)):
        s = samples[i]
        if "prepared" not in s:  # it decoded during the run; a file changed since
            raise CAMInputError(f"cannot re-read {s['item'].path or s['item'].name}: {s['reason']}")
        p = s["prepared"]
        sy, sx = p.scales
        out[i] = {
            "picture": s["original"],
            "scale": sx,
            "scale_y": sy,
            "left": p.left,
            "top": p.top,
        }
    return out


def _patch_rows(
    units: Sequence[int],
    c: int,
    by_unit: dict[int, Any],
    pics: dict[int, dict[str, Any]],
    items: Sequence[Any],
    weights: Tensor,
) -> tuple[list[dict[str, Any]], list[tuple[str, list[np.ndarray]]]]:
    """One class: per unit (best first) its weight and patches (with boxes in original
    pixels), and the ``(label, crops)`` rows of its picture."""
    entries, rows = [], []
    for rank, u in enumerate(units):
        w = float(weights[c, u])
        patches, crops = [], []
        for p in by_unit[u]:
            g = pics[p.sample]
            box = box_to_original(p.box, g["scale"], g["left"], g["top"], g["scale_y"])
            box = box.round(2).tolist()
            crops.append(crop_picture(g["picture"], box, out=PATCH_PIXELS))
            item = items[p.sample]
            patches.append(
                {
                    "rank": p.rank,
                    "activation": round(p.activation, 6),
                    "index": p.sample,
                    "name": item.name,
                    "path": item.path,
                    "cell": list(p.cell),
                    "box_input": [round(v, 2) for v in p.box],
                    "box": box,
                }
            )
        entries.append({"unit": u, "rank": rank, "weight": round(w, 6), "patches": patches})
        rows.append((f"unit {u}\nw = {w:.3g}", crops))
    return entries, rows


def write_unit_patches(ctx: Any, shards: Sequence[int], table: Any) -> Optional[dict[str, Any]]:
    """Rank 0, after the merge: the pictures and the index of ``OUT/units`` (module doc);
    returns the ``units`` entry of ``run.json`` (``None`` when ``--units`` is off)."""
    from ..viz import unit_patches_picture
    from .outputs import require

    opts = ctx.options
    if opts.units <= 0 or ctx.computer is None:
        return None
    head = ctx.computer.head
    classes = _choose_classes(ctx, table)
    _check_classes(classes, head.num_classes)
    col = merged_collector(ctx.out, shards)
    (ctx.out / UNITS_DIR).mkdir(exist_ok=True)
    index: list[dict[str, Any]] = []
    flat: list[dict[str, Any]] = []
    if col is not None and classes:
        ranked = class_units(head, classes, top=opts.units).tolist()
        by_unit = {u: col.records(u) for u in {u for row in ranked for u in row}}
        pics = _originals(ctx, [p.sample for rows in by_unit.values() for p in rows])
        cats = ctx.category_table(head.num_classes)
        weights = head.weight.detach().float().cpu()
        for c, units in zip(classes, ranked):
            name = str(cats[c]["name"])
            picture = f"{UNITS_DIR}/class_{c:04d}_{_slug(name)}.png"
            entries, rows = _patch_rows(units, c, by_unit, pics, ctx.data.items, weights)
            title = f"{name} (class {c}): top units by W'ck, top patches"
            _write_png(ctx.out / picture, unit_patches_picture(title, rows, patch=PATCH_PIXELS))
            index.append({"class": c, "name": name, "picture": picture, "units": entries})
            flat += [
                {
                    "class": c,
                    "class_name": name,
                    "unit_rank": e["rank"],
                    "unit": e["unit"],
                    "weight": e["weight"],
                    **p,
                }
                for e in entries
                for p in e["patches"]
            ]
    doc = {
        "classes": index,
        "units_per_class": opts.units,
        "patches_per_unit": opts.unit_patches,
        "span_cells": opts.unit_span,
        "ranking": "W'_ck, the folded head's class weight (largest first)",
        "activation": "max over cells of the unit map u_k (cam_plugin.units.unit_maps)",
        "boxes": "box: continuous original-image pixels (pixel i covers [i, i + 1)); "
        "box_input: the same on the model input",
    }
    atomic_write_text(ctx.out / UNITS_DIR / "index.json", json.dumps(doc, indent=1))
    pa, pq = require("pyarrow"), require("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(flat), ctx.out / UNITS_DIR / "patches.parquet")
    return {
        "classes": [e["class"] for e in index],
        "pictures": [e["picture"] for e in index],
        "index": f"{UNITS_DIR}/index.json",
        "patches": f"{UNITS_DIR}/patches.parquet",
    }


def _write_png(path: Path, image: np.ndarray) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
