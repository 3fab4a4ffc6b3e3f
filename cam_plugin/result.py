"""The result of one CAM call: maps, the model's logits and the class of every map.

Each method returns a *new* :class:`CAMResult`; the operations apply to the maps as
they are at that moment, in the order the caller chains them. The usual chain is
``res.upsample().normalize().boxes(0.2)``:

* ``upsample`` first, then ``relu`` / ``normalize``: ReLU and min-max scaling of the
  upsampled map are what the picture shows (bilinear upsampling does not commute with
  ReLU, so ``relu().upsample()`` gives a slightly different map).
* ``boxes(threshold)`` keeps pixels ``>= threshold × max`` *of each map as it is*:
  on a normalized map that is the paper's "20% of the max"; on a raw map with negative
  values it is still a fraction of that map's own maximum.

A result is a batch: ``len(res)`` is the number of images, ``res[i]`` / ``res[a:b]`` /
``res[mask]`` / ``res[indices]`` (or :meth:`CAMResult.select`) the result of those images,
and iterating gives one single-image result per image.

Two scales for the values of a map: ``normalize()`` scales each map by its own min and max
(good for one picture, meaningless across images), ``normalize(scale=MapScale(...))`` puts
every map on one fixed scale — given bounds, or :meth:`MapScale.fit` over the maps of a
calibration set — so that two images' maps compare (maps are in logit units:
``mean_xy M_c + b_c = S_c``).

Placement: ``upsample()`` centres every feature cell on its receptive field (a
:class:`~cam_plugin.placement.Placement`) whenever the result knows it or can have it
traced (:attr:`CAMResult.locate`, set by :class:`~cam_plugin.CAM`); ``upsample(
placement="bilinear")`` is plain ``F.interpolate``. :attr:`CAMResult.upsampled_with` says
which one was used.

Fused heads (:class:`~cam_plugin.branches.ConcatBranchAdapter`): :attr:`CAMResult.branches`
holds one result per spatial branch and :attr:`CAMResult.constant` the part of each logit
that no map holds (see :attr:`CAMResult.branches`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import CAMInputError
from .placement import Placement, place_maps
from .scale import MapScale, as_scale

__all__ = ["CAMResult", "MapScale", "minmax_normalize"]

#: what selects images of a batch: an int, a slice, a bool mask or a list / 1-D tensor of
#: indices
BatchIndex = Union[int, slice, Sequence[int], Sequence[bool], Tensor, np.ndarray]

_MODES = ("bilinear", "bicubic", "nearest")


def minmax_normalize(maps: Tensor) -> Tensor:
    """Per-map min-max scaling over the last two dims (the last three for a ``(B, k, T, H, W)``
    clip, so a clip is scaled as one): ``(m − min) / (max − min)``.

    A constant map (``max == min``) becomes all zeros, never NaN.
    """
    flat = maps.flatten(-3) if maps.dim() == 5 else maps.flatten(-2)
    lo = flat.amin(dim=-1, keepdim=True)
    hi = flat.amax(dim=-1, keepdim=True)
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    out = torch.where(span > 0, (flat - lo) / safe, torch.zeros_like(flat))
    return out.reshape(maps.shape)


def _as_int(value: Any) -> Optional[int]:
    """``value`` as an int when it is an integer (Python, numpy, 0-d integer tensor; not a
    bool), else ``None``."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, Tensor) and (value.dim() != 0 or value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _upsample_size(size: Any, input_size: tuple[int, int]) -> tuple[int, int]:
    """The ``(H, W)`` that :meth:`CAMResult.upsample` resizes to: ``input_size`` for
    ``None``, ``(n, n)`` for an int ``n``, or the two ints of ``(H, W)``, all ``>= 1``.

    Raises:
        CAMInputError: anything else (floats, bools, other lengths, values < 1).
    """
    if size is None:
        return input_size
    n = _as_int(size)
    values: list[Optional[int]] = [n, n] if n is not None else [None]
    listlike = isinstance(size, (Sequence, Tensor, np.ndarray)) and not isinstance(size, str)
    if n is None and listlike and getattr(size, "ndim", 1) == 1 and len(size) == 2:
        values = [_as_int(size[0]), _as_int(size[1])]
    h, w = values[0], values[-1]
    if len(values) != 2 or h is None or w is None or h < 1 or w < 1:
        raise CAMInputError(
            f"upsample size must be None (the input size {input_size}), an int n (an n x n "
            f"map) or (H, W) with integers H, W >= 1; got {size!r}"
        )
    return h, w


