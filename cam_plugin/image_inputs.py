"""Images in: PIL images, numpy arrays and image files as the input of a CAM call.

A batch of pictures becomes the model's input with the model's own evaluation
preprocessing (:class:`cam_plugin.preprocess.DataConfig`: timm's data config, an mmengine
``data_preprocessor``'s mean / std, else ImageNet defaults): decoded without losing bit
depth (:mod:`cam_plugin.images`), resized so the short side is ``round(min(H, W) / crop_pct)``,
centre-cropped to ``(H, W)`` and normalized. The geometry of every image
(:class:`cam_plugin.preprocess.Prepared`: scale ``s``, crop offsets) is kept, so a crop
pixel ``(x, y)`` maps back to ``((x + left) / s, (y + top) / s)`` in the original image
(:meth:`cam_plugin.CAMResult.to_original`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import CAMInputError
from .images import decode_array, decode_image
from .preprocess import DataConfig, Prepared, as_transform

__all__ = ["PictureBatch", "is_picture_input", "prepare_pictures"]

PictureBatch = Union[Image.Image, np.ndarray, str, Path, Sequence[Any]]


def _is_picture(item: Any) -> bool:
    return isinstance(item, (Image.Image, np.ndarray, str, Path))


def is_picture_input(images: Any) -> bool:
    """True for a PIL image, a numpy ``(H, W[, C])`` array, an image path, or a non-empty
    list / tuple of those (what :func:`prepare_pictures` takes)."""
    if _is_picture(images):
        return True
    return (
        isinstance(images, (list, tuple))
        and len(images) > 0
        and all(_is_picture(i) for i in images)
    )


def _decode(item: Any, index: int) -> Any:
    try:
        if isinstance(item, Image.Image):
            return decode_image(lambda: item)
        if isinstance(item, np.ndarray):
            return decode_array(item)
        return decode_image(item)
    except CAMInputError as err:
        raise CAMInputError(f"image {index}: {err}") from None


def prepare_pictures(
    images: PictureBatch,
    preprocess: Union[DataConfig, Callable[[Any], Prepared], Any],
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, tuple[Prepared, ...]]:
    """``(B, C, H, W)`` model input and the per-image geometry of ``images`` (one picture
    or a list), preprocessed by ``preprocess`` (a :class:`DataConfig`, a HuggingFace image
    processor, or a callable taking a :class:`~cam_plugin.images.DecodedImage` and returning
    a :class:`~cam_plugin.preprocess.Prepared`: :func:`cam_plugin.preprocess.as_transform`)."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    step = as_transform(preprocess)
    prepared = tuple(step(_decode(item, i)) for i, item in enumerate(items))
    shapes = {tuple(p.tensor.shape) for p in prepared}
    if len(shapes) != 1:
        raise CAMInputError(
            f"the preprocessing gave tensors of several shapes {sorted(shapes)}; it must "
            "resize every image to one input size"
        )
    batch = torch.stack([p.tensor for p in prepared]).to(device=device, dtype=dtype)
    return batch, prepared


def map_to_original(cam_map: Tensor, prepared: Prepared, fill: float) -> Tensor:
    """A map at the model's input size ``(H, W)`` placed on the original image
    ``(h0, w0)``: the crop's pixel ``(x, y)`` covers ``[(x + left) / s_x, (x + left + 1) /
    s_x)`` (and the same in ``y`` with ``s_y``, :attr:`Prepared.scales`); pixels outside the
    crop (the model never saw them) get ``fill``."""
    h0, w0 = prepared.original_size
    height, width = int(cam_map.shape[-2]), int(cam_map.shape[-1])
    sy, sx = prepared.scales
    ys = (torch.arange(h0, dtype=torch.float32) + 0.5) * sy - prepared.top - 0.5
    xs = (torch.arange(w0, dtype=torch.float32) + 0.5) * sx - prepared.left - 0.5
    inside_y = (ys >= -0.5) & (ys <= height - 0.5)
    inside_x = (xs >= -0.5) & (xs <= width - 0.5)
    # bilinear sampling of the crop's map at the original pixel centres
    grid_y = (ys.clamp(0, height - 1) / max(height - 1, 1)) * 2 - 1
    grid_x = (xs.clamp(0, width - 1) / max(width - 1, 1)) * 2 - 1
    grid = torch.stack(torch.meshgrid(grid_y, grid_x, indexing="ij")[::-1], dim=-1)
    flat = cam_map.reshape(-1, 1, height, width).float()
    out = torch.nn.functional.grid_sample(
        flat, grid[None].expand(flat.shape[0], -1, -1, -1).to(flat.device), align_corners=True
    )
    inside = (inside_y[:, None] & inside_x[None, :]).to(out.device)
    out = torch.where(inside, out, torch.full_like(out, fill))
    return out.reshape(*cam_map.shape[:-2], h0, w0)
