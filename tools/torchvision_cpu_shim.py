"""Make a CUDA-only torchvision wheel importable next to a CPU-only torch.

This file is part of the *development environment* built by the Makefile, not
of the cam-plugin library. PyPI only ships CUDA builds of torchvision; next to
the CPU build of torch their compiled extension fails to load, and then
``import torchvision`` dies in ``torchvision/_meta_registrations.py`` because
the ``torchvision::nms`` operator schema was never defined.

The Makefile copies this module into the venv's site-packages together with a
one-line ``.pth`` file that imports it. It inserts a finder at the front of
``sys.meta_path``; on the first lookup of ``torchvision`` the finder removes
itself and tries to load torchvision's own ``_C`` library. Only if that raises
``OSError`` does it define the two operator schemas (``nms`` and ``qnms``) that
the meta registrations expect, then lets the normal import go on. Where
torchvision loads normally it changes nothing, and interpreter start-up does
not import torch.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys
from typing import Any

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY: Any = None  # keep the torch.library.Library object alive


def _prepare_torchvision() -> None:
    global _LIBRARY
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import glob
    import os

    import torch

    folder = list(spec.submodule_search_locations)[0]
    libraries = glob.glob(os.path.join(folder, "_C*.so"))
    if not libraries:
        return
    try:
        torch.ops.load_library(libraries[0])
    except OSError:
        _LIBRARY = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            _LIBRARY.define(schema)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname != "torchvision":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        # never break the interpreter: on any failure fall back to the plain import
        with contextlib.suppress(Exception):
            _prepare_torchvision()
        return None


def install() -> None:
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


install()
