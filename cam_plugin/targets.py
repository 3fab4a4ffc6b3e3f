"""What a CAM call maps: the ``targets`` argument and contrastive classes as tensors.

``parse_targets`` turns the user's ``targets`` into a ``(B, k)`` long tensor of class
indices (``-1`` pads ragged per-image lists); ``contrast_classes`` gives the class ``c'`` of
every map for contrastive maps ``M_c − M_c'``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .errors import CAMInputError

__all__ = ["Contrast", "Targets", "contrast_classes", "parse_targets"]

Targets = Union[None, int, str, Tensor, Sequence[int], Sequence[Sequence[int]]]
Contrast = Union[None, str, int, Tensor, Sequence[int]]


def _check_class(values: Tensor, num_classes: int, what: str) -> None:
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
        bad = values[(values < 0) | (values >= num_classes)][0].item()
        raise CAMInputError(
            f"{what} {bad} is out of range: the model has {num_classes} classes "
            f"(valid: 0..{num_classes - 1})"
        )


def _class_index(value: Any, where: str) -> int:
    """One class index: a Python / numpy integer or a 0-d integer tensor, not negative."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise CAMInputError(
            f"{where} is {type(value).__name__}; expected a class index (an int), or for "
            "targets one int or one list of ints per image (no deeper nesting)"
        )
    if int(value) < 0:
        raise CAMInputError(
            f"{where} is {int(value)}: class indices are >= 0 (only ragged per-image lists "
            "are padded, internally)"
        )
    return int(value)


def _target_row(value: Any, i: int) -> list[int]:
    """The classes of image ``i``: an int, or a list / 1-d array / tensor of ints."""
    if isinstance(value, (np.ndarray, Tensor)) and value.ndim == 1:
        value = value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            raise CAMInputError(f"targets[{i}] is empty: give at least one class")
        return [_class_index(c, f"targets[{i}][{j}]") for j, c in enumerate(value)]
    return [_class_index(value, f"targets[{i}]")]


def _targets_from_tensor(
    targets: Tensor, batch: int, num_classes: int, device: torch.device
) -> Tensor:
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise CAMInputError(
            f"target tensor must hold integer class indices, got dtype {targets.dtype}"
        )
    t = targets.to(device=device, dtype=torch.long)
    if t.dim() == 0:
        t = t.expand(batch).reshape(batch, 1)
    elif t.dim() == 1:
        t = t.reshape(-1, 1)
    elif t.dim() != 2:
        raise CAMInputError(f"target tensor must be (B,) or (B, k), got {tuple(t.shape)}")
    if t.shape[0] != batch:
        raise CAMInputError(
            f"targets has {t.shape[0]} entries but the batch has {batch} images; give "
            "one target (or one list of targets) per image"
        )
    _check_class(t, num_classes, "target")
    return t


def parse_targets(targets: Targets, logits: Tensor, topk: int = 1) -> Optional[Tensor]:
    """Turn the ``targets`` argument into a ``(B, k)`` long tensor (``-1`` = padding).

    ``None`` -> the ``topk`` highest logits of each image; ``"all"`` -> ``None`` (every
    class, one einsum); an int -> that class for every image; one int per image; a list
    of class lists per image (multi-label, ragged lists are padded with ``-1``); a
    ``(B,)`` or ``(B, k)`` integer tensor.
    """
    batch, num_classes = logits.shape
    device = logits.device
    if targets is None:
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= num_classes:
            raise CAMInputError(f"topk must be an int in 1..{num_classes}, got {topk!r}")
        return logits.topk(topk, dim=1).indices
    if isinstance(targets, str):
        if targets != "all":
            raise CAMInputError(
                f"targets={targets!r}: the only string accepted is 'all' (every class)"
            )
        return None
    if isinstance(targets, bool):
        raise CAMInputError("targets must be class indices, not a bool")
    if isinstance(targets, np.ndarray):
        targets = torch.as_tensor(targets)
    if isinstance(targets, numbers.Integral):
        _check_class(torch.tensor([int(targets)]), num_classes, "target")
        return torch.full((batch, 1), int(targets), dtype=torch.long, device=device)
    if isinstance(targets, Tensor):
        return _targets_from_tensor(targets, batch, num_classes, device)
    if isinstance(targets, Sequence):
        items = list(targets)
        if len(items) != batch:
            raise CAMInputError(
                f"targets has {len(items)} entries but the batch has {batch} images; give "
                "one target (or one list of targets) per image"
            )
        rows = [_target_row(v, i) for i, v in enumerate(items)]
        width = max(len(r) for r in rows)
        t = torch.full((batch, width), -1, dtype=torch.long)
        for i, row in enumerate(rows):
            t[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        _check_class(t[t >= 0], num_classes, "target")
        return t.to(device)
    raise CAMInputError(
        f"targets must be None, 'all', an int, a list or a tensor; got {type(targets).__name__}"
    )


def contrast_classes(contrast: Contrast, logits: Tensor, classes: Tensor) -> Tensor:
    """The class ``c'`` of every map for contrastive maps ``M_c − M_c'`` (``(B, k)``,
    ``-1`` where ``classes`` is padding).

    ``"second"``: per map, the highest-logit class other than ``c`` (the runner-up for the
    top-1 class); an int: that class for every map; one int per image (list, array or
    ``(B,)`` tensor): that image's class for all its maps.
    """
    batch, num_classes = logits.shape
    if isinstance(contrast, str):
        if contrast != "second":
            raise CAMInputError(
                f"contrast={contrast!r}: the only string accepted is 'second' (the runner-up)"
            )
        if num_classes < 2:
            raise CAMInputError("contrast='second' needs a model with at least two classes")
        top2 = logits.topk(2, dim=1).indices  # (B, 2)
        out = torch.where(classes == top2[:, :1], top2[:, 1:], top2[:, :1])
    elif isinstance(contrast, bool) or contrast is None:
        raise CAMInputError("contrast must be 'second', a class index or one class per image")
    elif isinstance(contrast, numbers.Integral):
        _check_class(torch.tensor([int(contrast)]), num_classes, "contrast class")
        out = torch.full_like(classes, int(contrast))
    else:
        values = contrast if isinstance(contrast, Tensor) else torch.as_tensor(contrast)
        per_image = _targets_from_tensor(values, batch, num_classes, logits.device)
        if per_image.shape[1] != 1:
            raise CAMInputError("contrast takes one class per image, not a list per image")
        out = per_image.expand_as(classes)
    same = (out == classes) & (classes >= 0)
    if bool(same.any()):
        raise CAMInputError(
            f"contrast class {int(out[same][0])} equals the map's own class: M_c − M_c is zero"
        )
    return torch.where(classes >= 0, out, torch.full_like(out, -1))
