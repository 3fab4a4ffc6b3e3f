"""What the CAM probe hook checks before the first iteration of a detection run.

Each check is one function and raises a :class:`~cam_plugin.errors.CAMInputError` that says
what was wrong and what to do: the probed submodule exists (:func:`find_submodule`), its
output holds a 4-D map at ``index`` (:func:`probe_feature_map`: one forward of a random
image through the detector's feature extractor, the detector left untouched by
:func:`cam_plugin.probing.untouched`), the number of classes is known
(:func:`probe_num_classes`), the training samples carry labels (:func:`check_train_labels`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from mmengine.registry import OPTIMIZERS
from mmengine.runner import BaseLoop
from torch import Tensor, nn

from cam_plugin.errors import CAMInputError
from cam_plugin.probing import probe_input, rng_guard, untouched

from .common import describe
from .probe_model import CAMProbe
from .samples import gt_labels

__all__ = [
    "build_probe",
    "check_train_labels",
    "dataset_classes",
    "find_submodule",
    "head_num_classes",
    "probe_feature_map",
    "probe_image_size",
    "probe_num_classes",
    "select_output",
]

_OWNER = "CAMProbeHook"


def find_submodule(model: nn.Module, path: str) -> nn.Module:
    """The submodule at the dotted ``path``; the error names the first missing part, the
    nearest child name and every child of the module where the path broke off."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        pass
    cur: nn.Module = model
    done: list[str] = []
    for part in path.split("."):
        children = dict(cur.named_children())
        if part not in children:
            where = ".".join(done) or type(model).__name__
            names = list(children)
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise CAMInputError(
                f"{_OWNER}: feature={path!r}: {where} has no submodule '{part}'{hint}; its "
                f"children are: {', '.join(names) or 'none'}"
            )
        cur, done = children[part], [*done, part]
    return cur


def select_output(output: Any, feature: str, index: Union[int, str]) -> Any:
    """The probed value inside a module's output: the output itself when it is a tensor,
    else ``output[index]`` of a dict / tuple / list; raises when ``index`` is not there."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        if index not in output:
            raise CAMInputError(
                f"{_OWNER}: {feature} returns a dict with keys {list(output)}; "
                f"index={index!r} is not one of them"
            )
        return output[index]
    if isinstance(output, (tuple, list)):
        n = len(output)
        if not isinstance(index, int) or not -n <= index < n:
            raise CAMInputError(
                f"{_OWNER}: {feature} returns {n} outputs ({describe(output)}); "
                f"index={index!r} does not exist (valid: {-n}..{n - 1})"
            )
        return output[index]
    raise CAMInputError(f"{_OWNER}: {feature} returns {describe(output)}, not a feature map")


def probe_image_size(
    model: nn.Module, size: Optional[tuple[int, int]] = None
) -> tuple[int, int, int]:
    """``(C, H, W)`` of the check image: ``C`` from the data preprocessor's ``mean`` (else
    the first convolution's input channels, else 3); ``(H, W)`` = ``size``, else 224 rounded
    up to the preprocessor's ``pad_size_divisor``."""
    pre = getattr(model, "data_preprocessor", None)
    mean = getattr(pre, "mean", None)
    if isinstance(mean, Tensor) and mean.numel() > 1:
        channels = int(mean.numel())
    else:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        channels = conv.in_channels if conv is not None else 3
    if size is not None:
        return channels, size[0], size[1]
    div = int(getattr(pre, "pad_size_divisor", 1) or 1)
    side = int(math.ceil(224 / div) * div)
    return channels, side, side


def probe_feature_map(
    model: nn.Module,
    module: nn.Module,
    feature: str,
    index: Union[int, str],
    size: Optional[tuple[int, int]] = None,
) -> Tensor:
    """The probed map of one random image (``U[0, 1)``, :func:`probe_image_size`) run through
    ``model.extract_feat`` (else ``model(x, mode='tensor')``); must be ``(1, K, h, w)``.

    The detector is left as it was (:func:`cam_plugin.probing.untouched`: eval mode, no
    autograd, every RNG stream restored, modes restored); the recording hook is removed
    also when the forward raises.
    """
    c, h, w = probe_image_size(model, size)
    x = probe_input(model, (c, h, w), batch=1, dist="uniform")
    seen: list[Any] = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with untouched(model, all_rngs=True):
            extract = getattr(model, "extract_feat", None)
            if callable(extract):
                extract(x)
            else:
                model(x, mode="tensor")
    except CAMInputError:
        raise
    except Exception as err:
        raise CAMInputError(
            f"{_OWNER}: a forward of a random {h}x{w} image through "
            f"{type(model).__name__}.extract_feat failed ({type(err).__name__}: {err}); set "
            "probe_input_size=(H, W) to a size the detector takes"
        ) from err
    finally:
        handle.remove()
    if not seen:
        raise CAMInputError(
            f"{_OWNER}: feature={feature!r} never runs when the detector extracts its "
            "features; probe the backbone or the neck (or a module inside them)"
        )
    value = select_output(seen[-1], feature, index)
    if not isinstance(value, Tensor) or value.dim() != 4:
        raise CAMInputError(
            f"{_OWNER}: the probed output of {feature!r} (index={index!r}) is "
            f"{describe(value)}, not a 4-D (B, K, h, w) feature map; choose a backbone stage "
            "or neck level that returns one"
        )
    return value


