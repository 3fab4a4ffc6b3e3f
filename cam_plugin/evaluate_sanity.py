"""Sanity checks: model randomisation (Adebayo et al.) and CAM's completeness residual.

**Model randomisation** (Adebayo et al., NeurIPS 2018, "Sanity Checks for Saliency Maps",
cascading randomisation). A *deep copy* of the model is explained, then the copy's layers are
re-initialised one after the other from the top (the output) down, and the images are
explained again after each step. The record of each map is the Spearman rank correlation
between its original map and its map after each step. A method whose maps depend on the
learned weights decorrelates quickly; one that stays high is explaining the input, not the
model. The user's model is never touched (the copy is made once per ``update``).

* *Layers*: module names (``model.get_submodule``), re-initialised cumulatively in the given
  order; by default the model's top-level children that hold parameters, last first (for a
  ResNet: ``fc, layer4, layer3, layer2, layer1, bn1, conv1``).
* *Re-initialising* a module calls ``reset_parameters()`` of every submodule that has it (the
  layer's own init: Kaiming for convolutions and linears, ones / zeros and reset statistics
  for norms); a parameter no such method covers is redrawn ``N(0, std)`` with its own
  standard deviation (0.02 for a single value). Each step is seeded (``seed + step``) inside a
  forked RNG, so results are reproducible and the global RNG is left as it was.
* *Maps*: ``explain(model, images, classes) -> maps`` is any method (``(B, k, h, w)`` /
  ``(B, h, w)`` or a CAMResult); it runs under :func:`cam_plugin.probing.untouched` with
  gradients enabled (Grad-CAM needs them). ``absolute=True`` ranks ``|m|`` (the paper shows
  both). The classes stay those of the original copy (``classes``, or its top-1).
* *Spearman*: the Pearson correlation of the ranks (ties get their average rank) of the two
  flattened maps; a constant map has no ranking and gives NaN (left out of the summary).

**Completeness residual.** CAM is exact: ``S_c = mean_xy M_c(x, y) + b_c`` for the folded
head's bias ``b_c`` (see ``docs/method.md``). :class:`CompletenessResidual` records
``|mean_xy M_c + b_c - logit_c|`` of every map of a :class:`~cam_plugin.CAMResult` (exact to
float error at feature resolution; bilinear upsampling shifts the mean slightly) and the
residual relative to ``max(1, |logit_c|)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from .errors import CAMInputError
from .evaluate_core import (
    ClassesLike,
    EvalResult,
    FaithfulnessMetric,
    checked_images,
    map_batch,
    model_logits,
    one_shot,
)
from .probing import model_device_dtype, rng_guard, untouched
from .result import CAMResult

__all__ = [
    "CompletenessResidual",
    "RandomizationCheck",
    "average_ranks",
    "completeness_residual",
    "randomization_check",
    "reinitialize",
    "spearman",
]

Explain = Callable[[nn.Module, Tensor, Tensor], Union[Tensor, CAMResult]]


def average_ranks(values: Tensor) -> Tensor:
    """Ranks ``1 .. n`` of every row of ``values`` ``(N, n)``, ties sharing their average
    rank (float64)."""
    n = values.shape[1]
    ordered, order = torch.sort(values, dim=1, stable=True)
    pos = torch.arange(n, device=values.device).expand_as(order)
    new = torch.ones_like(order, dtype=torch.bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]
    start = torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=1).values
    end = torch.where(last, pos, torch.full_like(pos, n)).flip(1).cummin(dim=1).values.flip(1)
    ranks = torch.empty(order.shape, dtype=torch.float64, device=values.device)
    ranks.scatter_(1, order, (start + end).double() / 2 + 1)
    return ranks


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of the rows of ``a`` and ``b`` ``(N, ...)``: Pearson of
    :func:`average_ranks`; NaN for a constant row."""
    ra, rb = average_ranks(a.flatten(1)), average_ranks(b.flatten(1))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    den = (ra.square().sum(dim=1) * rb.square().sum(dim=1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(dim=1) / den, torch.full_like(den, float("nan")))


def default_layers(model: nn.Module) -> list[str]:
    """The model's top-level children that hold parameters, last first."""
    names = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    if not names:
        raise CAMInputError("the model has no child module with parameters; pass layers=[...].")
    return names[::-1]


def reinitialize(module: nn.Module, seed: int) -> None:
    """Re-initialise ``module`` in place (see the module notes), seeded by ``seed``, leaving
    the global RNG (torch, and the module's CUDA device) as it was."""
    device, _ = model_device_dtype(module)
    devices = [device] if device.type == "cuda" else []
    with rng_guard(all_rngs=True, devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        covered: set[int] = set()
        for sub in module.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(id(p) for p in sub.parameters(recurse=False))
        for param in module.parameters():
            if id(param) not in covered:
                std = float(param.std()) if param.numel() > 1 else 0.02
                param.normal_(0.0, std if std > 0 else 0.02)


def _class_tensor(classes: ClassesLike, logits: Tensor) -> Tensor:
    """The classes as int64 ``(B, k)`` on the logits' device (``None``: the top-1 class)."""
    b = logits.shape[0]
    if classes is None:
        return logits.argmax(dim=1, keepdim=True)
    grid = torch.as_tensor(np.asarray(classes) if not isinstance(classes, Tensor) else classes)
    if grid.is_floating_point() or grid.dtype == torch.bool:
        raise CAMInputError(f"classes must hold integer class ids, got dtype {grid.dtype}.")
    grid = grid.to(logits.device, torch.int64)
    if grid.dim() == 0:
        grid = grid.expand(b)
    return grid.reshape(b, -1)


def _explained(explain: Explain, model: nn.Module, images: Tensor, classes: Tensor) -> Tensor:
    """``explain``'s maps as ``(B, k, h, w)`` float."""
    with untouched(model, grad=True):
        out = explain(model, images, classes)
    maps = out.maps if isinstance(out, CAMResult) else out
    if not isinstance(maps, Tensor) or maps.dim() not in (3, 4):
        raise CAMInputError("explain must return maps (B, k, h, w) / (B, h, w) or a CAMResult.")
    return (maps.unsqueeze(1) if maps.dim() == 3 else maps).detach().float()


class RandomizationCheck(FaithfulnessMetric):
    """Cascading model randomisation (Adebayo et al.), see the module notes.

    Records per map: ``spearman`` ``(L,)``, the rank correlation after re-initialising the
    first ``1 .. L`` layers. Summary: ``spearman@<layer>`` (mean over maps, NaN left out)
    per step.

    Args:
        layers: module names, re-initialised cumulatively in this order (default: the
            top-level children with parameters, last first).
        absolute: correlate ``|m|`` instead of ``m``.
        seed: seed of the re-initialisation (step ``l`` uses ``seed + l``).
    """

    format = "cam_plugin.RandomizationCheck/1"

    def __init__(
        self, layers: Optional[Sequence[str]] = None, *, absolute: bool = False, seed: int = 0
    ) -> None:
        self.layers = None if layers is None else [str(n) for n in layers]
        self.absolute = bool(absolute)
        self.seed = int(seed)
        self.steps: Optional[list[str]] = self.layers
        super().__init__()

    def config(self) -> dict[str, Any]:
        """The settings that records depend on."""
        return {"layers": self.layers, "absolute": self.absolute, "seed": self.seed}

    def update(
        self,
        model: nn.Module,
        images: Tensor,
        explain: Explain,
        classes: ClassesLike = None,
        sample_ids: Optional[Sequence[Hashable]] = None,
    ) -> None:
        """Explain a deep copy, randomise it layer by layer, explain again, correlate.

        Args:
            model: the model (deep-copied; the original is never run or changed).
            images: ``(B, C, H, W)``.
            explain: ``(model, images, classes) -> maps``; ``classes`` is ``(B, k)``.
            classes: the class of each map (default: the copy's top-1 class).
            sample_ids: ``B`` ids.
        """
        images = checked_images(images, model)
        twin = copy.deepcopy(model)
        names = self.layers if self.layers is not None else default_layers(twin)
        if self.steps is None:
            self.steps = names
        elif list(self.steps) != list(names):
            raise CAMInputError(f"this metric randomises {self.steps}; this model gives {names}.")
        modules = [twin.get_submodule(n) for n in names]
        with untouched(twin):
            logits = model_logits(twin, images)
        grid = _class_tensor(classes, logits)
        base = _explained(explain, twin, images, grid)
        batch = map_batch(images, base, grid, self.sample_keys(sample_ids), logits=logits)

        def compute(rows: list[int]) -> dict[str, np.ndarray]:
            original = base.flatten(0, 1)[rows]
            out = []
            for step, module in enumerate(modules):
                reinitialize(module, self.seed + step)
                now = _explained(explain, twin, images, grid).flatten(0, 1)[rows]
                a, b = (original.abs(), now.abs()) if self.absolute else (original, now)
                out.append(spearman(a, b))
            return {"spearman": torch.stack(out, dim=1).cpu().numpy()}

        self._record(batch.keys, {"spearman": ((len(names),), np.float64)}, compute)

    def summarize(self, columns: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Mean correlation after each step (NaN records left out)."""
        values = columns["spearman"]
        out: dict[str, float] = {}
        for j, name in enumerate(self.steps or []):
            col = values[:, j]
            col = col[~np.isnan(col)]
            out[f"spearman@{name}"] = float(col.mean()) if len(col) else float("nan")
        return out


class CompletenessResidual(FaithfulnessMetric):
    """``|mean_xy M_c + b_c - logit_c|`` of every map of a :class:`~cam_plugin.CAMResult`.

    Records per map: ``residual``, ``logit``; derived ``relative`` (residual over
    ``max(1, |logit|)``). Summary: ``max_residual``, ``mean_residual``, ``max_relative``.
    """

    format = "cam_plugin.CompletenessResidual/1"

    def update(self, result: CAMResult, sample_ids: Optional[Sequence[Hashable]] = None) -> None:
        """Record the residual of every (non-padding) map of ``result``."""
        if not isinstance(result, CAMResult):
            raise CAMInputError("completeness needs a CAMResult (maps, logits, classes, bias).")
        residual = result.identity_residual().abs().double()
        logit = result.scores.double()
        b, k = result.classes.shape
        valid = result.valid.reshape(-1)
        rows = valid.nonzero().view(-1)
        ids = self.sample_keys(sample_ids)(b)
        image = torch.arange(b, device=valid.device).repeat_interleave(k)[rows]
        cls = result.classes.reshape(-1)[rows]
        keys: list[Hashable] = [(ids[i], c) for i, c in zip(image.tolist(), cls.tolist())]
        res_flat = residual.reshape(-1)[rows].cpu().numpy()
        logit_flat = logit.reshape(-1)[rows].cpu().numpy()
        columns = {"residual": ((), np.float64), "logit": ((), np.float64)}
        self._record(
            keys, columns, lambda sel: {"residual": res_flat[sel], "logit": logit_flat[sel]}
        )

    def derived(self, columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``relative`` residual per record."""
        return {"relative": columns["residual"] / np.maximum(1.0, np.abs(columns["logit"]))}

    def summarize(self, columns: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Largest and mean residual, largest relative residual."""
        rel = self.derived(columns)["relative"]
        return {
            "max_residual": float(columns["residual"].max()),
            "mean_residual": float(columns["residual"].mean()),
            "max_relative": float(rel.max()),
        }


def randomization_check(
    model: nn.Module,
    images: Tensor,
    explain: Explain,
    classes: ClassesLike = None,
    **options: Any,
) -> EvalResult:
    """One-shot :class:`RandomizationCheck` (``options`` are its settings)."""
    return one_shot(RandomizationCheck, model, images, explain, classes, **options)


def completeness_residual(result: CAMResult) -> EvalResult:
    """One-shot :class:`CompletenessResidual`."""
    return one_shot(CompletenessResidual, result)
