"""Baseline maps that use no model, for benchmarks: a WSOL score is only meaningful next to
what these get on the same data (Choe et al., CVPR 2020, report a centre-Gaussian baseline).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cam_plugin.result import minmax_normalize

__all__ = ["brightness_baseline_maps", "centered_gaussian_maps"]


def brightness_baseline_maps(images: Tensor) -> Tensor:
    """Image brightness as a localization map.

    ``m(x, y) = mean_c I_c(x, y)``, then min-max normalized per image (a constant image gives
    an all-zero map).

    Args:
        images: float tensor ``(B, C, H, W)`` (channels averaged) or ``(B, H, W)``, without
            mean/std normalization (brightness must increase with the value).

    Returns:
        float tensor ``(B, H, W)`` in ``[0, 1]``.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor (B, C, H, W), got {type(images)!r}.")
    if images.dim() not in (3, 4):
        raise ValueError(f"images must be (B, C, H, W) or (B, H, W); got {tuple(images.shape)}.")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point, got {images.dtype}; use images.float().")
    gray = images.mean(dim=1) if images.dim() == 4 else images
    return minmax_normalize(gray)


def centered_gaussian_maps(
    shape: tuple[int, ...],
    sigma: float = 0.25,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """A Gaussian bump centred in the image, the same for every image.

    ``m(x, y) = exp(-((x - cx)^2 / (2 (sigma W)^2) + (y - cy)^2 / (2 (sigma H)^2)))`` with
    ``cx = (W - 1) / 2``, ``cy = (H - 1) / 2``; the peak is 1 (at the centre pixel when the
    size is odd), values lie in ``(0, 1]``.

    Args:
        shape: ``(..., H, W)``, e.g. ``(B, H, W)``.
        sigma: standard deviation as a fraction of the image side.
        device: device of the result.
        dtype: floating dtype of the result.

    Returns:
        tensor of ``shape``.
    """
    if len(shape) < 2 or any(int(s) <= 0 for s in shape[-2:]):
        raise ValueError(f"shape must be (..., H, W) with H, W > 0; got {tuple(shape)}.")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 (a fraction of the image side), got {sigma}.")
    h, w = int(shape[-2]), int(shape[-1])
    ys = torch.arange(h, device=device, dtype=torch.float64) - (h - 1) / 2
    xs = torch.arange(w, device=device, dtype=torch.float64) - (w - 1) / 2
    gy = torch.exp(-(ys**2) / (2 * (sigma * h) ** 2))
    gx = torch.exp(-(xs**2) / (2 * (sigma * w) ** 2))
    bump = (gy[:, None] * gx[None, :]).to(dtype)
    bump = bump / bump.max()
    return bump.expand(*[int(s) for s in shape]).clone()
