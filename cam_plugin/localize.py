"""From class activation maps to boxes and masks.

Two rules live here, side by side (see ``docs/localization.md``):

* The paper's rule (Zhou et al., CVPR 2016, Sec. 3), :func:`threshold_boxes`: keep the pixels
  whose value is at least ``threshold * max`` of their map, take the largest 8-connected
  component (counted in pixels) and return its tight box. Pure torch, batched, runs on the
  maps' device.
* The evaluation rule of Choe et al., CVPR 2020 ("Evaluating Weakly Supervised Object
  Localization Methods Right"), :func:`contour_boxes`: quantize the map to ``uint8``,
  binarize strictly above ``int(threshold * max)``, find contours with OpenCV and box the
  largest contour (or every contour). This is what :mod:`cam_plugin.metrics` uses so that
  MaxBoxAcc / MaxBoxAccV2 numbers are comparable with published ones; its steps are public
  so the metrics share them: :func:`as_numpy_maps` (the maps' contract), :func:`quantize_maps`
  (step 1) and :func:`contour_sweep` (steps 2-6 for a whole threshold sweep of one map).

Box convention (both rules): ``(x0, y0, x1, y1)`` in *inclusive* pixel coordinates, int64;
``x`` indexes columns (width), ``y`` rows (height). A box ``(2, 3, 2, 3)`` covers one pixel.
A map with nothing to box gives ``(0, 0, 0, 0)``.

Maps are expected to be min-max normalized to ``[0, 1]`` per map (``CAMResult.normalize()``
or :func:`cam_plugin.minmax_normalize`); thresholds are always *fractions of each map's own
maximum*.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Union

import numpy as np
import torch
from torch import Tensor

from .errors import CAMInputError

__all__ = [
    "ContourBoxes",
    "ContourSweep",
    "TopKBoxes",
    "as_numpy_maps",
    "contour_boxes",
    "contour_sweep",
    "label_components",
    "masks",
    "quantize_maps",
    "threshold_boxes",
    "topk_boxes",
]

ArrayLike = Union[Tensor, np.ndarray]


# --------------------------------------------------------------------------- validation


def _check_tensor_maps(maps: object, name: str = "maps") -> Tensor:
    if isinstance(maps, np.ndarray):
        raise TypeError(
            f"{name} must be a torch.Tensor, got a numpy array; wrap it with "
            f"torch.from_numpy({name})."
        )
    if not isinstance(maps, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (..., H, W), got {type(maps)!r}.")
    if maps.dim() < 2:
        raise CAMInputError(
            f"{name} must have at least 2 dims (..., H, W); got shape {tuple(maps.shape)}."
        )
    if maps.shape[-1] == 0 or maps.shape[-2] == 0:
        raise CAMInputError(f"{name} has an empty spatial size {tuple(maps.shape[-2:])}.")
    if not (maps.is_floating_point() or maps.dtype == torch.bool):
        raise TypeError(
            f"{name} must be a floating point tensor, got dtype {maps.dtype}; "
            f"convert with {name}.float()."
        )
    if maps.is_floating_point() and bool(torch.isnan(maps).any()):
        raise CAMInputError(
            f"{name} contains NaN values; check the model output (a NaN logit or a 0/0 "
            "normalization of a constant map) before localizing."
        )
    return maps


def _check_threshold(threshold: object, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)):
        raise TypeError(
            f"{name} must be a float fraction of each map's maximum in [0, 1], got "
            f"{type(threshold).__name__}."
        )
    value = float(threshold)
    if not (0.0 <= value <= 1.0):
        raise CAMInputError(
            f"{name} must be a fraction of each map's maximum in [0, 1], got {value}; "
            "e.g. 0.2 keeps pixels at or above 20% of the peak."
        )
    return value


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
    if isinstance(maps, Tensor):
        arr = maps.detach().to("cpu", torch.float64).numpy()
    elif isinstance(maps, np.ndarray):
        if not (np.issubdtype(maps.dtype, np.floating) or maps.dtype == np.bool_):
            raise TypeError(
                f"{name} must hold floats in [0, 1], got dtype {maps.dtype}; divide integer "
                "maps by their maximum first."
            )
        arr = maps.astype(np.float64)
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy array of shape (..., H, W), got "
            f"{type(maps)!r}."
        )
    if arr.ndim < 2:
        raise CAMInputError(f"{name} must have at least 2 dims (..., H, W); got shape {arr.shape}.")
    if arr.shape[-1] == 0 or arr.shape[-2] == 0:
        raise CAMInputError(f"{name} has an empty spatial size {arr.shape[-2:]}.")
    if np.isnan(arr).any():
        raise CAMInputError(f"{name} contains NaN values; fix the maps before localizing.")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise CAMInputError(
            f"{name} must lie in [0, 1] (min-max normalize each map first, e.g. "
            f"CAMResult.normalize() or cam_plugin.minmax_normalize); got "
            f"min={arr.min():.4g}, max={arr.max():.4g}."
        )
    return arr


def _check_thresholds(thresholds: object) -> np.ndarray:
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


# --------------------------------------------------------------------------- paper's rule


def masks(maps: Tensor, threshold: float = 0.2) -> Tensor:
    """Binary masks of the paper's rule: pixels with ``m(x, y) >= threshold * max m``.

    The maximum is taken per map (over the last two dims). A map whose maximum is ``<= 0``
    (e.g. an all-zero map, which is what a constant map normalizes to) gives an empty mask.

    Args:
        maps: float tensor ``(..., H, W)``, normally normalized to ``[0, 1]``.
        threshold: fraction of each map's maximum in ``[0, 1]`` (the paper uses 0.2).

    Returns:
        Bool tensor of the same shape as ``maps``.
    """
    maps = _check_tensor_maps(maps)
    thr = _check_threshold(threshold)
    if maps.dtype == torch.bool:
        maps = maps.to(torch.float32)
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps >= thr * peak) & (peak > 0)


def _neighbourhood_max(labels: Tensor) -> Tensor:
    """3x3 maximum of an integer tensor ``(N, H, W)`` (8-neighbourhood plus centre)."""
    rows = labels.clone()
    rows[..., 1:] = torch.maximum(rows[..., 1:], labels[..., :-1])
    rows[..., :-1] = torch.maximum(rows[..., :-1], labels[..., 1:])
    out = rows.clone()
    out[..., 1:, :] = torch.maximum(out[..., 1:, :], rows[..., :-1, :])
    out[..., :-1, :] = torch.maximum(out[..., :-1, :], rows[..., 1:, :])
    return out


def label_components(mask: Tensor) -> Tensor:
    """8-connected component labels of a batch of binary masks, in torch (no Python loop).

    Every foreground pixel ``p`` starts with the id ``L(p) = H*W - i(p)``, ``i(p)`` being its
    row-major index, so ``L(p)`` always names a pixel of the same component (the one with
    index ``H*W - L(p)``). Each round then

    1. takes ``n(p)``, the largest label among the 3x3 neighbours inside the mask,
    2. hooks: the pixel named by ``L(p)`` raises its label to ``n(p)`` (a scatter-max), and
       ``L(p) <- max(L(p), n(p))``,
    3. jumps pointers twice: ``L(p) <- max(L(p), L(pixel named by L(p)))``,

    until nothing changes (hook-and-compress, a few rounds for blob-like masks). Labels only
    grow and stay inside their component, so at convergence each component carries
    ``H*W - i_first``, with ``i_first`` the index of its first pixel in a raster scan: labels
    are unique per component and rank components like ``cv2.connectedComponents`` does.

    Args:
        mask: bool tensor ``(..., H, W)``.

    Returns:
        int64 tensor of the same shape: 0 on background, a component id ``>= 1`` elsewhere.
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError("mask must be a bool torch.Tensor of shape (..., H, W).")
    if mask.dim() < 2:
        raise CAMInputError(f"mask must have at least 2 dims (..., H, W); got {tuple(mask.shape)}.")
    h, w = mask.shape[-2:]
    hw = h * w
    flat_mask = mask.reshape(-1, hw)
    n = flat_mask.shape[0]
    if n == 0 or hw == 0:
        return torch.zeros(mask.shape, dtype=torch.int64, device=mask.device)
    ids = hw - torch.arange(hw, device=mask.device, dtype=torch.int64)
    zero = torch.zeros((), dtype=torch.int64, device=mask.device)
    labels = torch.where(flat_mask, ids.view(1, hw), zero)
    while True:
        near = _neighbourhood_max(labels.view(n, h, w)).view(n, hw)
        near = torch.where(flat_mask, near, zero)
        # Background pixels point at the last pixel with value 0: a no-op for a max.
        new = labels.scatter_reduce(1, (hw - labels).clamp_(0, hw - 1), near, reduce="amax")
        new = torch.maximum(new, near)
        for _ in range(2):
            new = torch.maximum(new, new.gather(1, (hw - new).clamp_(0, hw - 1)))
        new = torch.where(flat_mask, new, zero)
        if torch.equal(new, labels):
            break
        labels = new
    return labels.view(mask.shape)


