"""Perturbation metrics: deletion / insertion (RISE) and confidence change (Grad-CAM++).

**Deletion and insertion** (Petsiuk et al., BMVC 2018, "RISE"). The pixels of each image are
ranked by its map, highest first (``torch.sort(..., descending=True, stable=True)``: ties in
raster order, as torchcam). With ``n = H W`` pixels and a step of ``s`` pixels the curve has
the points ``c_j = min(j s, n)``, ``j = 0 .. ceil(n / s)``. At point ``j``

* deletion scores the image with its ``c_j`` top pixels replaced by the *deletion substrate*
  (all channels of a pixel together),
* insertion scores the *insertion substrate* with the ``c_j`` top pixels of the image put
  back,

for the map's class (``score``: probability by default). ``c_0`` of deletion and ``c_last``
of insertion are the unperturbed image (its own forward). ``AUC = trapezoid(curve, x)`` with
``x_j = c_j / n`` (``auc_x="fraction"``, torchcam's ``DeletionInsertionMetric``) or
``x_j = j / ceil(n / s)`` (``"step"``, RISE's code, which spaces points evenly even when the
last step is shorter); the two agree when ``s`` divides ``n``. Neither curve is normalized by
the original score. Substrates: ``"zeros"``, ``"mean"`` (each image's per-channel mean),
``"blur"`` (a normalized ``k x k`` Gaussian of std ``sigma``, zero padding; RISE's insertion
substrate, ``k = 11``, ``sigma = 5``), a tensor broadcastable to the images, or a callable
``images -> substrate``. Defaults: RISE's (zeros for deletion, blur for insertion; a step of
one image row, ``W`` pixels -- 224 at 224 x 224, as RISE); torchcam uses zeros for both and
``s = ceil(n / steps)``.

**Confidence change.** Each image is multiplied by its map ``E`` (``E * x``, every channel;
maps min-max normalized after resizing unless ``normalize=False``) and scored for the map's
class: ``Y`` on the image, ``O`` on ``E * x``. Per map

* ``drop = max(0, Y - O) / (Y + eps)`` -- Average Drop of Chattopadhay et al. (WACV 2018,
  the Grad-CAM++ paper, ``eps = 0``; they report it times 100); torchcam's
  ``ClassificationMetric`` uses ``eps = 1e-7``,
* ``increase = [Y < O]`` -- Increase in Confidence (both papers; grad-cam's
  ``IncreaseInConfidence`` is ``[O - Y > 0]``, the same),
* ``change = O - Y`` -- grad-cam's ``CamMultImageConfidenceChange``, and
  ``drop_abs = max(0, Y - O)`` -- its ``DropInConfidence`` (not divided by ``Y``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
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
from .probing import untouched

__all__ = [
    "ConfidenceChange",
    "DeletionInsertion",
    "confidence_change",
    "deletion_insertion",
    "gaussian_blur",
    "substrate",
]

SubstrateLike = Union[str, Tensor, Callable[[Tensor], Tensor]]
_SCORES = ("probability", "logit")


def gaussian_blur(images: Tensor, kernel: int = 11, sigma: float = 5.0) -> Tensor:
    """Each channel convolved with a normalized ``kernel x kernel`` Gaussian of std
    ``sigma`` (sampled at integer offsets, sum 1), zero padding ``kernel // 2``."""
    k = check_positive_int(kernel, "blur kernel")
    offsets = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * float(sigma) ** 2))
    g2 = torch.outer(g, g)
    g2 = (g2 / g2.sum()).to(images.device, images.dtype)
    c = images.shape[1]
    weight = g2.expand(c, 1, k, k).contiguous()
    out = F.conv2d(images, weight, padding=k // 2, groups=c)
    return out[..., : images.shape[-2], : images.shape[-1]]


def substrate(images: Tensor, kind: SubstrateLike, kernel: int = 11, sigma: float = 5.0) -> Tensor:
    """The substrate ``(B, C, H, W)`` for ``images``: ``"zeros"``, ``"mean"`` (per image and
    channel), ``"blur"`` (:func:`gaussian_blur`), a tensor broadcastable to the images, or a
    callable ``images -> tensor``."""
    if isinstance(kind, str):
        check_choice(kind, "substrate", ("zeros", "mean", "blur"))
        if kind == "zeros":
            return torch.zeros_like(images)
        if kind == "mean":
            return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
        return gaussian_blur(images, kernel, sigma)
    value = kind(images) if callable(kind) and not isinstance(kind, Tensor) else kind
    if not isinstance(value, Tensor):
        raise CAMInputError("a substrate must be 'zeros', 'mean', 'blur', a tensor or a callable.")
    try:
        return torch.broadcast_to(value.to(images.device, images.dtype), images.shape)
    except RuntimeError as exc:
        raise CAMInputError(
            f"the substrate {tuple(value.shape)} does not broadcast to the images "
            f"{tuple(images.shape)}."
        ) from exc


def _ranks(maps: Tensor) -> Tensor:
    """``(N, H W)`` rank of every pixel of each map, 0 = highest (stable: raster ties)."""
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


class DeletionInsertion(FaithfulnessMetric):
    """Deletion and insertion curves and their AUC (RISE), batched over maps and steps.

    Records per map: ``score`` (its class's score on the image), ``deletion`` and
    ``insertion`` (the curves), ``fraction`` (``c_j / n``), ``deletion_auc``,
    ``insertion_auc``. Summary: the mean ``deletion_auc`` (lower is better),
    ``insertion_auc`` (higher is better) and their difference ``insertion_minus_deletion``.

    Args:
        step: pixels removed / inserted per step; ``None``: the image width (RISE's 224).
        deletion_substrate: what deleted pixels become (default ``"zeros"``).
        insertion_substrate: what the image starts from (default ``"blur"``).
        score: ``"probability"`` (softmax) or ``"logit"``.
        auc_x: ``"fraction"`` (x = share of pixels perturbed, torchcam) or ``"step"``
            (x = j / number of steps, RISE).
        blur_kernel: the ``"blur"`` substrate's kernel size.
        blur_sigma: the ``"blur"`` substrate's standard deviation.
        max_batch: perturbed images per forward (the memory budget).
    """

    format = "cam_plugin.DeletionInsertion/1"

    def __init__(
        self,
        step: Optional[int] = None,
        *,
        deletion_substrate: SubstrateLike = "zeros",
        insertion_substrate: SubstrateLike = "blur",
        score: Score = "probability",
        auc_x: Literal["fraction", "step"] = "fraction",
        blur_kernel: int = 11,
        blur_sigma: float = 5.0,
        max_batch: int = 32,
    ) -> None:
        self.step = None if step is None else check_positive_int(step, "step")
        self.deletion_substrate = deletion_substrate
        self.insertion_substrate = insertion_substrate
        self.score = check_choice(score, "score", _SCORES)
        self.auc_x = check_choice(auc_x, "auc_x", ("fraction", "step"))
        self.blur_kernel = check_positive_int(blur_kernel, "blur_kernel")
        self.blur_sigma = float(blur_sigma)
        self.max_batch = check_positive_int(max_batch, "max_batch")
        super().__init__()

    def config(self) -> dict[str, Any]:
        """The settings that records depend on."""
        return {
            "step": self.step,
            "deletion_substrate": _describe(self.deletion_substrate),
            "insertion_substrate": _describe(self.insertion_substrate),
            "score": self.score,
            "auc_x": self.auc_x,
            "blur": (self.blur_kernel, self.blur_sigma),
        }

    def counts(self, height: int, width: int) -> Tensor:
        """The pixels perturbed at each point: ``min(j s, n)`` for ``j = 0 .. ceil(n / s)``."""
        n = height * width
        s = self.step or width
        return torch.tensor([*range(0, n, s), n], dtype=torch.int64)

    def update(
        self,
        model: nn.Module,
        images: Tensor,
        maps: MapsLike,
        classes: ClassesLike = None,
        sample_ids: Optional[Sequence[Hashable]] = None,
    ) -> None:
        """Score the curves of every map of a batch (see the module notes).

        Args:
            model: the classifier (left exactly as it was).
            images: ``(B, C, H, W)`` as the model takes them.
            maps: ``(B, k, h, w)`` / ``(B, h, w)`` or a :class:`~cam_plugin.CAMResult`.
            classes: the class of each map (default: the result's, or the top-1 class).
            sample_ids: ``B`` ids (dataset indices); a (sample id, class) seen before is
                skipped.
        """
        images = checked_images(images, model)
        with untouched(model):
            logits = model_logits(model, images)
            batch = map_batch(images, maps, classes, self.sample_keys(sample_ids), logits=logits)
            h, w = images.shape[-2:]
            counts = self.counts(h, w)
            p = len(counts)
            columns = {
                "score": ((), np.float64),
                "deletion": ((p,), np.float64),
                "insertion": ((p,), np.float64),
                "fraction": ((p,), np.float64),
                "deletion_auc": ((), np.float64),
                "insertion_auc": ((), np.float64),
            }
            self._record(
                batch.keys, columns, lambda rows: self._curves(model, logits, batch, counts, rows)
            )

    def _curves(
        self, model: nn.Module, logits: Tensor, batch: MapBatch, counts: Tensor, rows: list[int]
    ) -> dict[str, np.ndarray]:
        """Both curves of the maps ``rows``: ``2 (P - 1)`` perturbed images per map, scored
        in chunks; ``job = (map, curve, point)`` is decoded from one flat index."""
        idx = torch.tensor(rows, dtype=torch.int64, device=batch.maps.device)
        img, cls = batch.image[idx], batch.classes[idx]
        images = batch.images
        ranks = _ranks(batch.maps[idx])
        dev_counts = counts.to(images.device)
        p = len(counts)
        sub_del = substrate(images, self.deletion_substrate, self.blur_kernel, self.blur_sigma)
        sub_ins = substrate(images, self.insertion_substrate, self.blur_kernel, self.blur_sigma)
        per_map = 2 * (p - 1)
        n_jobs = len(rows) * per_map

        def build(start: int, stop: int) -> Tensor:
            job = torch.arange(start, stop, device=images.device)
            m, rest = job // per_map, job % per_map
            insertion = rest >= p - 1
            point = torch.where(insertion, rest - (p - 1), rest + 1)
            top = (ranks[m] < dev_counts[point].view(-1, 1)).view(-1, 1, *images.shape[-2:])
            src, base = images[img[m]], sub_del[img[m]]
            deleted = torch.where(top, base, src)
            inserted = torch.where(top, src, sub_ins[img[m]])
            return torch.where(insertion.view(-1, 1, 1, 1), inserted, deleted)

        job_cls = cls.repeat_interleave(per_map)
        scores = scores_in_chunks(model, n_jobs, build, job_cls, self.score, self.max_batch)
        scores = scores.view(len(rows), 2, p - 1).double()
        original = class_scores(logits[img], cls, self.score).double()
        deletion = torch.cat([original.view(-1, 1), scores[:, 0]], dim=1)
        insertion = torch.cat([scores[:, 1], original.view(-1, 1)], dim=1)
        n = int(counts[-1])
        fraction = counts.double() / n
        x = fraction if self.auc_x == "fraction" else torch.linspace(0, 1, p, dtype=torch.float64)
        x = x.to(deletion.device)
        return {
            "score": original.cpu().numpy(),
            "deletion": deletion.cpu().numpy(),
            "insertion": insertion.cpu().numpy(),
            "fraction": fraction.expand(len(rows), p).numpy().copy(),
            "deletion_auc": torch.trapezoid(deletion, x, dim=1).cpu().numpy(),
            "insertion_auc": torch.trapezoid(insertion, x, dim=1).cpu().numpy(),
        }

    def summarize(self, columns: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Mean AUCs over the records."""
        deletion = float(columns["deletion_auc"].mean())
        insertion = float(columns["insertion_auc"].mean())
        return {
            "deletion_auc": deletion,
            "insertion_auc": insertion,
            "insertion_minus_deletion": insertion - deletion,
        }

    def curves(self) -> dict[str, np.ndarray]:
        """The mean curves: ``fraction``, ``deletion``, ``insertion`` (each ``(P,)``)."""
        rec = self.records()
        if not rec["keys"]:
            raise CAMInputError("no records yet: call update(...) first.")
        return {
            "fraction": rec["fraction"][0],
            "deletion": rec["deletion"].mean(axis=0),
            "insertion": rec["insertion"].mean(axis=0),
        }


class ConfidenceChange(FaithfulnessMetric):
    """Average Drop / Increase in Confidence (Grad-CAM++) and grad-cam's confidence change.

    Records per map: ``score`` (``Y``), ``masked_score`` (``O``, on ``E * x``); derived:
    ``drop``, ``increase``, ``change``, ``drop_abs`` (see the module notes). Summary:
    ``average_drop`` (mean ``drop``, a fraction; the paper reports percent),
    ``increase_in_confidence`` (share of maps with ``Y < O``), ``drop_in_confidence`` (mean
    ``drop_abs``, grad-cam's ``DropInConfidence``) and ``confidence_change`` (mean ``O - Y``).

    Args:
        score: ``"probability"`` (softmax; the papers and torchcam) or ``"logit"``.
        normalize: min-max normalize each map (after resizing) before multiplying; ``False``
            multiplies the maps as given (e.g. torchcam's or grad-cam's own maps).
        eps: added to ``Y`` in Average Drop's denominator: 0 (the paper) or 1e-7 (torchcam).
        max_batch: masked images per forward.
    """

    format = "cam_plugin.ConfidenceChange/1"

    def __init__(
        self,
        score: Score = "probability",
        *,
        normalize: bool = True,
        eps: float = 0.0,
        max_batch: int = 32,
    ) -> None:
        self.score = check_choice(score, "score", _SCORES)
        self.normalize = bool(normalize)
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise CAMInputError(f"eps must be a finite float >= 0, got {eps!r}.")
        self.eps = float(eps)
        self.max_batch = check_positive_int(max_batch, "max_batch")
        super().__init__()

    def config(self) -> dict[str, Any]:
        """The settings that records depend on (``eps`` only enters the summary)."""
        return {"score": self.score, "normalize": self.normalize}

    def update(
        self,
        model: nn.Module,
        images: Tensor,
        maps: MapsLike,
        classes: ClassesLike = None,
        sample_ids: Optional[Sequence[Hashable]] = None,
    ) -> None:
        """Score every map's ``E * x`` (arguments as :meth:`DeletionInsertion.update`)."""
        images = checked_images(images, model)
        with untouched(model):
            logits = model_logits(model, images)
            batch = map_batch(
                images,
                maps,
                classes,
                self.sample_keys(sample_ids),
                logits=logits,
                normalize=self.normalize,
            )
            columns = {"score": ((), np.float64), "masked_score": ((), np.float64)}

            def compute(rows: list[int]) -> dict[str, np.ndarray]:
                idx = torch.tensor(rows, dtype=torch.int64, device=batch.maps.device)
                img, cls = batch.image[idx], batch.classes[idx]
                maps_e = batch.maps[idx].to(batch.images.dtype)

                def build(start: int, stop: int) -> Tensor:
                    return batch.images[img[start:stop]] * maps_e[start:stop].unsqueeze(1)

                masked = scores_in_chunks(model, len(rows), build, cls, self.score, self.max_batch)
                original = class_scores(logits[img], cls, self.score)
                return {
                    "score": original.double().cpu().numpy(),
                    "masked_score": masked.double().cpu().numpy(),
                }

            self._record(batch.keys, columns, compute)

    def derived(self, columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``drop``, ``increase``, ``change`` and ``drop_abs`` per record."""
        y, o = columns["score"], columns["masked_score"]
        return {
            "drop": np.maximum(y - o, 0) / (y + self.eps),
            "increase": y < o,
            "change": o - y,
            "drop_abs": np.maximum(y - o, 0),
        }

    def summarize(self, columns: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Means of the derived columns."""
        d = self.derived(columns)
        return {
            "average_drop": float(d["drop"].mean()),
            "increase_in_confidence": float(d["increase"].mean()),
            "drop_in_confidence": float(d["drop_abs"].mean()),
            "confidence_change": float(d["change"].mean()),
        }


def _describe(kind: SubstrateLike) -> str:
    """A substrate as a config value (strings as they are; tensors / callables by type)."""
    return kind if isinstance(kind, str) else f"<{type(kind).__name__}>"


def deletion_insertion(
    model: nn.Module,
    images: Tensor,
    maps: MapsLike,
    classes: ClassesLike = None,
    **options: Any,
) -> EvalResult:
    """One-shot :class:`DeletionInsertion` (``options`` are its settings)."""
    return one_shot(DeletionInsertion, model, images, maps, classes, **options)


def confidence_change(
    model: nn.Module,
    images: Tensor,
    maps: MapsLike,
    classes: ClassesLike = None,
    **options: Any,
) -> EvalResult:
    """One-shot :class:`ConfidenceChange` (``options`` are its settings)."""
    return one_shot(ConfidenceChange, model, images, maps, classes, **options)
