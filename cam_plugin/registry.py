"""Finding the adapter of a model, without importing any framework up front.

Resolution order (the first that applies wins):

1. an adapter passed explicitly (``CAM(model, adapter=...)``);
2. the model's own ``__cam_adapter__()`` method (models built by
   :func:`cam_plugin.convert` have one, so they need no registration);
3. adapters registered with :func:`register_adapter`, newest first;
4. the integration for the package that defined the model's class, imported lazily
   on first use (a model from ``timm.*`` loads ``cam_plugin.integrations.timm``,
   ``torchvision.*`` the torchvision one, ``mmpretrain.*`` / ``mmdet.*`` theirs);
   it registers its adapters, then step 3 is tried again;
5. adapters published by other packages under the ``cam_plugin.adapters`` entry-point
   group (each entry point is a callable that calls :func:`register_adapter`),
   loaded once; then step 3 again;
6. the generic reading of :func:`cam_plugin.discovery.discover`.

Factories that need a forward pass (the generic reading, and the timm / torchvision /
mmpretrain factories built on it) read the forward given to :func:`resolve`: the ``trace``
of a real call (what :class:`cam_plugin.CAM` passes on its first call), else the user's
``example``, else a random probe at ``input_size`` (every factory honours it). With
``allow_probe=False`` no forward is run at all: a factory that needs one raises
:class:`~cam_plugin.forward.ForwardNeededError`.

A factory returns an :class:`~cam_plugin.adapter.Adapter`, or ``None`` when the model
is not one it handles. A factory that recognizes the model but finds its head
unsupported raises :class:`~cam_plugin.errors.UnsupportedHeadError`, which stops the
search. If nothing applies, :class:`~cam_plugin.errors.AdapterNotFoundError` lists
everything tried.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

from torch import Tensor, nn

from .adapter import Adapter
from .errors import AdapterNotFoundError, CAMInputError, UnsupportedHeadError
from .forward import ForwardTrace, ResolutionRequest, resolution_context

__all__ = [
    "AdapterFactory",
    "load_integrations_for",
    "register_adapter",
    "registered_adapters",
    "resolve",
]

AdapterFactory = Callable[[nn.Module], Optional[Adapter]]
Matcher = Union[type, tuple, Callable[[nn.Module], bool]]

#: top-level package of a model's class -> integration module that registers its adapters
INTEGRATIONS: dict[str, str] = {
    "timm": "cam_plugin.integrations.timm",
    "torchvision": "cam_plugin.integrations.torchvision",
    "mmpretrain": "cam_plugin.integrations.mmpretrain",
    "mmdet": "cam_plugin.integrations.mmdet",
    "mmaction": "cam_plugin.integrations.mmaction",
    "transformers": "cam_plugin.integrations.hf",
}
ENTRY_POINT_GROUP = "cam_plugin.adapters"


@dataclass(frozen=True)
class _Entry:
    name: str
    matcher: Matcher
    factory: AdapterFactory

    def matches(self, model: nn.Module) -> bool:
        if isinstance(self.matcher, (type, tuple)):
            return isinstance(model, self.matcher)
        return bool(self.matcher(model))


_REGISTRY: list[_Entry] = []
_LOADED_INTEGRATIONS: set[str] = set()
_ENTRY_POINTS_LOADED = False


def register_adapter(
    match: Matcher, factory: AdapterFactory, *, name: Optional[str] = None
) -> None:
    """Register an adapter factory for models matching ``match``.

    Args:
        match: a class (or tuple of classes) matched with ``isinstance``, or a predicate
            ``model -> bool``.
        factory: ``model -> Adapter`` (or ``None`` when it does not handle this model).
        name: a label shown when resolution fails; defaults to the factory's name.

    Later registrations take precedence over earlier ones.
    """
    if not (isinstance(match, (type, tuple)) or callable(match)):
        raise CAMInputError(
            f"register_adapter: match must be a class or a predicate, got {type(match).__name__}"
        )
    if not callable(factory):
        raise CAMInputError(
            f"register_adapter: factory must be callable, got {type(factory).__name__}"
        )
    label = name or str(getattr(factory, "__qualname__", repr(factory)))
    _REGISTRY.append(_Entry(label, match, factory))


def registered_adapters() -> list[str]:
    """Names of the registered adapter factories, newest first."""
    return [e.name for e in reversed(_REGISTRY)]


def _try_registered(model: nn.Module, tried: list[str]) -> Optional[Adapter]:
    for entry in reversed(_REGISTRY):
        if not entry.matches(model):
            continue
        adapter = entry.factory(model)
        if adapter is not None:
            return adapter
        tried.append(f"registered '{entry.name}': matched but declined")
    return None


def _class_packages(model: nn.Module) -> list[str]:
    pkgs: list[str] = []
    for cls in type(model).__mro__:
        top = cls.__module__.split(".")[0]
        if top not in pkgs and top not in ("torch", "builtins"):
            pkgs.append(top)
    return pkgs


def _load_integration(package: str, tried: list[str]) -> bool:
    module = INTEGRATIONS.get(package)
    if module is None or module in _LOADED_INTEGRATIONS:
        return False
    _LOADED_INTEGRATIONS.add(module)
    try:
        importlib.import_module(module)
    except ImportError as err:
        tried.append(f"integration {module}: could not be imported ({err})")
        return False
    return True


def load_integrations_for(model: nn.Module, tried: Optional[list[str]] = None) -> bool:
    """Import the integration of every package in the model's class hierarchy that has one
    (:data:`INTEGRATIONS`; each at most once per process). Returns True when one was
    imported now; an integration whose framework cannot be imported is noted in ``tried``."""
    loaded = False
    for package in _class_packages(model):
        loaded = _load_integration(package, tried if tried is not None else []) or loaded
    return loaded


def _load_entry_points(tried: list[str]) -> bool:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return False
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    loaded = False
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()()
            loaded = True
        except Exception as err:  # a broken third-party plugin must not break resolution
            tried.append(f"entry point {ep.name} ({ep.value}) failed: {err}")
    return loaded


def resolve(
    model: nn.Module,
    *,
    input_size: Optional[Sequence[int]] = None,
    generic: bool = True,
    example: Optional[Tensor] = None,
    trace: Optional[ForwardTrace] = None,
    allow_probe: bool = True,
) -> Adapter:
    """Return the :class:`~cam_plugin.adapter.Adapter` for ``model`` (order in the module doc).

    Args:
        model: the model.
        input_size: ``(C, H, W)`` for a random probe when neither ``trace`` nor ``example``
            is given (default: what the model says, else 3 x 224 x 224).
        generic: allow the generic reading as the last resort.
        example: a batch of the user's own inputs to read the model from (one forward,
            eval mode, no grad, RNG and modes restored).
        trace: a recorded forward of ``model`` (:class:`~cam_plugin.forward.ForwardTrace`)
            to read instead of running one.
        allow_probe: with ``False`` no forward is run: a factory that needs one raises
            :class:`~cam_plugin.forward.ForwardNeededError`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"CAM needs a torch.nn.Module, got {type(model).__name__}; pass the model object"
        )
    if example is not None and not isinstance(example, Tensor):
        raise CAMInputError(
            f"example must be a tensor batch of the model's inputs, got {type(example).__name__}"
        )
    request = ResolutionRequest(model, trace, example, input_size, allow_probe)
    with resolution_context(request):
        return _resolve(model, input_size, generic)


def _resolve(model: nn.Module, input_size: Optional[Sequence[int]], generic: bool) -> Adapter:
    tried: list[str] = []
    own = getattr(model, "__cam_adapter__", None)
    if callable(own):
        adapter = own()
        if isinstance(adapter, Adapter):
            return adapter
        tried.append("model.__cam_adapter__(): returned no Adapter")
    adapter = _try_registered(model, tried)
    if adapter is not None:
        return adapter
    for package in _class_packages(model):
        if _load_integration(package, tried):
            adapter = _try_registered(model, tried)
            if adapter is not None:
                return adapter
    if _load_entry_points(tried):
        adapter = _try_registered(model, tried)
        if adapter is not None:
            return adapter
    tried.append(f"registered adapters: {registered_adapters() or 'none'}")
    if generic:
        from .discovery import discover

        try:
            return discover(model, input_size=input_size)
        except UnsupportedHeadError:
            raise
        except AdapterNotFoundError as err:
            tried.append(f"generic probe: {err}")
    raise AdapterNotFoundError(
        f"no adapter for {type(model).__module__}.{type(model).__name__}; tried: "
        + "; ".join(tried)
        + ". Register one with cam_plugin.register_adapter(ModelClass, factory)."
    )
