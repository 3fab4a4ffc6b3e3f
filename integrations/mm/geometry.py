"""Where a feature map of an OpenMMLab batch sits on the image: written once for every face.

mmengine's data preprocessors stack the images of a batch into one tensor ``(H, W)``,
padding each at the bottom and right; the pipeline before it may have resized and flipped
the image. A map ``(n, h, w)`` computed on that batch covers the whole padded tensor, so
bringing it to an image is, in order (:func:`to_image_frame`):

1. upsample bilinearly (``align_corners=False``) to the batch tensor ``(H, W)``;
2. crop to ``img_shape`` (the image before padding);
3. undo the flip (``flip`` / ``flip_direction`` of the metainfo);
4. resize to the wanted frame (``ori_shape``: the original image).

Boxes: OpenMMLab stores edges (``x2 = x1 + width``, float); the WSOL metrics use integer
inclusive pixels (:func:`inclusive_boxes`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cam_plugin.errors import CAMInputError
from cam_plugin.result import minmax_normalize

__all__ = [
    "boxes_to_frame",
    "cam_maps_to_image",
    "flip_dims",
    "inclusive_boxes",
    "maps_to_original",
    "original_shape",
    "to_image_frame",
    "to_original",
    "valid_cell_mask",
]

_FLIP_DIMS = {"horizontal": (-1,), "vertical": (-2,), "diagonal": (-2, -1)}


def _bilinear(values: Tensor, size: Sequence[int]) -> Tensor:
    """``(n, h, w)`` resized bilinearly (``align_corners=False``) to ``size``, float32."""
    target = (int(size[0]), int(size[1]))
    out = F.interpolate(values[None].float(), size=target, mode="bilinear", align_corners=False)
    return out[0]


def to_image_frame(
    values: Tensor,
    input_hw: Sequence[int],
    *,
    img_shape: Optional[Sequence[int]] = None,
    flip: Sequence[int] = (),
    out_shape: Optional[Sequence[int]] = None,
) -> Tensor:
    """``(n, h, w)`` over the padded batch tensor -> ``(n, H', W')`` over an image.

    Steps 1-4 of the module doc: upsample to ``input_hw``, crop to ``img_shape`` (when
    given), flip the dims in ``flip`` (``(-1,)``: horizontal), resize to ``out_shape`` (when
    given and different). Returns float32; values are not rescaled.
    """
    up = _bilinear(values, input_hw)
    if img_shape is not None:
        up = up[:, : int(img_shape[0]), : int(img_shape[1])]
    if flip:
        up = up.flip(list(flip))
    if out_shape is not None and tuple(up.shape[-2:]) != (int(out_shape[0]), int(out_shape[1])):
        up = _bilinear(up, out_shape)
    return up


def flip_dims(meta: Mapping[str, Any]) -> tuple[int, ...]:
    """The dims to flip back for a sample's metainfo (``()`` when it was not flipped)."""
    if not meta.get("flip", False):
        return ()
    return _FLIP_DIMS.get(meta.get("flip_direction", "horizontal"), (-1,))


def original_shape(meta: Mapping[str, Any]) -> Optional[tuple[int, int]]:
    """``ori_shape``, else ``img_shape / scale_factor``, else ``None``."""
    ori = meta.get("ori_shape")
    if ori is not None:
        return int(ori[0]), int(ori[1])
    img_shape, scale = meta.get("img_shape"), meta.get("scale_factor")
    if img_shape is None or scale is None:
        return None
    sx, sy = (float(v) for v in scale[:2])
    return round(int(img_shape[0]) / sy), round(int(img_shape[1]) / sx)


def to_original(values: Tensor, input_hw: Sequence[int], meta: Mapping[str, Any]) -> Tensor:
    """``(n, h, w)`` over the padded batch tensor -> ``(n, H0, W0)`` over the original image
    of the sample whose metainfo is ``meta`` (values not rescaled)."""
    return to_image_frame(
        values,
        input_hw,
        img_shape=meta.get("img_shape"),
        flip=flip_dims(meta),
        out_shape=original_shape(meta),
    )


def maps_to_original(maps: Tensor, input_hw: Sequence[int], metainfo: Mapping[str, Any]) -> Tensor:
    """Bring feature-resolution maps of one image to its original image, min-max normalized.

    The maps ``(n, h, w)`` cover the padded batch tensor ``(H, W)``: they are upsampled
    bilinearly to ``(H, W)``, cropped to ``img_shape`` (the resized image before padding),
    un-flipped (``flip`` / ``flip_direction``), resized to ``ori_shape`` (or to
    ``img_shape / scale_factor`` when ``ori_shape`` is absent), then scaled per map to
    ``[0, 1]``: ``(m - min) / (max - min)``.

    Args:
        maps: ``(n, h, w)``.
        input_hw: ``(H, W)`` of the batch tensor.
        metainfo: the data sample's metainfo.

    Returns:
        float32 ``(n, H0, W0)``.
    """
    if maps.dim() != 3:
        raise CAMInputError(f"maps must be (n, h, w), got {tuple(maps.shape)}")
    return minmax_normalize(to_original(maps, input_hw, metainfo))


