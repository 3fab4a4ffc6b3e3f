"""The files of a run, how a shard writes them, how they are merged and read back.

Per shard (``OUT/shards/NNNNN/``, committed atomically by :func:`~cam_plugin.run.shards.
commit_shard`):

* ``maps.zarr``: a zarr v3 array ``(n, k, h, w)`` (float32, or float16 with ``--float16``)
  of the shard's images that decoded, at feature resolution; one chunk per image inside one
  zarr shard file, so reading image ``r`` reads one chunk. Its attributes hold the
  placement (cell ``i`` of the map is centred on input pixel ``offset + stride·i``) and the
  model's input size.
* ``manifest.parquet``: one row per image (:data:`MANIFEST_FIELDS`), failures included;
* ``boxes.json``: the shard's COCO results.

Merged by the last step of a run (rank 0): ``OUT/manifest.parquet`` (every row, by index),
``OUT/boxes.json`` (COCO *results*: a list of ``{image_id, category_id, bbox: [x, y, w, h],
score}`` that ``COCO.loadRes`` takes as is) and ``OUT/boxes_coco.json`` (the same boxes as a
COCO data set with its ``images`` and ``categories`` tables, loadable with ``COCO(path)``).

Geometry back to the original image: the model saw the crop of the image resized by
``scale`` horizontally and ``scale_y`` vertically (the same unless the preprocessing warps
the aspect ratio, as some HuggingFace image processors do) at offset ``(left, top)``; a crop
pixel ``u`` is the original point ``(u + left + 0.5) / scale − 0.5`` (``y`` likewise with
``scale_y`` and ``top``), so on the original image cell ``i`` is centred at
``(offset + stride·i + left + 0.5) / scale − 0.5`` (:func:`image_placement`);
:func:`maps_on_image` resamples the stored maps there (or at any size). Boxes in the
manifest and in ``boxes.json`` are continuous original-image coordinates (pixel ``i``
covers ``[i, i + 1)``), clipped to the image.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import CAMInputError
from ..placement import Placement, place_maps
from ..preprocess import box_to_original
from .shards import SHARDS_DIR, atomic_write_bytes, atomic_write_text, shard_dir

__all__ = [
    "MANIFEST_FIELDS",
    "ShardBuffer",
    "image_placement",
    "maps_on_image",
    "merge_outputs",
    "pixel_box_to_original",
    "read_manifest",
    "read_maps",
    "require",
    "row_scale_y",
    "run_placement",
]

#: the manifest's columns: name -> (pyarrow type name, meaning)
MANIFEST_FIELDS: dict[str, tuple[str, str]] = {
    "index": ("int64", "position in the data"),
    "name": ("string", "unique name (path relative to the data root, or the index)"),
    "path": ("string", "the file as found (null for data-set samples)"),
    "image_id": ("int64", "COCO image id (COCO data), else index + 1"),
    "status": ("string", "'ok' or 'failed'"),
    "reason": ("string", "why it failed (null when ok)"),
    "height": ("int32", "original height"),
    "width": ("int32", "original width"),
    "labels": ("list<int64>", "ground-truth classes when known"),
    "top_classes": ("list<int64>", "the best max(topk, 5) classes, best first"),
    "top_logits": ("list<float32>", "their logits"),
    "top_probs": ("list<float32>", "their softmax probabilities"),
    "map_classes": ("list<int64>", "class of every stored map (-1: padding)"),
    "box_classes": ("list<int64>", "class of every box"),
    "box_probs": ("list<float32>", "probability of every box's class"),
    "boxes": ("list<list<float64>>", "[x0, y0, x1, y1] continuous, original image"),
    "boxes_input": ("list<list<int64>>", "inclusive (x0, y0, x1, y1) on the model input"),
    "maps_store": ("string", "zarr array of its maps, relative to the run folder"),
    "maps_row": ("int64", "row of its maps in that array (-1 when failed)"),
    "scale": ("float64", "horizontal resize factor of the preprocessing (resized / original)"),
    "scale_y": ("float64", "vertical resize factor (= scale unless the resize warps)"),
    "left": ("int32", "crop offset x in resized pixels"),
    "top": ("int32", "crop offset y in resized pixels"),
    "decode": ("string", "source mode / bits / scaling as JSON"),
    "overlay": ("string", "overlay PNG relative to the run folder (null: none)"),
}


def require(module: str, extra: str = "run") -> Any:
    """``import module`` or a one-line error naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise CAMInputError(
            f"this needs {module.split('.')[0]}, which is not installed: "
            f"pip install 'cam-plugin[{extra}]'"
        ) from err


