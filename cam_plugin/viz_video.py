"""Video pictures: per-frame overlays of a space-time CAM and a clip picture (frames in a
strip) -- the video counterpart of :func:`cam_plugin.viz.overlay` and
:func:`cam_plugin.viz.grid_figure`, drawn with :mod:`cam_plugin.viz`'s helpers.

A video CAM is one map per class over ``(T', h, w)`` (``mean_{t,x,y} M_c + b_c = S_c``).
For clip ``i`` and map ``j`` of a result, the map is upsampled to the frames' ``(T, H, W)``
(:meth:`CAMResult.upsample`, trilinear), brought to ``[0, 1]`` and blended on each frame::

    m̂ = (m − min) / (max − min)       relative_to="clip": min, max over (t, x, y) (default)
                                       relative_to="frame": over (x, y) of each frame
    m̂ = clamp((m − low) / (high − low), 0, 1)        scale=MapScale(low, high): fixed
    out_t = (1 − a)·frame_t + a·cmap(m̂_t),   a = alpha  (or alpha·m̂_t with fade=True)

One normalization over the whole clip (the default) keeps the frames comparable: a frame
where the class's evidence is weak is drawn cool, not stretched to the full colour range --
the same choice as the tube boxes' default ``relative_to="clip"``
(:mod:`cam_plugin.tubes`). The tube boxes drawn are those of
``result.upsample(size).normalize().boxes(threshold, relative_to=relative_to)``: one box per
frame, none on a frame without evidence.

The clip given is what the model saw: its frames ``(T, H, W, 3)`` (uint8, or float in
``[0, 1]``), or the model's input tensor ``(C, T, H, W)`` with the ``mean`` / ``std`` of its
normalization to undo (:func:`clip_frames`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .errors import CAMInputError
from .result import CAMResult, minmax_normalize
from .scale import MapScale
from .tubes import check_relative_to, tube_presence
from .viz import caption, colorbar_panel, draw_box, enlarge, hstack, to_uint8_image

__all__ = ["clip_frames", "clip_picture", "frame_indices", "frame_overlays"]

_CLIP_HINT = (
    "pass the clip the model saw as frames (T, H, W, 3) uint8 or float in [0, 1], or as the "
    "model's input tensor (C, T, H, W) with mean=/std= to undo its normalization "
    "(one clip: clips[i], not the batch)"
)


def clip_frames(
    clip: Union[Tensor, np.ndarray, Sequence[Any]],
    *,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> np.ndarray:
    """The frames of one clip as ``(T, H, W, 3)`` uint8.

    Args:
        clip: ``(T, H, W, C)`` frames (``C`` = 1 or 3; uint8, or float in ``[0, 1]``), a
            list of ``(H, W, C)`` frames, or the model's input ``(C, T, H, W)`` (``C`` = 1
            or 3; the layout is read from where the channel axis of size 1 or 3 is; a shape
            with both ends 1 or 3 is read as ``(T, H, W, C)`` unless ``mean`` / ``std`` are
            given).
        mean, std: the normalization the model's input went through, per channel:
            ``frame = x·std + mean``, clipped to ``[0, 1]``.

    Float values become ``round(255·v)`` when the clip lies in ``[0, 1]``, ``round(v)`` in
    ``[0, 255]``, and are min-max scaled over the whole clip otherwise (a normalized input
    given without ``mean`` / ``std``): one rule for every frame, as :func:`to_uint8_image`
    has for one image (a list of frames is converted frame by frame).

    Raises:
        CAMInputError: another shape (a batch, a single image), or ``mean`` / ``std`` of the
            wrong length; the message says what to pass.
    """
    if isinstance(clip, (list, tuple)):
        clip = np.stack([to_uint8_image(f) for f in clip]) if clip else np.zeros((0,))
    if isinstance(clip, Tensor):
        arr = clip.detach().cpu()
        arr_np = arr.numpy() if arr.dtype == torch.uint8 else arr.float().numpy()
    elif isinstance(clip, np.ndarray):
        arr_np = clip
    else:
        raise CAMInputError(
            f"clip must be a tensor or array, got {type(clip).__name__}: {_CLIP_HINT}"
        )
    undo = mean is not None or std is not None
    shape = arr_np.shape
    if arr_np.ndim != 4 or min(shape, default=0) == 0:
        raise CAMInputError(f"clip has shape {shape}: {_CLIP_HINT}")
    first, last = shape[0] in (1, 3), shape[-1] in (1, 3)
    if last and not (first and undo):
        frames = arr_np  # (T, H, W, C)
    elif first:
        frames = np.moveaxis(arr_np, 0, -1)  # (C, T, H, W) -> (T, H, W, C)
    else:
        raise CAMInputError(f"clip has shape {shape} with no channel axis of 1 or 3: {_CLIP_HINT}")
    if undo:
        frames = _undo_normalization(frames, mean, std)
    if frames.dtype != np.uint8:  # one rule for the whole clip, as to_uint8_image per image
        frames = frames.astype(np.float32)
        lo, hi = float(frames.min()), float(frames.max())
        if lo < 0.0 or hi > 255.0:  # a normalized input: one min-max over the clip
            frames = (frames - lo) / (hi - lo) if hi > lo else np.zeros_like(frames)
        frames = frames * 255.0 if float(frames.max()) <= 1.0 else frames
        frames = (frames + 0.5).clip(0, 255).astype(np.uint8)
    return np.stack([to_uint8_image(f) for f in frames])


def _undo_normalization(
    frames: np.ndarray, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]
) -> np.ndarray:
    """``frames·std + mean`` per channel (``(T, H, W, C)``), clipped to ``[0, 1]``."""
    c = frames.shape[-1]
    m = np.zeros(c, np.float32) if mean is None else np.asarray(mean, np.float32).reshape(-1)
    s = np.ones(c, np.float32) if std is None else np.asarray(std, np.float32).reshape(-1)
    if m.size not in (1, c) or s.size not in (1, c):
        raise CAMInputError(
            f"mean and std need 1 or {c} values (one per channel), got {m.size} and {s.size}"
        )
    return (frames.astype(np.float32) * s + m).clip(0.0, 1.0)


def frame_indices(frames: int, every: int = 1, max_frames: Optional[int] = None) -> list[int]:
    """The frames a strip shows: ``0, every, 2·every, ...`` below ``frames``; with
    ``max_frames``, at most that many of them, evenly spread (the first and last kept)."""
    if not isinstance(every, int) or every < 1:
        raise CAMInputError(f"every must be an int >= 1 (every n-th frame), got {every!r}")
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise CAMInputError(f"max_frames must be None or an int >= 1, got {max_frames!r}")
    picked = list(range(0, frames, every))
    if max_frames is not None and len(picked) > max_frames:
        at = np.linspace(0, len(picked) - 1, max_frames).round().astype(int)
        picked = [picked[i] for i in sorted(set(at.tolist()))]
    return picked


def _one_map(result: CAMResult, index: int, j: int) -> CAMResult:
    """Clip ``index``, map ``j`` of ``result`` as a ``(1, 1, T', h, w)`` result."""
    if not isinstance(result, CAMResult):
        raise CAMInputError(f"expected a CAMResult of a video model, got {type(result).__name__}")
    if result.maps.dim() != 5:
        raise CAMInputError(
            f"clip pictures need a video result, maps (B, k, T', h, w) from CAM on clips "
            f"(B, C, T, H, W); this result has maps {tuple(result.maps.shape)}: for images use "
            f"cam_plugin.viz.overlay / grid_figure"
        )
    b, k = result.maps.shape[:2]
    if not -b <= index < b or not -k <= j < k:
        raise CAMInputError(
            f"index={index}, j={j} out of range: the result has {b} clips and {k} maps each"
        )
    one = result[index]
    if int(one.classes[0, j]) < 0:
        raise CAMInputError(f"map j={j} of clip {index} is padding (class -1): pick a real map")
    pick = slice(j % k, j % k + 1)
    return replace(
        one,
        maps=one.maps[:, pick],
        classes=one.classes[:, pick],
        bias=one.bias[:, pick],
        contrast=None if one.contrast is None else one.contrast[:, pick],
        constant=None if one.constant is None else one.constant[:, pick],
    )


def _colour_values(
    maps: Tensor, relative_to: str, scale: Optional[MapScale]
) -> tuple[Tensor, float, float, str]:
    """``(m̂ (T, H, W) in [0, 1], low, high, label)`` of the colour bar (module doc)."""
    if scale is not None:
        if not isinstance(scale, MapScale):
            raise CAMInputError(f"scale must be a cam_plugin.MapScale or None, got {scale!r}")
        return scale.apply(maps), scale.low, scale.high, f"fixed: {scale.label}"
    if relative_to == "clip":
        scaled = minmax_normalize(maps[None, None])[0, 0]  # one min-max over (t, x, y)
        return scaled, float(maps.min()), float(maps.max()), "clip min-max"
    return minmax_normalize(maps), 0.0, 1.0, "frame min-max"


def _blend(
    frame: np.ndarray, scaled: np.ndarray, alpha: float, fade: bool, cmap: Any
) -> np.ndarray:
    heat = np.asarray(cmap(scaled), dtype=np.float32)[:, :, :3] * 255.0
    a = alpha * scaled[:, :, None] if fade else np.float32(alpha)
    out = (1.0 - a) * frame.astype(np.float32) + a * heat
    return np.asarray((out + 0.5).clip(0, 255).astype(np.uint8))


def _draw(
    result: CAMResult,
    clip: Any,
    index: int,
    j: int,
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
    relative_to: str,
    scale: Optional[MapScale],
    alpha: float,
    fade: bool,
    colormap: str,
    threshold: Optional[float],
) -> tuple[np.ndarray, CAMResult, tuple[float, float, str]]:
    """``(overlays (T, H, W, 3), the one-map result, (low, high, label))``; boxes drawn
    when ``threshold`` is not ``None``."""
    import matplotlib

    rel = check_relative_to(relative_to)
    if not 0.0 <= alpha <= 1.0:
        raise CAMInputError(f"alpha must be in [0, 1], got {alpha}")
    one = _one_map(result, index, j)
    frames = clip_frames(clip, mean=mean, std=std)
    t, h, w = frames.shape[:3]
    want = result.frames if result.frames is not None else int(result.maps.shape[2])
    if t != want:
        raise CAMInputError(
            f"the clip has {t} frames but the result's clips have {want}: pass the clip the "
            f"model saw (clips[{index}])"
        )
    up = one.upsample((h, w))
    maps = up.maps[0, 0].detach().float().cpu()
    scaled, low, high, label = _colour_values(maps, relative_to, scale)
    cmap = matplotlib.colormaps[colormap]
    values = scaled.numpy()
    pics = np.stack([_blend(frames[f], values[f], alpha, fade, cmap) for f in range(t)])
    if threshold is not None:  # the tube: one box per frame with evidence
        norm = up.normalize()
        tube = norm.boxes(threshold, relative_to=rel)[0, 0]
        present = tube_presence(norm.maps, threshold, rel)[0, 0]
        for f in range(t):
            if bool(present[f]):
                pics[f] = draw_box(pics[f], tube[f].tolist(), color=(255, 255, 255), width=1)
    return pics, one, (low, high, label)


def frame_overlays(
    result: CAMResult,
    clip: Union[Tensor, np.ndarray, Sequence[Any]],
    index: int = 0,
    j: int = 0,
    *,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    relative_to: Literal["clip", "frame"] = "clip",
    scale: Optional[MapScale] = None,
    alpha: float = 0.5,
    fade: bool = False,
    colormap: str = "jet",
    boxes: bool = False,
    threshold: float = 0.2,
) -> np.ndarray:
    """Per-frame overlays of clip ``index``'s map ``j``: ``(T, H, W, 3)`` uint8 (module doc).

    Args:
        result: a video :class:`~cam_plugin.CAMResult` (maps ``(B, k, T', h, w)``).
        clip: the clip the model saw (:func:`clip_frames`); the map is upsampled to its
            ``(T, H, W)`` (``T`` must be the result's number of frames).
        index: the clip in the batch. j: the map of that clip (``result.classes[index, j]``).
        mean, std: the model's input normalization, to undo (:func:`clip_frames`).
        relative_to: ``"clip"``: one min-max over the clip (frames comparable; default);
            ``"frame"``: each frame on its own. Also the tube boxes' rule.
        scale: one fixed :class:`~cam_plugin.MapScale` instead (raw values, comparable
            across clips).
        alpha: heat-map weight in ``[0, 1]``; ``alpha=0`` gives the plain frames.
        fade: weight ``alpha·m̂`` per pixel: where ``m̂ = 0`` the frame is shown plain.
        colormap: a matplotlib colormap name.
        boxes: draw each frame's tube box (white, 1 px): ``threshold ×`` the clip's (or each
            frame's) maximum of the min-max normalized map, largest component.
        threshold: the fraction for the boxes (the paper: 0.2).
    """
    pics, _, _ = _draw(
        result,
        clip,
        index,
        j,
        mean,
        std,
        relative_to,
        scale,
        alpha,
        fade,
        colormap,
        threshold if boxes else None,
    )
    return pics


def clip_picture(
    result: CAMResult,
    clip: Union[Tensor, np.ndarray, Sequence[Any]],
    index: int = 0,
    j: int = 0,
    *,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    relative_to: Literal["clip", "frame"] = "clip",
    scale: Optional[MapScale] = None,
    alpha: float = 0.5,
    fade: bool = False,
    colormap: str = "jet",
    boxes: bool = True,
    threshold: float = 0.2,
    every: int = 1,
    max_frames: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
    min_side: int = 96,
    colorbar: bool = True,
) -> np.ndarray:
    """The clip's frames in one strip, each the overlay of :func:`frame_overlays` captioned
    with its frame index (``t=3``), under a title band with the class, its probability and
    the clip, and a colour bar saying which normalization (min-max over the clip with the
    raw min and max, per frame, or the fixed scale's bounds).

    Args:
        every: show every n-th frame (``0, n, 2n, ...``).
        max_frames: show at most this many of those, evenly spread (:func:`frame_indices`).
        class_names: names for the class indices (the title shows ``name (index)``).
        min_side: every frame is enlarged by the integer ``ceil(min_side / min(H, W))``
            (at least 1), nearest neighbour, so small clips stay readable.
        colorbar: append the colour bar on the right.
        (the other arguments as :func:`frame_overlays`; ``boxes`` defaults to True here.)

    Returns:
        ``(H', W', 3)`` uint8 array.
    """
    if not isinstance(min_side, int) or min_side < 1:
        raise CAMInputError(f"min_side must be an int >= 1, got {min_side!r}")
    pics, one, (low, high, label) = _draw(
        result,
        clip,
        index,
        j,
        mean,
        std,
        relative_to,
        scale,
        alpha,
        fade,
        colormap,
        threshold if boxes else None,
    )
    shown = frame_indices(pics.shape[0], every, max_frames)
    s = max(1, -(-min_side // max(1, min(pics.shape[1:3]))))
    strip = hstack([caption(enlarge(pics[f], s), f"t={f}") for f in shown])
    if colorbar:
        strip = hstack([strip, colorbar_panel(strip.shape[0], low, high, label, colormap=colormap)])
    title = _title(one, index, class_names, len(shown), pics.shape[0])
    band = np.full((14, strip.shape[1], 3), 255, np.uint8)
    return np.concatenate([_write(band, title), strip], axis=0)


def _name(cls: int, class_names: Optional[Sequence[str]]) -> str:
    if class_names is not None and 0 <= cls < len(class_names):
        return f"{class_names[cls]} ({cls})"
    return f"class {cls}"


def _title(
    one: CAMResult, index: int, class_names: Optional[Sequence[str]], shown: int, total: int
) -> str:
    cls = int(one.classes[0, 0])
    text = f"{_name(cls, class_names)}  p={float(one.probabilities[0, 0]):.2f}"
    if one.contrast is not None:
        text += f"  vs {_name(int(one.contrast[0, 0]), class_names)}"
    frames = f"{shown} of {total} frames" if shown < total else f"{total} frames"
    return f"{text}  |  clip {index}, {frames}"


def _write(band: np.ndarray, text: str) -> np.ndarray:
    """``text`` in black on a copy of the white ``band``."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(band)
    plain = text.encode("latin-1", "replace").decode("latin-1")
    ImageDraw.Draw(pil).text((2, 1), plain, fill=(0, 0, 0))
    return np.asarray(pil)
