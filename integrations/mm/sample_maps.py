"""One predict forward's capture -> the ``cam_maps`` of its data samples.

The visualization hook captures the feature map during the loop's own forward; when the
model returns its predicted data samples, :func:`attach_cam_maps` runs the core step
(:meth:`cam_plugin.Adapter.maps_from_capture`: features, logits ``S = W' mean_xy f + b'``,
maps ``M_c = Σ_k W'_ck f_k``) for the classes :func:`select_classes` picks, after checking
that the fold reproduces the model's own scores (:func:`scores_match`), and writes the
result into every sample (the contract is in :mod:`.samples`). When the hook knows where the
feature cells sit on the batch tensor (the traced placement,
:func:`cam_plugin.tracing.placement_of`), it is added to the ``cam_maps`` metainfo as
``placement``, and :func:`placed_maps` upsamples with it (every cell centred on its
receptive field) before the maps are brought to an image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from mmengine.structures import BaseDataElement
from torch import Tensor

from cam_plugin.adapter import Adapter
from cam_plugin.heads import REPRODUCE_RTOL, FoldedHead, logits_error
from cam_plugin.placement import Placement, place_maps

from .common import autocast_active, no_autocast
from .samples import CAM_MAPS, get_field, gt_classes, set_cam_maps

__all__ = [
    "LOW_PRECISION_RTOL",
    "Selection",
    "attach_cam_maps",
    "placed_maps",
    "scores_match",
    "select_classes",
    "stack_scores",
]

#: tolerance of :func:`scores_match` when the forward ran in fp16 / bf16
LOW_PRECISION_RTOL = 3e-2


def stack_scores(
    samples: Sequence[BaseDataElement], num_classes: int, device: torch.device
) -> Optional[Tensor]:
    """The samples' ``pred_score`` as one float32 ``(B, C)`` tensor, ``None`` when any
    sample has none of ``num_classes`` entries."""
    rows = []
    for s in samples:
        score = s.get("pred_score", None)
        if not isinstance(score, Tensor) or score.numel() != num_classes:
            return None
        rows.append(score.reshape(-1))
    return torch.stack(rows).to(device=device, dtype=torch.float32)


def scores_match(logits: Tensor, scores: Tensor, low_precision: bool) -> bool:
    """Whether the model's scores are the softmax (single-label) or sigmoid (multi-label)
    of the folded head's ``logits``.

    Compared on the logit scale, ``log p = S − logsumexp(S)`` or ``log(p / (1 − p)) = S``,
    where ``1e-6 < p < 1 − 1e-6``, with :func:`cam_plugin.heads.logits_error`; the error
    must stay within ``rtol · max(1, |S|)`` (``rtol`` = the core's 1e-3, or
    :data:`LOW_PRECISION_RTOL` for an fp16 / bf16 forward).
    """
    usable = (scores > 1e-6) & (scores < 1 - 1e-6)
    if not bool(usable.any()):
        return True
    rtol = LOW_PRECISION_RTOL if low_precision else REPRODUCE_RTOL
    scale = max(1.0, float(logits.abs().max()))
    log_p = scores.clamp_min(1e-12).log()
    logit_p = log_p - (1 - scores).clamp_min(1e-12).log()
    err_soft, _ = logits_error(logits.log_softmax(dim=1)[usable], log_p[usable])
    err_sig, _ = logits_error(logits[usable], logit_p[usable])
    return min(err_soft, err_sig) <= rtol * scale


@dataclass
class Selection:
    """The classes to map per sample.

    Attributes:
        classes: ``(B, n)`` long, ``-1`` padded: the targets first, then the ground-truth
            classes not among them.
        counts: how many leading classes of each row are targets.
        missing_gt: ``target='gt'`` but some sample had no ground-truth class (its
            predicted classes were taken instead).
    """

    classes: Tensor
    counts: list[int]
    missing_gt: bool


def select_classes(
    samples: Sequence[BaseDataElement], ranking: Tensor, topk: int, target: str
) -> Selection:
    """Targets per sample: the ``topk`` best classes of ``ranking`` (``target='pred'``) or
    at most ``topk`` ground-truth classes (``target='gt'``; the top classes for a sample
    without one), followed by the sample's ground-truth classes not already chosen."""
    num_classes = ranking.shape[1]
    k = min(topk, num_classes)
    top = ranking.topk(k, dim=1).indices.tolist()
    rows: list[list[int]] = []
    counts: list[int] = []
    missing_gt = False
    for i, sample in enumerate(samples):
        gt = [c for c in gt_classes(sample) if 0 <= c < num_classes]
        if target == "gt" and gt:
            targets = gt[:k]
        else:
            missing_gt = missing_gt or target == "gt"
            targets = top[i]
        rows.append(list(dict.fromkeys(targets + gt)))
        counts.append(len(targets))
    width = max(len(r) for r in rows)
    classes = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        classes[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return Selection(classes.to(ranking.device), counts, missing_gt)


def attach_cam_maps(
    samples: Sequence[BaseDataElement],
    captured: Tensor,
    adapter: Adapter,
    head: FoldedHead,
    input_hw: tuple[int, int],
    *,
    topk: int,
    target: str,
    placement: Optional[Placement] = None,
) -> tuple[Optional[str], bool]:
    """Compute the maps of one predicted batch and write them into its samples (with
    ``placement``, where the feature cells sit on the batch tensor, in each ``cam_maps``'s
    metainfo).

    Runs :meth:`Adapter.maps_from_capture` (fp32, autocast off, no autograd) with the
    classes of :func:`select_classes` (ranked by the model's ``pred_score`` when every
    sample has one, else by the folded logits), and writes ``cam_maps`` into each sample.

    ``captured`` must hold one map per sample (batch first).

    Returns:
        ``(problem, missing_gt)``: ``problem`` is ``None`` when the maps were written, else
        why nothing was written (the fold does not reproduce the model's ``pred_score``: the
        adapter does not fit this model); ``missing_gt`` as in :class:`Selection`.
    """
    num_classes = int(head.weight.shape[0])
    found: list[tuple[Selection, Optional[Tensor]]] = []

    def select(logits: Tensor) -> Tensor:
        model_scores = stack_scores(samples, num_classes, logits.device)
        ranking = model_scores if model_scores is not None else logits
        found.append((select_classes(samples, ranking, topk, target), model_scores))
        return found[0][0].classes.clamp_min(0)

    with torch.no_grad(), no_autocast(captured.device):
        out = adapter.maps_from_capture(captured, input_hw=input_hw, select=select, head=head)
    chosen, model_scores = found[0]
    low_precision = captured.dtype in (torch.float16, torch.bfloat16) or autocast_active(
        captured.device
    )
    if model_scores is not None and not scores_match(out.logits, model_scores, low_precision):
        return (
            f"the folded head of '{adapter.name}' does not reproduce the model's "
            "pred_score (the adapter does not fit this model)"
        ), False
    assert out.classes is not None
    scores = out.logits.gather(1, out.classes)
    for i, sample in enumerate(samples):
        n = int((chosen.classes[i] >= 0).sum())
        set_cam_maps(
            sample,
            maps=out.maps[i, :n].contiguous(),
            classes=chosen.classes[i, :n].clone(),
            scores=scores[i, :n].clone(),
            input_shape=input_hw,
            num_targets=chosen.counts[i],
            target=target,
        )
        if placement is not None:
            sample.get(CAM_MAPS).set_metainfo(dict(placement=placement))
    return None, chosen.missing_gt


def placed_maps(cam: Any, maps: Tensor) -> Tensor:
    """``maps`` ``(n, h, w)`` of a sample's ``cam_maps`` upsampled to its ``input_shape`` with
    every cell centred on its receptive field (:func:`cam_plugin.placement.place_maps` with
    the ``placement`` of its metainfo), float32; unchanged when it has none (the geometry
    then upsamples bilinearly)."""
    placement = get_field(cam, "placement")
    shape = get_field(cam, "input_shape")
    if not isinstance(placement, Placement) or shape is None:
        return maps
    return place_maps(maps.float(), (int(shape[0]), int(shape[1])), placement)
