"""ROAD's linear imputation as one batched solve: multigrid-preconditioned conjugate gradients.

The system (ROAD's ``NoisyLinearImputer``, without its noise): every removed pixel ``i`` is the
weighted mean of its 8 neighbours inside the image (weight 1/6 axial, 1/12 diagonal), removed
neighbours being unknowns too,

    s_i x_i - sum_{j removed} w_ij x_j = sum_{j kept} w_ij img_j,    s_i = sum_{j in image} w_ij.

ROAD (and grad-cam) solve it with one sparse direct solve per image and channel. Here it is
solved for a whole batch of images, masks and channels at once on the images' device, on the
full pixel grid with the operator

    A z = U (s (U z) - N(U z)) + K z

(``U`` / ``K``: removed / kept pixels, ``N``: the weighted neighbour sum), which is the system
on removed pixels and the identity on kept ones: symmetric, and positive definite wherever a
removed region touches a kept pixel. Conjugate gradients are preconditioned by one symmetric
multigrid V-cycle: bilinear prolongation ``P`` and its transpose ``R = P^T`` between grids
halved in each dimension (down to about 6 pixels), Galerkin coarse operators ``R A P``
(9-point stencils, read off by applying ``R A P`` to 9 interleaved patterns), two
l1-Jacobi sweeps before and after each coarse correction (``D = sum_j |a_ij|``: convergent
without a damping factor to tune) and 20 on the coarsest grid. The V-cycle is a fixed
symmetric positive definite operator, so the iteration is plain PCG; it reaches a relative
residual of 1e-8 in 10-20 iterations at 224 x 224 whatever the masks, against hundreds for
Jacobi-preconditioned CG.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["StencilOperator", "linear_impute", "neighbour_sum", "prolong", "restrict"]

#: the 3 x 3 stencil offsets ``(dy, dx)``, row-major; index 4 is the centre
OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
_SMOOTHING = 2
_COARSEST_SWEEPS = 20
_COARSEST_SIZE = 6


def neighbour_sum(z: Tensor) -> Tensor:
    """``sum_j w_j z_j`` over the 8 neighbours inside the image (1/6 axial, 1/12 diagonal)."""
    p = F.pad(z, (1, 1, 1, 1))
    axial = p[..., 1:-1, :-2] + p[..., 1:-1, 2:] + p[..., :-2, 1:-1] + p[..., 2:, 1:-1]
    diagonal = p[..., :-2, :-2] + p[..., :-2, 2:] + p[..., 2:, :-2] + p[..., 2:, 2:]
    return axial / 6 + diagonal / 12


def _prolong_1d(c: Tensor, n_fine: int, dim: int) -> Tensor:
    """Linear interpolation along ``dim``: fine ``2i`` = coarse ``i``, fine ``2i + 1`` the
    mean of coarse ``i`` and ``i + 1`` (coarse ``i`` alone past the last one)."""
    c = c.movedim(dim, -1)
    odd = (c[..., :-1] + c[..., 1:]) / 2
    if n_fine % 2 == 0:
        odd = torch.cat([odd, c[..., -1:]], dim=-1)
        fine = torch.stack([c, odd], dim=-1).flatten(-2)
    else:
        fine = torch.cat([torch.stack([c[..., :-1], odd], dim=-1).flatten(-2), c[..., -1:]], -1)
    return fine.movedim(-1, dim)


def _restrict_1d(f: Tensor, dim: int) -> Tensor:
    """The transpose of :func:`_prolong_1d` along ``dim`` (full weighting, unscaled)."""
    f = f.movedim(dim, -1)
    n_coarse = (f.shape[-1] + 1) // 2
    c = f[..., 0::2].clone()
    odd = f[..., 1::2]
    m = min(odd.shape[-1], n_coarse - 1)
    c[..., :m] += 0.5 * odd[..., :m]
    c[..., 1 : m + 1] += 0.5 * odd[..., :m]
    if odd.shape[-1] > m:
        c[..., -1] += odd[..., -1]
    return c.movedim(-1, dim)


def prolong(coarse: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear prolongation of ``(..., ceil(H/2), ceil(W/2))`` to ``(..., H, W)``."""
    return _prolong_1d(_prolong_1d(coarse, size[0], -2), size[1], -1)


def restrict(fine: Tensor) -> Tensor:
    """``P^T``: ``(..., H, W)`` to ``(..., ceil(H/2), ceil(W/2))``."""
    return _restrict_1d(_restrict_1d(fine, -2), -1)


class StencilOperator:
    """A 9-point operator with its own coefficients at every point:
    ``(A z)[i] = sum_o coef[o][i] z[i + o]`` over :data:`OFFSETS` (zero outside the grid).

    Args:
        coef: ``(9, S, 1, h, w)`` coefficients, one field per offset.
    """

    def __init__(self, coef: Tensor) -> None:
        self.coef = coef

    def __call__(self, z: Tensor) -> Tensor:
        h, w = z.shape[-2:]
        p = F.pad(z, (1, 1, 1, 1))
        out = self.coef[0] * p[..., 0:h, 0:w]
        for k, (dy, dx) in enumerate(OFFSETS[1:], start=1):
            out = out.add_(self.coef[k] * p[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w])
        return out

    def l1_diagonal(self) -> Tensor:
        """``sum_o |coef[o]|``, the l1-Jacobi smoother's diagonal."""
        return self.coef.abs().sum(dim=0)


