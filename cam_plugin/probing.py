"""Probing a model without touching it: the one home of the "save, eval, no-grad, fork the
RNG, restore" ritual and of the probe inputs.

Library code sometimes has to run a model (or a part of it) on an input of its own —
:func:`cam_plugin.convert` reading a backbone's stages, the receptive-field tracer, an
mmdet probe reading a neck's channels. Every such run goes through :func:`untouched`, so
that afterwards the host is exactly as it was:

* every module's ``training`` flag is restored (the run itself is in eval mode, so
  BatchNorm uses its running statistics and does not update them, dropout is off);
* autograd is off during the run (no graph is kept, no ``.grad`` changes);
* the torch RNG (CPU, and the current CUDA device when one is used) is forked, and
  with ``all_rngs=True`` numpy's and Python's global RNG states are restored too.

The user's *own* model is never run by :class:`cam_plugin.CAM` outside a user's call:
the adapter is read from the first real call's forward (see :mod:`cam_plugin.discovery`).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "first_tensor",
    "model_device_dtype",
    "probe_input",
    "rng_guard",
    "untouched",
]


def first_tensor(value: Any) -> Optional[Tensor]:
    """``value`` itself when it is a tensor, else the first element of a non-empty tuple or
    list when that is a tensor, else ``None`` (what a forward hook sees as args / output)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter (or buffer); CPU / float32
    for a model without any."""
    for t in (*model.parameters(), *model.buffers()):
        dtype = t.dtype if t.is_floating_point() else torch.float32
        return t.device, dtype
    return torch.device("cpu"), torch.float32


@contextlib.contextmanager
def rng_guard(*, all_rngs: bool = True, devices: Sequence[Any] = ()) -> Iterator[None]:
    """Leave the torch RNG (CPU and ``devices``) and, with ``all_rngs``, numpy's and Python's
    global RNG exactly as they were when the block ends (also on error)."""
    np_state = np.random.get_state() if all_rngs else None
    py_state = random.getstate() if all_rngs else None
    with torch.random.fork_rng(devices=list(devices)):
        try:
            yield
        finally:
            if np_state is not None:
                np.random.set_state(np_state)
            if py_state is not None:
                random.setstate(py_state)


def _cuda_devices(model: nn.Module) -> list[Any]:
    device, _ = model_device_dtype(model)
    return [device] if device.type == "cuda" else []


@contextlib.contextmanager
def untouched(
    model: nn.Module, *, eval_mode: bool = True, grad: bool = False, all_rngs: bool = False
) -> Iterator[nn.Module]:
    """Run code on ``model`` and leave it as it was.

    Inside the block: every module in eval mode (``eval_mode``), autograd off (unless
    ``grad``), the torch RNG forked (and numpy's / Python's with ``all_rngs``). When the
    block ends — normally or by an exception — every module's ``training`` flag is set back
    to its value before the block. Yields the model.

    Example:
        >>> with untouched(backbone):
        ...     out = backbone(probe_input(backbone, (3, 224, 224)))
    """
    modes = [(m, m.training) for m in model.modules()]
    grad_ctx = contextlib.nullcontext() if grad else torch.no_grad()
    try:
        if eval_mode:
            model.eval()
        with grad_ctx, rng_guard(all_rngs=all_rngs, devices=_cuda_devices(model)):
            yield model
    finally:
        for m, mode in modes:
            m.training = mode


def probe_input(
    model: nn.Module,
    input_size: Sequence[int],
    batch: int = 2,
    *,
    dist: Literal["normal", "uniform"] = "normal",
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """A deterministic random batch ``(batch, *input_size)`` on the model's device and dtype,
    drawn from a private generator (seed 0; the global RNG is not touched). ``dist`` picks
    ``N(0, 1)`` or ``U[0, 1)`` values; the values for a given seed do not depend on the
    device."""
    if batch < 1 or not input_size or any(int(v) < 1 for v in input_size):
        raise ValueError(f"probe_input: need batch >= 1 and a positive size, got {input_size}")
    device, model_dtype = model_device_dtype(model)
    gen = torch.Generator().manual_seed(0)
    shape = (int(batch), *[int(v) for v in input_size])
    x = torch.randn(shape, generator=gen) if dist == "normal" else torch.rand(shape, generator=gen)
    return x.to(device=device, dtype=dtype or model_dtype)
