"""What ``--data`` names, as a list of lazily decoded items with their ground truth.

:func:`open_data` recognises (``kind`` in parentheses; ``--data-format`` forces one):

* a folder, searched recursively (``folder``); with ``--data-format imagefolder`` a
  torchvision ``ImageFolder`` layout (``imagefolder``: ``ROOT/<class>/<image>``, class index
  = position of the folder name in sorted order, used as the target and for metrics);
* a glob such as ``'photos/**/*.jpg'`` (``glob``; ``**`` matches any depth);
* a text file with one image path per line, relative to the file's folder or absolute
  (``list``; blank lines and lines starting with ``#`` are skipped);
* a COCO *instances* JSON (``coco``): ``images`` / ``annotations`` / ``categories``; the
  image files are found under ``--data-root`` or next to the JSON; class ``i`` of the model
  is the ``i``-th category in increasing ``id`` order;
* a folder with the metadata of clovaai/wsolevaluation (``wsol``): ``image_ids.txt``,
  optionally ``class_labels.txt`` (``path,label``) and ``localization.txt``
  (``path,x0,y0,x1,y1`` boxes, several lines per image allowed, or ``path,mask,ignore``
  masks); image paths are relative to ``--data-root`` (default: the metadata folder);
* ``package.module:function`` returning a ``torch.utils.data.Dataset`` (``dataset``): a
  sample is an image (tensor ``(C, H, W)`` in ``[0, 1]``, array ``(H, W[, C])`` or PIL
  image), a tuple ``(image, label, ...)``, or a dict with ``image`` (or ``img``) and
  optionally ``label``.

Every item gets a unique ``name`` (the ``/``-separated path relative to the data root, or
the index for data sets), an ``image_id`` (COCO's id, otherwise ``index + 1``) and its
ground-truth classes when the data has them. :class:`GroundTruth` holds boxes (inclusive
``(x0, y0, x1, y1)`` in original-image pixels) and masks for ``cam-plugin evaluate``.
Nothing is decoded here: :class:`RunSamples` decodes one item per ``__getitem__`` (in
DataLoader workers) and never raises for a bad file.
"""

from __future__ import annotations

import dataclasses
import glob as globmod
import hashlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import CAMInputError
from ..images import DecodedImage, decode_array, decode_image
from ..inputs import IMAGE_SUFFIXES, collect_images

__all__ = [
    "DATA_KINDS",
    "GroundTruth",
    "RunData",
    "RunItem",
    "RunSamples",
    "open_data",
    "split_sample",
    "uint8_rgb",
]

#: ``masks(cls) -> (mask, ignore or None)``, bool arrays at the image's size
MaskLoader = Callable[[int], tuple[np.ndarray, Optional[np.ndarray]]]
DATA_KINDS = ("auto", "folder", "imagefolder", "glob", "list", "coco", "wsol", "dataset")
_GLOB_CHARS = set("*?[")
_NO_PICTURE = np.zeros((0, 0, 3), np.uint8)


@dataclass(frozen=True)
class RunItem:
    """One input: ``index`` (position in the data), ``name`` (unique), ``source`` (a path,
    or ``None`` for data-set samples), ``path`` (for messages), ``image_id`` and the
    ground-truth ``labels`` (model class indices; empty when unknown)."""

    index: int
    name: str
    source: Optional[str]
    path: Optional[str]
    image_id: int
    labels: tuple[int, ...] = ()


@dataclass
class GroundTruth:
    """Ground truth of one image: ``labels`` (classes), ``boxes`` int64 ``(n, 4)`` inclusive
    ``(x0, y0, x1, y1)`` in original-image pixels (may be empty), ``box_classes`` ``(n,)``
    the class of each box, and ``masks`` (``masks(cls)`` returns the ``(mask, ignore)``
    bool arrays of class ``cls`` at the image's size; ``ignore`` may be ``None``), or
    ``None``."""

    labels: tuple[int, ...]
    boxes: np.ndarray
    box_classes: np.ndarray
    masks: Optional[MaskLoader] = None

    @classmethod
    def make(
        cls,
        labels: tuple[int, ...],
        boxes: Sequence[Sequence[float]] = (),
        box_classes: Sequence[int] = (),
        masks: Optional[MaskLoader] = None,
    ) -> GroundTruth:
        """Boxes rounded to int64 pixels; ``box_classes`` default to the first label."""
        arr = np.rint(np.asarray(boxes, np.float64).reshape(-1, 4)).astype(np.int64)
        if len(box_classes) != len(arr):
            box_classes = [labels[0] if labels else -1] * len(arr)
        return cls(labels, arr, np.asarray(box_classes, np.int64).reshape(-1), masks)


