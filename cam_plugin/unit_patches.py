"""Per-unit top patches over a data set (Zhou et al., CVPR 2016, Sec. 5): where each unit fires.

A *unit* is a map that one key names: channel ``k``'s unit map ``u_k`` (the features as the
folded head sees them, :func:`cam_plugin.units.unit_maps`, so that ``M_c = Σ_k W'_ck u_k``),
or the class map ``M_c`` of a :class:`~cam_plugin.CAMResult`. Image ``i`` offers each unit
its strongest cell

    a_ik = max_{y,x} u_k(i; y, x),        (y*, x*) = argmax_{y,x} u_k(i; y, x)

and :class:`UnitPatchCollector` keeps, for every tracked unit, the ``N`` images with the
largest ``a_ik`` seen so far (one patch per image; equal activations go to the lower sample
id). Each batch is merged with two stable sorts over a ``(U, N + B)`` table -- no Python loop
over images or units -- and two collectors (other processes, other shards of a run) merge the
same way, so the result does not depend on how the data was split or ordered.

Where a patch is: cell ``(y*, x*)`` is centred on input pixel ``c = o + s · (y*, x*)`` (the
traced :class:`~cam_plugin.placement.Placement`). The patch is the square of ``span`` cells
around it: ``L = max(1, round(span · s))`` pixels per axis, first pixel
``round(c + 0.5 − L / 2)``, i.e. the box ``[x0, y0, x0 + L_x, y0 + L_y]`` in continuous
input coordinates (pixel ``i`` covers ``[i, i + 1)``); parts outside the image are filled
with grey. On the original picture that the preprocessing resized by ``scale`` and cropped
at ``(left, top)`` the box is ``(v + left) / scale`` per x edge, ``(v + top) / scale`` per y
edge (:func:`box_to_original`), and :func:`crop_picture` cuts it from the original at full
resolution.

    collector = UnitPatchCollector(units=[12, 40], per_unit=8, placement=placement)
    for images, pictures, ids in loader:            # pictures: (B, H, W, 3) uint8, as seen
        collector.update(unit_maps(head, features_of(images)), ids, pictures=pictures)
    collector.records()                             # UnitPatch per unit and rank, with crops
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .errors import CAMInputError
from .placement import Placement
from .preprocess import box_to_original
from .result import CAMResult
from .units import UnitResult, class_units

if TYPE_CHECKING:
    from .heads import FoldedHead

__all__ = [
    "UnitPatch",
    "UnitPatchCollector",
    "box_to_original",
    "class_picture",
    "crop_cells",
    "crop_picture",
    "patch_boxes",
    "patch_size",
]

#: grey for the parts of a patch outside the image
FILL = 128


@dataclass(frozen=True)
class UnitPatch:
    """One top patch of a unit.

    Attributes:
        unit: the unit (channel, or class for class maps).
        rank: 0 for the unit's strongest image.
        activation: ``a_ik``, the unit's largest value on that image.
        sample: the id the image was given with.
        cell: ``(row, col)`` of the strongest cell on the feature map.
        box: ``(x0, y0, x1, y1)`` the patch in continuous input pixels.
        crop: ``(L_y, L_x, 3)`` uint8 patch of the picture given to ``update`` (or ``None``).
    """

    unit: int
    rank: int
    activation: float
    sample: int
    cell: tuple[int, int]
    box: tuple[float, float, float, float]
    crop: Optional[np.ndarray] = None


def patch_size(placement: Placement, span: float) -> tuple[int, int]:
    """``(L_y, L_x)``: ``max(1, round(span · s))`` input pixels per axis."""
    return (max(1, round(span * placement.stride[0])), max(1, round(span * placement.stride[1])))


def _corners(cells: Tensor, placement: Placement, size: tuple[int, int]) -> Tensor:
    """``(n, 2)`` int64 ``(y0, x0)``: the first pixel of each cell's patch."""
    c = cells.to(torch.float64)
    cy = placement.offset[0] + placement.stride[0] * c[:, 0]
    cx = placement.offset[1] + placement.stride[1] * c[:, 1]
    y0 = torch.floor(cy + 1.0 - size[0] / 2)
    x0 = torch.floor(cx + 1.0 - size[1] / 2)
    return torch.stack([y0, x0], dim=1).long()


