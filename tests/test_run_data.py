"""The data the ``cam-plugin run`` tests share, generated once per session, and its checks.

:func:`run_data` writes (under one session temp folder):

* ``images/NNNN.jpg``: cluttered digits (``ClutteredDigits``, 64 px, seed 0) as JPEG;
* ``coco.json``: a COCO instances file over them (one box and an RLE mask per image,
  categories ``"0"``..``"9"`` with ids 1..10, so model class ``i`` is category ``i + 1``);
* ``wsol/``: the clovaai/wsolevaluation metadata of the same images (``image_ids.txt``,
  ``class_labels.txt``, ``localization.txt``), paths relative to the session folder;
* ``imagefolder/<digit>/NNNN.jpg``: the first images in an ImageFolder layout;
* ``mixed/``: a few digits plus the odd files (a corrupt JPEG, a PNG that is text,
  grayscale, RGBA, 16-bit PNGs, and ``a/same.jpg`` / ``b/same.jpg``);
* ``tinynets.py``: the models (``module:function``) and data sets the tests pass by name.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

NUM_IMAGES = 200

TINYNETS = '''
import time

import torch
from torch import nn


def tiny(num_classes: int = 10) -> nn.Module:
    """Three stride-2 convolutions -> ReLU -> global average pool -> Linear (8x8 at 64 px)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )


class _Slow(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.15)
        return self.inner(x)


def slow(num_classes: int = 10) -> nn.Module:
    """tiny(), 0.15 s per forward (so a test can kill a run in the middle)."""
    return _Slow(tiny(num_classes))


def digits():
    """40 ClutteredDigits test samples (dicts with image, label, boxes, mask)."""
    from cam_plugin.data import ClutteredDigits

    return ClutteredDigits("test", 40, seed=3)
'''


def _rle(mask: np.ndarray) -> dict[str, object]:
    from pycocotools import mask as cocomask

    rle = cocomask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _digits(root: Path) -> list[dict[str, object]]:
    from cam_plugin.data import ClutteredDigits

    ds = ClutteredDigits("test", NUM_IMAGES, seed=0)
    (root / "images").mkdir()
    records = []
    for i in range(NUM_IMAGES):
        s = ds[i]
        pixels = (s["image"][0].numpy() * 255 + 0.5).astype(np.uint8)
        name = f"images/{i:04d}.jpg"
        Image.fromarray(pixels).save(root / name, quality=95)
        box = [int(v) for v in s["boxes"][0]]
        records.append(
            {"name": name, "label": int(s["label"]), "box": box, "mask": s["mask"].numpy()}
        )
    return records


def _coco(root: Path, records: list[dict[str, object]]) -> None:
    images, anns = [], []
    for i, r in enumerate(records):
        images.append({"id": 100 + i, "file_name": r["name"], "width": 64, "height": 64})
        x0, y0, x1, y1 = r["box"]  # type: ignore[misc]
        anns.append(
            {
                "id": i + 1,
                "image_id": 100 + i,
                "category_id": int(r["label"]) + 1,
                "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                "iscrowd": 0,
                "area": float(np.sum(r["mask"])),
                "segmentation": _rle(r["mask"]),
            }
        )
    cats = [{"id": d + 1, "name": str(d)} for d in range(10)]
    doc = {"images": images, "annotations": anns, "categories": cats}
    (root / "coco.json").write_text(json.dumps(doc))


def _wsol(root: Path, records: list[dict[str, object]]) -> None:
    meta = root / "wsol"
    meta.mkdir()
    (meta / "image_ids.txt").write_text("".join(f"{r['name']}\n" for r in records))
    (meta / "class_labels.txt").write_text("".join(f"{r['name']},{r['label']}\n" for r in records))
    (meta / "localization.txt").write_text(
        "".join(f"{r['name']},{','.join(map(str, r['box']))}\n" for r in records)
    )  # type: ignore


def _imagefolder(root: Path, records: list[dict[str, object]]) -> None:
    for r in records[:30]:
        folder = root / "imagefolder" / str(r["label"])
        folder.mkdir(parents=True, exist_ok=True)
        os.link(root / str(r["name"]), folder / Path(str(r["name"])).name)


def _mixed(root: Path) -> None:
    mixed = root / "mixed"
    for sub in ("a", "b", "odd"):
        (mixed / sub).mkdir(parents=True)
    for i in range(8):
        os.link(root / f"images/{i:04d}.jpg", mixed / f"{i:04d}.jpg")
    digit = np.asarray(Image.open(root / "images/0000.jpg"))
    Image.fromarray(digit).save(mixed / "a" / "same.jpg")
    Image.fromarray(255 - digit).save(mixed / "b" / "same.jpg")
    Image.fromarray(digit).convert("L").save(mixed / "odd" / "gray.png")
    Image.fromarray(np.dstack([digit] * 3 + [np.full_like(digit, 200)])).save(
        mixed / "odd" / "rgba.png"
    )
    Image.fromarray(digit.astype(np.uint16) * 257).save(mixed / "odd" / "deep16.png")
    good = (root / "images/0001.jpg").read_bytes()
    (mixed / "odd" / "corrupt.jpg").write_bytes(good[: len(good) // 3])
    (mixed / "odd" / "text.png").write_text("this is not a PNG\n")


@functools.cache
def _make(base: str) -> Path:
    root = Path(base)
    records = _digits(root)
    _coco(root, records)
    _wsol(root, records)
    _imagefolder(root, records)
    _mixed(root)
    (root / "tinynets.py").write_text(TINYNETS)
    return root


def run_data(factory: pytest.TempPathFactory) -> Path:
    """The session's data folder (generated on the first call)."""
    return _make(str(factory.getbasetemp() / "run-data"))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp() / "run-data"
    base.mkdir(exist_ok=True)
    return run_data(tmp_path_factory)


def test_generated_annotations_agree(data_root: Path) -> None:
    """COCO and wsolevaluation describe the same images, boxes and labels."""
    coco = json.loads((data_root / "coco.json").read_text())
    lines = (data_root / "wsol" / "localization.txt").read_text().splitlines()
    assert len(coco["images"]) == len(lines) == NUM_IMAGES
    first = coco["annotations"][0]
    x0, y0, x1, y1 = (int(v) for v in lines[0].split(",")[1:])
    assert first["bbox"] == [x0, y0, x1 - x0 + 1, y1 - y0 + 1]
    with Image.open(data_root / "mixed" / "odd" / "deep16.png") as im:
        assert im.mode.startswith("I")