def _largest_component_boxes(mask: Tensor) -> Tensor:
    """Box of the largest 8-connected component of each mask ``(N, H, W)`` -> ``(N, 4)``."""
    n, h, w = mask.shape
    hw = h * w
    labels = label_components(mask).view(n, hw)
    offsets = torch.arange(n, device=mask.device, dtype=torch.int64).view(n, 1) * (hw + 1)
    sizes = torch.bincount((labels + offsets).view(-1), minlength=n * (hw + 1)).view(n, hw + 1)
    sizes[:, 0] = 0  # background
    # Largest size wins; among equal sizes the larger label, i.e. the earlier first pixel.
    key = sizes * (hw + 1) + torch.arange(hw + 1, device=mask.device, dtype=torch.int64)
    best = key.argmax(dim=1)
    has = sizes.amax(dim=1) > 0
    sel = (labels == best.view(n, 1)) & has.view(n, 1)
    sel = sel.view(n, h, w)
    rows = sel.any(dim=2)
    cols = sel.any(dim=1)
    ys = torch.arange(h, device=mask.device, dtype=torch.int64).view(1, h)
    xs = torch.arange(w, device=mask.device, dtype=torch.int64).view(1, w)
    y0 = torch.where(rows, ys, h).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1)
    x0 = torch.where(cols, xs, w).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    return torch.where(has.view(n, 1), boxes, torch.zeros_like(boxes))