def patch_boxes(cells: Tensor, placement: Placement, span: float = 2.0) -> Tensor:
    """``(n, 4)`` float64 boxes ``(x0, y0, x1, y1)`` in continuous input pixels of the
    patches around ``(n, 2)`` cells ``(row, col)`` (module doc)."""
    size = patch_size(placement, span)
    corner = _corners(cells.reshape(-1, 2), placement, size).to(torch.float64)
    y0, x0 = corner[:, 0], corner[:, 1]
    return torch.stack([x0, y0, x0 + size[1], y0 + size[0]], dim=1)


def crop_cells(
    pictures: Tensor, batch: Tensor, cells: Tensor, placement: Placement, size: tuple[int, int]
) -> Tensor:
    """``(n, L_y, L_x, 3)`` uint8 patches of ``pictures`` ``(B, H, W, 3)``: patch ``j`` is cut
    from picture ``batch[j]`` around cell ``cells[j]`` (one gather for all; grey outside)."""
    b, h, w, ch = pictures.shape
    pad = max(size) + 1
    padded = torch.full((b, h + 2 * pad, w + 2 * pad, ch), FILL, dtype=torch.uint8)
    padded[:, pad : pad + h, pad : pad + w] = pictures
    corner = _corners(cells, placement, size)
    rows = (corner[:, :1] + torch.arange(size[0]) + pad).clamp(0, h + 2 * pad - 1)
    cols = (corner[:, 1:] + torch.arange(size[1]) + pad).clamp(0, w + 2 * pad - 1)
    return padded[batch[:, None, None], rows[:, :, None], cols[:, None, :]]


def crop_picture(
    picture: np.ndarray, box: Union[Sequence[float], np.ndarray], out: int = 96
) -> np.ndarray:
    """The continuous box ``(x0, y0, x1, y1)`` of an ``(H, W, 3)`` uint8 picture, resampled
    (bilinear) to ``out x out`` pixels; grey outside the picture."""
    from PIL import Image

    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise CAMInputError(f"box must have x1 > x0 and y1 > y0, got {tuple(box)}")
    im = Image.fromarray(np.ascontiguousarray(picture, dtype=np.uint8))
    cut = im.transform(
        (out, out),
        Image.Transform.EXTENT,
        (x0, y0, x1, y1),
        resample=Image.Resampling.BILINEAR,
        fillcolor=(FILL, FILL, FILL),
    )
    return np.asarray(cut)


def _as_ids(ids: Any, batch: int) -> Tensor:
    t = torch.as_tensor(ids).reshape(-1)
    if t.is_floating_point() or t.dtype == torch.bool or t.numel() != batch:
        raise CAMInputError(
            f"ids must be {batch} integer sample ids (one per image), got "
            f"{tuple(t.shape)} of {t.dtype}"
        )
    if batch and int(t.min()) < 0:
        raise CAMInputError("sample ids must be >= 0")
    return t.to(torch.long).cpu()


def _as_pictures(pictures: Any, batch: int) -> Tensor:
    """``(B, H, W, 3)`` uint8 from uint8 ``(B, H, W, 3)`` or floats in ``[0, 1]``
    ``(B, 3, H, W)`` / ``(B, H, W, 3)``."""
    t = torch.as_tensor(np.asarray(pictures) if not isinstance(pictures, Tensor) else pictures)
    t = t.detach().cpu()
    if t.dim() == 4 and t.shape[1] in (1, 3) and t.shape[-1] not in (1, 3):
        t = t.permute(0, 2, 3, 1)
    if t.dim() != 4 or t.shape[0] != batch or t.shape[-1] not in (1, 3):
        raise CAMInputError(
            f"pictures must be {batch} images (B, H, W, 3) or (B, 3, H, W), got {tuple(t.shape)}"
        )
    if t.dtype != torch.uint8:
        t = t.float()
        if t.numel() and (float(t.min()) < 0.0 or float(t.max()) > 1.0):
            raise CAMInputError(
                "float pictures must lie in [0, 1]: pass the pictures as a person sees them "
                "(uint8, or floats in [0, 1]), not the normalized model input"
            )
        t = (t * 255.0 + 0.5).to(torch.uint8)
    return t.expand(-1, -1, -1, 3).contiguous() if t.shape[-1] == 1 else t.contiguous()


