"""Edits to a trunk that :func:`cam_plugin.convert` makes: last-stride removal and pruning.

* :func:`remove_last_stride` gives every convolution / pooling that downsamples into the
  final map stride 1 (a pooling whose kernel equals its stride and has no padding becomes
  ``nn.Identity``), so the final map's side doubles. The layers are found by the frame
  tracer (:func:`cam_plugin.tracing.trace_placement`: every call whose output has the final
  size and whose own stride is > 1); the result must be exactly the size of those layers'
  input, otherwise every change is undone and the request refused.
* :func:`prune_unused` replaces every module with parameters that one probe forward neither
  calls nor reads a parameter of by ``nn.Identity`` (the original classifier, auxiliary
  heads): only what computes the map is trained, and ``DistributedDataParallel`` sees no
  unused parameters.

Every probe forward runs under :func:`cam_plugin.probing.untouched`.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .errors import CAMInputError
from .probing import untouched
from .tracing import SpatialOp, trace_placement

__all__ = ["prune_unused", "remove_last_stride", "set_submodule"]

_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def set_submodule(root: nn.Module, qualified: str, new: nn.Module) -> None:
    """Replace ``root``'s submodule at the dotted path ``qualified`` by ``new``."""
    parent_name, _, attr = qualified.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _pair_of(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[-1])
    return int(v), int(v)


def _map_hw(module: nn.Module, x: Tensor) -> tuple[int, int]:
    with untouched(module):
        out = module(x)
    return int(out.shape[-2]), int(out.shape[-1])


class _Undo:
    """The changes made so far, to put back when the surgery is refused."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.strides: list[tuple[nn.Module, Any]] = []
        self.replaced: list[tuple[str, nn.Module]] = []

    def set_stride(self, module: nn.Module, stride: Any) -> None:
        self.strides.append((module, module.stride))  # type: ignore[arg-type]
        module.stride = stride  # type: ignore[assignment]

    def replace(self, qualified: str, module: nn.Module) -> None:
        set_submodule(self.root, qualified, nn.Identity())
        self.replaced.append((qualified, module))

    def rollback(self) -> None:
        for mod, old in self.strides:
            mod.stride = old  # type: ignore[assignment]
        for qual, mod in self.replaced:
            set_submodule(self.root, qual, mod)


def _unstride(op: SpatialOp, undo: _Undo, names: dict[int, str]) -> None:
    mod = op.module
    if isinstance(mod, nn.Conv2d):
        undo.set_stride(mod, (1, 1))
    elif isinstance(mod, _POOLS):
        k = _pair_of(mod.kernel_size)
        s = _pair_of(mod.stride if mod.stride is not None else mod.kernel_size)
        if k == s and _pair_of(mod.padding) == (0, 0):
            undo.replace(names[id(mod)], mod)
        else:
            undo.set_stride(mod, 1)
    else:
        raise CAMInputError(
            f"last_stride=1: the downsampling '{op.op}' in "
            f"'{op.module_name or 'the top-level forward'}' is not an nn.Conv2d / "
            "pooling module, so its stride cannot be changed; cut the backbone at an "
            "earlier stage instead"
        )


def remove_last_stride(trunk: nn.Module, x: Tensor) -> None:
    """Give every convolution / pooling that downsamples into the final map stride 1, in
    place (module doc).

    Raises:
        CAMInputError: no strided layer produces the final map, one is not an
            ``nn.Conv2d`` / pooling module, or the new map is not the size of those layers'
            input (e.g. a 2x2/2 patchify downsampling); ``trunk`` is then unchanged.
    """
    trace = trace_placement(trunk, x)
    final = _map_hw(trunk, x)
    ops = [op for op in trace.ops if op.out_size == final and max(op.stride) > 1 and op.op != "pad"]
    if not ops:
        raise CAMInputError(
            "last_stride=1: no strided convolution or pooling produces the final map of this "
            "backbone, so there is no stride to remove"
        )
    target = ops[0].in_size
    names = {id(m): n for n, m in trunk.named_modules()}
    undo = _Undo(trunk)
    try:
        for op in ops:
            _unstride(op, undo, names)
        got = _map_hw(trunk, x)
        if got != target:
            raise CAMInputError(
                f"last_stride=1 would turn the {final[0]}x{final[1]} map into "
                f"{got[0]}x{got[1]} instead of {target[0]}x{target[1]}: this backbone's last "
                "downsampling is not a padded 'same' convolution (e.g. a 2x2/2 patchify); use "
                "an earlier stage instead (or timm's output_stride=16 at creation)"
            )
    except Exception:
        undo.rollback()
        raise


class _ParameterUse(TorchFunctionMode):
    """Records the ids of every tensor passed to a torch function while active: a
    parameter read directly by its owner's parent (``nn.MultiheadAttention`` passes
    ``out_proj.weight`` to ``F.multi_head_attention_forward`` and never calls ``out_proj``)
    shows up here although its module's ``forward`` never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def __torch_function__(
        self, func: Any, types: Any, args: Any = (), kwargs: Optional[dict[str, Any]] = None
    ) -> Any:
        leaves, _ = tree_flatten((args, kwargs or {}))
        self.seen.update(id(v) for v in leaves if isinstance(v, Tensor))
        return func(*args, **(kwargs or {}))


def prune_unused(trunk: nn.Module, x: Tensor) -> tuple[str, ...]:
    """Replace, in place, every module with parameters that the probe forward ``trunk(x)``
    neither calls nor reads a parameter of by ``nn.Identity``; returns their names
    (outermost only)."""
    called: set[int] = set()
    handles = [
        m.register_forward_pre_hook(lambda mod, args: called.add(id(mod))) for m in trunk.modules()
    ]
    use = _ParameterUse()
    try:
        with untouched(trunk), use:
            trunk(x)
    finally:
        for h in handles:
            h.remove()
    pruned: list[str] = []
    for name, module in list(trunk.named_modules()):
        if not name or any(id(m) in called for m in module.modules()):
            continue
        if any(name.startswith(p + ".") for p in pruned):
            continue
        params = list(module.parameters())
        if not params or any(id(p) in use.seen for p in params):
            continue
        set_submodule(trunk, name, nn.Identity())
        pruned.append(name)
    return tuple(pruned)
