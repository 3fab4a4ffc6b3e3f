"""A record of one forward pass, for reading a model's structure off its calls.

:class:`CallRecorder` installs a forward hook on every submodule of a model for the
duration of a ``with`` block and records, in completion order, each call's module, its
first input tensor and its output (a :class:`ForwardTrace`). The hooks only read; they
record only the installing thread's forward (another thread running the same model at the
same time is ignored) and are removed when the block ends, also when the forward raises.

Discovery (:func:`cam_plugin.discovery.discover`) reads the adapter from such a trace. The
trace of the *user's own* first call is used whenever one exists, so the library never runs
the user's model on an input of its own: :func:`resolution_context` makes a trace (or an
example input, or an input size) visible to every adapter factory that calls ``discover``
during :func:`cam_plugin.registry.resolve`, without changing the factories' signature.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .probing import first_tensor

__all__ = [
    "Call",
    "CallRecorder",
    "ForwardNeededError",
    "ForwardTrace",
    "ResolutionRequest",
    "current_request",
    "resolution_context",
]


@dataclass
class Call:
    """One completed module call: its qualified name, the module, its first input tensor
    (or ``None``), its output, and whether the module is a leaf (has no children)."""

    name: str
    module: nn.Module
    inp: Optional[Tensor]
    out: Any
    leaf: bool


@dataclass
class ForwardTrace:
    """The calls of one forward of ``model`` on ``example``, and what the model returned."""

    model: nn.Module
    example: Tensor
    calls: list[Call] = field(default_factory=list)
    output: Any = None

    def last_value(self, module: nn.Module, capture: str) -> Optional[Tensor]:
        """The tensor a :class:`~cam_plugin.hooks.FeatureCapture` of ``module`` would hold
        after this forward: the last call's output (``"output"``) or first input
        (``"input"``)."""
        for call in reversed(self.calls):
            if call.module is module:
                return first_tensor(call.out) if capture == "output" else call.inp
        return None


class CallRecorder:
    """Record every submodule call of ``model`` made by this thread inside the block.

    Example:
        >>> with CallRecorder(model) as rec:
        ...     out = model(x)
        >>> trace = rec.trace(x, out)
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: list[Call] = []
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> CallRecorder:
        names = {id(m): n for n, m in self.model.named_modules()}
        owner = threading.get_ident()
        calls = self.calls

        def make_hook(module: nn.Module) -> Any:
            leaf = next(module.children(), None) is None
            name = names.get(id(module), "?")

            def hook(mod: nn.Module, args: Any, output: Any) -> None:
                if threading.get_ident() == owner:
                    calls.append(Call(name, mod, first_tensor(args), output, leaf))

            return hook

        try:
            for m in self.model.modules():
                if m is not self.model:
                    self._handles.append(m.register_forward_hook(make_hook(m)))
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def trace(self, example: Tensor, output: Any) -> ForwardTrace:
        """The recorded calls as a :class:`ForwardTrace` of ``example`` -> ``output``."""
        return ForwardTrace(self.model, example, list(self.calls), output)


class ForwardNeededError(LookupError):
    """Raised by discovery when resolution needs a forward pass and none may be run now
    (``CAM(model)`` before its first call); the caller resolves on the first real call."""


@dataclass(frozen=True)
class ResolutionRequest:
    """What a resolution may use to read the model (see :func:`resolution_context`).

    Attributes:
        model: the model being resolved (the request applies to it only).
        trace: the trace of a real forward of ``model`` (preferred).
        example: an input to probe with, given by the user.
        input_size: ``(C, H, W)`` for a probe when no example is given.
        allow_probe: whether discovery may run a forward of its own; ``False`` makes it
            raise :class:`ForwardNeededError` instead.
    """

    model: nn.Module
    trace: Optional[ForwardTrace] = None
    example: Optional[Tensor] = None
    input_size: Optional[Sequence[int]] = None
    allow_probe: bool = True


_REQUEST: contextvars.ContextVar[Optional[ResolutionRequest]] = contextvars.ContextVar(
    "cam_plugin_resolution_request", default=None
)


@contextlib.contextmanager
def resolution_context(request: ResolutionRequest) -> Iterator[ResolutionRequest]:
    """Make ``request`` visible to :func:`current_request` inside the block (per thread and
    per task: a context variable)."""
    token = _REQUEST.set(request)
    try:
        yield request
    finally:
        _REQUEST.reset(token)


def current_request(model: nn.Module) -> Optional[ResolutionRequest]:
    """The active :class:`ResolutionRequest` for ``model``, or ``None``."""
    request = _REQUEST.get()
    return request if request is not None and request.model is model else None