def _entries(
    source: Any,
) -> tuple[Tensor, Optional[Tensor], Optional[Placement], Optional[tuple[int, int]]]:
    """``(B, m, h, w)`` maps, their ``(B, m)`` unit ids (``None``: the channels), and for a
    :class:`~cam_plugin.CAMResult` its placement and input size."""
    if isinstance(source, Tensor):
        if source.dim() != 4:
            raise CAMInputError(f"unit maps must be (B, K, h, w), got {tuple(source.shape)}")
        return source, None, None, None
    if isinstance(source, UnitResult):
        b = source.maps.shape[0]
        maps = source.maps.reshape(b, -1, *source.maps.shape[-2:])
        return maps, source.units.reshape(b, -1), None, None
    if isinstance(source, CAMResult):
        if source.maps.dim() != 4 or source.stage != "feature":
            raise CAMInputError("give a CAMResult at feature resolution (before upsample)")
        return source.maps, source.classes, source.find_placement(), source.input_size
    raise CAMInputError(
        f"update takes unit maps (B, K, h, w), a UnitResult or a CAMResult, got "
        f"{type(source).__name__}"
    )


def _order(values: Tensor, samples: Tensor, n: int) -> Tensor:
    """``(U, n)`` positions of the best ``n`` entries per row: activation descending, then
    sample id ascending (deterministic, whatever the order of the entries)."""
    by_sample = torch.sort(samples, dim=1, stable=True).indices
    v = values.gather(1, by_sample)
    by_value = torch.sort(v, dim=1, descending=True, stable=True).indices
    return by_sample.gather(1, by_value)[:, :n]