@dataclass
class RunData:
    """The items of ``--data`` and what is known about them.

    Attributes:
        kind: one of :data:`DATA_KINDS` (never ``auto``).
        spec: ``--data`` as given.
        root: the folder names are relative to (``None`` for data sets).
        items: the inputs, in a fixed order.
        categories: ``[{"id", "name", "class"}]``: COCO category ids / names per model
            class (empty when the data names no classes).
        truth: ground truth by item name (boxes / masks / labels; empty when unknown).
        files: annotation files read (hashed into the fingerprint).
        dataset: the ``Dataset`` object for ``kind == "dataset"``.
    """

    kind: str
    spec: str
    root: Optional[str]
    items: list[RunItem]
    categories: list[dict[str, Any]] = field(default_factory=list)
    truth: dict[str, GroundTruth] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    dataset: Any = None

    @property
    def has_labels(self) -> bool:
        """Whether the items carry ground-truth classes (data sets: decided per sample)."""
        return self.kind == "dataset" or any(item.labels for item in self.items)

    def fingerprint(self) -> str:
        """sha256 of the kind, every item's name and (for files) byte size, and the bytes
        of the annotation files: changes when the data changes, not when it moves."""
        h = hashlib.sha256(f"{self.kind}\n{len(self.items)}\n".encode())
        for item in self.items:
            size = -1
            if item.source is not None:
                try:
                    size = os.stat(item.source).st_size
                except OSError:
                    size = -2
            h.update(f"{item.name}\t{size}\t{item.labels}\n".encode())
        for name in self.files:
            with open(name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        if self.dataset is not None:
            h.update(str(getattr(self.dataset, "fingerprint", "")).encode())
        return h.hexdigest()


# --------------------------------------------------------------------------- recognise


def _is_function_spec(spec: str) -> bool:
    module, sep, func = spec.partition(":")
    return bool(sep) and module.replace(".", "").replace("_", "").isalnum() and func.isidentifier()


def _detect(spec: str) -> str:
    path = Path(spec)
    if path.is_dir():
        return "wsol" if (path / "image_ids.txt").is_file() else "folder"
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco"
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return "list"  # a single image: a list of one
        return "list"
    if _GLOB_CHARS & set(spec):
        return "glob"
    if _is_function_spec(spec):
        return "dataset"
    raise CAMInputError(f"--data {spec}: no such file or folder (nor a glob or module:function)")


def open_data(
    spec: str,
    kind: str = "auto",
    root: Optional[str] = None,
    exclude: Sequence[str] = (),
) -> RunData:
    """The items of ``--data spec`` (see the module doc); ``root`` is ``--data-root``;
    files under a folder of ``exclude`` (the output folder) are skipped by folder and glob
    searches.

    Raises:
        CAMInputError: the data is missing, empty or its annotations cannot be read.
    """
    if kind not in DATA_KINDS:
        raise CAMInputError(f"--data-format must be one of {', '.join(DATA_KINDS)}, got {kind}")
    kind = _detect(spec) if kind == "auto" else kind
    readers: dict[str, Callable[[str, Optional[str]], RunData]] = {
        "imagefolder": _imagefolder,
        "list": _list,
        "coco": _coco,
        "wsol": _wsol,
        "dataset": _dataset,
    }
    if kind in ("folder", "glob"):
        data = (_folder if kind == "folder" else _glob)(spec, root, exclude)
    else:
        data = readers[kind](spec, root)
    if not data.items:
        raise CAMInputError(f"--data {spec}: no images found ({kind})")
    return data


def _items_from_paths(
    paths: Sequence[str], spec: str, kind: str, exclude: Sequence[str] = ()
) -> RunData:
    found = collect_images(paths, exclude=exclude)
    roots = [os.path.abspath(p) for p in paths if os.path.isdir(p)]
    root = roots[0] if len(roots) == 1 else os.path.commonpath([os.path.abspath(p) for p in paths])
    items = [RunItem(i, it.name, str(it.source), it.path, i + 1) for i, it in enumerate(found)]
    return RunData(kind, spec, root, items)


def _folder(spec: str, root: Optional[str], exclude: Sequence[str]) -> RunData:
    if not Path(spec).is_dir():
        raise CAMInputError(f"--data {spec} is not a folder")
    return _items_from_paths([spec], spec, "folder", exclude)


def _glob(spec: str, root: Optional[str], exclude: Sequence[str]) -> RunData:
    skip = tuple(os.path.abspath(e) + os.sep for e in exclude)
    paths = sorted(
        p
        for p in globmod.glob(spec, recursive=True)
        if os.path.isfile(p) and not os.path.abspath(p).startswith(skip)
    )
    if not paths:
        raise CAMInputError(f"--data {spec}: the glob matches no file")
    return _items_from_paths(paths, spec, "glob")


def _list(spec: str, root: Optional[str]) -> RunData:
    path = Path(spec)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _items_from_paths([spec], spec, "list")
    base = Path(root) if root else path.parent
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CAMInputError(f"--data {spec}: cannot read the list of paths ({err})") from err
    paths = [
        str(base / line.strip())
        for line in lines
        if line.strip() and not line.lstrip().startswith("#")
    ]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise CAMInputError(
            f"--data {spec}: {len(missing)} listed paths do not exist (first: {missing[0]}); "
            "paths are relative to the list's folder or --data-root"
        )
    data = _items_from_paths(paths, spec, "list")
    data.files.append(spec)
    return data


def _imagefolder(spec: str, root: Optional[str]) -> RunData:
    base = Path(spec)
    if not base.is_dir():
        raise CAMInputError(f"--data {spec} is not a folder")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise CAMInputError(f"--data {spec}: an ImageFolder layout needs one folder per class")
    items: list[RunItem] = []
    for label, cls in enumerate(classes):
        files = sorted(
            (f for f in (base / cls).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda f: f.as_posix(),
        )
        for f in files:
            name = PurePosixPath(*f.relative_to(base).parts).as_posix()
            n = len(items)
            items.append(RunItem(n, name, str(f), str(f), n + 1, (label,)))
    categories = [{"id": i, "name": c, "class": i} for i, c in enumerate(classes)]
    truth = {it.name: GroundTruth.make(it.labels) for it in items}
    return RunData("imagefolder", spec, str(base.resolve()), items, categories, truth)


def _read_json(spec: str) -> Any:
    try:
        with open(spec, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CAMInputError(f"--data {spec}: cannot read the annotation file ({err})") from err


def _image_root(candidates: Sequence[Path], first: str, spec: str) -> Path:
    for cand in candidates:
        if (cand / first).is_file():
            return cand
    tried = ", ".join(str(c) for c in candidates)
    raise CAMInputError(
        f"--data {spec}: image {first} not found under {tried}; pass --data-root FOLDER"
    )


def coco_boxes(bbox: Sequence[float]) -> list[float]:
    """COCO ``[x, y, w, h]`` (continuous, pixel ``i`` covers ``[i, i + 1)``) as the
    inclusive pixel box ``(floor x, floor y, ceil(x + w) − 1, ceil(y + h) − 1)``."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = max(np.ceil(x + w) - 1, np.floor(x)), max(np.ceil(y + h) - 1, np.floor(y))
    return [float(np.floor(x)), float(np.floor(y)), float(x1), float(y1)]


def _coco(spec: str, root: Optional[str]) -> RunData:
    doc = _read_json(spec)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise CAMInputError(f"--data {spec}: not a COCO instances file (no 'images' list)")
    cats = sorted(doc.get("categories") or [], key=lambda c: int(c["id"]))
    cls_of = {int(c["id"]): i for i, c in enumerate(cats)}
    anns: dict[int, list[dict[str, Any]]] = {}
    for ann in doc.get("annotations") or []:
        anns.setdefault(int(ann["image_id"]), []).append(ann)
    images = doc["images"]
    if not images:
        raise CAMInputError(f"--data {spec}: the COCO file lists no images")
    json_dir = Path(spec).resolve().parent
    cands = [Path(root)] if root else [json_dir, json_dir.parent, json_dir.parent / "images"]
    base = _image_root(cands, str(images[0]["file_name"]), spec)
    items: list[RunItem] = []
    truth: dict[str, GroundTruth] = {}
    for i, img in enumerate(images):
        name = str(img["file_name"])
        own = [a for a in anns.get(int(img["id"]), []) if int(a["category_id"]) in cls_of]
        labels = tuple(sorted({cls_of[int(a["category_id"])] for a in own}))
        path = str(base / name)
        items.append(RunItem(i, name, path, path, int(img["id"]), labels))
        boxed = [a for a in own if "bbox" in a and not a.get("iscrowd")]
        boxes = [coco_boxes(a["bbox"]) for a in boxed]
        classes = [cls_of[int(a["category_id"])] for a in boxed]
        segmented = [a for a in own if a.get("segmentation")]
        masks = _coco_masks(img, segmented, cls_of) if segmented else None
        truth[name] = GroundTruth.make(labels, boxes, classes, masks)
    categories = [
        {"id": int(c["id"]), "name": str(c.get("name", c["id"])), "class": i}
        for i, c in enumerate(cats)
    ]
    return RunData("coco", spec, str(base), items, categories, truth, [spec])


def _coco_masks(
    img: dict[str, Any], anns: list[dict[str, Any]], cls_of: dict[int, int]
) -> MaskLoader:
    height, width = int(img["height"]), int(img["width"])

    def load(cls: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        from pycocotools import mask as cocomask

        out = np.zeros((height, width), bool)
        ignore = np.zeros((height, width), bool)
        for a in anns:
            if cls_of[int(a["category_id"])] != cls:
                continue
            seg = a["segmentation"]
            if isinstance(seg, list):
                rle = cocomask.merge(cocomask.frPyObjects(seg, height, width))
            elif isinstance(seg.get("counts"), list):
                rle = cocomask.frPyObjects(seg, height, width)
            else:
                rle = seg
            m = cocomask.decode(rle).astype(bool)
            (ignore if a.get("iscrowd") else out)[...] |= m
        return out, ignore if ignore.any() else None

    return load


def _read_lines(path: Path, spec: str) -> list[list[str]]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise CAMInputError(f"--data {spec}: cannot read {path.name} ({err})") from err
    return [line.split(",") for line in text.splitlines() if line.strip()]


def _wsol(spec: str, root: Optional[str]) -> RunData:
    meta = Path(spec)
    ids = [row[0] for row in _read_lines(meta / "image_ids.txt", spec)]
    if not ids:
        raise CAMInputError(f"--data {spec}: image_ids.txt lists no images")
    labels: dict[str, int] = {}
    files = [str(meta / "image_ids.txt")]
    if (meta / "class_labels.txt").is_file():
        files.append(str(meta / "class_labels.txt"))
        try:
            labels = {r[0]: int(r[1]) for r in _read_lines(meta / "class_labels.txt", spec)}
        except (IndexError, ValueError) as err:
            raise CAMInputError(
                f"--data {spec}: class_labels.txt needs 'path,label' lines"
            ) from err
    base = _image_root([Path(root)] if root else [meta, meta.parent], ids[0], spec)
    boxes: dict[str, list[list[float]]] = {}
    masks: dict[str, list[str]] = {}
    ignores: dict[str, str] = {}
    loc = meta / "localization.txt"
    if loc.is_file():
        files.append(str(loc))
        for row in _read_lines(loc, spec):
            if len(row) == 5:
                boxes.setdefault(row[0], []).append([float(v) for v in row[1:]])
            elif len(row) == 3:
                masks.setdefault(row[0], []).append(row[1])
                if row[2]:
                    ignores[row[0]] = row[2]
            else:
                raise CAMInputError(
                    f"--data {spec}: localization.txt lines must be 'path,x0,y0,x1,y1' or "
                    f"'path,mask,ignore', got {','.join(row)!r}"
                )
    items: list[RunItem] = []
    truth: dict[str, GroundTruth] = {}
    for i, name in enumerate(ids):
        lab = (labels[name],) if name in labels else ()
        items.append(RunItem(i, name, str(base / name), str(base / name), i + 1, lab))
        loader = _mask_files(base, masks[name], ignores.get(name)) if name in masks else None
        truth[name] = GroundTruth.make(lab, boxes.get(name, []), masks=loader)
    return RunData("wsol", spec, str(base), items, truth=truth, files=files)


def _mask_files(base: Path, names: list[str], ignore: Optional[str]) -> MaskLoader:
    def load(cls: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        from PIL import Image

        out = None
        for n in names:
            m = np.asarray(Image.open(base / n).convert("L")) > 127
            out = m if out is None else out | m
        ign = np.asarray(Image.open(base / ignore).convert("L")) > 127 if ignore else None
        assert out is not None
        return out, ign

    return load


def _dataset(spec: str, root: Optional[str]) -> RunData:
    module_name, func_name = spec.split(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as err:
        raise CAMInputError(
            f"--data {spec}: cannot import {func_name} from {module_name} ({err})"
        ) from err
    dataset = func()
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise CAMInputError(
            f"--data {spec} returned a {type(dataset).__name__}, not a Dataset "
            "with __len__ and __getitem__"
        )
    items = [RunItem(i, f"{i:07d}", None, None, i + 1) for i in range(len(dataset))]
    return RunData("dataset", spec, None, items, dataset=dataset)


# --------------------------------------------------------------------------- samples


def split_sample(sample: Any) -> tuple[Any, tuple[int, ...]]:
    """``(image, labels)`` of a data-set sample (see the module doc)."""
    label: Any = None
    if isinstance(sample, dict):
        image = sample.get("image", sample.get("img"))
        label = sample.get("label")
        if image is None:
            raise CAMInputError(f"a data-set sample dict needs 'image', has {sorted(sample)}")
    elif isinstance(sample, (tuple, list)):
        image = sample[0]
        label = sample[1] if len(sample) > 1 else None
    else:
        image = sample
    if label is None:
        return image, ()
    values = torch.as_tensor(label).flatten().tolist()
    return image, tuple(int(v) for v in values)


def _as_decoded(image: Any) -> DecodedImage:
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu()
        if arr.dim() == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
            arr = arr.permute(1, 2, 0)
        return decode_array(arr.numpy())
    return decode_image(lambda: image)


class RunSamples(Dataset[dict[str, Any]]):
    """Decode and preprocess one item per access; a failure becomes a sample with a reason.

    A sample holds ``index``, ``item``, ``labels``, and either ``prepared`` (a
    :class:`~cam_plugin.preprocess.Prepared`), ``decode`` (mode / bits / scaling) and, for
    indices below ``keep_original``, ``original`` (the decoded image as ``uint8``
    ``(h0, w0, 3)``, for overlays) -- or ``reason``.
    """

    def __init__(
        self, data: RunData, transform: Callable[[Any], Any], keep_original: int = 0
    ) -> None:
        self.items = data.items
        self.dataset = data.dataset
        self.transform = transform
        self.keep_original = keep_original

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        out: dict[str, Any] = {"index": index, "item": item, "labels": item.labels}
        try:
            if self.dataset is not None:
                image, labels = split_sample(self.dataset[index])
                out["labels"] = labels
                decoded = _as_decoded(image)
            else:
                assert item.source is not None
                decoded = decode_image(item.source)
            # the crop as a picture is explain's; a run sends only the tensor between processes
            out["prepared"] = dataclasses.replace(self.transform(decoded), picture=_NO_PICTURE)
            out["decode"] = decoded.info()
            if index < self.keep_original:
                out["original"] = uint8_rgb(decoded)
        except Exception as err:  # noqa: BLE001 - one bad input must not end the run
            out.pop("prepared", None)
            text = str(err) if isinstance(err, CAMInputError) else f"{type(err).__name__}: {err}"
            out["reason"] = " ".join(text.split())
        return out


def uint8_rgb(decoded: DecodedImage) -> np.ndarray:
    """A decoded image as ``uint8`` ``(h, w, 3)`` (deeper sources scaled to 8 bits)."""
    px = decoded.pixels
    if px.dtype != np.uint8:
        px = (np.clip(px, 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.repeat(px[:, :, None], 3, axis=2) if px.ndim == 2 else np.ascontiguousarray(px)
