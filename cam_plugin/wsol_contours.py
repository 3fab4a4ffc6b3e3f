"""Choe et al.'s contour rule (CVPR 2020, ``clovaai/wsolevaluation``): the evaluation boxes.

For each map ``m`` (values in ``[0, 1]``) and threshold ``t`` of a sweep:

1. ``q = uint8(m * 255)`` (truncation, computed in float64),
2. binary image ``q > int(t * max q)`` (strictly above; ``cv2.THRESH_BINARY``),
3. ``cv2.findContours(..., RETR_TREE, CHAIN_APPROX_SIMPLE)`` (holes give contours too),
4. the contour with the largest ``cv2.contourArea`` (the first one on ties), or every
   contour (MaxBoxAccV2),
5. ``x, y, w, h = cv2.boundingRect(c)`` and the box ``(x, y, min(x + w, W - 1),
   min(y + h, H - 1))`` -- one pixel wider and taller than the contour, a quirk of the
   reference code kept for comparability,
6. no contour at all gives the single box ``(0, 0, 0, 0)``.

How it is fast without changing a box: step 2 never builds ``q``. Since ``q > c`` is
``trunc(255 m) >= c + 1`` and ``255 m`` (in float64) only grows with ``m``, the binary image
is ``m >= e[c + 1]`` with ``e[k]`` the smallest value of the maps' dtype whose quantization is
``>= k`` (:func:`quantization_edges`, 257 numbers per dtype, computed once). So a float32 map
is binarized by one comparison in float32, with no float64 copy; ``max q`` needs only the
map's maximum. That maximum and the input check come from one vectorised pass: the maps'
bits read as unsigned integers keep the order of non-negative floats, and every value
outside ``[0, 1]`` (negative, NaN, inf) reads above ``bits(1.0)`` (:func:`checked_maxima`;
only then does the exact check run, to name the problem). The maps go through in chunks
that stay in the cache from that pass to the comparison and the contours. Steps 4-5 are
computed for every contour of every map and threshold at once from the contour points
(exact integer arithmetic, equal to ``cv2.boundingRect`` and ``cv2.contourArea``); OpenCV
is called once per binary image, for ``findContours`` only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any, NamedTuple, Union

import numpy as np
import torch
from torch import Tensor

from .errors import CAMInputError

__all__ = [
    "ContourBoxes",
    "ContourSweep",
    "as_numpy_maps",
    "check_thresholds",
    "checked_maxima",
    "contour_boxes",
    "contour_sweep",
    "contour_sweeps",
    "contour_values",
    "quantization_edges",
    "quantize_maps",
    "validated_maps",
]

ArrayLike = Union[Tensor, np.ndarray]

#: bytes of binary images built at once by the contour sweeps
_BINARY_BYTES = 1 << 24
#: bytes of float maps (and their binary images) binarized and traced at once: a chunk stays
#: in the cache between reading its maxima, comparing and tracing
_CACHE_BYTES = 1 << 20
#: from this many thresholds on, a float map is quantized once and thresholded by OpenCV
_QUANTIZE_FROM = 8


# --------------------------------------------------------------------------- inputs


def _as_array(maps: object, name: str) -> np.ndarray:
    """``maps`` as a numpy array of float32 / float64 (see :func:`contour_values`)."""
    if isinstance(maps, Tensor):
        t = maps.detach()
        if t.dtype == torch.bool or t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        if not t.is_floating_point():
            raise TypeError(
                f"{name} must hold floats in [0, 1], got dtype {t.dtype}; divide integer maps "
                "by their maximum first."
            )
        arr = t.cpu().numpy()
    elif isinstance(maps, np.ndarray):
        arr = maps
        if arr.dtype == np.bool_ or arr.dtype == np.float16:
            arr = arr.astype(np.float32)
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(
                f"{name} must hold floats in [0, 1], got dtype {arr.dtype}; divide integer "
                "maps by their maximum first."
            )
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy array of shape (..., H, W), got "
            f"{type(maps)!r}."
        )
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    if arr.ndim < 2:
        raise CAMInputError(f"{name} must have at least 2 dims (..., H, W); got shape {arr.shape}.")
    if arr.shape[-1] == 0 or arr.shape[-2] == 0:
        raise CAMInputError(f"{name} has an empty spatial size {arr.shape[-2:]}.")
    return arr


#: the bit pattern of 1.0 in each float dtype, as the unsigned integer of the same width
_ONE_BITS = {
    np.dtype(np.float32): np.uint32(0x3F800000),
    np.dtype(np.float64): np.uint64(0x3FF0000000000000),
}
_UINT_OF = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}


def _exact_check(flat: np.ndarray, name: str) -> np.ndarray:
    """Each row's maximum, after the full check (NaN, every value in ``[0, 1]``) with the
    error that names what is wrong; the slow path of :func:`validated_maps`."""
    t = torch.from_numpy(flat)
    hi = t.amax(dim=1)  # NaN propagates through amax / amin
    low, high = float(t.amin()), float(hi.max())
    if np.isnan(low) or np.isnan(high):
        raise CAMInputError(f"{name} contains NaN values; fix the maps before localizing.")
    if low < 0.0 or high > 1.0:
        raise CAMInputError(
            f"{name} must lie in [0, 1] (min-max normalize each map first, e.g. "
            f"CAMResult.normalize() or cam_plugin.minmax_normalize); got "
            f"min={low:.4g}, max={high:.4g}."
        )
    return hi.numpy()


def validated_maps(maps: object, name: str = "maps") -> tuple[np.ndarray, np.ndarray]:
    """:func:`contour_values` and each map's maximum, from one pass over the maps.

    The pass is one vectorised maximum over the maps' bits read as unsigned integers of
    the same width: for IEEE floats ``0 <= a <= b`` iff ``bits(a) <= bits(b)``, and every
    value outside ``[0, 1]`` (negative, NaN, inf, above 1) has bits above ``bits(1.0)``. So
    ``max bits <= bits(1.0)`` proves the whole batch valid and gives each map's maximum;
    otherwise the exact check runs and raises (or accepts ``-0.0``).

    Returns:
        ``(values, maxima)``: the maps in their own float dtype, and ``(N,)`` the maximum of
        each of the ``N`` maps (leading dims flattened, row-major).
    """
    arr = _as_array(maps, name)
    h, w = arr.shape[-2:]
    flat = np.ascontiguousarray(arr).reshape(-1, h * w)
    return arr, checked_maxima(flat, name)


def checked_maxima(
    flat: np.ndarray, name: str = "maps", whole: np.ndarray | None = None
) -> np.ndarray:
    """Each row's maximum of float maps ``(n, H W)`` (C-contiguous), checked in the same
    pass (see :func:`validated_maps`). When the check fails, the exact check runs on
    ``whole`` (default: ``flat``; the batch ``flat`` is a chunk of, so that the error reports
    the batch's minimum and maximum) and raises, or accepts ``-0.0`` values."""
    if flat.shape[0] == 0:
        return np.zeros(0, dtype=flat.dtype)
    bits = flat.view(_UINT_OF[flat.dtype]).max(axis=1)
    if bits.max() <= _ONE_BITS[flat.dtype]:
        return bits.view(flat.dtype)
    if whole is not None and whole is not flat:
        _exact_check(whole, name)
    return _exact_check(flat, name)


def contour_values(maps: object, name: str = "maps") -> np.ndarray:
    """Maps as a validated numpy array **in their own float dtype** (float32 or float64).

    The same contract as :func:`as_numpy_maps` (at least two dims, a non-empty spatial
    size, no NaN, every value in ``[0, 1]``) without the float64 copy: float16 / bfloat16
    become float32 (exactly), a tensor is detached and copied to the CPU, bool becomes
    float32.

    Raises:
        TypeError: not a tensor / array, or an integer array.
        CAMInputError: fewer than two dims, an empty spatial size, NaN, values outside
            ``[0, 1]``.
    """
    return validated_maps(maps, name)[0]


def as_numpy_maps(maps: object, name: str = "maps") -> np.ndarray:
    """Maps (tensor or array ``(..., H, W)``) as a float64 numpy array, validated.

    The input contract of the evaluation rule (:func:`contour_boxes`) and of
    :mod:`cam_plugin.metrics`: a float (or bool) tensor / array with at least two dims, a
    non-empty spatial size, no NaN, and every value in ``[0, 1]`` (min-max normalized).
    A tensor is detached and copied to the CPU.

    Args:
        maps: ``torch.Tensor`` or ``np.ndarray`` ``(..., H, W)``.
        name: how the argument is called in error messages.

    Returns:
        float64 array of the same shape.

    Raises:
        TypeError: not a tensor / array, or an integer array.
        CAMInputError: fewer than two dims, an empty spatial size, NaN, values outside
            ``[0, 1]``.
    """
    return contour_values(maps, name).astype(np.float64, copy=False)


def check_thresholds(thresholds: object) -> np.ndarray:
    """A threshold or a sweep as a non-empty float64 ``(T,)`` array of fractions in ``[0, 1]``.

    Raises:
        TypeError: not a float or a 1-D sequence of floats.
        CAMInputError: empty, not 1-D, not finite, or outside ``[0, 1]``.
    """
    if isinstance(thresholds, Tensor):
        thresholds = thresholds.detach().cpu().numpy()
    if isinstance(thresholds, (int, float, np.floating)) and not isinstance(thresholds, bool):
        thresholds = [float(thresholds)]
    try:
        arr = np.asarray(thresholds, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            "thresholds must be a float or a 1-D sequence of floats in [0, 1], e.g. "
            "np.arange(0, 1, 0.01)."
        ) from exc
    if arr.ndim != 1 or arr.size == 0:
        raise CAMInputError(
            f"thresholds must be a non-empty 1-D sequence of floats, got shape {arr.shape}."
        )
    if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
        raise CAMInputError(
            "thresholds must be finite fractions of each map's maximum in [0, 1]; got "
            f"min={arr.min()}, max={arr.max()}."
        )
    return arr


# --------------------------------------------------------------------------- quantization


def quantize_maps(maps: np.ndarray) -> np.ndarray:
    """Choe et al.'s quantization ``q = uint8(m * 255)`` (truncation), computed in float64.

    Args:
        maps: float array of any shape with values in ``[0, 1]`` (see :func:`as_numpy_maps`).

    Returns:
        ``uint8`` array of the same shape.
    """
    return (np.asarray(maps, dtype=np.float64) * 255).astype(np.uint8)


@lru_cache(maxsize=4)
def quantization_edges(dtype: Any) -> np.ndarray:
    """``e[k]`` (``k = 0..256``): the smallest value ``m`` of ``dtype`` (float32 or float64)
    with ``uint8(float64(m) * 255) >= k``, so that ``quantize_maps(m) >= k`` iff
    ``m >= e[k]`` (``e[256] = inf``: no value in ``[0, 1]`` quantizes to 256).

    ``float64(m) * 255`` is non-decreasing in ``m`` (rounding is monotone), so each edge is
    found from ``k / 255`` by stepping one unit in the last place up or down.
    """
    dt = np.dtype(dtype)
    k = np.arange(257, dtype=np.float64)
    e = (k / 255).astype(dt)

    def reaches(v: np.ndarray) -> np.ndarray:
        return np.floor(v.astype(np.float64) * 255) >= k

    for _ in range(8):  # a couple of ulps at most; a few rounds for safety
        e = np.where(reaches(e), e, np.nextafter(e, dt.type(np.inf)))
        below = np.nextafter(e, dt.type(-np.inf))
        e = np.where(reaches(below), below, e)
    e[256] = np.inf
    return e


def _cuts(peaks: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``int(t * max q)`` for every map (rows) and threshold (columns), as Choe et al."""
    return (thresholds[None, :] * peaks[:, None].astype(np.float64)).astype(np.int64)


def _peaks(flat: np.ndarray, maxima: np.ndarray | None, name: str, whole: np.ndarray) -> np.ndarray:
    """``max q`` per map ``(n,)`` of maps ``(n, H W)`` (uint8, or float in ``[0, 1]``: taken
    from ``maxima`` when known, else :func:`checked_maxima`, which checks the chunk ``flat``
    of the batch ``whole`` in the same pass)."""
    if flat.dtype == np.uint8:
        return flat.max(axis=1).astype(np.int64)
    top = checked_maxima(flat, name, whole) if maxima is None else maxima
    return quantize_maps(top).astype(np.int64)


def _quantized(values: np.ndarray) -> np.ndarray:
    """:func:`quantize_maps` of float maps through torch (the same truncation, faster)."""
    t = torch.from_numpy(np.ascontiguousarray(values)).to(torch.float64) * 255
    return t.to(torch.uint8).numpy()


def _binaries(flat: np.ndarray, cuts: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``q > cut`` for float maps ``(n, H W)`` at their cuts ``(n, T)``, as ``uint8`` 0 / 1
    images ``(n, T, H W)``: one vectorised comparison ``m >= e[cut + 1]`` of the floats,
    written into ``out`` (a bool buffer of at least ``n T H W`` elements) when given."""
    edges = quantization_edges(flat.dtype)[cuts + 1]
    shape = (flat.shape[0], cuts.shape[1], flat.shape[1])
    target = None if out is None else out[: int(np.prod(shape))].reshape(shape)
    result = np.greater_equal(flat[:, None, :], edges[:, :, None], out=target)
    return result.view(np.uint8)


class ContourSweep(NamedTuple):
    """Every contour box of one quantized map at every threshold of a sweep.

    Attributes:
        boxes: int64 ``(n_total, 4)``, inclusive ``(x0, y0, x1, y1)``: the boxes of every
            contour of all thresholds, concatenated in threshold order.
        counts: int64 ``(T,)``: ``counts[t]`` boxes belong to threshold ``t`` (``>= 1``: a
            threshold without contours contributes the box ``(0, 0, 0, 0)``).
        largest: int64 ``(T,)``: the row in ``boxes`` of each threshold's largest contour
            (the first one of maximal area), so ``boxes[largest]`` is MaxBoxAcc's box per
            threshold.
    """

    boxes: np.ndarray
    counts: np.ndarray
    largest: np.ndarray


def _boxes_of_contours(
    contours: Sequence[np.ndarray], counts: np.ndarray, height: int, width: int
) -> ContourSweep:
    """Boxes, counts and largest rows of contours grouped by image (``counts`` per group).

    For a point set ``cv2.boundingRect`` is ``(min x, min y, max x - min x + 1, ...)``, so
    Choe et al.'s box ``(x, y, x + w, y + h)`` is ``(min x, min y, max x + 1, max y + 1)``,
    clipped to ``(W - 1, H - 1)``. ``cv2.contourArea`` is the shoelace formula
    ``|sum_i (x_i y_{i+1} - x_{i+1} y_i)| / 2`` over the closed polygon; twice it is
    computed here in exact integers. Groups without a contour get the box ``(0, 0, 0, 0)``
    of area 0; the first contour of maximal area is the group's largest.
    """
    counts = counts.astype(np.int64).copy()
    if contours:
        lengths = np.fromiter(map(len, contours), dtype=np.int64, count=len(contours))
        pts = np.concatenate(contours).reshape(-1, 2).astype(np.int64)
        ends = np.cumsum(lengths)
        first = ends - lengths
        x, y = pts[:, 0], pts[:, 1]
        boxes = np.stack(
            [
                np.minimum.reduceat(x, first),
                np.minimum.reduceat(y, first),
                np.minimum(np.maximum.reduceat(x, first) + 1, width - 1),
                np.minimum(np.maximum.reduceat(y, first) + 1, height - 1),
            ],
            axis=1,
        )
        following = np.arange(1, len(pts) + 1)
        following[ends - 1] = first  # close each polygon
        area = np.abs(np.add.reduceat(x * y[following] - x[following] * y, first))
    else:
        boxes = np.zeros((0, 4), dtype=np.int64)
        area = np.zeros(0, dtype=np.int64)
    empty = counts == 0
    if empty.any():
        at = (np.cumsum(counts) - counts)[empty]
        boxes = np.insert(boxes, at, 0, axis=0)
        area = np.insert(area, at, 0)
        counts[empty] = 1
    starts = np.cumsum(counts) - counts
    is_max = area == np.repeat(np.maximum.reduceat(area, starts), counts)
    largest = np.minimum.reduceat(np.where(is_max, np.arange(len(area)), len(area)), starts)
    return ContourSweep(boxes=boxes, counts=counts, largest=largest)


def _find_contours(
    values: np.ndarray, thresholds: np.ndarray, maxima: np.ndarray | None, name: str
) -> tuple[list[np.ndarray], np.ndarray]:
    """Contours of every map (``(N, H, W)``) at every threshold (``(T,)``), grouped per
    (map, threshold) in row-major order: the contour list and ``(N * T,)`` counts.

    The maps go chunk by chunk, each chunk read from memory once and then worked on in the
    cache: its maxima (checked, :func:`_peaks`), its cuts, its binary images, their
    contours. With few thresholds a float chunk is binarized by one comparison of the floats
    (chunks of ``_CACHE_BYTES`` of maps and binary images); with many, or for ``uint8``
    maps, each map is quantized once and binarized per threshold by ``cv2.threshold``
    (Choe et al.'s own call; chunks of ``_BINARY_BYTES`` of float64 maps being quantized)."""
    import cv2

    n, t_count = values.shape[0], len(thresholds)
    shape = values.shape[1:]
    flat = values.reshape(n, -1)
    found: list[np.ndarray] = []
    counts = np.zeros(n * t_count, dtype=np.int64)
    as_uint8 = values.dtype == np.uint8 or t_count >= _QUANTIZE_FROM
    if as_uint8:
        per_step = max(1, _BINARY_BYTES // (flat.shape[1] * 8))
    else:
        per_step = max(1, _CACHE_BYTES // (flat.shape[1] * (values.itemsize + t_count)))
        # one buffer for every chunk's binary images: reused while it is still in the cache
        buffer = np.empty(min(n, per_step) * t_count * flat.shape[1], dtype=np.bool_)
    g = 0
    for start in range(0, n, per_step):
        part = flat[start : start + per_step]
        known = None if maxima is None else maxima[start : start + per_step]
        part_cuts = _cuts(_peaks(part, known, name, flat), thresholds)
        images: Iterator[np.ndarray]
        if as_uint8:
            q = part if part.dtype == np.uint8 else _quantized(part)
            images = (
                cv2.threshold(image.reshape(shape), cut, 255, cv2.THRESH_BINARY)[1]
                for image, row in zip(q, part_cuts.tolist())
                for cut in row
            )
        else:
            images = iter(_binaries(part, part_cuts, buffer).reshape(-1, *shape))
        for binary in images:
            # OpenCV 3 returns (image, contours, hierarchy), OpenCV >= 4 (contours, hierarchy).
            contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
            counts[g] = len(contours)
            found.extend(contours)
            g += 1
    return found, counts


def contour_sweeps(
    values: np.ndarray,
    thresholds: np.ndarray,
    *,
    maxima: np.ndarray | None = None,
    name: str = "maps",
) -> ContourSweep:
    """Every contour box of many maps at every threshold, in one flat result.

    Args:
        values: ``(N, H, W)``: ``uint8`` maps already quantized by :func:`quantize_maps`, or
            float32 / float64 maps in ``[0, 1]`` (binarized without quantizing, with the
            same result; checked chunk by chunk, as :func:`contour_values` does, unless
            ``maxima`` is given).
        thresholds: ``(T,)`` fractions of each map's maximum in ``[0, 1]``.
        maxima: ``(N,)`` each map's maximum when already known (:func:`validated_maps`).
        name: how the maps are called in error messages.

    Returns:
        :class:`ContourSweep` over the ``N * T`` (map, threshold) groups in row-major order:
        ``counts`` and ``largest`` are ``(N * T,)``, ``boxes`` hold every group's boxes in
        that order.
    """
    thresholds = check_thresholds(thresholds)
    values = np.ascontiguousarray(values)
    if values.ndim != 3:
        raise CAMInputError(f"contour_sweeps needs maps (N, H, W); got {values.shape}.")
    found, counts = _find_contours(values, thresholds, maxima, name)
    return _boxes_of_contours(found, counts, values.shape[1], values.shape[2])


def contour_sweep(image: np.ndarray, thresholds: np.ndarray) -> ContourSweep:
    """Every contour box of one ``uint8`` map at every threshold (Choe et al.'s steps 2-6
    of :func:`contour_boxes`, for a map already quantized by :func:`quantize_maps`).

    At threshold ``t`` the binary image is ``image > int(t * max(image))``; its contours
    (``cv2.findContours``, ``RETR_TREE``, ``CHAIN_APPROX_SIMPLE``) are boxed and the largest
    is marked. This is the per-map step :mod:`cam_plugin.metrics` runs for the whole sweep,
    reading both the largest-contour (MaxBoxAcc) and every-contour (MaxBoxAccV2) boxes off
    one result.

    Args:
        image: ``uint8`` array ``(H, W)`` (made C-contiguous here if it is not).
        thresholds: ``(T,)`` fractions of the map's maximum in ``[0, 1]``, e.g.
            :func:`cam_plugin.metrics.cam_thresholds`.

    Returns:
        :class:`ContourSweep` ``(boxes, counts, largest)``.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2:
        raise TypeError(
            "contour_sweep needs one uint8 (H, W) map; quantize float maps in [0, 1] with "
            "quantize_maps(maps) first."
        )
    return contour_sweeps(image[None], thresholds)


class ContourBoxes(NamedTuple):
    """Boxes of one map at every threshold of a sweep (Choe et al.'s contour rule).

    Attributes:
        boxes: int64 ``(n_total, 4)``, inclusive ``(x0, y0, x1, y1)``: the boxes of all
            thresholds concatenated in threshold order.
        counts: int64 ``(T,)``: ``counts[t]`` boxes belong to ``thresholds[t]``; always
            ``>= 1`` because an empty threshold contributes the box ``(0, 0, 0, 0)``.
    """

    boxes: np.ndarray
    counts: np.ndarray

    def per_threshold(self) -> list[np.ndarray]:
        """The boxes split per threshold: a list of ``T`` arrays ``(counts[t], 4)``."""
        return list(np.split(self.boxes, np.cumsum(self.counts)[:-1]))


def contour_boxes(
    maps: ArrayLike,
    thresholds: float | Sequence[float] | np.ndarray | Tensor,
    multi_contour: bool = False,
) -> list[ContourBoxes]:
    """Boxes by Choe et al.'s contour rule (``compute_bboxes_from_scoremaps``), per threshold.

    For each map ``m`` (values in ``[0, 1]``) and threshold ``t``:

    1. ``q = uint8(m * 255)`` (truncation, computed in float64),
    2. binary image ``q > int(t * max q)`` (strictly above; ``cv2.THRESH_BINARY``),
    3. ``cv2.findContours(..., RETR_TREE, CHAIN_APPROX_SIMPLE)`` (holes give contours too),
    4. the contour with the largest ``cv2.contourArea`` (the first one on ties), or every
       contour when ``multi_contour=True``,
    5. ``x, y, w, h = cv2.boundingRect(c)`` and the box ``(x, y, min(x + w, W - 1),
       min(y + h, H - 1))``. Note the quirk kept for comparability: ``x + w`` is one past
       the contour's last column, so boxes are one pixel wider and taller than the contour
       (clipped to the image).
    6. No contour at all gives the single box ``(0, 0, 0, 0)``.

    The maps are checked, binarized and boxed chunk by chunk with vectorised steps (see the
    module notes); OpenCV runs once per map and threshold, for ``findContours``.

    Args:
        maps: tensor or array ``(..., H, W)`` with values in ``[0, 1]``; leading dims are
            flattened in row-major order.
        thresholds: one float or a sweep, e.g. ``np.arange(0, 1, 0.01)``.
        multi_contour: box every contour (MaxBoxAccV2) instead of the largest (MaxBoxAcc).

    Returns:
        One :class:`ContourBoxes` per map (``len == prod(leading dims)``, 1 for a single
        ``(H, W)`` map): ``boxes (n_total, 4)`` int64 with ``counts (T,)`` per threshold.
    """
    arr = _as_array(maps, "maps")
    thr = check_thresholds(thresholds)
    h, w = arr.shape[-2:]
    flat = arr.reshape(-1, h, w)
    n, t_count = flat.shape[0], len(thr)
    if n == 0:
        return []
    sweep = contour_sweeps(flat, thr)  # checks the maps chunk by chunk as it boxes them
    if not multi_contour:
        boxes = sweep.boxes[sweep.largest].reshape(n, t_count, 4)
        ones = np.ones(t_count, dtype=np.int64)
        return [ContourBoxes(boxes=boxes[i], counts=ones) for i in range(n)]
    per_map = sweep.counts.reshape(n, t_count)
    bounds = np.concatenate([[0], np.cumsum(per_map.sum(axis=1))])
    return [
        ContourBoxes(boxes=sweep.boxes[bounds[i] : bounds[i + 1]], counts=per_map[i])
        for i in range(n)
    ]
