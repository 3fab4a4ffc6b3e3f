"""One forward of the user's model: the feature map, and on first use the adapter, from
that same forward.

Every hook-based face (:class:`cam_plugin.CAM`, Captum's ``ClassActivationMap``, the
mmengine hook) runs the user's model exactly once per call, inside a
:class:`ForwardCapture`:

* when the adapter is known, a :class:`~cam_plugin.hooks.FeatureCapture` records the
  feature module's output (or input) for this thread's forward only;
* when it is not yet known, a :class:`~cam_plugin.forward.CallRecorder` records every
  call of that forward, and :meth:`ForwardCapture.finish` resolves the adapter from the
  recorded calls (:func:`cam_plugin.registry.resolve` with ``trace=``) and takes the
  feature tensor from the same record. No second forward, no random input: the user's
  own hooks fire once per call.

The recorder keeps every module's output of that first forward alive until
:meth:`ForwardCapture.finish` returns (about the activation memory of one training
forward, once).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from torch import Tensor, nn

from .adapter import Adapter
from .discovery import guess_input_size
from .errors import AdapterNotFoundError, CAMInputError, UnsupportedHeadError
from .forward import CallRecorder, ForwardNeededError, ForwardTrace
from .hooks import FeatureCapture
from .registry import resolve

__all__ = ["ForwardCapture", "resolve_without_forward"]


def resolve_without_forward(
    model: nn.Module, input_size: Optional[Sequence[int]] = None
) -> Optional[Adapter]:
    """The adapter of ``model`` when it can be found without running the model (an
    explicit ``__cam_adapter__``, a registered factory that reads the model's structure),
    else ``None`` (resolution then waits for the first real forward). Refusals
    (:class:`~cam_plugin.errors.UnsupportedHeadError`) are raised right away."""
    try:
        return resolve(model, input_size=input_size, allow_probe=False)
    except ForwardNeededError:
        return None


class ForwardCapture:
    """Capture the feature map of one forward of ``model``; resolve its adapter from that
    forward when ``adapter`` is ``None``.

    Args:
        model: the model whose forward runs inside the block.
        adapter: the known adapter, or ``None`` to read it from this forward.
        detach: store the feature tensor detached (no autograd graph kept).
        input_size: passed to the resolution for adapters that want it.

    Example:
        >>> with ForwardCapture(model, adapter) as fc:
        ...     output = model(images)
        >>> adapter, captured = fc.finish(images, output)
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Optional[Adapter],
        *,
        detach: bool = True,
        input_size: Optional[Sequence[int]] = None,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.detach = detach
        self.input_size = input_size
        self._capture: Optional[FeatureCapture] = None
        self._captured: Optional[Tensor] = None
        self._recorder: Optional[CallRecorder] = None

    def __enter__(self) -> ForwardCapture:
        if self.adapter is not None:
            cap = FeatureCapture(self.adapter.feature_module, self.adapter.capture, self.detach)
            self._capture = cap.install()
        else:
            self._recorder = CallRecorder(self.model).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._capture is not None:
            self._captured = self._capture.pop()
            self._capture.remove()
        if self._recorder is not None:
            self._recorder.__exit__()
        # the captured value stays readable through finish(); hooks are gone

    def _resolve_from(self, trace: ForwardTrace) -> Adapter:
        """Resolve from the recorded forward. Images smaller than the model's native input
        can shrink the last feature map until its structure cannot be read (Inception v3 at
        96 px ends in 1x1); only then is one probe at the native size run (eval, no grad,
        RNG and modes restored), and the maps still come from the user's forward."""
        try:
            return resolve(self.model, trace=trace, input_size=self.input_size)
        except (UnsupportedHeadError, AdapterNotFoundError) as first:
            native = tuple(self.input_size) if self.input_size else guess_input_size(self.model)
            got = tuple(int(v) for v in trace.example.shape[1:])
            if len(native) != 3 or len(got) != 3 or got[1] * got[2] >= native[1] * native[2]:
                raise
            try:
                return resolve(self.model, input_size=native)
            except (UnsupportedHeadError, AdapterNotFoundError):
                raise first from None  # the reading of the user's own input says more

    def finish(self, example: Tensor, output: Any) -> tuple[Adapter, Tensor]:
        """``(adapter, captured feature tensor)`` of the forward run in the block.

        Raises:
            CAMInputError: the feature module was not called (the adapter does not fit).
            UnsupportedHeadError / AdapterNotFoundError: from the resolution.
        """
        if self._recorder is not None and self.adapter is None:
            trace = self._recorder.trace(example, output)
            self._recorder.calls.clear()
            self.adapter = self._resolve_from(trace)
            captured = trace.last_value(self.adapter.feature_module, self.adapter.capture)
        else:
            captured, self._captured = self._captured, None
        adapter = self.adapter
        if adapter is None or captured is None:
            name = (adapter.feature_name or adapter.name) if adapter is not None else "?"
            raise CAMInputError(
                f"the feature module '{name}' was not called during the forward pass (or gave "
                "no tensor); is the adapter for this model?"
            )
        if self.detach:
            captured = captured.detach()
        return adapter, captured
