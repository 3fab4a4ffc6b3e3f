"""Pictures: colour-mapped overlays of a map on an image, captions, strips and a labelled
grid figure -- every picture the faces draw (hooks decide *when*, this module *how*).

``overlay`` blends ``(1 − α)·image + α·colormap(m̂)`` where ``m̂`` is the map resized
(bilinear) to the image and brought to ``[0, 1]``: min-max per map by default, or on one
fixed :class:`~cam_plugin.result.MapScale` (``scale=``) so that the colours of several
images mean the same logit values. ``colorbar=True`` adds a colour bar that says which:
the map's own min and max ("min-max per map"), or the fixed scale's bounds and where they
come from. Video clips (per-frame overlays, frames in a strip) are drawn by
:mod:`cam_plugin.viz_video` with these helpers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from .errors import CAMInputError
from .result import MapScale, minmax_normalize

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .result import CAMResult

__all__ = [
    "annotated_overlay",
    "caption",
    "colorbar_panel",
    "draw_box",
    "enlarge",
    "grid_figure",
    "hstack",
    "overlay",
    "probe_strip",
    "to_uint8_image",
    "unit_patches_picture",
]

ArrayLike = Union[np.ndarray, Tensor, Image.Image]


def _as_hwc_array(image: ArrayLike) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        t = t if t.dtype == torch.uint8 else t.float()
        if t.dim() == 3 and t.shape[0] in (1, 3):
            t = t.permute(1, 2, 0)
        return t.numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[2] not in (1, 3, 4):
            return image.transpose(1, 2, 0)  # (C, H, W)
        return image
    raise TypeError(f"image must be a PIL image, numpy array or tensor, got {type(image).__name__}")


def to_uint8_image(
    image: ArrayLike, *, bgr: bool = False, value_range: Literal["auto", "minmax"] = "auto"
) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 array from a PIL image, an ``(H, W[, C])`` array, a
    ``(C, H, W)`` array or tensor (``C`` = 1 or 3; grey becomes three channels).

    uint8 input is kept as it is. Float values ``v`` become ``round(255·v)`` when they lie in
    ``[0, 1]``, ``round(v)`` when they lie in ``[0, 255]``, and are min-max scaled to
    ``[0, 255]`` otherwise (or always, with ``value_range="minmax"``: a normalized network
    input). ``bgr=True`` swaps the channel order (a BGR picture shown in RGB).
    """
    arr = _as_hwc_array(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise CAMInputError(f"image must be (H, W), (H, W, C) or (C, H, W), got {arr.shape}")
    arr = arr[:, :, :3]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if bgr:
        arr = arr[:, :, ::-1]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if value_range == "minmax" or lo < 0.0 or hi > 255.0:
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        elif hi <= 1.0:
            arr = arr * 255.0
        arr = (arr + 0.5).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def overlay(
    image: ArrayLike,
    cam_map: Union[Tensor, np.ndarray],
    *,
    alpha: float = 0.5,
    colormap: str = "jet",
    scale: Optional[MapScale] = None,
    colorbar: bool = False,
) -> np.ndarray:
    """Blend a colour-mapped CAM over an image: ``(1 − α)·image + α·cmap(m̂)``, with
    ``m̂ = minmax(resize(m))`` or, with a fixed ``scale``, ``m̂ = scale(resize(m))``.

    Args:
        image: the picture (see :func:`to_uint8_image`).
        cam_map: ``(h, w)`` map at any resolution; resized bilinearly to the image.
        alpha: weight of the heat map, in ``[0, 1]``.
        colormap: a matplotlib colormap name.
        scale: ``None``: min-max per map (each map uses every colour); a
            :class:`~cam_plugin.result.MapScale`: one fixed scale
            (``clamp((m − low) / (high − low), 0, 1)``), comparable across images.
        colorbar: append a :func:`colorbar_panel` on the right saying which (the map's own
            min / max, or the scale's bounds and label).

    Returns:
        ``(H, W, 3)`` uint8 array (wider with ``colorbar``).
    """
    import matplotlib

    if not 0.0 <= alpha <= 1.0:
        raise CAMInputError(f"alpha must be in [0, 1], got {alpha}")
    if scale is not None and not isinstance(scale, MapScale):
        raise CAMInputError(f"scale must be a cam_plugin.MapScale or None, got {scale!r}")
    base = to_uint8_image(image)
    m = torch.as_tensor(np.asarray(cam_map) if not isinstance(cam_map, Tensor) else cam_map)
    m = m.detach().float().cpu()
    if m.dim() != 2:
        raise CAMInputError(f"cam_map must be 2-D (h, w), got shape {tuple(m.shape)}")
    h, w = base.shape[:2]
    m = F.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    scaled: np.ndarray = (minmax_normalize(m) if scale is None else scale.apply(m)).numpy()
    cmap = matplotlib.colormaps[colormap]
    heat = np.asarray(cmap(scaled), dtype=np.float32)[:, :, :3] * 255.0
    out = ((1.0 - alpha) * base.astype(np.float32) + alpha * heat).clip(0, 255).astype(np.uint8)
    if not colorbar:
        return out
    if scale is None:
        low, high, label = float(m.min()), float(m.max()), "min-max per map"
    else:
        low, high, label = scale.low, scale.high, f"fixed: {scale.label}"
    return hstack([out, colorbar_panel(h, low, high, label, colormap=colormap)])


def colorbar_panel(
    height: int, low: float, high: float, label: str, *, colormap: str = "jet"
) -> np.ndarray:
    """A ``(height, W, 3)`` uint8 colour bar: the colormap from ``high`` (top) to ``low``
    (bottom), both values written next to it, and ``label`` (what the scale is) written
    vertically, so a picture says how its colours map to raw values."""
    import matplotlib

    height = max(int(height), 16)
    bar_w, text_w = max(6, height // 24), 46
    ramp = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None].repeat(bar_w, axis=1)
    colours = np.asarray(matplotlib.colormaps[colormap](ramp), dtype=np.float32)[:, :, :3]
    panel = Image.new("RGB", (bar_w + text_w + 12, height), (255, 255, 255))
    panel.paste(Image.fromarray((colours * 255).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(panel)
    draw.text((bar_w + 2, 0), f"{high:.3g}", fill=(0, 0, 0))
    draw.text((bar_w + 2, height - 11), f"{low:.3g}", fill=(0, 0, 0))
    text = Image.new("RGB", (height, 11), (255, 255, 255))
    plain = label.replace("–", "-").encode("latin-1", "replace").decode("latin-1")
    ImageDraw.Draw(text).text((1, 0), plain[: max(1, height // 6 - 1)], fill=(0, 0, 0))
    panel.paste(text.rotate(90, expand=True), (bar_w + text_w, 0))
    return np.asarray(panel)


def draw_box(
    image: np.ndarray,
    box: Sequence[float],
    *,
    color: tuple[int, int, int] = (0, 255, 0),
    width: int = 2,
) -> np.ndarray:
    """Draw an inclusive ``(x0, y0, x1, y1)`` box on a copy of an ``(H, W, 3)`` uint8 image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        raise CAMInputError(f"box must have x1 >= x0 and y1 >= y0, got {tuple(box)}")
    pil = Image.fromarray(to_uint8_image(image))
    ImageDraw.Draw(pil).rectangle([x0, y0, x1, y1], outline=color, width=width)
    return np.asarray(pil)


def caption(picture: np.ndarray, text: str) -> np.ndarray:
    """``text`` in white on a black band at the top-left of a copy of ``picture``."""
    pil = Image.fromarray(to_uint8_image(picture))
    draw = ImageDraw.Draw(pil)
    _, _, right, bottom = draw.textbbox((1, 0), text)
    draw.rectangle([0, 0, min(right + 1, pil.width - 1), bottom + 1], fill=(0, 0, 0))
    draw.text((1, 0), text, fill=(255, 255, 255))
    return np.asarray(pil)


def enlarge(picture: np.ndarray, scale: int) -> np.ndarray:
    """``picture`` with every pixel repeated ``scale x scale`` times (nearest neighbour)."""
    if scale == 1:
        return picture
    return np.ascontiguousarray(picture.repeat(scale, axis=0).repeat(scale, axis=1))


def hstack(panels: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
    """Equal-height ``(H, W_i, 3)`` panels side by side, separated by ``gap`` white columns."""
    if not panels:
        raise CAMInputError("hstack needs at least one panel")
    sep = np.full((panels[0].shape[0], gap, 3), 255, np.uint8)
    parts = [p for panel in panels for p in (panel, sep)][:-1]
    return np.concatenate(parts, axis=1)


def annotated_overlay(
    image: ArrayLike,
    cam_map: Union[Tensor, np.ndarray],
    *,
    alpha: float = 0.5,
    colormap: str = "jet",
    box: Optional[Sequence[float]] = None,
    gt_boxes: Sequence[Sequence[float]] = (),
    text: Optional[str] = None,
    scale: Optional[MapScale] = None,
    colorbar: bool = False,
) -> np.ndarray:
    """:func:`overlay` (``scale`` and ``colorbar`` as there), then the ground-truth boxes
    (red, 1 px), the CAM's box (green, 1 px) and a :func:`caption`; boxes are inclusive
    ``(x0, y0, x1, y1)`` in the image."""
    pic = overlay(image, cam_map, alpha=alpha, colormap=colormap, scale=scale, colorbar=colorbar)
    for gt in gt_boxes:
        pic = draw_box(pic, gt, color=(255, 0, 0), width=1)
    if box is not None:
        pic = draw_box(pic, box, color=(0, 255, 0), width=1)
    return caption(pic, text) if text else pic


def probe_strip(
    image: ArrayLike,
    maps: Union[Tensor, np.ndarray],
    captions: Sequence[str],
    *,
    boxes: Optional[Union[Tensor, np.ndarray]] = None,
    alpha: float = 0.5,
    colormap: str = "jet",
    min_side: int = 128,
) -> np.ndarray:
    """One row: the image, then one captioned overlay per map, with the map's box.

    Every panel is enlarged by the integer ``s = ceil(min_side / min(H, W))`` (at least 1)
    so that small images stay readable; a box ``(x0, y0, x1, y1)`` (inclusive, image
    pixels) becomes ``(s·x0, s·y0, s·(x1 + 1) − 1, s·(y1 + 1) − 1)``, drawn ``s`` px wide.

    Args:
        image: the picture ``(H, W)``.
        maps: ``(n, h, w)`` maps (resized to the picture by :func:`overlay`).
        captions: one text per map.
        boxes: ``(n, 4)`` boxes, or ``None``.
        alpha: heat-map weight.
        colormap: matplotlib colormap name.
        min_side: the enlarged image's shorter side is at least this (when ``s`` allows).
    """
    base = to_uint8_image(image)
    if len(captions) != len(maps):
        raise CAMInputError(f"{len(maps)} maps but {len(captions)} captions")
    scale = max(1, math.ceil(min_side / max(1, min(base.shape[:2]))))
    panels = [enlarge(base, scale)]
    for j, text in enumerate(captions):
        pic = enlarge(overlay(base, maps[j], alpha=alpha, colormap=colormap), scale)
        if boxes is not None:
            x0, y0, x1, y1 = (float(v) for v in boxes[j])
            box = [x0 * scale, y0 * scale, (x1 + 1) * scale - 1, (y1 + 1) * scale - 1]
            pic = draw_box(pic, box, color=(0, 255, 0), width=max(1, scale))
        panels.append(caption(pic, text))
    return hstack(panels)


def grid_figure(
    images: Sequence[ArrayLike],
    result: CAMResult,
    *,
    class_names: Optional[Sequence[str]] = None,
    boxes: bool = True,
    threshold: float = 0.2,
    alpha: float = 0.5,
    colormap: str = "jet",
    titles: Optional[Sequence[str]] = None,
    scale: Optional[MapScale] = None,
    colorbar: bool = False,
) -> Figure:
    """One row per image: the image, then an overlay per map with its class name,
    probability and (optionally) the paper's box (``threshold × max``, largest component).

    ``images`` are shown at the size the model saw; the maps are upsampled to it
    (``result.upsample()``: the traced placement where known). Colours: min-max per map, or
    one fixed ``scale`` (:class:`~cam_plugin.result.MapScale`; a result normalized with one
    keeps it in ``result.scale``) for every map; ``colorbar=True`` adds one colour bar to
    the figure that says which.
    """
    from matplotlib.figure import Figure

    if len(images) != result.maps.shape[0]:
        raise CAMInputError(
            f"{len(images)} images but the result has {result.maps.shape[0]} maps per batch"
        )
    up = result.upsample() if result.stage == "feature" else result
    if scale is not None or result.stage == "feature":
        up = up.normalize(scale)
    fixed = up.scale
    box_t = up.boxes(threshold) if boxes else None
    probs = result.probabilities.detach().cpu()
    rows, k = up.maps.shape[0], up.maps.shape[1]
    fig = Figure(figsize=(2.6 * (k + 1), 2.9 * rows), dpi=100, layout="constrained")
    for r in range(rows):
        base = to_uint8_image(images[r])
        h, w = base.shape[:2]
        ax = fig.add_subplot(rows, k + 1, r * (k + 1) + 1)
        ax.imshow(base)
        ax.set_title(titles[r] if titles else "input", fontsize=9)
        ax.axis("off")
        for j in range(k):
            cls = int(result.classes[r, j])
            ax = fig.add_subplot(rows, k + 1, r * (k + 1) + j + 2)
            ax.axis("off")
            if cls < 0:
                continue
            m = up.maps[r, j]
            if m.shape != (h, w):
                m = F.interpolate(m[None, None], size=(h, w), mode="bilinear")[0, 0]
            pic = overlay(base, m, alpha=alpha, colormap=colormap, scale=_UNIT if fixed else None)
            if box_t is not None:
                pic = draw_box(pic, _scale_box(box_t[r, j], up.maps.shape[-2:], (h, w)))
            ax.imshow(pic)
            name = (
                class_names[cls] if class_names is not None and cls < len(class_names) else str(cls)
            )
            name = name if len(name) <= 22 else name[:21] + "…"
            ax.set_title(f"{name}\np={float(probs[r, j]):.2f}", fontsize=9)
    if colorbar:
        _figure_colorbar(fig, fixed, colormap)
    return fig


#: the identity scale for maps already in [0, 1] on a fixed scale
_UNIT = MapScale(0.0, 1.0, "already scaled")


def _figure_colorbar(fig: Figure, fixed: Optional[MapScale], colormap: str) -> None:
    """One colour bar for every panel of ``fig``: the fixed scale's raw bounds, or 0..1 of
    each map's own range."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    if fixed is not None:
        norm, label = Normalize(fixed.low, fixed.high), f"fixed scale ({fixed.label})"
    else:
        norm, label = Normalize(0.0, 1.0), "min-max per map (not comparable across maps)"
    bar = ScalarMappable(norm=norm, cmap=colormap)
    fig.colorbar(bar, ax=fig.axes, shrink=0.8, label=label)


def _scale_box(box: Tensor, src_hw: Any, dst_hw: tuple[int, int]) -> list[float]:
    sy = dst_hw[0] / float(src_hw[0])
    sx = dst_hw[1] / float(src_hw[1])
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0 * sx, y0 * sy, (x1 + 1) * sx - 1, (y1 + 1) * sy - 1]


def _text_panel(text: str, height: int, width: int) -> np.ndarray:
    """``(height, width, 3)`` white panel with ``text`` (lines) in black at the top-left."""
    pil = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(pil).multiline_text((3, 2), text, fill=(0, 0, 0), spacing=2)
    return np.asarray(pil)


def _fit(picture: ArrayLike, size: tuple[int, int]) -> np.ndarray:
    """``picture`` resized (bilinear) to ``size`` ``(H, W)``."""
    pil = Image.fromarray(to_uint8_image(picture))
    return np.asarray(pil.resize((size[1], size[0]), Image.Resampling.BILINEAR))


def unit_patches_picture(
    title: str,
    rows: Sequence[tuple[str, Sequence[ArrayLike]]],
    *,
    patch: int = 64,
    label_width: int = 96,
    side: Optional[ArrayLike] = None,
) -> np.ndarray:
    """The paper's Sec. 5 figure for one class: one row per unit (its label, then its top
    patches over a data set, best first), a ``title`` band on top and, optionally, a
    ``side`` picture (e.g. the class's CAM on an image) on the left at the rows' height.

    Args:
        title: the class (name, index), written on top.
        rows: ``(label, patches)`` per unit, in rank order (label lines split on ``\\n``);
            each patch any picture :func:`to_uint8_image` takes, shown at ``patch x patch``;
            shorter rows are padded with white.
        patch: side of every patch in pixels.
        label_width: width of the label column.
        side: a picture drawn left of the rows, scaled to their total height.

    Returns:
        ``(H, W, 3)`` uint8 array.
    """
    if not rows:
        raise CAMInputError("unit_patches_picture needs at least one unit row")
    if patch < 4:
        raise CAMInputError(f"patch must be >= 4 pixels, got {patch}")
    width = max(len(p) for _, p in rows)
    blank = np.full((patch, patch, 3), 255, np.uint8)
    lines = []
    for label, patches in rows:
        cells = [_fit(p, (patch, patch)) for p in patches]
        cells += [blank] * (width - len(cells))
        lines.append(hstack([_text_panel(label, patch, label_width), *cells]))
    gap = np.full((2, lines[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([x for line in lines for x in (line, gap)][:-1], axis=0)
    if side is not None:
        pic = to_uint8_image(side)
        h = grid.shape[0]
        grid = hstack([_fit(pic, (h, max(1, round(pic.shape[1] * h / pic.shape[0])))), grid], 4)
    band = _text_panel(title, 14, grid.shape[1])
    return np.concatenate([band, grid], axis=0)