class UnitPatchCollector:
    """The ``per_unit`` strongest images of every tracked unit, streamed (module doc).

    Args:
        units: the unit ids to track; ``None``: every unit seen (all channels of a unit-map
            tensor, every unit / class of a result).
        per_unit: ``N``, patches kept per unit.
        placement: the feature cells' placement on the model input; default the result's
            (a :class:`~cam_plugin.CAMResult` knows it), else the half-pixel placement of
            ``input_size`` (or the pictures' size).
        input_size: ``(H, W)`` of the model input (when no pictures are given).
        span: patch side in feature cells.

    Attributes:
        by_class: for :meth:`for_classes`, each class's units (ranked by ``W'_ck``).
    """

    def __init__(
        self,
        units: Optional[Union[Sequence[int], Tensor]] = None,
        *,
        per_unit: int = 8,
        placement: Optional[Placement] = None,
        input_size: Optional[Sequence[int]] = None,
        span: float = 2.0,
    ) -> None:
        if isinstance(per_unit, bool) or not isinstance(per_unit, int) or per_unit < 1:
            raise CAMInputError(f"per_unit must be a positive int, got {per_unit!r}")
        if not span > 0:
            raise CAMInputError(f"span must be > 0 (feature cells), got {span!r}")
        if placement is not None and not isinstance(placement, Placement):
            raise CAMInputError(f"placement must be a Placement, got {type(placement).__name__}")
        self.per_unit, self.span, self.placement = per_unit, float(span), placement
        self.input_size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        self.map_size: Optional[tuple[int, int]] = None
        self.keys = torch.zeros(0, dtype=torch.long)
        self.fixed = units is not None
        self.values = torch.zeros(0, per_unit)
        self.samples = torch.zeros(0, per_unit, dtype=torch.long)
        self.cells = torch.zeros(0, per_unit, 2, dtype=torch.long)
        self.crops: Optional[Tensor] = None
        self.with_crops: Optional[bool] = None
        self.by_class: dict[int, list[int]] = {}
        if units is not None:
            keys = torch.as_tensor(units, dtype=torch.long).reshape(-1)
            if keys.numel() == 0 or int(keys.min()) < 0:
                raise CAMInputError(f"units must be unit indices >= 0, got {keys.tolist()}")
            self._grow(torch.tensor(list(dict.fromkeys(keys.tolist())), dtype=torch.long))

    @classmethod
    def for_classes(
        cls, head: FoldedHead, classes: Sequence[int], *, top: int = 5, **options: Any
    ) -> UnitPatchCollector:
        """A collector of the ``top`` units of each class, ranked by ``W'_ck``
        (:func:`cam_plugin.units.class_units`; ``by_class`` keeps the ranking)."""
        table = class_units(head, classes, top=top)
        collector = cls(torch.unique(table), **options)
        collector.by_class = {int(c): row.tolist() for c, row in zip(classes, table)}
        return collector

    # -- state -----------------------------------------------------------------------------
    def _grow(self, new: Tensor) -> None:
        """Track ``new`` unit ids (not yet tracked) with empty slots."""
        new = new[~torch.isin(new, self.keys)]
        if new.numel() == 0:
            return
        n, per = int(new.numel()), self.per_unit
        self.keys = torch.cat([self.keys, new])
        self.values = torch.cat([self.values, torch.full((n, per), -torch.inf)])
        self.samples = torch.cat([self.samples, torch.full((n, per), -1, dtype=torch.long)])
        self.cells = torch.cat([self.cells, torch.zeros(n, per, 2, dtype=torch.long)])
        if self.crops is not None:
            empty = torch.full((n, per, *self.crops.shape[2:]), FILL, dtype=torch.uint8)
            self.crops = torch.cat([self.crops, empty])

    def _columns(self, ids: Tensor) -> Tensor:
        """Position of every unit id in :attr:`keys` (``-1``: not tracked)."""
        match = ids[..., None] == self.keys
        return torch.where(match.any(-1), match.long().argmax(-1), torch.full_like(ids, -1))

    def _layout(self) -> tuple[Placement, tuple[int, int]]:
        """The placement (given, found, or half-pixel) and the patch size."""
        if self.placement is None:
            if self.input_size is None or self.map_size is None:
                raise CAMInputError(
                    "the patches' place on the image is unknown: pass placement= (e.g. "
                    "cam_plugin.tracing.feature_placement(model, (3, H, W))), input_size=, "
                    "or pictures to update()"
                )
            self.placement = Placement.half_pixel(self.input_size, self.map_size)
        return self.placement, patch_size(self.placement, self.span)

    # -- feeding -----------------------------------------------------------------------------
    def update(self, source: Any, ids: Any, *, pictures: Any = None) -> None:
        """Offer one batch: ``source`` is ``(B, K, h, w)`` unit maps (unit = channel), a
        :class:`~cam_plugin.units.UnitResult` or a :class:`~cam_plugin.CAMResult` (unit =
        class); ``ids`` one integer sample id per image; ``pictures`` the images as a person
        sees them at the model's input size (crops are then kept; give them on every call
        or never)."""
        maps, unit_ids, placement, input_size = _entries(source)
        batch, hw = int(maps.shape[0]), (int(maps.shape[-2]), int(maps.shape[-1]))
        ids_t = _as_ids(ids, batch)
        if self.map_size not in (None, hw):
            raise CAMInputError(f"maps of size {hw} after maps of size {self.map_size}")
        if self.with_crops is not None and (pictures is not None) != self.with_crops:
            raise CAMInputError("give pictures to update() on every call or on none")
        pics = None if pictures is None else _as_pictures(pictures, batch)
        self.map_size, self.with_crops = hw, pics is not None
        self.placement = self.placement or placement
        self.input_size = self.input_size or input_size
        if pics is not None and self.input_size is None:
            self.input_size = (int(pics.shape[1]), int(pics.shape[2]))
        flat = maps.detach().flatten(2).float().cpu().nan_to_num(nan=-torch.inf)
        if unit_ids is None:
            if not self.fixed and len(self.keys) < flat.shape[1]:
                self._grow(torch.arange(flat.shape[1]))
            if len(self.keys) and int(self.keys.max()) >= flat.shape[1]:
                raise CAMInputError(f"units {self.keys.tolist()} beyond the {flat.shape[1]} maps")
            best, where = flat[:, self.keys].max(dim=2)  # (B, U)
        else:
            if not self.fixed:
                self._grow(torch.unique(unit_ids[unit_ids >= 0].cpu()))
            top, arg = flat.max(dim=2)  # (B, m)
            col = self._columns(unit_ids.cpu())
            ok = col >= 0
            rows = torch.arange(batch)[:, None].expand_as(col)
            best = torch.full((batch, len(self.keys)), -torch.inf)
            where = torch.zeros((batch, len(self.keys)), dtype=torch.long)
            best[rows[ok], col[ok]] = top[ok]
            where[rows[ok], col[ok]] = arg[ok]
        cells = torch.stack([where // hw[1], where % hw[1]], dim=-1).transpose(0, 1)  # (U, B, 2)
        order = self._keep(best.T, ids_t[None].expand(len(self.keys), -1), cells)
        if pics is not None:
            self._take_crops(order, pics)

    def _keep(self, values: Tensor, samples: Tensor, cells: Tensor) -> Tensor:
        """Append ``(U, m)`` candidates to the kept table and keep the best ``per_unit`` of
        every row; returns their positions in ``[kept | candidates]``."""
        samples = torch.where(values == -torch.inf, torch.full_like(samples, -1), samples)
        all_v = torch.cat([self.values, values], dim=1)
        all_s = torch.cat([self.samples, samples], dim=1)
        order = _order(all_v, all_s, self.per_unit)
        self.values, self.samples = all_v.gather(1, order), all_s.gather(1, order)
        all_c = torch.cat([self.cells, cells], dim=1)
        self.cells = all_c.gather(1, order[..., None].expand(-1, -1, 2))
        return order

    def _take_crops(self, order: Tensor, pics: Tensor) -> None:
        """Keep the crops of the winners: old ones gathered, new ones cut (one gather)."""
        placement, size = self._layout()
        n_old, units = self.per_unit, len(self.keys)
        if self.crops is None:
            self.crops = torch.full((units, n_old, *size, 3), FILL, dtype=torch.uint8)
        rows = torch.arange(units)[:, None].expand_as(order)
        out = self.crops[rows, order.clamp(max=n_old - 1)]
        new = (order >= n_old) & (self.samples >= 0)
        if bool(new.any()):
            u, slot = new.nonzero(as_tuple=True)
            out[u, slot] = crop_cells(
                pics, order[u, slot] - n_old, self.cells[u, slot], placement, size
            )
        self.crops = out

    # -- merging and saving -----------------------------------------------------------------
    def merge(self, other: UnitPatchCollector) -> UnitPatchCollector:
        """Fold ``other`` (another process's or shard's collector) into this one, in place;
        the result equals one collector fed both streams (each sample seen once)."""
        if other.per_unit != self.per_unit:
            raise CAMInputError(f"per_unit {other.per_unit} != {self.per_unit}")
        if None not in (self.map_size, other.map_size) and self.map_size != other.map_size:
            raise CAMInputError(f"map sizes differ: {self.map_size} and {other.map_size}")
        if self.with_crops is not None and other.with_crops not in (None, self.with_crops):
            raise CAMInputError("one collector kept crops and the other did not")
        self.map_size = self.map_size or other.map_size
        self.placement = self.placement or other.placement
        self.input_size = self.input_size or other.input_size
        if not self.fixed:
            self._grow(other.keys)
        col = self._columns(other.keys)
        ok = col >= 0
        per = self.per_unit
        values = torch.full_like(self.values, -torch.inf)
        samples = torch.full_like(self.samples, -1)
        cells = torch.zeros_like(self.cells)
        values[col[ok]], samples[col[ok]] = other.values[ok], other.samples[ok]
        cells[col[ok]] = other.cells[ok]
        old = self.crops
        if other.crops is not None and old is None:
            old = torch.full((len(self.keys), per, *other.crops.shape[2:]), FILL, dtype=torch.uint8)
        order = self._keep(values, samples, cells)
        if old is not None:
            theirs = torch.full_like(old, FILL)
            if other.crops is not None:
                theirs[col[ok]] = other.crops[ok]
            both = torch.cat([old, theirs], 1)
            rows = torch.arange(len(self.keys))[:, None].expand_as(order)
            self.crops = both[rows, order]
        self.with_crops = self.with_crops if self.with_crops is not None else other.with_crops
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything as numpy arrays (``np.savez``); :meth:`from_state` reads it back."""
        pl = self.placement
        state = {
            "keys": self.keys.numpy(),
            "values": self.values.numpy(),
            "samples": self.samples.numpy(),
            "cells": self.cells.numpy(),
            "options": np.asarray([self.per_unit, self.span, float(self.fixed)], np.float64),
            "map_size": np.asarray(self.map_size or (0, 0), np.int64),
            "input_size": np.asarray(self.input_size or (0, 0), np.int64),
            "placement": np.asarray(
                [*pl.stride, *pl.offset] if pl is not None else [np.nan] * 4, np.float64
            ),
        }
        if self.crops is not None:
            state["crops"] = self.crops.numpy()
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> UnitPatchCollector:
        """A collector from :meth:`state_dict` (or an ``np.load`` of its ``savez``)."""
        per, span, fixed = (float(v) for v in np.asarray(state["options"]))
        pl = np.asarray(state["placement"], np.float64)
        out = cls(
            per_unit=int(per),
            span=span,
            placement=None if np.isnan(pl).any() else Placement(tuple(pl[:2]), tuple(pl[2:])),
        )
        out.fixed = bool(fixed)
        out.keys = torch.as_tensor(np.asarray(state["keys"]), dtype=torch.long)
        out.values = torch.as_tensor(np.asarray(state["values"]), dtype=torch.float32)
        out.samples = torch.as_tensor(np.asarray(state["samples"]), dtype=torch.long)
        out.cells = torch.as_tensor(np.asarray(state["cells"]), dtype=torch.long)
        sizes = [tuple(int(v) for v in np.asarray(state[k])) for k in ("map_size", "input_size")]
        out.map_size = sizes[0] if sizes[0] != (0, 0) else None  # type: ignore[assignment]
        out.input_size = sizes[1] if sizes[1] != (0, 0) else None  # type: ignore[assignment]
        if "crops" in state:
            out.crops = torch.as_tensor(np.asarray(state["crops"]), dtype=torch.uint8)
            out.with_crops = True
        elif bool((out.samples >= 0).any()):
            out.with_crops = False
        return out

    # -- reading -----------------------------------------------------------------------------
    def table(self) -> dict[str, np.ndarray]:
        """One row per kept patch (columns ``unit``, ``rank``, ``activation``, ``sample``,
        ``row``, ``col``, ``box`` ``(n, 4)`` in continuous input pixels), units in
        :attr:`keys` order, best first."""
        keep = self.samples >= 0
        u, r = keep.nonzero(as_tuple=True)
        cells = self.cells[u, r]
        boxes = (
            patch_boxes(cells, self._layout()[0], self.span)
            if len(cells)
            else torch.zeros(0, 4, dtype=torch.float64)
        )
        return {
            "unit": self.keys[u].numpy(),
            "rank": r.numpy(),
            "activation": self.values[u, r].numpy(),
            "sample": self.samples[u, r].numpy(),
            "row": cells[:, 0].numpy(),
            "col": cells[:, 1].numpy(),
            "box": boxes.numpy(),
        }

    def records(self, unit: Optional[int] = None) -> list[UnitPatch]:
        """The kept patches (of one ``unit``, or of all), best first per unit."""
        t = self.table()
        rows = range(len(t["unit"]))
        pos = {int(k): i for i, k in enumerate(self.keys.tolist())}
        out = []
        for j in rows:
            if unit is not None and int(t["unit"][j]) != unit:
                continue
            crop = None
            if self.crops is not None:
                crop = self.crops[pos[int(t["unit"][j])], int(t["rank"][j])].numpy()
            out.append(
                UnitPatch(
                    unit=int(t["unit"][j]),
                    rank=int(t["rank"][j]),
                    activation=float(t["activation"][j]),
                    sample=int(t["sample"][j]),
                    cell=(int(t["row"][j]), int(t["col"][j])),
                    box=tuple(float(v) for v in t["box"][j]),  # type: ignore[arg-type]
                    crop=crop,
                )
            )
        if unit is not None and unit not in pos:
            raise CAMInputError(f"unit {unit} is not tracked (tracked: {sorted(pos)[:10]}...)")
        return out


def class_picture(
    collector: UnitPatchCollector,
    cls: int,
    *,
    head: Optional[FoldedHead] = None,
    title: Optional[str] = None,
    patch: int = 64,
    side: Any = None,
) -> np.ndarray:
    """The paper's Sec. 5 figure of class ``cls`` in one call: a row per unit of
    ``collector.by_class[cls]`` (:meth:`UnitPatchCollector.for_classes`), labelled with the
    unit and, given the ``head``, its weight ``W'_ck``, then its kept crops, best first
    (:func:`cam_plugin.viz.unit_patches_picture`; ``side``: e.g. the class's CAM overlay).

    Needs a collector fed with ``pictures=``; to cut the patches from the original images
    instead, use :func:`box_to_original` and :func:`crop_picture` on :meth:`records`.
    """
    from .viz import unit_patches_picture

    if cls not in collector.by_class:
        raise CAMInputError(
            f"class {cls} has no units in this collector (built for "
            f"{sorted(collector.by_class)}): use UnitPatchCollector.for_classes"
        )
    if collector.crops is None:
        raise CAMInputError("no crops kept: give pictures= to update(), or cut them yourself")
    rows = []
    for u in collector.by_class[cls]:
        label = f"unit {u}"
        if head is not None:
            label += f"\nw = {float(head.weight[cls, u]):.3g}"
        rows.append((label, [p.crop for p in collector.records(u) if p.crop is not None]))
    return unit_patches_picture(title or f"class {cls}", rows, patch=patch, side=side)