def _schema() -> Any:
    pa = require("pyarrow")
    simple = {
        "int64": pa.int64(),
        "int32": pa.int32(),
        "float64": pa.float64(),
        "string": pa.string(),
        "list<int64>": pa.list_(pa.int64()),
        "list<float32>": pa.list_(pa.float32()),
        "list<list<float64>>": pa.list_(pa.list_(pa.float64())),
        "list<list<int64>>": pa.list_(pa.list_(pa.int64())),
    }
    return pa.schema([(k, simple[t]) for k, (t, _) in MANIFEST_FIELDS.items()])


def pixel_box_to_original(
    box: Sequence[int],
    scale: float,
    left: int,
    top: int,
    size: tuple[int, int],
    scale_y: Optional[float] = None,
) -> list[float]:
    """An inclusive pixel box ``(x0, y0, x1, y1)`` of the model's input as continuous
    original coordinates ``[(x0 + left) / s_x, (y0 + top) / s_y, (x1 + 1 + left) / s_x,
    (y1 + 1 + top) / s_y]`` (:func:`cam_plugin.preprocess.box_to_original` of the pixels'
    outer edges), clipped to ``[0, w0] × [0, h0]`` and rounded to 0.01 px."""
    h0, w0 = size
    x0, y0, x1, y1 = (float(v) for v in box)
    vals = box_to_original([x0, y0, x1 + 1, y1 + 1], scale, left, top, scale_y=scale_y)
    lim = [w0, h0, w0, h0]
    return [round(min(max(float(v), 0.0), float(m)), 2) for v, m in zip(vals, lim)]


def image_placement(
    placement: Placement, scale: float, left: int, top: int, scale_y: Optional[float] = None
) -> Placement:
    """The placement of the map cells on the *original* image (module doc; ``scale_y``
    defaults to ``scale``)."""
    sy, sx = placement.stride
    oy, ox = placement.offset
    ry = scale if scale_y is None else scale_y
    return Placement(
        (sy / ry, sx / scale),
        ((oy + top + 0.5) / ry - 0.5, (ox + left + 0.5) / scale - 0.5),
        source=placement.source,
    )


def row_scale_y(row: Mapping[str, Any]) -> float:
    """A manifest row's vertical scale (``scale`` for runs written before ``scale_y``)."""
    value = row.get("scale_y")
    return float(row["scale"] if value is None else value)


def maps_on_image(
    maps: Any,
    row: Mapping[str, Any],
    placement: Placement,
    size: Optional[Sequence[int]] = None,
) -> Tensor:
    """``(k, h, w)`` stored maps of manifest ``row`` resampled onto its original image
    ``(k, h0, w0)``, or onto the image resized to ``size`` ``(H, W)``, each cell centred
    where it sits (bilinear between cells, constant beyond the outermost centres)."""
    t = torch.as_tensor(np.asarray(maps, dtype=np.float32))
    orig = (int(row["height"]), int(row["width"]))
    where = image_placement(
        placement, float(row["scale"]), int(row["left"]), int(row["top"]), row_scale_y(row)
    )
    target = orig if size is None else (int(size[0]), int(size[1]))
    return place_maps(t, target, where.rescaled(orig, target))


def run_placement(run_dir: str | Path) -> Placement:
    """The placement recorded in ``run.json``."""
    meta = json.loads((Path(run_dir) / "run.json").read_text())["maps"]["placement"]
    return Placement(tuple(meta["stride"]), tuple(meta["offset"]), source=meta["source"])


