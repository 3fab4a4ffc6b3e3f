"""Class-specific units (Zhou et al., CVPR 2016, Sec. 5): which feature channels make a class.

The folded head writes every map as a weighted sum of *unit maps* ``u_k``:

    M_c(x, y) = Σ_k W'_ck u_k(x, y)

where ``u_k = f_k`` for a plain GAP + affine head, and ``u_k = (q_k − μ) / σ`` with
``q = P f + π`` when the head has a LayerNorm after the pool (:mod:`cam_plugin.heads`:
``μ``, ``σ`` are the per-image mean and std of the pooled ``q``). The *contribution* of unit
``k`` to the logit of class ``c`` is ``W'_ck · mean_xy u_k``; the contributions of all units
plus the bias give the logit exactly, so ranking them answers "which units make this image
a c". Ranking by ``W'_ck`` alone gives the class's units independent of the image, as in
the paper's figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .errors import CAMInputError
from .heads import FoldedHead

__all__ = ["UnitRanking", "UnitResult", "class_units", "rank_units", "unit_maps"]

UnitRanking = Literal["contribution", "weight"]


@dataclass(frozen=True)
class UnitResult:
    """The top units of every map.

    Attributes:
        classes: ``(B, k)`` class of every map (``-1`` = padding).
        units: ``(B, k, n)`` unit (channel) indices, best first.
        weights: ``(B, k, n)`` their class weights ``W'_ck``.
        contributions: ``(B, k, n)`` ``W'_ck · mean_xy u_k``, their share of the logit.
        maps: ``(B, k, n, h, w)`` the unit maps ``u_k`` (not weighted).
        total: ``(B, k)`` the sum of the contributions of *all* units (``S_c − b'_c``).
    """

    classes: Tensor
    units: Tensor
    weights: Tensor
    contributions: Tensor
    maps: Tensor
    total: Tensor


def unit_maps(head: FoldedHead, features: Tensor) -> Tensor:
    """``(B, K', h, w)`` unit maps ``u_k``: the features after the head's per-location affine
    part and, for a LayerNorm head, its per-image normalization, so that
    ``M_c = Σ_k W'_ck u_k`` exactly."""
    q = head.project(features)
    if head.norm_eps is None:
        return q
    mu, sigma = head.norm_stats(q)
    return (q - mu[:, :, None, None]) / sigma[:, :, None, None]


def rank_units(
    head: FoldedHead,
    features: Tensor,
    classes: Tensor,
    *,
    top: int = 5,
    by: UnitRanking = "contribution",
) -> UnitResult:
    """The ``top`` units of every map of ``classes`` (``(B, k)``), ranked ``by`` their
    contribution ``W'_ck · mean_xy u_k`` (per image) or their weight ``W'_ck`` (per class).

    Raises:
        CAMInputError: ``top`` not a positive int, ``by`` unknown, ``classes`` not ``(B, k)``.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise CAMInputError(f"top must be a positive int, got {top!r}")
    if by not in ("contribution", "weight"):
        raise CAMInputError(f"by must be 'contribution' or 'weight', got {by!r}")
    if classes.dim() != 2 or classes.shape[0] != features.shape[0]:
        raise CAMInputError(f"classes must be (B, k) for B = {features.shape[0]} images")
    u = unit_maps(head, features)  # (B, K, h, w)
    n = min(top, u.shape[1])
    w = head.weight.to(u.dtype)[classes.clamp_min(0)]  # (B, k, K)
    contrib = w * u.flatten(2).mean(dim=2)[:, None, :]  # (B, k, K)
    score = contrib if by == "contribution" else w
    idx = score.topk(n, dim=2).indices  # (B, k, n)
    b, k = classes.shape
    maps = u[torch.arange(b, device=u.device)[:, None, None], idx]  # (B, k, n, h, w)
    valid = (classes >= 0)[:, :, None]
    return UnitResult(
        classes=classes,
        units=torch.where(valid, idx, torch.full_like(idx, -1)),
        weights=w.gather(2, idx) * valid,
        contributions=contrib.gather(2, idx) * valid,
        maps=maps * valid[..., None, None],
        total=contrib.sum(dim=2) * valid[..., 0],
    )


def class_units(head: FoldedHead, classes: Sequence[int] | Tensor, *, top: int = 5) -> Tensor:
    """``(n, top)`` the ``top`` units of each of the ``n`` ``classes``, ranked by their class
    weight ``W'_ck`` (largest first; the paper's per-class ranking, independent of any
    image). Ties go to the lower unit index.

    Raises:
        CAMInputError: ``top`` not a positive int, a class out of ``0..C-1``.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise CAMInputError(f"top must be a positive int, got {top!r}")
    cls = torch.as_tensor(classes, dtype=torch.long).reshape(-1).cpu()
    c = head.num_classes
    if cls.numel() and (int(cls.min()) < 0 or int(cls.max()) >= c):
        raise CAMInputError(f"classes must be in 0..{c - 1}, got {cls.tolist()}")
    w = head.weight.detach().float().cpu()[cls]  # (n, K)
    n = min(top, w.shape[1])
    # stable sort on the descending weight: equal weights keep the lower unit first
    return torch.sort(-w, dim=1, stable=True).indices[:, :n]
