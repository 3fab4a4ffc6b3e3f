"""ROAD: RemOve And Debias (Rong et al., ICML 2022), batched on the images' device.

For a map ``m`` and a percentage ``p``, the pixels to remove are chosen by a threshold on the
map, then filled by *noisy linear imputation* and the model scores the result:

* **MoRF** (most relevant first) removes the ``p %`` highest pixels of ``m``; **LeRF** (least
  relevant first) the ``p %`` lowest, ranked by ``1 - m``. Concretely, with
  ``q = 100 - p`` (``convention="paper"``: ``p`` is the share removed, as in the paper) or
  ``q = p`` (``convention="grad-cam"``: grad-cam 1.5.7's ``ROADMostRelevantFirst(percentile)``
  / ``ROADLeastRelevantFirst(percentile)``, where the number is the share *kept*), a pixel
  is kept when ``v < percentile(v, q)`` with ``v = m`` (MoRF) or ``v = 1 - m`` (LeRF,
  computed in the map's dtype) and ``percentile`` NumPy's linear interpolation, reproduced
  bit for bit (:func:`numpy_percentile`).
* **Imputation**: every removed pixel takes the weighted mean of its 8 neighbours inside the
  image (weight 1/6 for the 4 axial ones, 1/12 for the diagonals), removed neighbours being
  unknowns too: the sparse linear system of ROAD's ``NoisyLinearImputer``, solved for the
  whole batch and every channel at once by multigrid-preconditioned conjugate gradients to a
  relative residual ``tol`` (:mod:`cam_plugin.evaluate_impute`) instead of one sparse direct
  solve per image; then ``noise * N(0, 1)`` is
  added to the removed pixels, drawn from the metric's own ``torch.Generator`` (seeded by
  ``seed``; the global RNG is never used). A removed region that touches no kept pixel has no
  data to interpolate and is filled with 0 (plus noise).
* **Scores** (``score``: probability or logit of the map's class) of the imputed images;
  records keep the raw scores, the summary reports ``after - before`` as grad-cam does
  (``MoRF@p``, ``LeRF@p`` and their means over ``percentiles``, ``MoRF``, ``LeRF``), and
  ``combined = mean((LeRF - MoRF) / 2)`` (grad-cam's ``ROADCombined``; ``before`` cancels).
  A faithful map has a low MoRF (removing its top pixels hurts) and a high LeRF.

With ``noise=0`` the numbers equal grad-cam's to float precision (tested); with noise they
differ only by the noise draw.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .errors import CAMInputError
from .evaluate_core import (
    ClassesLike,
    EvalResult,
    FaithfulnessMetric,
    MapBatch,
    MapsLike,
    Score,
    check_choice,
    check_positive_int,
    checked_images,
    class_scores,
    map_batch,
    model_logits,
    one_shot,
    scores_in_chunks,
)
from .evaluate_impute import linear_impute
from .probing import untouched

__all__ = ["ROAD", "linear_impute", "numpy_percentile", "road", "road_keep_masks"]

DEFAULT_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def numpy_percentile(values: Tensor, qs: Sequence[float]) -> Tensor:
    """``np.percentile(row, q)`` of every row of ``values`` ``(N, n)`` for each ``q`` in
    ``qs``, bit for bit (one sort per row).

    NumPy's default ("linear") method: the virtual index ``i = n f + (1 - f) - 1`` with
    ``f = q / 100`` (float64, evaluated as NumPy does), ``a = sorted[floor(i)]``,
    ``b = sorted[floor(i) + 1]``, ``g = i - floor(i)``; in the values' dtype
    ``a + (b - a) g`` when ``g < 0.5``, else ``b - (b - a)(1 - g)``; the minimum for
    ``i <= 0`` and the maximum for ``i >= n - 1``.

    Returns:
        ``(N, len(qs))`` in the values' dtype.
    """
    n = values.shape[1]
    ordered = torch.sort(values, dim=1).values
    out = []
    for q in qs:
        f = float(q) / 100
        virtual = n * f + (1 + f * (1 - 1 - 1)) - 1
        if virtual >= n - 1:
            out.append(ordered[:, -1])
            continue
        if virtual <= 0:
            out.append(ordered[:, 0])
            continue
        lo = math.floor(virtual)
        gamma = virtual - lo
        a, b = ordered[:, lo], ordered[:, lo + 1]
        diff = b - a
        out.append(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma)
    return torch.stack(out, dim=1)


def road_keep_masks(maps: Tensor, percentiles: Sequence[float], most_relevant: bool) -> Tensor:
    """Which pixels stay, ``(N, P, H, W)`` bool: ``v < numpy_percentile(v, q)`` per map and
    per ``q`` in ``percentiles``, ``v = maps`` (MoRF) or ``1 - maps`` (LeRF)."""
    v = maps if most_relevant else 1 - maps
    thr = numpy_percentile(v.flatten(1), percentiles)
    return v.unsqueeze(1) < thr.view(*thr.shape, 1, 1)


class ROAD(FaithfulnessMetric):
    """ROAD MoRF / LeRF at several percentages and the combined score (see the module notes).

    Records per map: ``score`` (before), ``morf`` and ``lerf`` (``(P,)`` scores after
    imputation); derived ``morf_change`` and ``lerf_change`` (after - before). Summary:
    ``MoRF@p``, ``LeRF@p``, ``MoRF``, ``LeRF`` (mean changes) and ``combined``.

    Args:
        percentiles: the percentages ``p`` (grad-cam's default: 10, 20, ..., 90).
        convention: ``"paper"`` (``p`` % removed) or ``"grad-cam"`` (``p`` % kept).
        score: ``"probability"`` or ``"logit"``.
        noise: std of the Gaussian noise added to imputed pixels (ROAD's 0.01).
        seed: seed of the metric's own noise generator (re-seeded by ``reset``).
        tol: the imputation's relative residual
            (:func:`~cam_plugin.evaluate_impute.linear_impute`).
        max_iter: the imputation's iteration cap (default 100).
        solver_dtype: the imputation's dtype (float32; float64 is slower and more exact).
        max_batch: imputed images per solve and forward (the memory budget).
    """

    format = "cam_plugin.ROAD/1"

    def __init__(
        self,
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        *,
        convention: Literal["paper", "grad-cam"] = "paper",
        score: Score = "probability",
        noise: float = 0.01,
        seed: int = 0,
        tol: float = 1e-8,
        max_iter: Optional[int] = None,
        solver_dtype: torch.dtype = torch.float32,
        max_batch: int = 32,
    ) -> None:
        self.percentiles = tuple(float(p) for p in percentiles)
        if not self.percentiles or any(not 0 <= p <= 100 for p in self.percentiles):
            raise CAMInputError(f"percentiles must be in [0, 100], got {tuple(percentiles)}.")
        self.convention = check_choice(convention, "convention", ("paper", "grad-cam"))
        self.score = check_choice(score, "score", ("probability", "logit"))
        if not (math.isfinite(noise) and noise >= 0):
            raise CAMInputError(f"noise must be a finite float >= 0, got {noise!r}.")
        self.noise = float(noise)
        self.seed = int(seed)
        self.tol = float(tol)
        self.max_iter = max_iter
        self.solver_dtype = solver_dtype
        self.max_batch = check_positive_int(max_batch, "max_batch")
        super().__init__()

    def reset(self) -> None:
        """Forget every record and re-seed the noise generators."""
        super().reset()
        self._generators: dict[str, torch.Generator] = {}

    def config(self) -> dict[str, Any]:
        """The settings that records depend on."""
        return {
            "percentiles": list(self.percentiles),
            "convention": self.convention,
            "score": self.score,
            "noise": self.noise,
            "seed": self.seed,
        }

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def kept_percentiles(self) -> list[float]:
        """The NumPy percentile that splits kept from removed pixels, per percentage."""
        if self.convention == "paper":
            return [100.0 - p for p in self.percentiles]
        return list(self.percentiles)

    def update(
        self,
        model: nn.Module,
        images: Tensor,
        maps: MapsLike,
        classes: ClassesLike = None,
        sample_ids: Optional[Sequence[Hashable]] = None,
    ) -> None:
        """Score MoRF and LeRF of every map of a batch at every percentage (arguments as
        :meth:`cam_plugin.evaluate.DeletionInsertion.update`)."""
        images = checked_images(images, model)
        with untouched(model):
            logits = model_logits(model, images)
            batch = map_batch(images, maps, classes, self.sample_keys(sample_ids), logits=logits)
            p = len(self.percentiles)
            columns = {
                "score": ((), np.float64),
                "morf": ((p,), np.float64),
                "lerf": ((p,), np.float64),
            }
            self._record(batch.keys, columns, lambda rows: self._scores(model, logits, batch, rows))

    def _scores(
        self, model: nn.Module, logits: Tensor, batch: MapBatch, rows: list[int]
    ) -> dict[str, np.ndarray]:
        """Scores of the ``2 P`` imputed images of each map ``rows`` (MoRF then LeRF per
        map), imputed and scored ``max_batch`` at a time."""
        idx = torch.tensor(rows, dtype=torch.int64, device=batch.maps.device)
        img, cls = batch.image[idx], batch.classes[idx]
        maps = batch.maps[idx]
        q = self.kept_percentiles()
        keep = torch.stack(
            [road_keep_masks(maps, q, True), road_keep_masks(maps, q, False)], dim=1
        )  # (R, 2, P, H, W)
        p = len(q)
        per_map = 2 * p
        keep = keep.reshape(len(rows) * per_map, *maps.shape[-2:])
        images = batch.images
        gen = self._generator(images.device)

        def build(start: int, stop: int) -> Tensor:
            src = images[img[torch.arange(start, stop, device=images.device) // per_map]]
            filled = linear_impute(
                src,
                keep[start:stop],
                tol=self.tol,
                max_iter=self.max_iter,
                dtype=self.solver_dtype,
            )
            if self.noise > 0:
                draw = torch.randn(
                    filled.shape, generator=gen, device=images.device, dtype=filled.dtype
                )
                filled = torch.where(
                    keep[start:stop].unsqueeze(1), filled, filled + self.noise * draw
                )
            return filled

        job_cls = cls.repeat_interleave(per_map)
        n_jobs = len(rows) * per_map
        after = scores_in_chunks(model, n_jobs, build, job_cls, self.score, self.max_batch)
        scored = after.double().view(len(rows), 2, p).cpu().numpy()
        before = class_scores(logits[img], cls, self.score).double().cpu().numpy()
        return {"score": before, "morf": scored[:, 0], "lerf": scored[:, 1]}

    def derived(self, columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``morf_change`` and ``lerf_change``: after - before, ``(n, P)``."""
        before = columns["score"][:, None]
        return {"morf_change": columns["morf"] - before, "lerf_change": columns["lerf"] - before}

    def summarize(self, columns: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Mean changes per percentage and overall, and the combined score."""
        d = self.derived(columns)
        out: dict[str, float] = {}
        for j, pct in enumerate(self.percentiles):
            label = f"{pct:g}"
            out[f"MoRF@{label}"] = float(d["morf_change"][:, j].mean())
            out[f"LeRF@{label}"] = float(d["lerf_change"][:, j].mean())
        out["MoRF"] = float(d["morf_change"].mean())
        out["LeRF"] = float(d["lerf_change"].mean())
        out["combined"] = float(((d["lerf_change"] - d["morf_change"]) / 2).mean())
        return out


def road(
    model: nn.Module,
    images: Tensor,
    maps: MapsLike,
    classes: ClassesLike = None,
    **options: Any,
) -> EvalResult:
    """One-shot :class:`ROAD` (``options`` are its settings)."""
    return one_shot(ROAD, model, images, maps, classes, **options)