def cam_maps_to_image(
    maps: Tensor,
    input_shape: Sequence[int],
    img_shape: Optional[Sequence[int]] = None,
    out_shape: Optional[Sequence[int]] = None,
) -> Tensor:
    """Bring feature-resolution maps ``(n, h, w)`` to the image and min-max normalize them.

    The maps cover the batch tensor the network saw, ``input_shape = (H, W)`` (padding
    included: mmengine pads at the bottom and right). They are upsampled bilinearly
    (``align_corners=False``) to ``(H, W)``, cropped to ``img_shape`` (the image before
    padding), resized to ``out_shape`` when given (e.g. ``ori_shape``), then scaled per map
    to ``[0, 1]``: ``(m − min) / (max − min)``.

    Returns:
        float32 ``(n, H', W')``.
    """
    if maps.dim() != 3:
        raise CAMInputError(f"maps must be (n, h, w), got shape {tuple(maps.shape)}")
    up = to_image_frame(maps, input_shape, img_shape=img_shape, out_shape=out_shape)
    return minmax_normalize(up)


def valid_cell_mask(
    img_shapes: Sequence[Optional[Sequence[int]]],
    input_hw: Sequence[int],
    feature_hw: Sequence[int],
    device: Union[torch.device, str, None] = None,
) -> Tensor:
    """Feature cells that see the image, not the padding: bool ``(B, h, w)``.

    mmengine's data preprocessors pad each image at the bottom and right up to the batch
    size ``(H, W)``; an image of ``img_shape = (h_i, w_i)`` covers the first
    ``ceil(h_i · h / H)`` rows and ``ceil(w_i · w / W)`` columns of an ``(h, w)`` map.
    An image without ``img_shape`` (``None``) counts as unpadded.

    Args:
        img_shapes: ``(h_i, w_i)`` per image (or ``None``).
        input_hw: ``(H, W)`` of the batch tensor.
        feature_hw: ``(h, w)`` of the feature map.
        device: device of the mask.
    """
    big_h, big_w = float(input_hw[0]), float(input_hw[1])
    h, w = int(feature_hw[0]), int(feature_hw[1])
    rows, cols = [], []
    for shape in img_shapes:
        if shape is None:
            rows.append(h)
            cols.append(w)
            continue
        rows.append(min(h, max(1, math.ceil(float(shape[0]) * h / big_h - 1e-6))))
        cols.append(min(w, max(1, math.ceil(float(shape[1]) * w / big_w - 1e-6))))
    r = torch.tensor(rows, device=device)
    c = torch.tensor(cols, device=device)
    ys = torch.arange(h, device=device)
    xs = torch.arange(w, device=device)
    return (ys[None, :, None] < r[:, None, None]) & (xs[None, None, :] < c[:, None, None])


def inclusive_boxes(boxes: np.ndarray, convention: str, height: int, width: int) -> np.ndarray:
    """Integer inclusive ``(x0, y0, x1, y1)`` pixel boxes clipped to a ``height x width``
    map.

    ``convention="exclusive"`` (OpenMMLab's edges, ``x2 = x1 + width``):
    ``x0 = floor(x1)``, ``x1' = ceil(x2) − 1``; ``"inclusive"``: rounded as they are.
    """
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if convention == "exclusive":
        out = np.stack(
            [
                np.floor(arr[:, 0]),
                np.floor(arr[:, 1]),
                np.ceil(arr[:, 2]) - 1,
                np.ceil(arr[:, 3]) - 1,
            ],
            axis=1,
        )
    else:
        out = np.round(arr)
    out[:, 0::2] = out[:, 0::2].clip(0, width - 1)
    out[:, 1::2] = out[:, 1::2].clip(0, height - 1)
    out[:, 2] = np.maximum(out[:, 2], out[:, 0])
    out[:, 3] = np.maximum(out[:, 3], out[:, 1])
    return out.astype(np.int64)


def boxes_to_frame(
    boxes: np.ndarray, img_shape: Sequence[int], hw: tuple[int, int]
) -> list[list[float]]:
    """OpenMMLab edge boxes in the frame of ``img_shape`` -> inclusive boxes in a picture of
    size ``hw`` (scaled, ``x1' = max(x0', x2·s − 1)``), for drawing."""
    sy, sx = hw[0] / float(img_shape[0]), hw[1] / float(img_shape[1])
    out = []
    for x0, y0, x1, y1 in boxes.astype(np.float64).tolist():
        out.append([x0 * sx, y0 * sy, max(x0 * sx, x1 * sx - 1), max(y0 * sy, y1 * sy - 1)])
    return out