def read_manifest(run_dir: str | Path) -> Any:
    """The merged manifest as a ``pyarrow.Table``."""
    pq = require("pyarrow.parquet")
    return pq.read_table(Path(run_dir) / "manifest.parquet")


def read_maps(run_dir: str | Path, row: Mapping[str, Any]) -> np.ndarray:
    """``(k, h, w)`` float32 maps of one manifest row (random access: one chunk read)."""
    zarr = require("zarr")
    if row["status"] != "ok" or int(row["maps_row"]) < 0:
        raise CAMInputError(f"{row['name']} has no maps ({row['reason']})")
    arr = zarr.open_array(str(Path(run_dir) / row["maps_store"]), mode="r")
    return np.asarray(arr[int(row["maps_row"])], dtype=np.float32)


class ShardBuffer:
    """The rows, maps and COCO results of one shard until it is written."""

    def __init__(self, shard: int, category_ids: Sequence[int]) -> None:
        self.shard = shard
        self.store = f"{SHARDS_DIR}/{shard_dir(Path('.'), shard).name}/maps.zarr"
        self.category_ids = list(category_ids)
        self.rows: list[dict[str, Any]] = []
        self.maps: list[np.ndarray] = []
        self.results: list[dict[str, Any]] = []
        self.overlays: list[tuple[np.ndarray, np.ndarray, list[float], str]] = []

    def _row(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        item = sample["item"]
        row: dict[str, Any] = {k: None for k in MANIFEST_FIELDS}
        row.update(
            index=item.index,
            name=item.name,
            path=item.path,
            image_id=item.image_id,
            labels=list(sample.get("labels", ())),
            maps_store=None,
            maps_row=-1,
        )
        return row

    def add_failure(self, sample: Mapping[str, Any]) -> None:
        """A sample that could not be read."""
        row = self._row(sample)
        row.update(status="failed", reason=sample["reason"])
        self.rows.append(row)

    def _category(self, cls: int) -> int:
        return self.category_ids[cls] if 0 <= cls < len(self.category_ids) else cls

    def add_image(
        self, sample: Mapping[str, Any], res: Any, i: int, overlay: Optional[str]
    ) -> None:
        """Image ``i`` of the batch result ``res`` (:class:`~.compute.BatchMaps`)."""
        prep = sample["prepared"]
        size = tuple(prep.original_size)
        row = self._row(sample)
        boxes_in = res.boxes[i].tolist()
        valid = [j for j, c in enumerate(res.box_classes[i].tolist()) if c >= 0]
        sy, sx = prep.scales
        boxes = [
            pixel_box_to_original(boxes_in[j], sx, prep.left, prep.top, size, sy) for j in valid
        ]
        box_classes = [int(res.box_classes[i, j]) for j in valid]
        box_probs = [float(res.box_probs[i, j]) for j in valid]
        row.update(
            status="ok",
            height=size[0],
            width=size[1],
            top_classes=res.top_classes[i].tolist(),
            top_logits=res.top_logits[i].tolist(),
            top_probs=res.top_probs[i].tolist(),
            map_classes=res.map_classes[i].tolist(),
            box_classes=box_classes,
            box_probs=box_probs,
            boxes=boxes,
            boxes_input=[boxes_in[j] for j in valid],
            maps_store=self.store,
            maps_row=len(self.maps),
            scale=float(sx),
            scale_y=float(sy),
            left=int(prep.left),
            top=int(prep.top),
            decode=json.dumps(sample["decode"], sort_keys=True),
            overlay=overlay,
        )
        self.rows.append(row)
        self.maps.append(res.maps[i].numpy())
        for box, cls, prob in zip(boxes, box_classes, box_probs):
            x0, y0, x1, y1 = box
            self.results.append(
                {
                    "image_id": int(item_id(row)),
                    "category_id": self._category(cls),
                    "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                    "score": round(prob, 6),
                }
            )
        if overlay is not None and "original" in sample and valid:
            slot = row["map_classes"].index(box_classes[0])
            self.overlays.append((sample["original"], res.maps[i, slot].numpy(), boxes[0], overlay))

    def write_overlays(self, out: Path, placement: Placement) -> None:
        """The overlays of this shard (PNG, original size: the top map placed on the image,
        min-max normalized, with its box), each written atomically to ``out / name``."""
        import io

        from PIL import Image

        from ..result import minmax_normalize
        from ..viz import annotated_overlay

        by_path = {r["overlay"]: r for r in self.rows if r.get("overlay")}
        for original, cam_map, box, rel in self.overlays:
            placed = maps_on_image(cam_map[None], by_path[rel], placement)
            inclusive = [
                int(np.floor(box[0])),
                int(np.floor(box[1])),
                max(int(np.ceil(box[2])) - 1, 0),
                max(int(np.ceil(box[3])) - 1, 0),
            ]
            pic = annotated_overlay(original, minmax_normalize(placed)[0].numpy(), box=inclusive)
            data = io.BytesIO()
            Image.fromarray(pic).save(data, format="PNG")
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out / rel, data.getvalue())

    def write(self, folder: Path, float16: bool, attributes: dict[str, Any]) -> dict[str, Any]:
        """Write ``maps.zarr``, ``manifest.parquet`` and ``boxes.json`` into ``folder``;
        returns the counts for the completion marker."""
        zarr = require("zarr")
        pq = require("pyarrow.parquet")
        pa = require("pyarrow")
        k, h, w = attributes["maps_shape"]
        dtype = np.float16 if float16 else np.float32
        data = np.stack(self.maps).astype(dtype) if self.maps else np.zeros((0, k, h, w), dtype)
        n = int(data.shape[0])
        arr = zarr.create_array(
            store=str(folder / "maps.zarr"),
            shape=data.shape,
            dtype=dtype,
            chunks=(1, k, h, w),
            shards=(n, k, h, w) if n else None,
            attributes=attributes,
            fill_value=0,
        )
        if n:
            arr[:] = data
        rows = sorted(self.rows, key=lambda r: int(r["index"]))
        table = pa.Table.from_pylist(rows, schema=_schema())
        pq.write_table(table, folder / "manifest.parquet")
        (folder / "boxes.json").write_text(json.dumps(self.results))
        failed = sum(1 for r in self.rows if r["status"] != "ok")
        return {"shard": self.shard, "images": len(self.rows), "ok": n, "failed": failed}