@dataclass(frozen=True)
class CAMResult:
    """Class activation maps of a batch.

    Attributes:
        maps: ``(B, k, h, w)``; at feature resolution straight from :class:`~cam_plugin.CAM`.
            For video models ``(B, k, T', h, w)`` (space-time maps; the identity averages
            over ``t, x, y``).
        logits: ``(B, C)`` the model's own output for the batch.
        classes: ``(B, k)`` class index of every map; ``-1`` pads ragged multi-label targets.
        bias: ``(B, k)`` the folded head's bias ``b'_c`` of every map, so that at feature
            resolution ``maps.mean((2, 3)) + bias == logits.gather(1, classes)``.
        input_size: ``(H, W)`` of the images.
        frames: ``T``, the number of input frames of a video clip (``None`` for images);
            :meth:`upsample` then resizes the maps to ``(T, H, W)``.
        exact: False for max-pooled heads (the identity does not hold).
        stage: ``"feature"``, or the operations applied since (``"upsampled"``, ...).
        placement: where each feature cell sits on the image
            (:class:`~cam_plugin.placement.Placement`), when known; ``upsample()`` then
            centres every cell on its receptive field. ``None`` after upsampling.
        contrast: ``(B, k)`` class ``c'`` of every map for contrastive maps
            ``M_c − M_c'`` (``None`` for plain maps). The identity then reads
            ``mean_xy (M_c − M_c') + (b_c − b_c') = S_c − S_c'``: ``bias`` holds
            ``b_c − b_c'`` and :attr:`scores` the logit margin ``S_c − S_c'``.
        locate: traces :attr:`placement` at its first need (set by :class:`~cam_plugin.CAM`:
            cached per input size, on a weightless copy of the model; ``None`` where the
            geometry cannot be traced). ``None`` after upsampling.
        upsampled_with: how :meth:`upsample` placed the cells: the placement's ``source``
            (``"traced"``; ``"half-pixel"`` / ``"assumed"`` for such a given placement), or
            the mode of a plain ``F.interpolate`` (``"bilinear"``, ``"nearest"``,
            ``"bicubic"``); ``None`` before upsampling.
        scale: the fixed :class:`MapScale` that :meth:`normalize` applied (``None``: raw,
            or min-max per map when :attr:`stage` says ``normalized``).
        constant: ``(B, k)`` for a fused head (:class:`~cam_plugin.branches.ConcatBranchAdapter`):
            the part of each map's logit that comes from non-spatial inputs (a CLS token),
            ``Σ_j W'_c,j · z_j``; it is included in :attr:`bias`. ``None`` otherwise.
        branches: for a fused head, one result per spatial branch (by name), each with its
            own maps, input size and placement. Branch ``i``'s ``bias`` is
            ``b'_c + constant + Σ_{j≠i} mean_xy M^j_c``, so each branch satisfies the
            identity on its own, and ``Σ_i mean_xy M^i_c + constant + b'_c = S_c``. This
            result's own maps are those of the first spatial branch. ``upsample``,
            ``normalize``, ``relu`` and indexing apply to every branch.
    """

    maps: Tensor
    logits: Tensor
    classes: Tensor
    bias: Tensor
    input_size: tuple[int, int]
    exact: bool = True
    stage: str = "feature"
    placement: Optional[Placement] = None
    contrast: Optional[Tensor] = None
    frames: Optional[int] = None
    locate: Optional[Callable[[], Optional[Placement]]] = field(
        default=None, repr=False, compare=False
    )
    upsampled_with: Optional[str] = None
    originals: Optional[tuple[Any, ...]] = field(default=None, repr=False, compare=False)
    scale: Optional[MapScale] = None
    constant: Optional[Tensor] = None
    branches: Optional[Mapping[str, CAMResult]] = field(default=None, repr=False, compare=False)

    @property
    def valid(self) -> Tensor:
        """``(B, k)`` bool: which maps are real (False only for padding of ragged targets)."""
        return self.classes >= 0

    @property
    def probabilities(self) -> Tensor:
        """``(B, k)`` softmax probability of each map's class (0 for padding)."""
        probs = self.logits.float().softmax(dim=1).gather(1, self.classes.clamp_min(0))
        return probs * self.valid

    @property
    def scores(self) -> Tensor:
        """``(B, k)`` logit of each map's class (for contrastive maps the margin
        ``S_c − S_c'``)."""
        scores = self.logits.gather(1, self.classes.clamp_min(0))
        if self.contrast is not None:
            scores = scores - self.logits.gather(1, self.contrast.clamp_min(0))
        return scores

    def identity_residual(self) -> Tensor:
        """``(B, k)`` of ``mean_xy M_c + b_c − logit_c``: zero up to float error for an exact
        CAM at feature resolution (after upsampling the mean changes slightly)."""
        res = self.maps.float().flatten(2).mean(dim=2) + self.bias.float() - self.scores.float()
        return res * self.valid

    def find_placement(self) -> Optional[Placement]:
        """:attr:`placement` when known, else what :attr:`locate` traces (cached), else
        ``None`` (upsampling is then plain ``F.interpolate``)."""
        if self.placement is not None:
            return self.placement
        if self.locate is None or self.maps.dim() != 4:
            return None
        return self.locate()

    def upsample(
        self,
        size: Union[int, Sequence[int], None] = None,
        mode: Literal["bilinear", "bicubic", "nearest"] = "bilinear",
        align_corners: Optional[bool] = False,
        placement: Union[Placement, Literal["auto", "bilinear"], None] = "auto",
    ) -> CAMResult:
        """Resize the maps, by default to the input size, with every feature cell centred on
        its receptive field wherever that is known.

        Args:
            size: ``(H, W)`` (integers ``>= 1``); an int ``n`` means ``n x n`` (like
                ``F.interpolate``); ``None`` (default) the input size. Anything else (a
                float, a bool, three values) raises :class:`~cam_plugin.CAMInputError`.
            mode: interpolation (``"bilinear"``, ``"bicubic"``, ``"nearest"``).
            align_corners: as in ``F.interpolate`` (plain upsampling only).
            placement: where feature cell ``i`` goes. ``"auto"`` (default): at input pixel
                ``o + s·i`` of :meth:`find_placement` — the result's :attr:`placement`, or
                the one :attr:`locate` traces at this first need (a result of
                :class:`~cam_plugin.CAM` on an NCHW model) — resampled by
                :func:`cam_plugin.placement.place_maps`; plain ``F.interpolate`` when none
                is known or for ``mode="bicubic"``. A
                :class:`~cam_plugin.placement.Placement` (a converted model's
                ``placement(input_size)``, :func:`cam_plugin.tracing.feature_placement`):
                that one (``"bilinear"`` / ``"nearest"`` only). ``"bilinear"`` or
                ``None``: plain ``F.interpolate`` (``align_corners=False`` puts cell ``i``
                at ``s·i + (s − 1)/2``, half a cell off for padded strided convolutions),
                and nothing is traced. :attr:`upsampled_with` says which was used.
        """
        target = _upsample_size(size, self.input_size)
        if mode not in _MODES:
            raise CAMInputError(f"upsample mode must be one of {_MODES}, got {mode!r}")
        known = placement is None or isinstance(placement, Placement)
        if not known and placement not in ("auto", "bilinear"):
            raise CAMInputError(
                f"placement must be a cam_plugin.placement.Placement, 'auto', 'bilinear' or "
                f"None; got {placement!r}"
            )
        auto = placement == "auto" and mode != "bicubic" and self.maps.dim() == 4
        found = placement if isinstance(placement, Placement) else None
        found = self.find_placement() if auto else found
        frames = self.frames if self.frames is not None else int(self.maps.shape[2])
        maps, how = _resize(self.maps, self.input_size, target, mode, align_corners, found, frames)
        return replace(
            self,
            maps=maps,
            stage=self._after("upsampled"),
            placement=None,
            locate=None,
            upsampled_with=how,
            branches=self._on_branches(lambda b: b.upsample(size, mode, align_corners, placement)),
        )

    def normalize(self, scale: Union[MapScale, tuple[float, float], None] = None) -> CAMResult:
        """Scale the maps to ``[0, 1]``.

        Args:
            scale: ``None`` (default): min-max per map, ``(m − min) / (max − min)`` (a
                constant map -> zeros); each map uses its whole colour range, so two
                images' maps cannot be compared. A :class:`MapScale` (or ``(low, high)``):
                one fixed scale for every map, ``clamp((m − low) / (high − low), 0, 1)``
                (:meth:`MapScale.fit` takes it from a calibration set); recorded in
                :attr:`scale` for the pictures' colour bar.
        """
        fixed = as_scale(scale) if scale is not None else None
        maps = minmax_normalize(self.maps) if fixed is None else fixed.apply(self.maps)
        return replace(
            self,
            maps=maps,
            stage=self._after("normalized"),
            scale=fixed,
            branches=self._on_branches(lambda b: b.normalize(fixed)),
        )

    def relu(self) -> CAMResult:
        """Clamp negative evidence to zero."""
        return replace(
            self,
            maps=torch.relu(self.maps),
            stage=self._after("relu"),
            branches=self._on_branches(lambda b: b.relu()),
        )

    def _on_branches(self, op: Callable[[CAMResult], CAMResult]) -> Optional[dict[str, CAMResult]]:
        if self.branches is None:
            return None
        return {name: op(branch) for name, branch in self.branches.items()}

    def boxes(
        self,
        threshold: float = 0.2,
        *,
        warn_above: Optional[int] = 2048,
        relative_to: Literal["clip", "frame"] = "clip",
    ) -> Tensor:
        """The paper's box per map: pixels ``>= threshold × max`` of the map, largest
        8-connected component, its ``(x0, y0, x1, y1)`` (inclusive pixels); ``(B, k, 4)``.

        Video maps ``(B, k, T, h, w)`` give tubes ``(B, k, T, 4)``, a box per frame, cut at
        ``threshold ×`` the clip's max (``relative_to="clip"``: frames without evidence get
        ``(0, 0, 0, 0)``) or each frame's max (``"frame"``); :mod:`cam_plugin.tubes`.

        Coordinates are in the maps' current resolution: call :meth:`upsample` first to
        get boxes in input pixels. Boxing costs about a millisecond per 224 x 224 map on one
        CPU core (:func:`cam_plugin.localize.threshold_boxes`), so every class of a batch
        after upsampling (``targets="all"``) takes seconds: with more than ``warn_above``
        maps a ``UserWarning`` gives the estimated time and the way out (box the
        top classes, or box at feature resolution and scale the boxes). ``None`` never warns.
        """
        from .localize import box_cost_warning, threshold_boxes
        from .tubes import check_relative_to, tube_boxes

        box_cost_warning(self.maps, warn_above)
        if check_relative_to(relative_to) and self.maps.dim() == 5:
            return tube_boxes(self.maps, threshold, relative_to)
        return threshold_boxes(self.maps, threshold)

    def masks(
        self, threshold: float = 0.2, *, relative_to: Literal["clip", "frame"] = "clip"
    ) -> Tensor:
        """``(B, k, h, w)`` bool: pixels ``>= threshold × max`` of each map (video maps:
        ``(B, k, T, h, w)``, the max of the clip or of each frame as in :meth:`boxes`)."""
        from .localize import masks
        from .tubes import check_relative_to, tube_masks

        if check_relative_to(relative_to) and self.maps.dim() == 5:
            return tube_masks(self.maps, threshold, relative_to)
        return masks(self.maps, threshold)

    # -- the batch -----------------------------------------------------------------------
    def __len__(self) -> int:
        """The number of images ``B``."""
        return int(self.maps.shape[0])

    def __iter__(self) -> Iterator[CAMResult]:
        """One single-image result per image (``res[i]`` for ``i`` in ``range(len(res))``)."""
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: BatchIndex) -> CAMResult:
        """The result of some images of the batch; every per-image field (``maps``,
        ``logits``, ``classes``, ``bias``) is indexed the same way, and ``input_size``,
        ``exact``, ``stage`` and ``placement`` are kept.

        Args:
            index: an int (a batch of that one image: the batch dim is kept), a slice, a
                bool mask of length ``B``, or a list / 1-D tensor / array of indices
                (negative counts from the end, repeats allowed).

        Raises:
            CAMInputError: an index out of range, a mask of another length, floats, a tuple
                (``res[i, j]``: only the batch is indexed), or a multi-dimensional index.
        """
        rows = _batch_rows(index, len(self))
        return replace(
            self,
            maps=self.maps[_on(rows, self.maps)],
            logits=self.logits[_on(rows, self.logits)],
            classes=self.classes[_on(rows, self.classes)],
            bias=self.bias[_on(rows, self.bias)],
            contrast=None if self.contrast is None else self.contrast[_on(rows, self.contrast)],
            constant=None if self.constant is None else self.constant[_on(rows, self.constant)],
            branches=self._on_branches(lambda b: b[index]),
            originals=None if self.originals is None else _pick(self.originals, rows),
        )

    def select(self, index: BatchIndex) -> CAMResult:
        """``res[index]``: the result of some images (see :meth:`__getitem__`)."""
        return self[index]

    def per_image(self) -> list[tuple[Tensor, Tensor]]:
        """``[(classes_i, maps_i), ...]`` without the padding of ragged targets."""
        return [(c[v], m[v]) for c, m, v in zip(self.classes, self.maps, self.valid)]

    def to_original(self, fill: float = float("nan")) -> list[Tensor]:
        """Per image, the maps ``(k, h0, w0)`` on the original picture (when the call was
        given pictures: ``originals`` holds their geometry), bilinearly resampled from the
        maps at the input size (``upsample()`` first when they are not); pixels the crop
        left out get ``fill``. See :func:`cam_plugin.image_inputs.map_to_original`."""
        from .image_inputs import map_to_original

        if self.originals is None:
            raise CAMInputError("to_original needs a call on pictures (PIL / numpy / paths)")
        at_input = self if self.maps.shape[-2:] == self.input_size else self.upsample()
        return [map_to_original(m, p, fill) for m, p in zip(at_input.maps, self.originals)]

    def to_numpy(self) -> dict[str, Any]:
        """``maps``, ``logits``, ``classes``, ``probabilities`` as numpy arrays."""
        return {
            "maps": self.maps.detach().float().cpu().numpy(),
            "logits": self.logits.detach().float().cpu().numpy(),
            "classes": self.classes.detach().cpu().numpy(),
            "probabilities": self.probabilities.detach().cpu().numpy(),
            "bias": self.bias.detach().float().cpu().numpy(),
            **({} if self.contrast is None else {"contrast": self.contrast.cpu().numpy()}),
            **({} if self.constant is None else {"constant": self.constant.float().cpu().numpy()}),
        }

    def _after(self, op: str) -> str:
        return op if self.stage == "feature" else f"{self.stage}+{op}"

    def __repr__(self) -> str:
        return (
            f"CAMResult(maps={tuple(self.maps.shape)}, classes={tuple(self.classes.shape)}, "
            f"input_size={self.input_size}, stage={self.stage!r}, exact={self.exact})"
        )


