"""Capturing a module's output (or input) with forward hooks that never outlive their use.

:class:`FeatureCapture` is a context manager: the hook exists only between
``__enter__`` and ``__exit__`` (also when the forward pass raises), and a
``weakref.finalize`` removes it if the object is garbage-collected while installed.
A capture only *reads*: it never changes the module's output, gradients, mode or RNG.

A capture belongs to the thread that installed it: PyTorch fires a module's forward hooks
for every thread's forward, so the hook ignores calls made on any other thread. Two threads
that each capture from one shared model (a threaded web server) therefore each get the
feature map of their own forward, never the other's.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .errors import CAMInputError

__all__ = ["FeatureCapture", "count_hooks"]

CaptureKind = Literal["output", "input"]


def _remove(handle: Optional[RemovableHandle]) -> None:
    if handle is not None:
        handle.remove()


class FeatureCapture:
    """Capture the tensor a module produces (``"output"``) or receives (``"input"``).

    Args:
        module: the module to watch.
        capture: ``"output"`` (forward hook) or ``"input"`` (forward pre-hook, first
            positional argument).
        detach: store ``tensor.detach()`` (default) so no graph is kept alive; set
            ``False`` for differentiable maps.
        any_thread: also record forwards run on other threads than the installing one
            (default ``False``: only the installing thread's forwards are recorded, so
            concurrent users of one model never see each other's tensors). Set it for a
            forward that itself runs the module on worker threads.

    Example:
        >>> with FeatureCapture(model.layer4) as cap:
        ...     logits = model(images)
        >>> cap.value.shape  # (B, K, h, w)
    """

    def __init__(
        self,
        module: nn.Module,
        capture: CaptureKind = "output",
        detach: bool = True,
        *,
        any_thread: bool = False,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise CAMInputError(f"FeatureCapture needs an nn.Module, got {type(module).__name__}")
        if capture not in ("output", "input"):
            raise CAMInputError(f"capture must be 'output' or 'input', got {capture!r}")
        self.module = module
        self.capture: CaptureKind = capture
        self.detach = detach
        self.any_thread = bool(any_thread)
        self._owner: Optional[int] = None
        self.value: Optional[Tensor] = None
        self._handle: Optional[RemovableHandle] = None
        self._finalizer: Optional[weakref.finalize] = None

    @property
    def active(self) -> bool:
        """Whether the hook is installed."""
        return self._handle is not None

    def _store(self, value: Any) -> None:
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
            value = value[0]
        if not isinstance(value, Tensor):
            self.value = None
            return
        self.value = value.detach() if self.detach else value

    def install(self) -> FeatureCapture:
        """Install the hook (idempotent).

        The hook holds only a weak reference to this object, so a capture that is dropped
        while installed is garbage-collected and its finalizer removes the hook.
        """
        if self._handle is None:
            ref = weakref.ref(self)
            owner = None if self.any_thread else threading.get_ident()
            self._owner = owner

            def on_output(module: nn.Module, args: Any, output: Any) -> None:
                cap = ref()
                if cap is not None and (owner is None or threading.get_ident() == owner):
                    cap._store(output)

            def on_input(module: nn.Module, args: Any) -> None:
                cap = ref()
                if cap is not None and (owner is None or threading.get_ident() == owner):
                    cap._store(args[0] if args else None)

            if self.capture == "output":
                self._handle = self.module.register_forward_hook(on_output)
            else:
                self._handle = self.module.register_forward_pre_hook(on_input)
            self._finalizer = weakref.finalize(self, _remove, self._handle)
        return self

    def remove(self) -> None:
        """Remove the hook (idempotent) and drop the stored tensor."""
        if self._finalizer is not None:
            self._finalizer()  # calls handle.remove() exactly once
            self._finalizer = None
        self._handle = None
        self._owner = None
        self.value = None

    def pop(self) -> Optional[Tensor]:
        """Return the captured tensor and forget it."""
        value, self.value = self.value, None
        return value

    def __enter__(self) -> FeatureCapture:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def count_hooks(model: nn.Module) -> int:
    """Number of forward (pre-)hooks installed on ``model`` and its submodules."""
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks)
    if torch.nn.modules.module._global_forward_hooks:
        total += len(torch.nn.modules.module._global_forward_hooks)
    return total
