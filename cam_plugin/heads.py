"""Folding an affine-after-pool head into one CAM weight matrix.

A head that is affine per sample after the global average pool gives an exact CAM.
With the pooled vector ``p = mean_xy f(x, y)`` the head computes ``S = A p + a`` for
a chain of

* ``nn.Linear``            ``p -> W p + b``
* 1x1 ``nn.Conv2d``        the same on a ``(B, K, 1, 1)`` tensor (also pointwise Conv1d / Conv3d)
* ``BatchNorm1d/2d`` (eval) ``p -> s * p + t`` with ``s = γ / sqrt(var + eps)``, ``t = β - μ s``
* ``Dropout`` (eval), ``Identity``, ``Flatten``: nothing

folded into ``S = W' p + b'``, so ``M_c(x, y) = Σ_k W'_ck f_k(x, y)`` and
``mean_xy M_c + b'_c = S_c`` exactly.

One ``LayerNorm`` over the channels may appear in the chain (ConvNeXt's head norm,
timm ViT's ``fc_norm``). With ``q = P p + π`` the affine part before it (identity
for ConvNeXt), ``μ`` and ``σ = sqrt(var(q) + eps)`` the per-sample mean and std of
``q``, and ``W'``, ``b'`` the fold of ``γ``, ``β`` and everything after it:

    M_c(x, y) = Σ_k W'_ck (q_k(x, y) − μ) / σ,      bias = b'_c

so the identity still holds exactly: μ enters as a per-sample shift of the map.
Anything else (a non-linearity, a second norm, a module the fold does not know)
raises :class:`~cam_plugin.errors.UnsupportedHeadError` naming the module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .errors import CONVERT_HINT, UnsupportedHeadError

__all__ = ["FoldedHead", "fold_head", "is_passthrough", "logits_error"]

#: tolerance of "the folded head reproduces the logits": ``|Ŝ − S| <= 1e-3·max(1, |S|)``
REPRODUCE_RTOL = 1e-3

_PASSTHROUGH = (
    nn.Identity,
    nn.Flatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def is_passthrough(module: nn.Module) -> bool:
    """True for modules that are the identity in eval mode (Identity, Flatten, Dropout*)."""
    return isinstance(module, _PASSTHROUGH) or type(module).__name__ in {
        "DropPath",
        "Identity",
        "Flatten",
    }


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    """A ``(K,)`` vector shaped to broadcast over ``(B, K, *spatial)``."""
    return v.reshape(1, -1, *([1] * (ndim - 2)))


def logits_error(predicted: Tensor, logits: Tensor) -> tuple[float, float]:
    """``(max |Ŝ − S|, max(1, max |S|))``: how far the logits ``Ŝ`` a folded head predicts are
    from the model's ``S``, and the scale that error is judged against. Shapes must match."""
    scale = max(1.0, float(logits.detach().abs().max())) if logits.numel() else 1.0
    if predicted.shape != logits.shape:
        return float("inf"), scale
    err = float((predicted.detach().float() - logits.detach().float()).abs().max())
    return err, scale