def item_id(row: Mapping[str, Any]) -> int:
    """The COCO image id of a manifest row."""
    return int(row["image_id"])


def _coco_tables(
    rows: list[dict[str, Any]], results: list[dict[str, Any]], categories: list[dict[str, Any]]
) -> dict[str, Any]:
    images = [
        {
            "id": int(r["image_id"]),
            "file_name": r["name"],
            "width": int(r["width"]),
            "height": int(r["height"]),
        }
        for r in rows
        if r["status"] == "ok"
    ]
    anns = []
    for n, res in enumerate(results, start=1):
        _, _, bw, bh = res["bbox"]
        anns.append({**res, "id": n, "area": round(bw * bh, 4), "iscrowd": 0})
    return {
        "info": {"description": "cam-plugin run: CAM boxes (paper rule)"},
        "images": images,
        "categories": [{"id": int(c["id"]), "name": str(c["name"])} for c in categories],
        "annotations": anns,
    }


def merge_outputs(out: Path, shards: Sequence[int], categories: list[dict[str, Any]]) -> Any:
    """Merge the shards' small files into ``manifest.parquet``, ``boxes.json`` and
    ``boxes_coco.json`` (each written atomically); returns the merged table."""
    pq = require("pyarrow.parquet")
    pa = require("pyarrow")
    tables = [pq.read_table(shard_dir(out, s) / "manifest.parquet") for s in shards]
    table = pa.concat_tables(tables) if tables else _schema().empty_table()
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(out / "manifest.parquet", sink.getvalue().to_pybytes())
    results: list[dict[str, Any]] = []
    for s in shards:
        results += json.loads((shard_dir(out, s) / "boxes.json").read_text())
    atomic_write_text(out / "boxes.json", json.dumps(results))
    coco = _coco_tables(table.to_pylist(), results, categories)
    atomic_write_text(out / "boxes_coco.json", json.dumps(coco))
    return table
