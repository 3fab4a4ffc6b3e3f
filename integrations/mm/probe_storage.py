"""Where the CAM probe's weights live: its own files, never the detector's checkpoint.

A probe file (``PROBE_FORMAT``) holds the probe's ``state_dict``, its optimizer state and
``meta`` (probed feature and index, ``num_features``, ``num_classes``, class names, steps).
Next to every checkpoint of iteration ``n`` the hook writes ``{work_dir}/cam_probe/
iter_{n}.pth`` (:func:`probe_path`); when a checkpoint is loaded (resume / ``load_from``) it
looks for the file of the same iteration in ``{work_dir}/cam_probe`` and next to the loaded
checkpoint (:func:`find_probe_file`). Files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import os.path as osp
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch

from cam_plugin.errors import CAMInputError

from .probe_model import CAMProbe

__all__ = [
    "PROBE_FORMAT",
    "find_probe_file",
    "probe_state",
    "probe_folders",
    "probe_path",
    "prune_probe_files",
    "read_probe_file",
    "restore_probe",
    "write_probe_file",
]

PROBE_FORMAT = "cam_plugin.CAMProbe/1"
_OWNER = "CAMProbeHook"
_NAME = re.compile(r"iter_(\d+)\.pth")


def probe_path(work_dir: str, iteration: int) -> str:
    """``{work_dir}/cam_probe/iter_{iteration}.pth``."""
    return osp.join(work_dir, "cam_probe", f"iter_{int(iteration)}.pth")


def probe_state(
    probe: CAMProbe, optim: torch.optim.Optimizer, meta: Mapping[str, Any]
) -> dict[str, Any]:
    """A probe file's content: ``format``, the probe's weights (CPU), the optimizer state
    and ``meta`` (with the probe's ``num_features`` / ``num_classes`` added)."""
    return {
        "format": PROBE_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in probe.state_dict().items()},
        "optimizer": optim.state_dict(),
        "meta": {
            **meta,
            "num_features": probe.num_features,
            "num_classes": probe.num_classes,
        },
    }


def restore_probe(probe: CAMProbe, optim: torch.optim.Optimizer, state: Mapping) -> int:
    """Load a checked probe file's weights and optimizer state; returns its ``steps``."""
    probe.load_state_dict(state["state_dict"])
    optim.load_state_dict(state["optimizer"])
    return int(state.get("meta", {}).get("steps", 0))


def write_probe_file(path: str, state: Mapping[str, Any]) -> None:
    """Write a probe file (its folder is created)."""
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    torch.save(dict(state), path)


def read_probe_file(path: str, num_features: int, num_classes: int, what: str) -> Mapping:
    """Read and check a probe file for a probe of ``(num_features, num_classes)``.

    Raises:
        CAMInputError: no file, not a probe file, or trained on another feature shape or
            class count (``what`` names the probed output in the message).
    """
    if not osp.isfile(path):
        raise CAMInputError(f"{_OWNER}: no probe file at {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CAMInputError(f"{_OWNER}: cannot read {path!r} as a probe file ({err})") from err
    if not isinstance(state, Mapping) or state.get("format") != PROBE_FORMAT:
        raise CAMInputError(f"{_OWNER}: {path!r} is not a CAM probe file")
    meta = state.get("meta", {})
    want = (num_features, num_classes)
    got = (meta.get("num_features"), meta.get("num_classes"))
    if got != want:
        raise CAMInputError(
            f"{_OWNER}: the probe in {path!r} has (features, classes) = {got}, but {what} "
            f"gives {want}; it was trained on another setup"
        )
    return state


def prune_probe_files(folder: str, max_keep: int) -> None:
    """Keep only the ``max_keep`` newest ``iter_{n}.pth`` files of ``folder`` (``max_keep
    <= 0``: keep all)."""
    if max_keep <= 0 or not osp.isdir(folder):
        return
    found = []
    for name in os.listdir(folder):
        m = _NAME.fullmatch(name)
        if m:
            found.append((int(m.group(1)), name))
    for _, name in sorted(found)[:-max_keep]:
        os.remove(osp.join(folder, name))


def probe_folders(work_dir: str, load_from: Any) -> list[str]:
    """Where to look for the probe of a loaded checkpoint: ``{work_dir}/cam_probe``, then
    the ``cam_probe`` folder next to ``load_from`` (when it is a path)."""
    folders = [osp.join(work_dir, "cam_probe")]
    if isinstance(load_from, str):
        folders.append(osp.join(osp.dirname(load_from), "cam_probe"))
    return folders


def find_probe_file(folders: Sequence[str], iteration: int) -> Optional[str]:
    """The first ``{folder}/iter_{iteration}.pth`` that exists, else ``None``."""
    for folder in folders:
        path = osp.join(folder, f"iter_{int(iteration)}.pth")
        if osp.isfile(path):
            return path
    return None