@dataclass
class FoldedHead:
    """The head as one affine map on the pooled features, optionally with one LayerNorm.

    Attributes:
        weight: ``(C, K')`` CAM weights ``W'``.
        bias: ``(C,)`` bias ``b'`` of the identity ``mean_xy M_c + b'_c = S_c``.
        pre_weight, pre_bias: the affine map ``q = P f + π`` applied per location before
            the LayerNorm (``None`` when there is none, the usual case).
        norm_eps: the LayerNorm's ``eps`` when the head has one, else ``None``.
    """

    weight: Tensor
    bias: Tensor
    pre_weight: Optional[Tensor] = None
    pre_bias: Optional[Tensor] = None
    norm_eps: Optional[float] = None

    @property
    def num_classes(self) -> int:
        """Number of classes ``C``."""
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        """Number of feature channels ``K`` the head expects."""
        if self.pre_weight is not None:
            return int(self.pre_weight.shape[1])
        return int(self.weight.shape[1])

    def project(self, features: Tensor) -> Tensor:
        """Apply the affine part before the norm per location: ``(B, K, h, w) -> (B, K', h, w)``."""
        if self.pre_weight is None:
            return features
        out = torch.einsum("jk,bk...->bj...", self.pre_weight.to(features.dtype), features)
        if self.pre_bias is not None:
            out = out + _per_channel(self.pre_bias.to(features.dtype), out.dim())
        return out

    def norm_stats(self, projected: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample ``μ`` and ``σ`` of the pooled projected features, each ``(B, 1)``."""
        if self.norm_eps is None:
            raise RuntimeError("norm_stats called on a head without a LayerNorm")
        pooled = projected.flatten(2).mean(dim=2)
        mu = pooled.mean(dim=1, keepdim=True)
        var = pooled.var(dim=1, unbiased=False, keepdim=True)
        return mu, torch.sqrt(var + self.norm_eps)

    def logits(self, features: Tensor) -> Tensor:
        """Logits ``S = W' n(mean_xy q) + b'`` from ``(B, K, h, w)`` features."""
        q = self.project(features)
        pooled = q.flatten(2).mean(dim=2)
        if self.norm_eps is not None:
            mu, sigma = self.norm_stats(q)
            pooled = (pooled - mu) / sigma
        return pooled @ self.weight.to(pooled.dtype).t() + self.bias.to(pooled.dtype)

    def reproduces(self, features: Tensor, logits: Tensor, rtol: float = REPRODUCE_RTOL) -> bool:
        """True when ``W' n(mean_xy q) + b'`` equals ``logits`` to ``rtol·max(1, |S|)``."""
        err, scale = logits_error(self.logits(features), logits)
        return err <= rtol * scale

    def check_reproduces(
        self, features: Tensor, logits: Tensor, *, name: str, rtol: float = REPRODUCE_RTOL
    ) -> None:
        """Raise :class:`~cam_plugin.errors.UnsupportedHeadError` unless the fold reproduces
        the model's ``logits`` from ``features`` (the exactness identity
        ``mean_xy M_c + b'_c = S_c``, checked through the pooled features). ``name`` is the
        adapter's name, for the message."""
        err, scale = logits_error(self.logits(features), logits)
        if err > rtol * scale:
            raise UnsupportedHeadError(
                f"the folded head of '{name}' reproduces the model's logits only to "
                f"{err:.3g} (scale {scale:.3g}): the model's structure changed since the "
                "adapter was resolved (a module replaced?), or its pooling is not global at "
                "this input "
                "size. Build a new CAM (the adapter is resolved again), or give an adapter "
                "that matches the model"
            )

    def maps(self, features: Tensor, classes: Optional[Tensor] = None) -> Tensor:
        """Class activation maps ``M_c(x, y) = Σ_k W'_ck f_k(x, y)``.

        Args:
            features: ``(B, K, h, w)``.
            classes: ``None`` for every class (one einsum, ``(B, C, h, w)``), or a
                ``(B, k)`` long tensor of class indices per image (``(B, k, h, w)``).
        """
        q = self.project(features)
        weight = self.weight.to(q.dtype)
        if classes is None:
            out = torch.einsum("ck,bk...->bc...", weight, q)
            row_sums = weight.sum(dim=1)[None, :]
        else:
            rows = weight[classes]  # (B, k, K)
            b, k_sel = classes.shape
            out = torch.bmm(rows, q.reshape(q.shape[0], q.shape[1], -1)).reshape(
                b, k_sel, *q.shape[2:]
            )
            row_sums = rows.sum(dim=2)
        if self.norm_eps is not None:
            mu, sigma = self.norm_stats(q)
            spatial = (1,) * (out.dim() - 2)
            shift = (row_sums * mu).reshape(*out.shape[:2], *spatial)
            out = (out - shift) / sigma.reshape(-1, 1, *spatial)
        return out

    def class_bias(self, classes: Optional[Tensor] = None) -> Tensor:
        """``b'`` for every class ``(C,)`` or for a ``(B, k)`` selection."""
        return self.bias if classes is None else self.bias[classes]


class _Affine:
    """``x -> A x + a`` where ``A`` is a full matrix, a diagonal (stored as a vector) or ``None``
    (the identity); composing keeps diagonals as vectors so a BatchNorm never becomes a
    dense ``K x K`` matrix."""

    def __init__(
        self, mat: Optional[Tensor] = None, vec: Optional[Tensor] = None, diag: bool = False
    ) -> None:
        self.mat, self.vec, self.diag = mat, vec, diag

    def then(self, other: _Affine) -> _Affine:
        """The composition ``other ∘ self``."""
        if self.mat is None:
            mat, diag = other.mat, other.diag
        elif other.mat is None:
            mat, diag = self.mat, self.diag
        elif other.diag and self.diag:
            mat, diag = other.mat * self.mat, True
        elif other.diag:
            mat, diag = other.mat[:, None] * self.mat, False
        elif self.diag:
            mat, diag = other.mat * self.mat[None, :], False
        else:
            mat, diag = other.mat @ self.mat, False
        vec = self.vec
        if vec is not None and other.mat is not None:
            vec = other.mat * vec if other.diag else other.mat @ vec
        if other.vec is not None:
            vec = other.vec if vec is None else vec + other.vec
        return _Affine(mat, vec, diag)

    def dense(self, width: int, like: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """``(A, a)`` as a dense matrix and vector."""
        if self.mat is None:
            if like is not None:
                mat = torch.eye(width, dtype=like.dtype, device=like.device)
            else:
                mat = torch.eye(width)
        else:
            mat = torch.diag(self.mat) if self.diag else self.mat
        vec = self.vec if self.vec is not None else mat.new_zeros(mat.shape[0])
        return mat, vec


def _affine_of(module: nn.Module, name: str) -> Optional[_Affine]:
    """The affine map ``module(p) = A p + a`` of a foldable module, else ``None``."""
    if isinstance(module, nn.Linear):
        return _Affine(module.weight, module.bias)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        pointwise = all(k == 1 for k in module.kernel_size)
        unpadded = module.padding == 0 or all(p == 0 for p in module.padding)  # type: ignore[union-attr]
        if not pointwise or module.groups != 1 or not unpadded:
            raise UnsupportedHeadError(
                f"head module '{name}' ({module!r}) is a convolution that is not 1x1 / "
                f"ungrouped / unpadded; it cannot be folded. {CONVERT_HINT}"
            )
        return _Affine(module.weight.reshape(module.weight.shape[0], -1), module.bias)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.running_mean is None or module.running_var is None:
            raise UnsupportedHeadError(
                f"head module '{name}' ({type(module).__name__}) has no running statistics "
                "(track_running_stats=False), so it is not affine per sample. " + CONVERT_HINT
            )
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        shift = -module.running_mean * scale
        if module.bias is not None:
            shift = shift + module.bias
        return _Affine(scale, shift, diag=True)
    return None


def _out_width(affine: _Affine, width: int) -> int:
    if affine.mat is None or affine.diag:
        return width
    return int(affine.mat.shape[0])


def _in_width(affine: _Affine) -> Optional[int]:
    if affine.mat is None:
        return None
    return int(affine.mat.shape[0] if affine.diag else affine.mat.shape[1])


def fold_head(modules: Sequence[tuple[str, nn.Module]], in_features: int) -> FoldedHead:
    """Fold the modules applied after the global average pool into a :class:`FoldedHead`.

    Args:
        modules: ``(qualified name, module)`` in call order, starting right after the pool.
        in_features: ``K``, the number of pooled channels.

    Raises:
        UnsupportedHeadError: a module is not affine per sample (the message names it).
    """
    chain = _Affine()
    pre: Optional[_Affine] = None
    norm_eps: Optional[float] = None
    width = in_features
    like: Optional[Tensor] = None
    for name, module in modules:
        if is_passthrough(module):
            continue
        like = next(module.parameters(), like)
        if isinstance(module, nn.LayerNorm):
            if norm_eps is not None:
                raise UnsupportedHeadError(
                    f"head module '{name}' is a second LayerNorm after the pool; only one "
                    f"can be folded exactly. {CONVERT_HINT}"
                )
            if tuple(module.normalized_shape) != (width,):
                raise UnsupportedHeadError(
                    f"head module '{name}' normalizes over {tuple(module.normalized_shape)}, "
                    f"not over the {width} pooled channels. {CONVERT_HINT}"
                )
            pre, norm_eps = chain, float(module.eps)
            chain = _Affine(module.weight, module.bias, diag=module.weight is not None)
            if module.weight is None:
                chain = _Affine(None, module.bias)
            continue
        affine = _affine_of(module, name)
        if affine is None:
            raise UnsupportedHeadError(
                f"head module '{name}' ({type(module).__name__}) comes after the feature map "
                f"and is not affine (a non-linearity, attention or pooling other than a "
                f"global average), so CAM cannot be exact. {CONVERT_HINT}"
            )
        expected = _in_width(affine)
        if expected is not None and expected != width:
            raise UnsupportedHeadError(
                f"head module '{name}' expects {expected} inputs but receives {width} pooled values"
            )
        chain = chain.then(affine)
        width = _out_width(affine, width)
    weight, bias = chain.dense(width, like)
    if norm_eps is None:
        return FoldedHead(weight=weight, bias=bias)
    pre_weight: Optional[Tensor] = None
    pre_bias: Optional[Tensor] = None
    if pre is not None and (pre.mat is not None or pre.vec is not None):
        pre_weight, pre_bias = pre.dense(in_features, like)
    return FoldedHead(
        weight=weight, bias=bias, pre_weight=pre_weight, pre_bias=pre_bias, norm_eps=norm_eps
    )
