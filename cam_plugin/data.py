"""Synthetic weakly supervised localization data: handwritten digits in clutter.

:class:`ClutteredDigits` pastes a real handwritten digit (scikit-learn's ``load_digits``,
1797 images of 8x8 pixels, values 0..16) at a random size and position on a dark canvas and
surrounds it with clutter as bright as the digit and of comparable size: fragments (random
crops) of *other* digits, strokes and arcs, and pixel noise. The label is the digit; the box
and mask are known by construction. Because the clutter is as bright as the digit,
thresholding the raw image brightness localizes poorly, while a classifier has to find the
one complete digit to be right, so its class activation map has something to show.

Everything is generated on the fly from ``np.random.default_rng([seed, split, index])``:
the same ``(seed, split, index)`` always gives the same sample, in any process and order.
Train and test use disjoint source digits (a fixed permutation of the 1797 indices, split by
``test_fraction``, independent of ``seed``).

scikit-learn is an optional dependency (``pip install scikit-learn``), imported on first use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ClutteredDigits", "collate_wsol", "digit_split_indices"]

_SPLITS = {"train": 0, "test": 1}
_PERMUTATION_SEED = 20160627  # fixed: the train/test split of source digits never moves
_NUM_SOURCE = 1797


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as float32 ``(1797, 8, 8)`` in ``[0, 1]`` and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "ClutteredDigits needs scikit-learn for its handwritten digits: "
            "pip install scikit-learn (or cam-plugin[test])."
        ) from exc
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    if images.shape != (_NUM_SOURCE, 8, 8):  # pragma: no cover - sklearn changed its data
        raise RuntimeError(f"unexpected sklearn digits shape {images.shape}.")
    return images, labels


def digit_split_indices(split: str, test_fraction: float = 0.3) -> np.ndarray:
    """Indices into ``load_digits()`` used by a split (disjoint between train and test)."""
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    perm = np.random.default_rng(_PERMUTATION_SEED).permutation(_NUM_SOURCE)
    n_test = int(round(_NUM_SOURCE * test_fraction))
    chosen = perm[:n_test] if split == "test" else perm[n_test:]
    return np.sort(chosen)


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    import cv2

    return np.asarray(cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR))


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int) -> bool:
    return not (
        a[2] + margin < b[0] or b[2] + margin < a[0] or a[3] + margin < b[1] or b[3] + margin < a[1]
    )


class ClutteredDigits(Dataset[dict[str, Any]]):
    """Handwritten digits in bright clutter, for weakly supervised localization.

    Each sample is a dict:

    * ``"image"``: float32 ``(3, S, S)`` in ``[0, 1]``; grey, the same value in the three
      channels so that ImageNet backbones take it (apply your own normalization through
      ``transform``);
    * ``"label"``: int, the digit (of the first digit when ``digits_per_image > 1``);
    * ``"boxes"``: int64 ``(n, 4)``, inclusive ``(x0, y0, x1, y1)``, tight around each digit's
      nonzero pixels after scaling (``n = digits_per_image``);
    * ``"labels"``: int64 ``(n,)``, the class of each box;
    * ``"mask"``: bool ``(S, S)``, the pixels of the digit(s);
    * ``"index"``: int, the sample index (a sample id for :class:`~cam_plugin.metrics.WSOLMetrics`).

    Digits are scaled (bilinear) to a random height in ``digit_size`` (width 80-100% of
    it) and given a random peak brightness in ``[0.7, 1]``. Clutter items (crops of 50-80%
    of each side of scaled digits of *other* classes, straight strokes, arcs) get sizes and
    brightness from the same ranges. Each one touches a digit box with probability
    ``touch_prob`` (overlapping one side by 10-30% of the item), otherwise it lies anywhere
    with its centre outside the digit boxes. Gaussian noise (``noise_std``) is added and the
    image clipped to ``[0, 1]``. On 200 test images (seed 0, defaults) the brightness map
    gets MaxBoxAccV2 ~40 and MaxBoxAcc ~19, the ground-truth mask 100.

    Args:
        split: ``"train"`` or ``"test"`` (disjoint source digits).
        length: number of samples (default 5000 for train, 1000 for test).
        canvas_size: side ``S`` of the square image.
        digit_size: ``(min, max)`` side of a scaled digit in pixels.
        digits_per_image: digits per image (``> 1`` for detection-style data; they do not
            overlap).
        num_fragments: fragments of other digits per image.
        num_strokes: strokes and arcs per image.
        noise_std: standard deviation of the additive Gaussian pixel noise.
        touch_prob: probability that a clutter item touches a digit's box.
        seed: seed of the generator (same seed, same samples).
        test_fraction: share of the 1797 source digits reserved for the test split.
        transform: optional callable applied to the image tensor.
    """

    classes: tuple[str, ...] = tuple(str(i) for i in range(10))
    _crop_lo = 0.5
    _crop_hi = 0.8

    def __init__(
        self,
        split: Literal["train", "test"] = "train",
        length: int | None = None,
        *,
        canvas_size: int = 64,
        digit_size: tuple[int, int] = (20, 36),
        digits_per_image: int = 1,
        num_fragments: int = 4,
        num_strokes: int = 3,
        noise_std: float = 0.05,
        touch_prob: float = 0.5,
        seed: int = 0,
        test_fraction: float = 0.3,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
        lo, hi = (int(v) for v in digit_size)
        if not 8 <= lo <= hi:
            raise ValueError(
                f"digit_size must be (min, max) with 8 <= min <= max, got {digit_size}."
            )
        if hi > canvas_size:
            raise ValueError(
                f"digit_size max {hi} does not fit the canvas of {canvas_size} pixels; raise "
                "canvas_size or lower digit_size."
            )
        if digits_per_image < 1:
            raise ValueError(f"digits_per_image must be >= 1, got {digits_per_image}.")
        if num_fragments < 0 or num_strokes < 0 or noise_std < 0:
            raise ValueError("num_fragments, num_strokes and noise_std must be >= 0.")
        if length is None:
            length = 5000 if split == "train" else 1000
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}.")
        self.split = split
        self.length = int(length)
        self.canvas_size = int(canvas_size)
        self.digit_size = (lo, hi)
        self.digits_per_image = int(digits_per_image)
        self.num_fragments = int(num_fragments)
        self.num_strokes = int(num_strokes)
        self.noise_std = float(noise_std)
        if not 0.0 <= touch_prob <= 1.0:
            raise ValueError(f"touch_prob must be in [0, 1], got {touch_prob}.")
        self.touch_prob = float(touch_prob)
        self.seed = int(seed)
        self.transform = transform
        self.source_indices = digit_split_indices(split, test_fraction)
        images, labels = _load_digits()
        self._images = images[self.source_indices]
        self._labels = labels[self.source_indices]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(index, Tensor):
            index = int(index.item())
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index)!r}.")
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples.")
        image, boxes, labels, mask = self.render(int(index))
        tensor = torch.from_numpy(np.repeat(image[None], 3, axis=0))
        if self.transform is not None:
            tensor = self.transform(tensor)
        return {
            "image": tensor,
            "label": int(labels[0]),
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "mask": torch.from_numpy(mask),
            "index": int(index),
        }

    # ------------------------------------------------------------------ generator

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Sample ``index`` as numpy arrays: image float32 ``(S, S)``, boxes int64 ``(n, 4)``,
        labels int64 ``(n,)``, mask bool ``(S, S)``."""
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
        s = self.canvas_size
        canvas = np.zeros((s, s), dtype=np.float32)
        mask = np.zeros((s, s), dtype=bool)
        boxes: list[tuple[int, int, int, int]] = []
        labels: list[int] = []
        for _ in range(self.digits_per_image):
            k = int(rng.integers(len(self._images)))
            glyph = self._glyph(self._images[k], rng)
            gh, gw = glyph.shape
            y, x = 0, 0
            for _attempt in range(100):
                y = int(rng.integers(0, s - gh + 1))
                x = int(rng.integers(0, s - gw + 1))
                cand = (x, y, x + gw - 1, y + gh - 1)
                if not any(_overlap(cand, b, 1) for b in boxes):
                    break
            region = glyph > 0
            sub = canvas[y : y + gh, x : x + gw]
            np.maximum(sub, glyph, out=sub)
            mask[y : y + gh, x : x + gw] |= region
            x0, y0, x1, y1 = _tight_box(region)
            boxes.append((x + x0, y + y0, x + x1, y + y1))
            labels.append(int(self._labels[k]))

        clutter = np.zeros_like(canvas)
        others = np.flatnonzero(~np.isin(self._labels, labels))
        if len(others) == 0:  # every class is on the canvas: any digit will do
            others = np.arange(len(self._labels))
        for _ in range(self.num_fragments):
            k = int(others[rng.integers(len(others))])
            piece = self._fragment(self._glyph(self._images[k], rng), rng)
            self._paste(clutter, piece, boxes, rng)
        for _ in range(self.num_strokes):
            self._paste(clutter, self._stroke(rng), boxes, rng)
        np.maximum(canvas, clutter, out=canvas)
        if self.noise_std > 0:
            canvas += rng.normal(0.0, self.noise_std, size=canvas.shape).astype(np.float32)
        np.clip(canvas, 0.0, 1.0, out=canvas)
        return (
            canvas,
            np.asarray(boxes, dtype=np.int64).reshape(-1, 4),
            np.asarray(labels, dtype=np.int64),
            mask,
        )

    def _brightness(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(0.7, 1.0))

    def _glyph(self, digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A source digit scaled (bilinear) to a random size, its peak at a random brightness."""
        lo, hi = self.digit_size
        side = int(rng.integers(lo, hi + 1))
        aspect = float(rng.uniform(0.8, 1.0))
        width = max(8, int(round(side * aspect)))
        glyph = np.clip(_resize(digit, side, width), 0.0, None)
        peak = float(glyph.max())
        if peak > 0:
            glyph *= self._brightness(rng) / peak
        return glyph.astype(np.float32)

    def _fragment(self, glyph: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A random crop (40-75% of each side) holding a good share of the glyph's ink."""
        gh, gw = glyph.shape
        total = float(glyph.sum())
        best = glyph
        best_ink = -1.0
        for _ in range(6):
            ch = max(4, int(round(gh * rng.uniform(self._crop_lo, self._crop_hi))))
            cw = max(4, int(round(gw * rng.uniform(self._crop_lo, self._crop_hi))))
            y = int(rng.integers(0, gh - ch + 1))
            x = int(rng.integers(0, gw - cw + 1))
            crop = glyph[y : y + ch, x : x + cw]
            ink = float(crop.sum())
            if ink > best_ink:
                best, best_ink = crop, ink
            if ink >= 0.3 * total:
                break
        return best

    def _stroke(self, rng: np.random.Generator) -> np.ndarray:
        """A straight stroke or an arc, anti-aliased, on its own small patch."""
        import cv2

        lo, hi = self.digit_size
        side = int(rng.integers(lo, hi + 1))
        patch = np.zeros((side, side), dtype=np.uint8)
        thickness = max(2, int(round(side / 9 * rng.uniform(0.8, 1.3))))
        c = side // 2
        if rng.random() < 0.5:
            angle = rng.uniform(0, np.pi)
            half = side * rng.uniform(0.3, 0.45)
            dx, dy = half * np.cos(angle), half * np.sin(angle)
            p0 = (int(round(c - dx)), int(round(c - dy)))
            p1 = (int(round(c + dx)), int(round(c + dy)))
            cv2.line(patch, p0, p1, 255, thickness, cv2.LINE_AA)
        else:
            axes = (
                int(side * rng.uniform(0.2, 0.4)),
                int(side * rng.uniform(0.2, 0.4)),
            )
            start = float(rng.uniform(0, 360))
            sweep = float(rng.uniform(120, 300))
            rot = float(rng.uniform(0, 180))
            cv2.ellipse(patch, (c, c), axes, rot, start, start + sweep, 255, thickness, cv2.LINE_AA)
        return (patch.astype(np.float32) / 255.0) * self._brightness(rng)

    def _paste(
        self,
        layer: np.ndarray,
        piece: np.ndarray,
        boxes: Sequence[tuple[int, int, int, int]],
        rng: np.random.Generator,
    ) -> None:
        """Max-composite ``piece``: touching a digit box with probability ``touch_prob``
        (overlapping one of its sides by 10-30% of the piece), otherwise anywhere with its
        centre outside every digit box (best effort)."""
        s = layer.shape[0]
        ph, pw = piece.shape
        y, x = 0, 0
        if boxes and rng.random() < self.touch_prob:
            x0, y0, x1, y1 = boxes[int(rng.integers(len(boxes)))]
            side = int(rng.integers(4))
            if side < 2:  # left / right
                over = int(round(pw * rng.uniform(0.1, 0.3)))
                x = x0 - pw + over if side == 0 else x1 + 1 - over
                y = int(rng.integers(y0 - ph // 2, max(y0 - ph // 2, y1 - ph // 2) + 1))
            else:  # top / bottom
                over = int(round(ph * rng.uniform(0.1, 0.3)))
                y = y0 - ph + over if side == 2 else y1 + 1 - over
                x = int(rng.integers(x0 - pw // 2, max(x0 - pw // 2, x1 - pw // 2) + 1))
        else:
            for _attempt in range(30):
                y = int(rng.integers(-(ph // 3), s - ph + ph // 3 + 1))
                x = int(rng.integers(-(pw // 3), s - pw + pw // 3 + 1))
                cy, cx = y + ph // 2, x + pw // 2
                if not any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in boxes):
                    break
        ys, xs = max(0, y), max(0, x)
        ye, xe = min(s, y + ph), min(s, x + pw)
        if ye <= ys or xe <= xs:
            return
        sub = layer[ys:ye, xs:xe]
        np.maximum(sub, piece[ys - y : ye - y, xs - x : xe - x], out=sub)


def collate_wsol(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate :class:`ClutteredDigits` samples: stacks ``image``, ``label``, ``mask`` and
    ``index``; keeps ``boxes`` and ``labels`` as lists (images may hold different numbers of
    boxes), ready for ``WSOLMetrics.update(maps, batch["boxes"], ...)``."""
    if not batch:
        raise ValueError("collate_wsol got an empty batch.")
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "label": torch.tensor([int(b["label"]) for b in batch], dtype=torch.int64),
        "boxes": [b["boxes"] for b in batch],
        "labels": [b["labels"] for b in batch],
        "mask": torch.stack([b["mask"] for b in batch]),
        "index": torch.tensor([int(b["index"]) for b in batch], dtype=torch.int64),
    }
