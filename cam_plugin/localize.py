"""From class activation maps to boxes and masks.

Two rules live side by side (see ``docs/localization.md``):

* The paper's rule (Zhou et al., CVPR 2016, Sec. 3), :func:`threshold_boxes`: keep the pixels
  whose value is at least ``threshold * max`` of their map, take the largest 8-connected
  component (counted in pixels) and return its tight box. Batched over every leading dim;
  the components come from OpenCV on the CPU and from torch on other devices
  (:func:`largest_component_boxes`, one function for both, the same boxes).
* The evaluation rule of Choe et al., CVPR 2020 ("Evaluating Weakly Supervised Object
  Localization Methods Right"), :func:`contour_boxes`: quantize the map to ``uint8``,
  binarize strictly above ``int(threshold * max)``, find contours with OpenCV and box the
  largest contour (or every contour). It lives in :mod:`cam_plugin.wsol_contours` and is
  re-exported here with its public steps (:func:`as_numpy_maps`, :func:`quantize_maps`,
  :func:`contour_sweep`), which :mod:`cam_plugin.metrics` shares.

On top of the paper's rule: :func:`topk_boxes` (one box for each of the ``k`` best classes,
the paper's top-5 localization) and :func:`paper_top5_boxes` (the paper's Sec. 3.2
heuristic: a tight and a loose box for each of the top-1 and top-2 classes, a loose box for
the top-3 class).

Box convention (both rules): ``(x0, y0, x1, y1)`` in *inclusive* pixel coordinates, int64;
``x`` indexes columns (width), ``y`` rows (height). A box ``(2, 3, 2, 3)`` covers one pixel.
A map with nothing to box gives ``(0, 0, 0, 0)``.

Maps are expected to be min-max normalized to ``[0, 1]`` per map (``CAMResult.normalize()``
or :func:`cam_plugin.minmax_normalize`); thresholds are always *fractions of each map's own
maximum*.
"""

from __future__ import annotations

import warnings
from typing import Literal, NamedTuple, Union

import numpy as np
import torch
from torch import Tensor

from .errors import CAMInputError
from .wsol_contours import (
    ContourBoxes,
    ContourSweep,
    as_numpy_maps,
    contour_boxes,
    contour_sweep,
    quantize_maps,
)

__all__ = [
    "PAPER_TOP5_LAYOUT",
    "SECONDS_PER_PIXEL",
    "ContourBoxes",
    "ContourSweep",
    "TopKBoxes",
    "as_numpy_maps",
    "box_cost_warning",
    "contour_boxes",
    "contour_sweep",
    "label_components",
    "largest_component_boxes",
    "masks",
    "paper_top5_boxes",
    "quantize_maps",
    "threshold_boxes",
    "topk_boxes",
]

ArrayLike = Union[Tensor, np.ndarray]
Backend = Literal["auto", "opencv", "torch"]

#: pixels per OpenCV call when many masks are labelled at once (the label image is int32)
_PIXELS_PER_CALL = 1 << 22


# --------------------------------------------------------------------------- validation


def _check_tensor_maps(maps: object, name: str = "maps") -> Tensor:
    """Type, dims, size and dtype of ``maps``; NaN is checked where the maximum is taken."""
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


def _check_backend(backend: object) -> str:
    if backend not in ("auto", "opencv", "torch"):
        raise CAMInputError(f"backend must be 'auto', 'opencv' or 'torch', got {backend!r}.")
    return str(backend)


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

    Raises:
        CAMInputError: a map holds NaN (found through its maximum, which NaN propagates to).
    """
    maps = _check_tensor_maps(maps)
    thr = _check_threshold(threshold)
    if maps.dtype == torch.bool:
        maps = maps.to(torch.float32)
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    if peak.numel() and bool(torch.isnan(peak).any()):
        raise CAMInputError(
            "maps contains NaN values; check the model output (a NaN logit or a 0/0 "
            "normalization of a constant map) before localizing."
        )
    # ``m >= thr * peak`` where the peak is positive; an infinite cut keeps nothing elsewhere.
    cut = torch.where(peak > 0, peak * thr, torch.full_like(peak, float("inf")))
    return maps >= cut


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


def _torch_largest_boxes(mask: Tensor) -> Tensor:
    """Box of the largest 8-connected component of each mask ``(N, H, W)`` -> ``(N, 4)``,
    labelled in torch on the mask's device (:func:`label_components`)."""
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


