"""Input checks shared by every face: images, train mode, finite values.

Each check raises a cam-plugin error naming what was wrong and what to do, before torch
would fail inside the model.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from .adapter import Adapter
from .errors import CAMInputError
from .probing import model_device_dtype

__all__ = ["all_finite", "check_eval_mode", "check_images"]


def all_finite(t: Tensor) -> bool:
    """True when no element of ``t`` is NaN or ±inf.

    One reduction instead of an elementwise mask: a NaN or ±inf anywhere makes the sum NaN
    or ±inf, so a finite sum proves every element finite. Only when the sum is not finite
    (a bad element, or a finite overflow) is the exact ``isfinite(t).all()`` run.
    """
    low = t.dtype in (torch.float16, torch.bfloat16)
    total = t.sum(dtype=torch.float32) if low else t.sum()
    if bool(torch.isfinite(total)):
        return True
    return bool(torch.isfinite(t).all())


def _check_placement(images: Tensor, model: nn.Module, name: str) -> None:
    """Same device and dtype as the model's parameters (autocast may lower the dtype)."""
    device, dtype = model_device_dtype(model)
    if not any(True for _ in model.parameters()):
        return
    if images.device != device:
        raise CAMInputError(
            f"{name} are on {images.device} but the model is on {device}: move them first, "
            f"e.g. {name}.to('{device}')"
        )
    if images.dtype != dtype and not torch.is_autocast_enabled(images.device.type):
        raise CAMInputError(
            f"{name} are {images.dtype} but the model's parameters are {dtype}: convert them "
            f"({name}.to({dtype})) or run the call under torch.autocast"
        )


def check_images(
    images: Any,
    adapter: Optional[Adapter],
    *,
    name: str = "images",
    batch: str = "B",
    check_finite: bool = True,
    model: Optional[nn.Module] = None,
    channels: Optional[int] = None,
) -> Tensor:
    """Reject what the model cannot take before torch fails inside it: not a tensor, not
    ``(B, C, H, W)``, an empty batch, an integer dtype, a channel count other than the
    adapter's (or ``channels``), NaN / inf values (when ``check_finite``), and — when
    ``model`` is given — a device or floating dtype other than the model's parameters'
    (outside autocast). ``name`` and ``batch`` word the messages (Captum calls them
    ``inputs`` and ``N``). Returns ``images``."""
    if not isinstance(images, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape ({batch}, C, H, W), got "
            f"{type(images).__name__}"
        )
    if images.dim() not in (4, 5):
        hint = f" (one image? use {name}.unsqueeze(0))" if images.dim() == 3 else ""
        raise CAMInputError(
            f"{name} must be 4-D ({batch}, C, H, W) (or 5-D ({batch}, C, T, H, W) clips for a "
            f"video model), got shape {tuple(images.shape)}{hint}"
        )
    if images.shape[0] == 0:
        raise CAMInputError(f"{name} is an empty batch ({batch} = 0); give at least one image")
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (normalized as the model expects), "
            f"got dtype {images.dtype}"
        )
    expected = adapter.input_size[0] if adapter is not None and adapter.input_size else channels
    if expected is not None and images.shape[1] != expected:
        raise CAMInputError(
            f"{name} have {images.shape[1]} channels but the model expects {expected}"
        )
    if model is not None:
        _check_placement(images, model, name)
    if check_finite and not all_finite(images):
        raise CAMInputError(f"{name} contain NaN or inf values; clean the input first")
    return images


def check_eval_mode(
    model: Optional[nn.Module], adapter: Optional[Adapter], alternative: str = ""
) -> None:
    """Refuse a model (or head module) in train mode: BatchNorm would use batch statistics
    and dropout would be random, so the identity would not hold. ``alternative`` ends the
    message with what else the caller may do."""
    head = adapter.head_modules if adapter is not None else ()
    training = [n for n, m in head if m.training]
    if (model is not None and model.training) or training:
        tail = f", {alternative}" if alternative else ""
        raise CAMInputError(
            "the model is in train mode: BatchNorm uses batch statistics and dropout is "
            f"random, so CAM is not exact. Call model.eval() first{tail}"
        )