def _resize(
    maps: Tensor,
    input_size: tuple[int, int],
    target: tuple[int, int],
    mode: str,
    align_corners: Optional[bool],
    placement: Optional[Placement],
    frames: int,
) -> tuple[Tensor, str]:
    """``(maps at target, how)``: placed (:func:`place_maps`, ``how`` = the placement's
    source) when ``placement`` is given, else plain ``F.interpolate`` (``how`` = the mode;
    a clip ``(B, k, T', h, w)`` is resized to ``(frames, *target)``)."""
    if placement is not None:
        if maps.dim() == 5:
            raise CAMInputError("placed upsampling is for image maps; clips are resized plainly")
        if mode == "bicubic":
            raise CAMInputError("placed upsampling supports mode 'bilinear' or 'nearest'")
        scaled = placement.rescaled(input_size, target)
        return place_maps(maps, target, scaled, mode=mode), placement.source  # type: ignore[arg-type]
    ac = None if mode == "nearest" else align_corners
    if maps.dim() == 5:  # a clip: (T', h, w) -> (T, H, W)
        mode3 = {"bilinear": "trilinear", "bicubic": "trilinear"}.get(mode, mode)
        return F.interpolate(maps, size=(frames, *target), mode=mode3, align_corners=ac), mode
    return F.interpolate(maps, size=target, mode=mode, align_corners=ac), mode


