"""The CAM probe: a multi-label GAP + linear classifier on a captured feature map, and the
multi-label mAP it is scored with.

For the valid (unpadded) cells ``Ω`` of the captured map ``f`` of one image::

    p_k = (1/|Ω|) Σ_{(x,y)∈Ω} f_k(x, y)            (masked global average pool)
    S_c = Σ_k w_ck p_k + b_c                        (multi-label logits, sigmoid / BCE)
    M_c(x, y) = Σ_k w_ck f_k(x, y)                  (the CAM)
    =>  S_c = mean_Ω M_c + b_c                       (the exactness identity)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from cam_plugin.errors import CAMInputError

__all__ = ["CAMProbe", "multi_hot", "multilabel_average_precision"]


class CAMProbe(nn.Module):
    """A multi-label GAP + linear classifier on a captured feature map.

    ``forward(f, mask)`` returns ``S = W · mean_Ω f + b`` (``Ω``: the cells where ``mask``
    is true, every cell when ``mask`` is ``None``); :meth:`maps` returns
    ``M_c = Σ_k W_ck f_k``, so ``mean_Ω M_c + b_c = S_c``. The weights start at zero (no
    random numbers are drawn: creating a probe never moves any RNG).

    Args:
        num_features: channels ``K`` of the feature map.
        num_classes: classes ``C``.
    """

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        for value, what in ((num_features, "num_features"), (num_classes, "num_classes")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CAMInputError(f"CAMProbe: {what} must be an int >= 1, got {value!r}")
        self.fc = nn.Linear(num_features, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.num_features = num_features
        self.num_classes = num_classes

    @staticmethod
    def pool(features: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Masked global average pool: ``(B, K, h, w)`` -> ``(B, K)``, fp32.

        Args:
            features: the feature map.
            mask: bool ``(B, h, w)`` of the valid cells, or ``None`` for all of them.
        """
        f = features.float()
        if mask is None:
            return f.mean(dim=(2, 3))
        m = mask.to(dtype=f.dtype, device=f.device)[:, None]
        return (f * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp_min(1.0)

    def forward(self, features: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Logits ``(B, C)`` of a feature map ``(B, K, h, w)`` (``mask`` as in :meth:`pool`)."""
        return self.fc(self.pool(features, mask))

    def maps(self, features: Tensor, classes: Optional[Tensor] = None) -> Tensor:
        """CAMs ``M_c = Σ_k W_ck f_k`` (no bias).

        Args:
            features: ``(B, K, h, w)``.
            classes: ``(B, n)`` class indices, or ``None`` for every class.

        Returns:
            ``(B, n, h, w)`` (``n = C`` without ``classes``), fp32.
        """
        f = features.float()
        weight = self.fc.weight.to(f.dtype)
        if classes is None:
            return torch.einsum("bkhw,ck->bchw", f, weight)
        return torch.einsum("bkhw,bnk->bnhw", f, weight[classes.long()])


def multilabel_average_precision(scores: Tensor, targets: Tensor) -> tuple[float, Tensor]:
    """Mean average precision of multi-label scores (non-interpolated, per class).

    For class ``c``, rank the images by score (descending): ``AP_c = (1/P_c) Σ_i
    precision@i · rel_i`` with ``P_c`` positives; ``mAP`` is the mean over classes with at
    least one positive. Vectorised over classes.

    Args:
        scores: ``(N, C)`` scores (logits or probabilities: only the order matters).
        targets: ``(N, C)`` 0/1 labels.

    Returns:
        ``(mAP, AP)`` with ``AP`` ``(C,)`` (``nan`` for classes without positives); ``mAP``
        is ``nan`` when no class has a positive.
    """
    if scores.shape != targets.shape or scores.dim() != 2:
        raise CAMInputError(
            f"scores and targets must both be (N, C); got {tuple(scores.shape)} and "
            f"{tuple(targets.shape)}"
        )
    s = scores.double()
    t = (targets > 0).double()
    order = torch.argsort(s, dim=0, descending=True, stable=True)
    rel = torch.gather(t, 0, order)
    ranks = torch.arange(1, s.shape[0] + 1, dtype=torch.float64)[:, None]
    precision = rel.cumsum(dim=0) / ranks
    positives = t.sum(dim=0)
    ap = (precision * rel).sum(dim=0) / positives.clamp_min(1.0)
    ap = torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))
    valid = positives > 0
    mean = float(ap[valid].mean()) if bool(valid.any()) else float("nan")
    return mean, ap.float()


def multi_hot(labels: Sequence[Optional[Tensor]], num_classes: int) -> tuple[Tensor, Tensor, bool]:
    """Image-level targets from per-image instance labels.

    Returns:
        ``(targets, has, dropped)``: multi-hot float ``(B, C)`` (1 for every class with an
        instance in the image), bool ``(B,)`` — which images have labels at all (``None``:
        none), and whether labels outside ``[0, C)`` were ignored.
    """
    has = torch.zeros(len(labels), dtype=torch.bool)
    rows, cols = [], []
    dropped = False
    for i, lab in enumerate(labels):
        if lab is None:
            continue
        has[i] = True
        flat = lab.reshape(-1).long().cpu()
        bad = (flat < 0) | (flat >= num_classes)
        if bool(bad.any()):
            dropped = True
            flat = flat[~bad]
        rows.append(torch.full_like(flat, i))
        cols.append(flat)
    targets = torch.zeros(len(labels), num_classes)
    if rows:
        targets[torch.cat(rows), torch.cat(cols)] = 1.0
    return targets, has, dropped