def threshold_boxes(maps: Tensor, threshold: float = 0.2) -> Tensor:
    """The paper's localization rule (Zhou et al., CVPR 2016, Sec. 3), batched.

    For each map ``m``: keep ``{(x, y) : m(x, y) >= threshold * max m}``, take its largest
    8-connected component (by pixel count; ties go to the component met first in a
    row-major scan, as ``cv2.connectedComponentsWithStats`` numbers them) and return that
    component's tight box ``(x0, y0, x1, y1)``, inclusive. A map whose maximum is ``<= 0``
    (an all-zero map) gives ``(0, 0, 0, 0)``.

    Vectorised over every leading dim (connected components are labelled in torch, see
    :func:`label_components`); runs on the maps' device.

    Args:
        maps: float tensor ``(..., H, W)``, e.g. ``(B, H, W)`` or ``(B, k, H, W)``; normally
            min-max normalized, the threshold is a fraction of each map's own maximum.
        threshold: fraction in ``[0, 1]``; the paper uses 0.2.

    Returns:
        int64 tensor ``(..., 4)`` on the maps' device.
    """
    keep = masks(maps, threshold)
    lead = keep.shape[:-2]
    h, w = keep.shape[-2:]
    flat = keep.reshape(-1, h, w)
    if flat.shape[0] == 0:
        return torch.zeros((*lead, 4), dtype=torch.int64, device=keep.device)
    return _largest_component_boxes(flat).reshape(*lead, 4)


class TopKBoxes(NamedTuple):
    """Boxes of the top-k classes of each image, sorted by descending score.

    Attributes:
        boxes: int64 ``(B, k, 4)``, inclusive ``(x0, y0, x1, y1)``.
        classes: int64 ``(B, k)``, class ids.
        scores: ``(B, k)``, the scores these classes were ranked by.
    """

    boxes: Tensor
    classes: Tensor
    scores: Tensor