def _opencv_largest_boxes(mask: Tensor) -> Tensor:
    """Box of the largest 8-connected component of each CPU mask ``(N, H, W)`` -> ``(N, 4)``.

    The masks are stacked into one tall image with a background row after each, so one
    ``cv2.connectedComponentsWithStats`` call labels a whole chunk (no component crosses a
    background row). Each component's map is ``top // (H + 1)``; per map the largest area
    wins, ties going to the lower label (OpenCV numbers components in raster order of their
    first pixel, as :func:`label_components` ranks them).
    """
    import cv2

    n, h, w = mask.shape
    boxes = np.zeros((n, 4), dtype=np.int64)
    per_call = max(1, _PIXELS_PER_CALL // ((h + 1) * w))
    src = mask.numpy()
    for start in range(0, n, per_call):
        part = src[start : start + per_call]
        k = part.shape[0]
        tall = np.zeros((k, h + 1, w), dtype=np.uint8)
        tall[:, :h] = part
        count, _, stats, _ = cv2.connectedComponentsWithStats(
            tall.reshape(k * (h + 1), w), connectivity=8, ltype=cv2.CV_32S
        )
        if count <= 1:
            continue
        st = stats[1:].astype(np.int64)
        which = st[:, cv2.CC_STAT_TOP] // (h + 1)
        order = np.lexsort((np.arange(len(st)), -st[:, cv2.CC_STAT_AREA], which))
        first = np.ones(len(order), dtype=bool)
        first[1:] = which[order[1:]] != which[order[:-1]]
        best = st[order[first]]
        rows = which[order[first]]
        x0 = best[:, cv2.CC_STAT_LEFT]
        y0 = best[:, cv2.CC_STAT_TOP] - rows * (h + 1)
        boxes[start + rows] = np.stack(
            [x0, y0, x0 + best[:, cv2.CC_STAT_WIDTH] - 1, y0 + best[:, cv2.CC_STAT_HEIGHT] - 1],
            axis=1,
        )
    return torch.from_numpy(boxes)


def largest_component_boxes(mask: Tensor, backend: Backend = "auto") -> Tensor:
    """Tight box of the largest 8-connected component of each mask, batched.

    The largest component has the most pixels; ties go to the component met first in a
    row-major scan. A mask without any pixel gives ``(0, 0, 0, 0)``.

    Args:
        mask: bool tensor ``(..., H, W)``.
        backend: ``"opencv"`` (``cv2.connectedComponentsWithStats`` on the CPU, masks
            stacked into few calls), ``"torch"`` (:func:`label_components`, on the mask's
            device), or ``"auto"``: OpenCV for CPU masks, torch elsewhere (CUDA). Both give
            the same boxes (tested).

    Returns:
        int64 ``(..., 4)`` inclusive ``(x0, y0, x1, y1)`` on the mask's device.
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() < 2:
        raise TypeError("mask must be a bool torch.Tensor of shape (..., H, W).")
    use = _check_backend(backend)
    if use == "auto":
        use = "opencv" if mask.device.type == "cpu" else "torch"
    lead = mask.shape[:-2]
    h, w = mask.shape[-2:]
    flat = mask.reshape(-1, h, w)
    if flat.shape[0] == 0:
        return torch.zeros((*lead, 4), dtype=torch.int64, device=mask.device)
    if use == "opencv":
        boxes = _opencv_largest_boxes(flat.cpu().contiguous()).to(mask.device)
    else:
        boxes = _torch_largest_boxes(flat)
    return boxes.reshape(*lead, 4)


#: seconds per pixel to box one map on one CPU core, for cost estimates: about 1 ms per
#: 224 x 224 map (``benchmarks/boxes.py`` measures 0.4-0.5 ms on CAM maps; maps with many
#: components take longer)
SECONDS_PER_PIXEL = 1e-3 / (224 * 224)


def box_cost_warning(maps: Tensor, warn_above: int | None, stacklevel: int = 3) -> None:
    """Warn (``UserWarning``) with the estimated time when boxing more than
    ``warn_above`` maps ``(..., H, W)``: ``n * H * W * SECONDS_PER_PIXEL`` on one CPU core.
    ``None`` never warns."""
    if warn_above is None or maps.dim() < 2:
        return
    n = int(np.prod(maps.shape[:-2], dtype=np.int64))
    if n <= warn_above:
        return
    h, w = maps.shape[-2:]
    seconds = n * h * w * SECONDS_PER_PIXEL
    warnings.warn(
        f"boxing {n} maps of {h}x{w} (more than warn_above={warn_above}) takes about "
        f"{seconds:.1f} s on one CPU core. Box only the classes you need (CAM(...)(x, topk=5) "
        "or targets=labels), or box the feature-resolution maps and scale the boxes by the "
        "input stride; pass warn_above=None to silence this.",
        UserWarning,
        stacklevel=stacklevel,
    )


def threshold_boxes(maps: Tensor, threshold: float = 0.2, backend: Backend = "auto") -> Tensor:
    """The paper's localization rule (Zhou et al., CVPR 2016, Sec. 3), batched.

    For each map ``m``: keep ``{(x, y) : m(x, y) >= threshold * max m}`` (:func:`masks`),
    take its largest 8-connected component (by pixel count; ties go to the component met
    first in a row-major scan, as ``cv2.connectedComponentsWithStats`` numbers them) and
    return that component's tight box ``(x0, y0, x1, y1)``, inclusive. A map whose maximum
    is ``<= 0`` (an all-zero map) gives ``(0, 0, 0, 0)``.

    Vectorised over every leading dim: the masks are built in one torch pass on the maps'
    device and labelled by :func:`largest_component_boxes` (OpenCV on the CPU, torch on
    CUDA by default).

    Args:
        maps: float tensor ``(..., H, W)``, e.g. ``(B, H, W)`` or ``(B, k, H, W)``; normally
            min-max normalized, the threshold is a fraction of each map's own maximum.
        threshold: fraction in ``[0, 1]``; the paper uses 0.2.
        backend: ``"auto"``, ``"opencv"`` or ``"torch"`` (see
            :func:`largest_component_boxes`).

    Returns:
        int64 tensor ``(..., 4)`` on the maps' device.
    """
    return largest_component_boxes(masks(maps, threshold), backend)


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


def _ranked_maps(
    maps: Tensor, scores: Tensor, k: int, classes: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The maps, class ids and scores of the ``k`` best classes of each image, best first."""
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
    return picked, class_ids.gather(1, order).to(torch.int64), top_scores


def topk_boxes(
    maps: Tensor,
    scores: Tensor,
    k: int = 5,
    threshold: float = 0.2,
    classes: Tensor | None = None,
) -> TopKBoxes:
    """The paper's top-k rule: one box for each of the ``k`` best-scoring classes.

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
    picked, class_ids, top_scores = _ranked_maps(maps, scores, k, classes)
    return TopKBoxes(boxes=threshold_boxes(picked, threshold), classes=class_ids, scores=top_scores)


#: which of the three best classes each of the heuristic's five boxes belongs to, and
#: whether it is the tight (True) or the loose (False) box
PAPER_TOP5_LAYOUT = ((0, True), (0, False), (1, True), (1, False), (2, False))


def paper_top5_boxes(
    maps: Tensor,
    scores: Tensor,
    tight: float = 0.2,
    loose: float = 0.1,
    classes: Tensor | None = None,
) -> TopKBoxes:
    """The paper's five-box heuristic for top-5 localization (Zhou et al., Sec. 3.2).

    "We select two bounding boxes (one tight and one loose) from the class activation map of
    the top 1st and 2nd predicted classes and one loose bounding box from the top 3rd
    predicted class." Each box is the paper's rule (:func:`threshold_boxes`): the tight box
    at ``tight`` (the paper's 20% of the max) and the loose box at the lower ``loose``
    (the paper does not give its value; 0.1 by default). The five (class, box) pairs, in
    order (:data:`PAPER_TOP5_LAYOUT`):

    ``(c1, tight(c1)), (c1, loose(c1)), (c2, tight(c2)), (c2, loose(c2)), (c3, loose(c3))``

    An image is right under top-5 localization when one pair has the label's class and a box
    with IoU >= 0.5 with a ground-truth box (:class:`cam_plugin.metrics.WSOLMetrics` counts
    it from the label map alone, as ``Top-5 Loc@heuristic``).

    Args:
        maps: float ``(B, C, H, W)``, one map per candidate class, ``C >= 3``.
        scores: ``(B, C)`` the score of each map's class (ranks the classes).
        tight: the tight box's threshold, a fraction of each map's maximum.
        loose: the loose box's threshold, ``<= tight``.
        classes: optional int ``(B, C)`` class id of each map (default: map ``c`` is class
            ``c``).

    Returns:
        :class:`TopKBoxes` with ``boxes (B, 5, 4)``, ``classes (B, 5)`` (``c1, c1, c2, c2,
        c3``) and ``scores (B, 5)`` (each box's class score).
    """
    t = _check_threshold(tight, "tight")
    lo = _check_threshold(loose, "loose")
    if lo > t:
        raise CAMInputError(
            f"the loose threshold ({lo}) must not exceed the tight one ({t}): a lower threshold "
            "keeps more pixels and gives the looser box."
        )
    picked, class_ids, top_scores = _ranked_maps(maps, scores, 3, classes)
    tight_boxes = threshold_boxes(picked[:, :2], t)
    loose_boxes = threshold_boxes(picked, lo)
    rank = [r for r, _ in PAPER_TOP5_LAYOUT]
    boxes = torch.stack(
        [tight_boxes[:, r] if is_tight else loose_boxes[:, r] for r, is_tight in PAPER_TOP5_LAYOUT],
        dim=1,
    )
    return TopKBoxes(boxes=boxes, classes=class_ids[:, rank], scores=top_scores[:, rank])
