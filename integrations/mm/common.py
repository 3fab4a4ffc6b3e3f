"""Helpers every OpenMMLab face shares: unwrapping model wrappers, switching autocast off,
and the option checks of the hooks (each error names the hook, the option and what is valid).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from torch import Tensor, nn

from cam_plugin.errors import CAMInputError

__all__ = [
    "WarnOnce",
    "autocast_active",
    "check_colormap",
    "check_fraction",
    "check_int",
    "describe",
    "no_autocast",
    "reject_unknown",
    "safe_name",
    "unwrap",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside mmengine's wrappers (``MMDistributedDataParallel``, ...) and
    torch's ``DataParallel`` / ``DistributedDataParallel``: follow ``.module`` while the
    object is a wrapper and ``.module`` is a module."""
    while is_model_wrapper(model) or isinstance(
        model, (nn.DataParallel, nn.parallel.DistributedDataParallel)
    ):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A context in which autocast is off on ``device`` (maps and probes run in fp32 even
    inside a mixed-precision loop); a no-op for a device type without autocast."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):
        return contextlib.nullcontext()


def autocast_active(device: torch.device) -> bool:
    """Whether autocast is enabled for ``device``'s type right now."""
    try:
        return bool(torch.is_autocast_enabled(device.type))
    except TypeError:  # torch < 2.4
        return bool(torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled())


def reject_unknown(owner: str, unknown: Mapping[str, Any], valid: Sequence[str]) -> None:
    """Raise :class:`CAMInputError` naming every unknown option (with the nearest valid
    one when there is a close match) and the valid options; nothing when ``unknown`` is
    empty."""
    if not unknown:
        return
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        parts.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise CAMInputError(
        f"{owner} got unknown option(s) {', '.join(parts)}; valid options: {', '.join(valid)}"
    )


def check_int(owner: str, name: str, value: Any, low: int, hint: str = "") -> int:
    """``value`` when it is an int (not a bool) ``>= low``, else :class:`CAMInputError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        why = f" ({hint})" if hint else ""
        raise CAMInputError(f"{owner}: {name} must be an int >= {low}{why}, got {value!r}")
    return value


def check_fraction(owner: str, name: str, value: Any) -> float:
    """``float(value)`` when it is a number in ``[0, 1]``, else :class:`CAMInputError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CAMInputError(f"{owner}: {name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise CAMInputError(f"{owner}: {name} must be in [0, 1], got {value!r}")
    return float(value)


def check_colormap(owner: str, colormap: Any) -> str:
    """``colormap`` when matplotlib knows it, else :class:`CAMInputError`."""
    import matplotlib

    if not isinstance(colormap, str) or colormap not in matplotlib.colormaps:
        raise CAMInputError(f"{owner}: unknown matplotlib colormap {colormap!r}")
    return colormap


def describe(value: Any) -> str:
    """A short description of a module output: ``tensor(2, 64, 8, 8)``,
    ``tuple[tensor(...), ...]``, ``dict{'a': ...}`` or the type name."""
    if isinstance(value, Tensor):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}[" + ", ".join(describe(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "dict{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


def safe_name(value: Any) -> str:
    """``value`` as a file-name-safe string (runs of other characters become ``_``), at
    most 80 characters."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(value))[:80]


class WarnOnce:
    """``warn(key, message)`` logs ``"{owner}: {message}"`` as a warning the first time a
    ``key`` is seen and ignores the key afterwards (one warning per kind of problem, not one
    per batch)."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.seen: set[str] = set()

    def __call__(self, key: str, message: str) -> None:
        if key not in self.seen:
            self.seen.add(key)
            print_log(f"{self.owner}: {message}", logger="current", level=logging.WARNING)
