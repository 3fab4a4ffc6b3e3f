"""Per-branch maps for fused heads: a head on several pooled vectors concatenated.

Multi-view and multi-input models, global + local branches and DINOv2's
``[CLS, mean(patches)]`` pool several tensors and concatenate them before an affine head:
``S = W' n(P p + π) + b'`` with ``p = [w_1 pool(f^1), z_2, w_3 pool(f^3), ...]`` (``f^i``
spatial maps averaged over their cells, ``z_j`` non-spatial vectors, ``n`` an optional
LayerNorm folded by :mod:`cam_plugin.heads`). Splitting ``A = W' P`` by the columns of
each branch gives, exactly,

    S_c = Σ_i mean_xy M^i_c + K_c + b'_c

with one map ``M^i_c`` per spatial branch and a per-image constant ``K_c`` for the
non-spatial parts (formulas in :class:`BranchMaps`). :class:`BranchSpec` says where each
branch's tensor comes from and which columns it fills; :class:`ConcatBranchAdapter` is the
adapter; :class:`cam_plugin.CAM` captures every branch in the user's one forward and
:func:`branch_result` turns the maps into a :class:`~cam_plugin.result.CAMResult` whose
``branches`` hold one result per spatial branch and ``constant`` the ``K_c``.

A fusion that is not affine in the pooled vectors (a product or gate of branches, attention
across them, a max over views) cannot be split: the fold of ``p`` does not reproduce the
model's logits and :meth:`ConcatBranchAdapter.branch_maps` raises
:class:`~cam_plugin.errors.UnsupportedHeadError` saying so.

Example (DINOv2: tokens after the final LayerNorm, ``classifier = Linear(2D, C)``)::

    ln, d = model.dinov2.layernorm, model.config.hidden_size
    adapter = ConcatBranchAdapter.from_branches(
        [BranchSpec("cls", ln, (0, d), spatial=False, read=lambda t: t[:, 0]),
         BranchSpec("patches", ln, (d, 2 * d), layout=FeatureLayout("tokens", 1))],
        head=[model.classifier])
    res = CAM(model, adapter=adapter)(images)   # res.maps: the patch map, res.constant: CLS
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .adapter import Adapter, CaptureMaps, HeadSpec
from .errors import CONVERT_HINT, CAMInputError, UnsupportedHeadError
from .heads import REPRODUCE_RTOL, FoldedHead, logits_error
from .hooks import CaptureKind
from .layout import FeatureLayout
from .placement import Placement
from .probing import first_tensor
from .result import CAMResult

__all__ = ["BranchMaps", "BranchSpec", "ConcatBranchAdapter", "branch_result"]

Locator = Optional[Callable[[], Optional[Placement]]]


@dataclass(frozen=True)
class BranchSpec:
    """One input of a fused head (:class:`ConcatBranchAdapter`): a spatial map that the model
    averages over its cells, or a non-spatial vector (a CLS token, a metadata embedding).

    Attributes:
        name: the branch's name (its key in ``CAMResult.branches``).
        module: the module whose output (or input) holds the branch's tensor.
        columns: ``(start, stop)``: the input columns of the head this branch fills in the
            concatenated vector. Branches given the same columns are added (a sum fusion is
            affine too); together the branches must fill ``0 .. K_total − 1``.
        capture: ``"output"`` or ``"input"`` of ``module``.
        layout: for a spatial branch, the layout of the captured tensor (after ``read``):
            NCHW, NHWC, or tokens with their prefix tokens; the model averages it over its
            ``h x w`` cells.
        spatial: ``False`` for a non-spatial part: ``read`` (or the captured tensor itself)
            must give a ``(B, width)`` vector.
        read: a function applied to the captured tensor first (``lambda t: t[:, 0]`` for a
            CLS token; ``None``: the tensor as captured).
        weight: a factor on the pooled vector (``mean(tokens[1:])`` over ``R`` registers and
            ``N`` patches is ``R/(R+N)·mean(registers) + N/(R+N)·mean(patches)``).
        call: which call of ``module`` in one forward (``0`` the first, ``-1`` the last): a
            backbone shared by several views runs once per view.
    """

    name: str
    module: nn.Module
    columns: tuple[int, int]
    capture: CaptureKind = "output"
    layout: FeatureLayout = field(default_factory=FeatureLayout)
    spatial: bool = True
    read: Optional[Callable[[Tensor], Tensor]] = None
    weight: float = 1.0
    call: int = -1

    @property
    def width(self) -> int:
        """Number of head columns the branch fills."""
        return int(self.columns[1]) - int(self.columns[0])

    def check(self) -> None:
        """Raise :class:`~cam_plugin.errors.CAMInputError` for a malformed spec."""
        if not isinstance(self.module, nn.Module):
            raise CAMInputError(f"branch '{self.name}': module must be an nn.Module")
        start, stop = (int(v) for v in self.columns)
        if not 0 <= start < stop:
            raise CAMInputError(
                f"branch '{self.name}': columns must be (start, stop) with 0 <= start < stop, "
                f"got {self.columns}"
            )
        if self.capture not in ("output", "input"):
            raise CAMInputError(f"branch '{self.name}': capture must be 'output' or 'input'")


@dataclass
class BranchMaps:
    """The core step of a fused head for one forward (:meth:`ConcatBranchAdapter.branch_maps`).

    With ``p`` the concatenated pooled vector, the folded head ``S = W' n(P p + π) + b'``
    (``n`` the head's LayerNorm, if any, with per-sample ``μ``, ``σ``; ``P = I``, ``π = 0``
    without one), and ``A = W' P``:

        M^i_c(x, y) = w_i Σ_k A_c,(cols_i, k) f^i_k(x, y) / σ          (one map per branch)
        K_c = Σ_j w_j A_c,cols_j · z_j / σ + (W'π − Σ_k W'_ck μ)_c / σ   (the constant)

    so ``Σ_i mean_xy M^i_c + K_c + b'_c = S_c`` exactly.

    Attributes:
        features: ``(B, K_i, h_i, w_i)`` per spatial branch (by name).
        vectors: ``(B, K_j)`` per non-spatial branch.
        pooled: ``(B, K_total)`` the head's input ``p``.
        head: the folded head.
        logits: ``(B, C)``, the model's (or the fold's, without an output).
        classes: ``(B, k)`` selected classes, ``None`` for every class.
    """

    features: dict[str, Tensor]
    vectors: dict[str, Tensor]
    pooled: Tensor
    head: FoldedHead
    logits: Tensor
    classes: Optional[Tensor]
    specs: tuple[BranchSpec, ...]

    def maps(self, classes: Optional[Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """``({name: M^i}, K)`` for ``(B, k)`` classes (``None``: every class): maps
        ``(B, k, h_i, w_i)`` per spatial branch and the constant ``(B, k)``."""
        head = self.head
        weight = head.weight.to(self.pooled.dtype)
        a = weight if head.pre_weight is None else weight @ head.pre_weight.to(weight.dtype)
        rows = a[classes] if classes is not None else a.expand(self.pooled.shape[0], -1, -1)
        inv = torch.ones(self.pooled.shape[0], 1, dtype=a.dtype, device=a.device)
        extra = torch.zeros(rows.shape[:2], dtype=a.dtype, device=a.device)
        if head.norm_eps is not None:
            q = self.pooled if head.pre_weight is None else self.pooled @ head.pre_weight.t()
            if head.pre_bias is not None:
                q = q + head.pre_bias
            mu, sigma = head.norm_stats(q[:, :, None, None])
            inv = 1.0 / sigma
            w_rows = weight[classes] if classes is not None else weight[None]
            extra = -w_rows.sum(dim=-1) * mu
            if head.pre_bias is not None:
                extra = extra + w_rows @ head.pre_bias.to(weight.dtype)
        maps: dict[str, Tensor] = {}
        constant = extra * inv
        for spec in self.specs:
            cols = rows[..., spec.columns[0] : spec.columns[1]] * (spec.weight * inv[..., None])
            if spec.spatial:
                m = torch.einsum("bnk,bkhw->bnhw", cols, self.features[spec.name])
                maps[spec.name] = maps[spec.name] + m if spec.name in maps else m
            else:
                constant = constant + (cols * self.vectors[spec.name][:, None, :]).sum(dim=-1)
        return maps, constant


@dataclass
class ConcatBranchAdapter(Adapter):
    """An adapter for a head on several pooled vectors concatenated (multi-view or
    multi-input models, DINOv2's ``[CLS, mean(patches)]``, global + local branches).

    ``W'`` is split by columns: every spatial branch gets its own exact map and every
    non-spatial part a per-image constant (:class:`BranchMaps`), and the maps' means plus
    the constant plus ``b'`` sum to the logit. Build it with :meth:`from_branches`; use it
    with :class:`cam_plugin.CAM` (``CAM(model, adapter=...)``), whose results carry
    ``branches`` and ``constant``. Fusions that are not a concatenation (or sum) followed by
    an affine head — a product, a gate, attention over the branches, a max over views — do
    not reproduce the model's logits and are refused with
    :class:`~cam_plugin.errors.UnsupportedHeadError`.

    Attributes:
        branches: the :class:`BranchSpec` of every input of the head.
    """

    branches: tuple[BranchSpec, ...] = field(default_factory=tuple)  # type: ignore[assignment]

    @classmethod
    def from_branches(
        cls,
        branches: Sequence[BranchSpec],
        head: HeadSpec,
        *,
        name: str = "fused",
        input_size: Optional[tuple[int, int, int]] = None,
        output_fn: Optional[Callable[[Any], Tensor]] = None,
    ) -> ConcatBranchAdapter:
        """The adapter of a head (modules after the concatenation, in call order) on
        ``branches``; the first spatial branch is the adapter's ``feature_module``."""
        specs = tuple(branches)
        if not specs or not all(isinstance(b, BranchSpec) for b in specs):
            raise CAMInputError("from_branches needs a non-empty list of BranchSpec")
        spatial = [b for b in specs if b.spatial]
        if not spatial:
            raise CAMInputError("a fused head needs at least one spatial branch to map")
        first = spatial[0]
        return cls(
            feature_module=first.module,
            head=head,
            layout=first.layout,
            capture=first.capture,
            input_size=input_size,
            num_features=max(int(b.columns[1]) for b in specs),
            name=name,
            feature_name=first.name,
            output_fn=output_fn,
            branches=specs,
        )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.branches = tuple(self.branches)
        for spec in self.branches:
            spec.check()
        names = [b.name for b in self.branches]
        if len(set(names)) != len(names) or not names:
            raise CAMInputError(f"branch names must be unique and non-empty, got {names}")
        total = max(int(b.columns[1]) for b in self.branches)
        filled = torch.zeros(total, dtype=torch.bool)
        for b in self.branches:
            filled[int(b.columns[0]) : int(b.columns[1])] = True
        if not bool(filled.all()):
            gap = int((~filled).nonzero()[0])
            raise CAMInputError(f"no branch fills column {gap} of the head's {total} inputs")
        self.num_features = total
        self.fold(total)  # a head that does not take `total` inputs, or is not affine, raises

    @property
    def spatial_names(self) -> list[str]:
        """Names of the spatial branches, in order (the first is the result's own maps)."""
        return [b.name for b in self.branches if b.spatial]

    def maps_from_capture(self, captured: Tensor, output: Any = None, **kwargs: Any) -> CaptureMaps:
        """Refused: a fused head has one capture per branch (:meth:`branch_maps`)."""
        raise UnsupportedHeadError(
            f"'{self.name}' is a fused head with {len(self.branches)} inputs: its maps come "
            "from one capture per branch. Use cam_plugin.CAM(model, adapter=...) (per-branch "
            "maps in CAMResult.branches) or ConcatBranchAdapter.branch_maps"
        )

    def compute(self, features: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Refused, as :meth:`maps_from_capture` (one feature tensor is not enough)."""
        self.maps_from_capture(features)
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def capture_branches(self, detach: bool = True) -> Iterator[Callable[[], list[Tensor]]]:
        """Hooks on every branch's module for one forward of this thread; yields a function
        that returns each branch's captured tensor (``call`` picks among repeated calls).
        The hooks are removed when the block ends, also on error."""
        owner = threading.get_ident()
        seen: dict[tuple[int, str], list[Tensor]] = {}
        handles = []

        def record(key: tuple[int, str]) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any = None) -> None:
                if threading.get_ident() != owner:
                    return
                value = first_tensor(output if key[1] == "output" else (args[0] if args else None))
                if value is not None:
                    seen[key].append(value.detach() if detach else value)

            return hook

        try:
            for spec in self.branches:
                key = (id(spec.module), spec.capture)
                if key in seen:
                    continue
                seen[key] = []
                if spec.capture == "output":
                    handles.append(spec.module.register_forward_hook(record(key)))
                else:
                    handles.append(spec.module.register_forward_pre_hook(record(key)))

            def values() -> list[Tensor]:
                out = []
                for spec in self.branches:
                    calls = seen[(id(spec.module), spec.capture)]
                    if not -len(calls) <= spec.call < len(calls):
                        raise CAMInputError(
                            f"branch '{spec.name}': its module ran {len(calls)} time(s) in the "
                            f"forward, so call={spec.call} does not exist"
                        )
                    out.append(calls[spec.call])
                return out

            yield values
        finally:
            for handle in handles:
                handle.remove()

    def branch_maps(
        self,
        captured: Sequence[Tensor],
        output: Any = None,
        *,
        input_hw: Optional[tuple[int, int]] = None,
        select: Optional[Callable[[Tensor], Optional[Tensor]]] = None,
        verify: bool = False,
    ) -> BranchMaps:
        """The core step of a fused head: one tensor per branch (in order) -> the pooled
        concatenation ``p``, the folded head, the logits (the model's, read from ``output``,
        else ``W' n(p) + b'``) and the classes ``select`` picks. With ``verify`` the fold of
        ``p`` must reproduce the model's logits, else
        :class:`~cam_plugin.errors.UnsupportedHeadError` (the fusion is not affine)."""
        if len(captured) != len(self.branches):
            raise CAMInputError(f"{len(self.branches)} branches but {len(captured)} tensors")
        features: dict[str, Tensor] = {}
        vectors: dict[str, Tensor] = {}
        parts: list[tuple[BranchSpec, Tensor]] = []
        for spec, raw in zip(self.branches, captured):
            value = spec.read(raw) if spec.read is not None else raw
            if value.dtype in (torch.float16, torch.bfloat16):
                value = value.float()
            if spec.spatial:
                feats = spec.layout.to_nchw(value, input_hw)
                features[spec.name] = feats
                pooled = feats.flatten(2).mean(dim=2)
            else:
                if value.dim() != 2:
                    raise CAMInputError(
                        f"branch '{spec.name}' is non-spatial but gives shape "
                        f"{tuple(value.shape)}, not (B, width): give read= to pick the vector"
                    )
                vectors[spec.name] = pooled = value
            if pooled.shape[1] != spec.width:
                raise UnsupportedHeadError(
                    f"branch '{spec.name}' has {pooled.shape[1]} channels but fills "
                    f"{spec.width} columns {tuple(spec.columns)} of the head"
                )
            parts.append((spec, pooled))
        ref = parts[0][1]
        pooled_all = ref.new_zeros(ref.shape[0], int(self.num_features or 0))
        for spec, pooled in parts:
            pooled_all[:, spec.columns[0] : spec.columns[1]] += spec.weight * pooled
        head = self.fold()
        own = head.logits(pooled_all[:, :, None, None])
        logits = own if output is None else self.logits_from_output(output)
        if verify and output is not None:
            err, scale = logits_error(own, logits)
            if err > REPRODUCE_RTOL * scale:
                raise UnsupportedHeadError(
                    f"'{self.name}': the head on the concatenated branches {self.spatial_names} "
                    f"reproduces the model's logits only to {err:.3g} (scale {scale:.3g}): the "
                    "fusion is not a concatenation (or sum) of average-pooled branches followed "
                    "by an affine head (a product, gate, attention or max over branches?), or "
                    "the branch specs do not match the model. Per-branch CAM is exact only for "
                    f"affine fusions. {CONVERT_HINT}"
                )
        classes = select(logits) if select is not None else None
        return BranchMaps(features, vectors, pooled_all, head, logits, classes, self.branches)


def branch_result(
    step: BranchMaps,
    *,
    input_size: tuple[int, int],
    contrast: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    locate: Optional[Callable[[BranchSpec], Locator]] = None,
    eager: bool = False,
    detach: bool = True,
) -> CAMResult:
    """The :class:`~cam_plugin.result.CAMResult` of a fused head's core step.

    One result per spatial branch (``branches``), each with its maps ``M^i_c`` (contrastive
    ``M^i_c − M^i_c'`` when ``contrast(logits, classes)`` gives the ``(B, k)`` classes
    ``c'``, as :func:`cam_plugin.cam.contrast_classes` does) and ``bias = b'_c + K_c +
    Σ_{j≠i} mean_xy M^j_c``, so that each satisfies ``mean_xy M^i_c + bias = S_c``; the
    returned result is the first spatial branch's, with ``branches`` and ``constant``
    (``K_c``) set. ``locate(spec)`` gives a branch its placement finder (traced at the first
    ``upsample()``; with ``eager`` traced now). Padding classes (``-1``) get zeros.
    """
    logits = step.logits
    classes = step.classes
    if classes is None:
        classes = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    maps, constant = step.maps(classes.clamp_min(0))
    bias = step.head.class_bias(classes.clamp_min(0)).to(constant.dtype)
    other = contrast(logits, classes) if contrast is not None else None
    if other is not None:
        other_maps, other_constant = step.maps(other.clamp_min(0))
        maps = {name: m - other_maps[name] for name, m in maps.items()}
        constant = constant - other_constant
        bias = bias - step.head.class_bias(other.clamp_min(0)).to(constant.dtype)
    keep = classes >= 0
    maps = {name: m * keep[:, :, None, None] for name, m in maps.items()}
    constant, bias = constant * keep, bias * keep
    if detach:
        maps = {name: m.detach() for name, m in maps.items()}
        constant, bias = constant.detach(), bias.detach()
    means = {name: m.flatten(2).mean(dim=2) for name, m in maps.items()}
    total = sum(means.values(), torch.zeros_like(constant))
    results: dict[str, CAMResult] = {}
    for spec in step.specs:
        if not spec.spatial or spec.name in results:
            continue
        finder = locate(spec) if locate is not None else None
        results[spec.name] = CAMResult(
            maps=maps[spec.name],
            logits=logits,
            classes=classes,
            bias=bias + constant + total - means[spec.name],
            input_size=input_size,
            placement=finder() if eager and finder is not None else None,
            contrast=other,
            locate=finder,
            constant=constant,
        )
    first = next(iter(results.values()))
    return replace(first, branches=results)
