"""The options of the CAM probe hook, checked when the hook is built.

:func:`parse_probe_options` turns the hook's keyword arguments into one frozen
:class:`ProbeOptions`, each option checked by a small function; every error is a
:class:`~cam_plugin.errors.CAMInputError` naming the option and what is valid.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

from cam_plugin.errors import CAMInputError

from .common import check_colormap, check_fraction, check_int, reject_unknown

__all__ = ["OPTION_NAMES", "ProbeOptions", "parse_probe_options"]

_OWNER = "CAMProbeHook"
_DEFAULT_OPTIMIZER = dict(type="Adam", lr=1e-3)


@dataclass(frozen=True)
class ProbeOptions:
    """The checked options of :class:`~.probe_hook.CAMProbeHook` (documented there)."""

    feature: str = "backbone"
    index: Union[int, str] = -1
    num_classes: Optional[int] = None
    optimizer: Optional[Mapping[str, Any]] = None
    interval: int = 1
    num_images: int = 1
    max_classes: int = 4
    threshold: Optional[float] = 0.2
    alpha: float = 0.5
    colormap: str = "jet"
    out_dir: Optional[str] = None
    probe_input_size: Optional[tuple[int, int]] = None
    load_from: Optional[str] = None
    max_keep: int = -1
    backend_args: Optional[dict] = None


#: the option names, in the order of the hook's signature
OPTION_NAMES = tuple(f.name for f in fields(ProbeOptions))


def _feature(feature: Any) -> str:
    if not isinstance(feature, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", feature):
        raise CAMInputError(
            f"{_OWNER}: feature must be the dotted name of a submodule of the detector "
            f"('backbone', 'neck', 'backbone.layer3'), got {feature!r}"
        )
    return feature


def _index(index: Any) -> Union[int, str]:
    if isinstance(index, bool) or not isinstance(index, (int, str)):
        raise CAMInputError(
            f"{_OWNER}: index must be an int (position in the module's tuple output) or a str "
            f"(dict key), got {index!r}"
        )
    return index


def _optimizer(optimizer: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    cfg = dict(optimizer) if optimizer is not None else dict(_DEFAULT_OPTIMIZER)
    if "type" not in cfg:
        raise CAMInputError(
            f"{_OWNER}: optimizer must be a config dict with a 'type', e.g. "
            f"dict(type='Adam', lr=1e-3); got {optimizer!r}"
        )
    if "params" in cfg:
        raise CAMInputError(
            f"{_OWNER}: the optimizer config must not name 'params' (the probe's own "
            "parameters are used)"
        )
    return cfg


def _max_keep(max_keep: Any) -> int:
    if isinstance(max_keep, bool) or not isinstance(max_keep, int) or max_keep == 0:
        raise CAMInputError(f"{_OWNER}: max_keep must be -1 (keep all) or >= 1, got {max_keep!r}")
    return max_keep


def _input_size(size: Optional[Sequence[int]]) -> Optional[tuple[int, int]]:
    if size is None:
        return None
    dims = [int(v) for v in size]
    if len(dims) != 2 or min(dims) < 8:
        raise CAMInputError(f"{_OWNER}: probe_input_size must be (H, W) >= 8, got {size!r}")
    return dims[0], dims[1]


def parse_probe_options(options: Mapping[str, Any]) -> ProbeOptions:
    """Check the hook's options (unknown names refused, with the nearest valid one) and
    return them as :class:`ProbeOptions` (absent options take their defaults)."""
    reject_unknown(
        _OWNER, {k: v for k, v in options.items() if k not in OPTION_NAMES}, OPTION_NAMES
    )
    o = {**{f.name: f.default for f in fields(ProbeOptions)}, **options}
    num_classes = o["num_classes"]
    threshold = o["threshold"]
    return ProbeOptions(
        feature=_feature(o["feature"]),
        index=_index(o["index"]),
        num_classes=None
        if num_classes is None
        else check_int(_OWNER, "num_classes", num_classes, 1),
        optimizer=_optimizer(o["optimizer"]),
        interval=check_int(_OWNER, "interval", o["interval"], 1),
        num_images=check_int(_OWNER, "num_images", o["num_images"], 0),
        max_classes=check_int(_OWNER, "max_classes", o["max_classes"], 1),
        threshold=None if threshold is None else check_fraction(_OWNER, "threshold", threshold),
        alpha=check_fraction(_OWNER, "alpha", o["alpha"]),
        colormap=check_colormap(_OWNER, o["colormap"]),
        out_dir=o["out_dir"],
        probe_input_size=_input_size(o["probe_input_size"]),
        load_from=o["load_from"],
        max_keep=_max_keep(o["max_keep"]),
        backend_args=o["backend_args"],
    )