def dataset_classes(runner: Any) -> Optional[tuple[str, ...]]:
    """``metainfo['classes']`` of the first of the train / val / test data sets (of the
    loops already built) that has them."""
    for attr in ("_train_loop", "_val_loop", "_test_loop"):
        loop = getattr(runner, attr, None)
        if not isinstance(loop, BaseLoop):
            continue
        dataset = getattr(getattr(loop, "dataloader", None), "dataset", None)
        meta = getattr(dataset, "metainfo", None)
        if isinstance(meta, Mapping) and meta.get("classes"):
            return tuple(str(c) for c in meta["classes"])
    return None


def head_num_classes(model: nn.Module) -> Optional[int]:
    """``num_classes`` of the detector's box head (one- or two-stage)."""
    for name in ("bbox_head", "roi_head.bbox_head"):
        head: Any = model
        for part in name.split("."):
            head = getattr(head, part, None)
        if isinstance(head, (list, nn.ModuleList)):
            head = head[-1] if len(head) else None
        n = getattr(head, "num_classes", None)
        if isinstance(n, int) and n >= 1:
            return n
    return None


def probe_num_classes(
    given: Optional[int], classes: Optional[tuple[str, ...]], model: nn.Module
) -> int:
    """The probe's class count: ``given``, else the data set's class count, else the box
    head's; refused when unknown or smaller than the data set's."""
    num_classes = given
    if num_classes is None:
        num_classes = len(classes) if classes else head_num_classes(model)
    if num_classes is None:
        raise CAMInputError(
            f"{_OWNER}: cannot tell the number of classes (the data set has no "
            "metainfo['classes'] and the detector head no num_classes); set num_classes"
        )
    if classes is not None and len(classes) > num_classes:
        raise CAMInputError(
            f"{_OWNER}: num_classes={num_classes} but the data set has {len(classes)} "
            "classes; drop num_classes or raise it"
        )
    return num_classes


def check_train_labels(dataset: Any, look: int = 32) -> None:
    """The training samples must carry ``gt_instances.labels``: the first sample goes
    through the pipeline (RNG streams restored) and the first ``look`` data infos must hold
    at least one labelled instance."""
    try:
        length = len(dataset)
    except TypeError:
        return
    if length == 0:
        raise CAMInputError(f"{_OWNER}: the training set is empty")
    with rng_guard():
        item = dataset[0]
    sample = item.get("data_samples") if isinstance(item, Mapping) else None
    labels = gt_labels(sample)
    name = type(dataset).__name__
    if labels is None:
        raise CAMInputError(
            f"{_OWNER}: the samples of the training set ({name}) carry no "
            "gt_instances.labels, so there are no image-level labels to train the probe on. "
            "Give the data set annotations and put dict(type='LoadAnnotations', "
            "with_bbox=True) before PackDetInputs in the train pipeline"
        )
    infos = getattr(dataset, "get_data_info", None)
    if not callable(infos) or int(labels.numel()) > 0:
        return
    found = 0
    for i in range(min(length, look)):
        instances = infos(i).get("instances") or []
        found += sum(
            1
            for inst in instances
            if isinstance(inst, Mapping) and inst.get("bbox_label") is not None
        )
    if found == 0:
        raise CAMInputError(
            f"{_OWNER}: the first {min(length, look)} samples of the training set ({name}) "
            "have no labelled instances; the probe needs image-level labels from "
            "gt_instances.labels"
        )


def build_probe(
    num_features: int,
    num_classes: int,
    device: torch.device,
    optimizer: Mapping[str, Any],
) -> tuple[CAMProbe, torch.optim.Optimizer]:
    """A zero-initialised probe on ``device`` and its optimizer, built by mmengine's
    ``OPTIMIZERS`` from the config ``optimizer`` (every RNG stream left as it was)."""
    with rng_guard():
        probe = CAMProbe(num_features, num_classes).to(device)
        cfg = dict(optimizer, params=probe.parameters())
        try:
            optim = OPTIMIZERS.build(cfg)
        except Exception as err:
            raise CAMInputError(
                f"{_OWNER}: building the probe's optimizer {dict(optimizer)!r} failed "
                f"({type(err).__name__}: {err})"
            ) from err
    return probe, optim
