"""Image inputs for the commands: which files, their unique names, and lazy batches.

* :func:`collect_images` turns command-line paths (files and folders, searched
  recursively) into :class:`ImageItem` s named by their path relative to the *input root*:
  the folder when one folder is given, otherwise the deepest folder holding every input
  (so ``a/cat.png`` and ``b/cat.png`` keep their folders and never share a name).
* :func:`picture_names` derives output file names from item names: ``a/cat.png`` ->
  ``a/cat.png``; when two items would give the same name (``cat.jpg`` and ``cat.png``,
  names differing only in case, or a reserved name such as ``overview.png``) the suffix is
  kept (``cat.jpg.png``), and any clash left gets ``~2``, ``~3``, ... The result is a
  one-to-one map, case-insensitively, and no output is also a folder of another.
* :class:`ImageFiles` is a ``Dataset`` that decodes and preprocesses one item per
  ``__getitem__`` (so a ``DataLoader`` holds one batch at a time, decoded in its workers)
  and never raises for a bad file: the sample carries the reason instead.
  :func:`collate_images` splits a batch into the images that decoded and the failures.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .errors import CAMInputError
from .images import ImageSource, decode_image
from .preprocess import Prepared

__all__ = [
    "IMAGE_SUFFIXES",
    "SKIMAGE_PHOTOS",
    "ImageBatch",
    "ImageFiles",
    "ImageItem",
    "collate_images",
    "collect_images",
    "image_loader",
    "picture_names",
    "skimage_photos",
]

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
)
SKIMAGE_PHOTOS = ("chelsea", "coffee", "rocket", "camera", "astronaut", "stereo_motorcycle")


@dataclass(frozen=True)
class ImageItem:
    """One input: ``name`` (unique, ``/``-separated, relative to the input root), ``source``
    (a path, or a callable returning an array) and ``path`` (as given, for messages)."""

    name: str
    source: ImageSource
    path: Optional[str] = None


def collect_images(
    paths: Sequence[str | os.PathLike[str]], exclude: Sequence[str | os.PathLike[str]] = ()
) -> list[ImageItem]:
    """Files and folders (recursive, by :data:`IMAGE_SUFFIXES`) as named items, in order.

    A file named explicitly is taken whatever its suffix; the same file twice is kept once.
    Files found in a folder under one of ``exclude`` (e.g. the output folder of a previous
    run inside the input folder) are skipped.

    Raises:
        CAMInputError: a path does not exist, or no image was found.
    """
    files: list[Path] = []
    roots: list[str] = []
    skip = [os.path.abspath(e) + os.sep for e in exclude]

    def wanted(f: Path) -> bool:
        return (
            f.suffix.lower() in IMAGE_SUFFIXES
            and not (os.path.abspath(f) + os.sep).startswith(tuple(skip))
            and f.is_file()
        )

    for given in paths:
        p = Path(given)
        if p.is_dir():
            roots.append(os.path.abspath(p))
            files += sorted((f for f in p.rglob("*") if wanted(f)), key=lambda f: f.as_posix())
        elif p.exists():
            roots.append(os.path.dirname(os.path.abspath(p)))
            files.append(p)
        else:
            raise CAMInputError(f"no such image file or folder: {p}")
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise CAMInputError(f"no images ({suffixes}) under {', '.join(map(str, paths))}")
    root = os.path.commonpath(roots)
    items: list[ImageItem] = []
    seen: set[str] = set()
    for f in files:
        absolute = os.path.abspath(f)
        if absolute in seen:
            continue
        seen.add(absolute)
        name = PurePosixPath(*Path(os.path.relpath(absolute, root)).parts).as_posix()
        items.append(ImageItem(name=name, source=str(f), path=str(f)))
    return items


def _skimage_photo(name: str) -> np.ndarray:
    from skimage import data

    arr = getattr(data, name)()
    if isinstance(arr, tuple):  # stereo_motorcycle -> (left, right, disparity)
        arr = arr[0]
    return np.asarray(arr)


def skimage_photos(names: Iterable[str] = SKIMAGE_PHOTOS) -> list[ImageItem]:
    """The photos bundled with scikit-image, loaded lazily, named by their function."""
    try:
        import skimage  # noqa: F401
    except ImportError as err:
        raise CAMInputError(
            "no images given and scikit-image (the bundled photos) is not installed: "
            "pass image files or `pip install scikit-image`"
        ) from err
    return [ImageItem(name=n, source=functools.partial(_skimage_photo, n)) for n in names]


def picture_names(
    names: Sequence[str], reserved: Iterable[str] = (), suffix: str = ".png"
) -> list[str]:
    """One output file name per item name, unique case-insensitively (see the module doc)."""
    taken = {r.lower() for r in reserved}

    def short(name: str) -> str:
        p = PurePosixPath(name)
        return (p.with_suffix("") if p.suffix else p).as_posix() + suffix

    counts: dict[str, int] = {}
    for n in names:
        counts[short(n).lower()] = counts.get(short(n).lower(), 0) + 1
    first = [
        n + suffix if counts[short(n).lower()] > 1 or short(n).lower() in taken else short(n)
        for n in names
    ]
    dirs = {
        parent.as_posix().lower()
        for c in first
        for parent in PurePosixPath(c).parents
        if parent.as_posix() != "."
    }
    out: list[str] = []
    for candidate in first:
        base, k = candidate[: -len(suffix)], 1
        while candidate.lower() in taken or candidate.lower() in dirs:
            k += 1
            candidate = f"{base}~{k}{suffix}"
        taken.add(candidate.lower())
        out.append(candidate)
    return out


@dataclass
class ImageBatch:
    """A collated batch: ``images`` ``(n, C, H, W)`` of the samples that decoded (None if
    none did), their ``samples`` (``index``, ``item``, ``prepared``, ``decode``) and the
    ``failures`` (``index``, ``item``, ``reason``)."""

    images: Optional[Tensor]
    samples: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)


class ImageFiles(Dataset[dict[str, Any]]):
    """Decode and preprocess ``items[i]`` on access; failures become samples with a reason.

    Args:
        items: the inputs.
        transform: ``DecodedImage -> Prepared`` (e.g. :class:`~cam_plugin.preprocess.Preprocess`).
    """

    def __init__(self, items: Sequence[ImageItem], transform: Callable[[Any], Prepared]) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        try:
            decoded = decode_image(item.source)
            prepared = self.transform(decoded)
        except CAMInputError as err:
            return {"index": index, "item": item, "reason": str(err)}
        except Exception as err:  # noqa: BLE001 - one bad input must not end the run
            return {"index": index, "item": item, "reason": f"{type(err).__name__}: {err}"}
        return {"index": index, "item": item, "prepared": prepared, "decode": decoded.info()}


def collate_images(samples: Sequence[dict[str, Any]]) -> ImageBatch:
    """Stack the tensors of the samples that decoded; keep the failures apart."""
    good = [s for s in samples if "prepared" in s]
    bad = [s for s in samples if "prepared" not in s]
    images = torch.stack([s["prepared"].tensor for s in good]) if good else None
    return ImageBatch(images=images, samples=good, failures=bad)


def image_loader(
    items: Sequence[ImageItem],
    transform: Callable[[Any], Prepared],
    *,
    batch_size: int,
    workers: int = 0,
) -> DataLoader[Any]:
    """A ``DataLoader`` over :class:`ImageFiles` in order, collated by :func:`collate_images`.

    Memory is flat in the number of items: each process decodes one full-size image at a
    time and keeps only its preprocessed crop; at most ``1 + 2 · workers`` batches of crops
    (``batch_size`` each) exist at once."""
    return DataLoader(
        ImageFiles(items, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_images,
    )