def _batch_rows(index: Any, n: int) -> Union[slice, Tensor]:
    """The rows of a batch of ``n`` that ``index`` selects (see ``CAMResult.__getitem__``)."""
    what = (
        "index a CAMResult with an int, a slice, a bool mask of length B or a list / 1-D "
        f"tensor of image indices (B = {n})"
    )
    i = _as_int(index)
    if i is not None:
        if not -n <= i < n:
            raise CAMInputError(f"image index {i} is out of range; {what}")
        return slice(i % n, i % n + 1)
    if isinstance(index, slice):
        if index.step is not None and index.step <= 0:
            return torch.tensor(list(range(n)[index]), dtype=torch.long)
        return index
    if isinstance(index, (tuple, str, bytes)) or not isinstance(
        index, (Sequence, Tensor, np.ndarray)
    ):
        raise CAMInputError(f"{what}; got {type(index).__name__} {index!r}")
    rows = _index_tensor(index, what)
    if rows.dtype == torch.bool:
        if rows.numel() != n:
            raise CAMInputError(f"the mask has {rows.numel()} entries for {n} images; {what}")
        return rows.nonzero().flatten()
    if rows.numel() and not bool(((rows >= -n) & (rows < n)).all()):
        raise CAMInputError(f"image indices {rows.tolist()} are out of range; {what}")
    return rows % max(n, 1)