def topk_boxes(
    maps: Tensor,
    scores: Tensor,
    k: int = 5,
    threshold: float = 0.2,
    classes: Tensor | None = None,
) -> TopKBoxes:
    """The paper's top-k heuristic: one box for each of the ``k`` best-scoring classes.

    Zhou et al. box the maps of the top-5 predicted classes of each image (top-5
    localization: an image counts as correct when one of those classes is the label and its
    box has IoU >= 0.5 with a ground-truth box). Each box comes from :func:`threshold_boxes`.

    Args:
        maps: float tensor ``(B, C, H, W)``: one map per candidate class, ``C >= k`` (all
            classes, or the top classes already chosen by ``CAM(..., topk=...)``).
        scores: ``(B, C)``: the score (logit or probability) of each map's class.
        k: how many classes to keep per image, ``1 <= k <= C``.
        threshold: fraction of each map's maximum, as in :func:`threshold_boxes`.
        classes: optional int ``(B, C)`` class id of each map; by default map ``c`` is
            class ``c``.

    Returns:
        :class:`TopKBoxes` with ``boxes (B, k, 4)``, ``classes (B, k)``, ``scores (B, k)``.
    """
    maps = _check_tensor_maps(maps)
    if maps.dim() != 4:
        raise CAMInputError(
            f"maps must be (B, C, H, W) with one map per candidate class; got shape "
            f"{tuple(maps.shape)}."
        )
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor (B, C), got {type(scores)!r}.")
    b, c = maps.shape[:2]
    if tuple(scores.shape) != (b, c):
        raise CAMInputError(
            f"scores must have shape (B, C) = {(b, c)} to match maps {tuple(maps.shape)}; got "
            f"{tuple(scores.shape)}."
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= c:
        raise CAMInputError(f"k must be an int in [1, C={c}], got {k!r}.")
    if classes is None:
        class_ids = torch.arange(c, device=maps.device).expand(b, c)
    else:
        if not isinstance(classes, Tensor) or tuple(classes.shape) != (b, c):
            raise CAMInputError(
                f"classes must be an int tensor of shape (B, C) = {(b, c)} giving the class id "
                "of each map."
            )
        class_ids = classes.to(device=maps.device, dtype=torch.int64)
    top_scores, order = scores.to(maps.device).topk(k, dim=1)
    picked = maps.gather(1, order.view(b, k, 1, 1).expand(b, k, *maps.shape[-2:]))
    return TopKBoxes(
        boxes=threshold_boxes(picked, threshold),
        classes=class_ids.gather(1, order).to(torch.int64),
        scores=top_scores,
    )


# --------------------------------------------------------------------------- Choe et al.


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


def contour_sweep(image: np.ndarray, thresholds: np.ndarray) -> ContourSweep:
    """Every contour box of one ``uint8`` map at every threshold (Choe et al.'s steps 2-6
    of :func:`contour_boxes`, for a map already quantized by :func:`quantize_maps`).

    At threshold ``t`` the binary image is ``image > int(t * max(image))``; its contours
    (``cv2.findContours``, ``RETR_TREE``, ``CHAIN_APPROX_SIMPLE``) are boxed and the largest
    is marked. This is the per-map step :mod:`cam_plugin.metrics` runs once per image for
    the whole sweep, reading both the largest-contour (MaxBoxAcc) and every-contour
    (MaxBoxAccV2) boxes off one result.

    Args:
        image: ``uint8`` array ``(H, W)`` (made C-contiguous here if it is not).
        thresholds: ``(T,)`` fractions of the map's maximum in ``[0, 1]``, e.g.
            :func:`cam_plugin.metrics.cam_thresholds`.

    Returns:
        :class:`ContourSweep` ``(boxes, counts, largest)``.

    Boxes and areas are computed from the contour points at once for the whole sweep. For a
    point set ``cv2.boundingRect`` is ``(min x, min y, max x - min x + 1, ...)``, so Choe et
    al.'s box ``(x, y, x + w, y + h)`` is ``(min x, min y, max x + 1, max y + 1)``, clipped
    to ``(W - 1, H - 1)``. ``cv2.contourArea`` is the shoelace formula
    ``|sum_i (x_i y_{i+1} - x_{i+1} y_i)| / 2`` over the closed polygon; twice it is computed
    here in exact integers. The first contour of maximal area is the largest (as ``max``).
    """
    import cv2

    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2:
        raise TypeError(
            "contour_sweep needs one uint8 (H, W) map; quantize float maps in [0, 1] with "
            "quantize_maps(maps) first."
        )
    image = np.ascontiguousarray(image)
    thresholds = _check_thresholds(thresholds)
    height, width = image.shape
    peak = int(image.max())
    found: list[np.ndarray] = []
    counts = np.zeros(len(thresholds), dtype=np.int64)
    for t, thr in enumerate(thresholds):
        _, binary = cv2.threshold(image, int(float(thr) * peak), 255, cv2.THRESH_BINARY)
        # OpenCV 3 returns (image, contours, hierarchy), OpenCV >= 4 (contours, hierarchy).
        contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
        counts[t] = len(contours)
        found.extend(contours)
    if found:
        lengths = np.fromiter((len(c) for c in found), dtype=np.int64, count=len(found))
        pts = np.concatenate(found).reshape(-1, 2).astype(np.int64)
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


def quantize_maps(maps: np.ndarray) -> np.ndarray:
    """Choe et al.'s quantization ``q = uint8(m * 255)`` (truncation), computed in float64.

    Args:
        maps: float array of any shape with values in ``[0, 1]`` (see :func:`as_numpy_maps`).

    Returns:
        ``uint8`` array of the same shape.
    """
    return (np.asarray(maps, dtype=np.float64) * 255).astype(np.uint8)


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

    Args:
        maps: tensor or array ``(..., H, W)`` with values in ``[0, 1]``; leading dims are
            flattened in row-major order.
        thresholds: one float or a sweep, e.g. ``np.arange(0, 1, 0.01)``.
        multi_contour: box every contour (MaxBoxAccV2) instead of the largest (MaxBoxAcc).

    Returns:
        One :class:`ContourBoxes` per map (``len == prod(leading dims)``, 1 for a single
        ``(H, W)`` map): ``boxes (n_total, 4)`` int64 with ``counts (T,)`` per threshold.
    """
    arr = as_numpy_maps(maps)
    thr = _check_thresholds(thresholds)
    h, w = arr.shape[-2:]
    quantized = quantize_maps(arr.reshape(-1, h, w))
    out: list[ContourBoxes] = []
    for image in quantized:
        boxes, counts, largest = contour_sweep(image, thr)
        if multi_contour:
            out.append(ContourBoxes(boxes=boxes, counts=counts))
        else:
            out.append(ContourBoxes(boxes=boxes[largest], counts=np.ones_like(counts)))
    return out
