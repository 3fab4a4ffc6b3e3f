"""Tests of the synthetic WSOL data and the model-free baselines."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cam_plugin.baselines import brightness_baseline_maps, centered_gaussian_maps
from cam_plugin.data import ClutteredDigits, collate_wsol, digit_split_indices
from cam_plugin.metrics import WSOLMetrics

pytest.importorskip("sklearn")


def _same(a: dict[str, object], b: dict[str, object]) -> bool:
    return all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]  # type: ignore[arg-type]
        for k in a
    )


def test_sample_format() -> None:
    ds = ClutteredDigits("train", 10)
    s = ds[3]
    assert set(s) == {"image", "label", "boxes", "labels", "mask", "index"}
    img = s["image"]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])
    assert s["boxes"].shape == (1, 4) and s["boxes"].dtype == torch.int64
    assert s["mask"].shape == (64, 64) and s["mask"].dtype == torch.bool
    assert 0 <= s["label"] <= 9 and s["labels"].tolist() == [s["label"]]
    assert s["index"] == 3 and len(ds) == 10
    assert ds.classes == tuple("0123456789")


def test_deterministic_per_seed_and_index() -> None:
    a = ClutteredDigits("train", 20, seed=7)
    b = ClutteredDigits("train", 20, seed=7)
    c = ClutteredDigits("train", 20, seed=8)
    assert _same(a[5], b[5])
    assert _same(a[19], a[-1])
    _ = b[0], b[11]  # order of access does not matter
    assert _same(a[12], b[12])
    assert not torch.equal(a[5]["image"], c[5]["image"])


def test_splits_use_disjoint_source_digits() -> None:
    train = digit_split_indices("train")
    test = digit_split_indices("test")
    assert len(np.intersect1d(train, test)) == 0
    assert len(train) + len(test) == 1797
    assert np.array_equal(ClutteredDigits("test", 1, seed=3).source_indices, test)
    assert not torch.equal(
        ClutteredDigits("train", 1)[0]["image"], ClutteredDigits("test", 1)[0]["image"]
    )


def test_boxes_are_tight_around_the_visible_digit() -> None:
    ds = ClutteredDigits("test", 40)
    for i in range(len(ds)):
        image, boxes, _, mask = ds.render(i)
        x0, y0, x1, y1 = boxes[0].tolist()
        inside = np.zeros_like(mask)
        inside[y0 : y1 + 1, x0 : x1 + 1] = True
        assert mask.any() and not (mask & ~inside).any()  # the digit is inside its box
        # tight: the mask touches all four sides of the box
        assert mask[y0].any() and mask[y1].any() and mask[:, x0].any() and mask[:, x1].any()
        # the digit is drawn: its brightest pixels are at least its brightness (>= 0.7)
        assert image[mask].max() >= 0.6
        assert 20 <= y1 - y0 + 1 <= 36


def test_multi_digit_variant_and_collate() -> None:
    ds = ClutteredDigits("train", 6, canvas_size=96, digits_per_image=3)
    loader = DataLoader(ds, batch_size=3, collate_fn=collate_wsol)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, 96, 96)
    assert batch["index"].tolist() == [0, 1, 2]
    for boxes, labels in zip(batch["boxes"], batch["labels"]):
        assert boxes.shape == (3, 4) and labels.shape == (3,)
    boxes = batch["boxes"][0].numpy()
    for i in range(3):
        for j in range(i + 1, 3):
            a, b = boxes[i], boxes[j]
            assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]  # disjoint


def test_brightness_baseline_is_clearly_worse_than_the_ground_truth() -> None:
    ds = ClutteredDigits("test", 200)
    batch = collate_wsol([ds[i] for i in range(len(ds))])
    results = {}
    for name, maps in (
        ("brightness", brightness_baseline_maps(batch["image"])),
        ("gaussian", centered_gaussian_maps((200, 64, 64))),
        ("gt-mask", batch["mask"].float()),
    ):
        metric = WSOLMetrics(fixed_rule="contour")  # the sweep's rule only: faster on CPU
        metric.update(maps, batch["boxes"], gt_masks=batch["mask"], sample_ids=batch["index"])
        results[name] = metric.compute()
    # seed 0, 200 test images: brightness ~40 MaxBoxAccV2 / ~19 MaxBoxAcc; GT mask 100
    assert results["gt-mask"]["MaxBoxAccV2"] > 99 and results["gt-mask"]["PxAP"] > 99
    assert results["brightness"]["MaxBoxAccV2"] < 50
    assert results["brightness"]["MaxBoxAcc"] < 35
    assert results["gaussian"]["MaxBoxAccV2"] < 30


def test_baseline_maps() -> None:
    g = centered_gaussian_maps((2, 5, 7))
    assert g.shape == (2, 5, 7) and float(g.max()) == 1.0 and float(g[0, 2, 3]) == 1.0
    assert torch.equal(g[0], g[1]) and float(g.min()) > 0
    img = torch.zeros(1, 3, 4, 4)
    img[0, :, 1, 2] = 0.5
    b = brightness_baseline_maps(img)
    assert b.shape == (1, 4, 4) and float(b[0, 1, 2]) == 1.0 and float(b.sum()) == 1.0
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        brightness_baseline_maps(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="shape"):
        centered_gaussian_maps((5,))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "val"}, "split"),
        ({"digit_size": (20, 80)}, "canvas"),
        ({"digit_size": (4, 10)}, "digit_size"),
        ({"digits_per_image": 0}, "digits_per_image"),
        ({"touch_prob": 2.0}, "touch_prob"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ClutteredDigits(**kwargs)  # type: ignore[arg-type]


def test_index_errors() -> None:
    ds = ClutteredDigits("test", 3)
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(TypeError, match="int"):
        ds["0"]  # type: ignore[index]


def test_sklearn_is_imported_lazily() -> None:
    code = "import sys, cam_plugin.data; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