def _pick(items: tuple[Any, ...], rows: Union[slice, Tensor]) -> tuple[Any, ...]:
    return items[rows] if isinstance(rows, slice) else tuple(items[int(i)] for i in rows)


def _index_tensor(index: Any, what: str) -> Tensor:
    """A list / array / tensor index as a 1-D bool or int64 tensor (on the CPU for lists)."""
    if isinstance(index, Tensor):
        rows = index
    else:
        values = list(index)
        if values and all(isinstance(v, (bool, np.bool_)) for v in values):
            rows = torch.tensor([bool(v) for v in values], dtype=torch.bool)
        else:
            ints = [_as_int(v) for v in values]
            if any(v is None for v in ints):
                raise CAMInputError(f"{what}; got {index!r}")
            rows = torch.tensor(ints, dtype=torch.long)
    if rows.dim() != 1:
        raise CAMInputError(f"{what}; got an index of shape {tuple(rows.shape)}")
    if rows.dtype == torch.bool:
        return rows
    if rows.is_floating_point() or rows.is_complex():
        raise CAMInputError(f"{what}; got a {rows.dtype} index")
    return rows.long()


def _on(rows: Union[slice, Tensor], ref: Tensor) -> Union[slice, Tensor]:
    return rows.to(ref.device) if isinstance(rows, Tensor) else rows
