"""What the CAM probe reads from one forward of the detector, with hooks that live only for
that forward.

:meth:`ProbeCapture.arm` installs three hooks: a pre-hook on the detector (the batch's
inputs and data samples), a forward hook on the probed module (its map, pooled at once over
the valid cells: :meth:`~.probe_model.CAMProbe.pool` with :func:`~.geometry.valid_cell_mask`)
and a forward hook on the detector with ``always_call=True`` that removes all three when
that forward ends, also when it raises. Hooks armed for a forward that never came are
removed by the next :meth:`~ProbeCapture.arm` / :meth:`~ProbeCapture.take`, or by the
finalizer when the capture is garbage-collected.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from cam_plugin.errors import CAMInputError

from .common import describe, no_autocast
from .geometry import valid_cell_mask
from .probe_model import CAMProbe
from .probe_setup import select_output
from .samples import metainfo

__all__ = ["ProbeCapture"]


def _remove_handles(handles: list[RemovableHandle]) -> None:
    for handle in list(handles):
        handle.remove()
    handles.clear()


class ProbeCapture:
    """The probed map of the detector's next forward.

    After that forward, :meth:`take` returns a dict with (when present) ``input_hw``
    (``(H, W)`` of the batch tensor), ``samples`` (the data samples), ``pooled`` (fp32
    ``(B, K)``, masked average pool), ``mask`` (bool ``(B, h, w)`` or ``None``),
    ``features`` and ``inputs`` (fp32 map and the detached inputs, with ``keep_maps``), and
    ``skipped`` (``(key, message)`` when the probed output was unusable).

    Args:
        model: the detector (unwrapped).
        module: the probed submodule.
        feature: its dotted name (for messages).
        index: which of its outputs (see :func:`~.probe_setup.select_output`).
    """

    def __init__(
        self, model: nn.Module, module: nn.Module, feature: str, index: Union[int, str]
    ) -> None:
        self.model = model
        self.module = module
        self.feature = feature
        self.index = index
        self._handles: list[RemovableHandle] = []
        self._token = 0
        self._batch: dict[str, Any] = {}
        self._finalizer = weakref.finalize(self, _remove_handles, self._handles)

    @property
    def armed(self) -> bool:
        """Whether hooks are installed right now."""
        return bool(self._handles)

    def arm(self, keep_maps: bool) -> None:
        """Install the hooks for the next forward (``keep_maps``: keep the map and the
        inputs, for drawing)."""
        _remove_handles(self._handles)
        self._batch = {"keep_maps": keep_maps}
        self._token += 1
        token = self._token
        ref = weakref.ref(self)
        handles = self._handles

        def current() -> Optional[ProbeCapture]:
            cap = ref()
            if cap is None or cap._token != token:
                _remove_handles(handles)
                return None
            return cap

        def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
            cap = current()
            if cap is not None:
                cap._on_call(args, kwargs)

        def on_feature(module: nn.Module, args: tuple, output: Any) -> None:
            cap = current()
            if cap is not None:
                cap._on_feature(output)

        def on_done(module: nn.Module, args: tuple, output: Any) -> None:
            _remove_handles(handles)

        handles.append(self.model.register_forward_pre_hook(on_call, with_kwargs=True))
        handles.append(self.module.register_forward_hook(on_feature))
        handles.append(self.model.register_forward_hook(on_done, always_call=True))

    def take(self) -> dict[str, Any]:
        """Remove any hook still installed and return what the forward left (see the class
        doc); a later forward is not recorded until the next :meth:`arm`."""
        _remove_handles(self._handles)
        self._token += 1
        batch, self._batch = self._batch, {}
        return batch

    def _on_call(self, args: tuple, kwargs: dict) -> None:
        inputs = kwargs.get("inputs", args[0] if args else None)
        samples = kwargs.get("data_samples", args[1] if len(args) > 1 else None)
        if isinstance(inputs, Tensor) and inputs.dim() == 4:
            self._batch["input_hw"] = (int(inputs.shape[-2]), int(inputs.shape[-1]))
            if self._batch.get("keep_maps"):
                self._batch["inputs"] = inputs.detach()
        if isinstance(samples, (list, tuple)):
            self._batch["samples"] = list(samples)

    def _on_feature(self, output: Any) -> None:
        try:
            value = select_output(output, self.feature, self.index)
        except CAMInputError as err:
            self._batch["skipped"] = ("select", f"{err}; this batch is skipped")
            return
        if not isinstance(value, Tensor) or value.dim() != 4:
            self._batch["skipped"] = ("dim", f"the probed output is {describe(value)}; skipped")
            return
        with torch.no_grad(), no_autocast(value.device):
            f = value.detach().float()
            samples = self._batch.get("samples")
            input_hw = self._batch.get("input_hw")
            mask = None
            if samples is not None and input_hw is not None and len(samples) == f.shape[0]:
                shapes = [metainfo(s).get("img_shape") for s in samples]
                mask = valid_cell_mask(shapes, input_hw, f.shape[-2:], device=f.device)
            self._batch["pooled"] = CAMProbe.pool(f, mask)
            self._batch["mask"] = mask
            if self._batch.get("keep_maps"):
                self._batch["features"] = f.clone() if f is value else f