def _galerkin(
    apply: Callable[[Tensor], Tensor], size: tuple[int, int], systems: int, like: Tensor
) -> StencilOperator:
    """``R A P`` on the grid below ``size``, read off by probing: with the coarse points
    coloured by ``(y mod 3, x mod 3)``, ``R A P`` of the indicator of one colour holds at
    each point its stencil entry towards the one neighbour of that colour."""
    hc, wc = (size[0] + 1) // 2, (size[1] + 1) // 2
    yy = torch.arange(hc, device=like.device).view(hc, 1).expand(hc, wc)
    xx = torch.arange(wc, device=like.device).view(1, wc).expand(hc, wc)
    colour = (yy % 3) * 3 + xx % 3
    probes = []
    for c in range(9):
        pattern = (colour == c).to(like.dtype).view(1, 1, hc, wc)
        probes.append(restrict(apply(prolong(pattern, size).expand(systems, 1, *size))))
    stacked = torch.stack(probes)  # (9, S, 1, hc, wc)
    coef = []
    for dy, dx in OFFSETS:
        inside = (yy + dy >= 0) & (yy + dy < hc) & (xx + dx >= 0) & (xx + dx < wc)
        towards = ((yy + dy) % 3) * 3 + (xx + dx) % 3
        index = towards.view(1, 1, 1, hc, wc).expand(1, systems, 1, hc, wc)
        coef.append(stacked.gather(0, index)[0] * inside.to(like.dtype))
    return StencilOperator(torch.stack(coef))


@dataclass
class _Level:
    apply: Callable[[Tensor], Tensor]
    diagonal: Tensor
    size: tuple[int, int]


def _levels(keep: Tensor, dtype: torch.dtype) -> tuple[list[_Level], Tensor, Tensor]:
    """The grid hierarchy for the masks ``keep`` ``(S, H, W)``, and ``U``, ``K``."""
    s_count, h, w = keep.shape
    k = keep.unsqueeze(1).to(dtype)
    u = 1 - k
    weights = neighbour_sum(torch.ones((1, 1, h, w), dtype=dtype, device=keep.device))

    def fine(z: Tensor) -> Tensor:
        uz = u * z
        return u * (weights * uz - neighbour_sum(uz)) + k * z

    levels = [_Level(fine, u * (weights + neighbour_sum(u)) + k, (h, w))]
    apply: Callable[[Tensor], Tensor] = fine
    size = (h, w)
    while min(size) > _COARSEST_SIZE:
        op = _galerkin(apply, size, s_count, k)
        size = ((size[0] + 1) // 2, (size[1] + 1) // 2)
        levels.append(_Level(op, op.l1_diagonal(), size))
        apply = op
    return levels, u, k


def _v_cycle(levels: list[_Level], r: Tensor, at: int = 0) -> Tensor:
    """One symmetric V-cycle from zero for ``A z = r`` on level ``at``."""
    level = levels[at]
    inv = 1 / level.diagonal
    z = inv * r
    if at == len(levels) - 1:
        for _ in range(_COARSEST_SWEEPS - 1):
            z = z + inv * (r - level.apply(z))
        return z
    for _ in range(_SMOOTHING - 1):
        z = z + inv * (r - level.apply(z))
    coarse = _v_cycle(levels, restrict(r - level.apply(z)), at + 1)
    z = z + prolong(coarse, level.size)
    for _ in range(_SMOOTHING):
        z = z + inv * (r - level.apply(z))
    return z


def _sum_hw(t: Tensor) -> Tensor:
    return t.sum(dim=(-2, -1), keepdim=True)


def linear_impute(
    images: Tensor,
    keep: Tensor,
    *,
    tol: float = 1e-8,
    max_iter: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """ROAD's linear imputation (without noise) of the removed pixels, batched.

    Solves the system of the module notes for every image and channel at once by
    multigrid-preconditioned conjugate gradients until ``||r|| <= tol ||b||`` for every
    system, or ``max_iter`` iterations (default 100; a warning says when a system stopped
    short). A removed region that touches no kept pixel has no data and stays 0.

    Args:
        images: ``(S, C, H, W)``.
        keep: ``(S, H, W)`` bool, True where the pixel stays.
        tol: relative residual to reach.
        max_iter: iteration cap.
        dtype: the solver's dtype (float32 by default; float64 is slower and more exact).

    Returns:
        ``(S, C, H, W)`` in the images' dtype: kept pixels unchanged, removed ones imputed.
    """
    limit = 100 if max_iter is None else int(max_iter)
    levels, u, k = _levels(keep, dtype)
    b = neighbour_sum(images.to(dtype) * k) * u
    tiny = torch.finfo(dtype).tiny
    z = torch.zeros_like(b)
    r = b.clone()
    y = _v_cycle(levels, r)
    p = y.clone()
    rz = _sum_hw(r * y)
    goal = tol * _sum_hw(b * b).sqrt()
    active = torch.ones_like(goal)
    for _ in range(limit):
        ap = levels[0].apply(p)
        pap = _sum_hw(p * ap)
        alpha = torch.where(pap > 0, rz / pap.clamp_min(tiny), 0) * active
        z.add_(alpha * p)
        r.sub_(alpha * ap)
        # a converged system stops moving (no denormal numbers from a vanishing residual)
        active = active * (_sum_hw(r * r).sqrt() > goal).to(dtype)
        if not bool(active.any()):
            break
        y = _v_cycle(levels, r)
        rz_new = _sum_hw(r * y)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(tiny), 0)
        p = (y + beta * p) * active
        rz = rz_new
    else:
        worst = float((_sum_hw(r * r).sqrt() / _sum_hw(b * b).sqrt().clamp_min(1e-30)).max())
        warnings.warn(
            f"ROAD imputation stopped after {limit} iterations at a relative residual of "
            f"{worst:.2e} (tol={tol:g}); raise max_iter or use dtype=torch.float64.",
            UserWarning,
            stacklevel=2,
        )
    return torch.where(keep.unsqueeze(1), images, z.to(images.dtype))
