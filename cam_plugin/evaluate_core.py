"""What every faithfulness metric of :mod:`cam_plugin.evaluate` shares.

* **Inputs** (:func:`map_batch`): images ``(B, C, H, W)``, maps ``(B, k, h, w)`` or
  ``(B, h, w)`` (any method's: CAM, Grad-CAM, Captum, a baseline) or a
  :class:`~cam_plugin.CAMResult`, and the class of every map (``(B,)`` or ``(B, k)``; by
  default the result's classes, or the model's top-1 class). Maps at another resolution are
  resized to the image with ``F.interpolate(..., "bilinear", align_corners=False)``; a
  CAMResult's padding maps (class ``-1``) are left out. The ``N`` maps of a batch are
  flattened in row-major order (image, then map).
* **Scores** (:func:`class_scores`): the score of a map's class in the model's output is
  its softmax probability (``score="probability"``, the default, as RISE, the Grad-CAM++
  paper and torchcam use) or its logit (``"logit"``). The model's output is its logits
  ``(B, C)`` (a tensor, or the first tensor of a tuple / list, or an object's ``.logits``).
* **Forwards** run under :func:`cam_plugin.probing.untouched` (eval mode, no grad, the RNG
  forked; the model's training flags restored) and perturbed images go through the model in
  chunks of at most ``max_batch`` images (:func:`scores_in_chunks`), built chunk by chunk on
  the images' device.
* **Records** (:class:`FaithfulnessMetric`): one row per map, keyed by ``(sample id, class)``
  in a :class:`~cam_plugin.wsol_records.RecordStore` -- the rule of
  :class:`~cam_plugin.metrics.WSOLMetrics`: a key already recorded is skipped (and not
  computed again), states from several processes merge. Without ``sample_ids`` every image
  gets a fresh id. :meth:`FaithfulnessMetric.sample_states` splits the records by sample
  (for collectors that expect one result per sample, such as mmengine's).
* **One-shot functions** (``deletion_insertion``, ``road``, ...) are :func:`one_shot`: the
  metric built with the options, one ``update``, its ``result()``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_images
from .errors import CAMInputError
from .probing import first_tensor
from .result import CAMResult, minmax_normalize
from .wsol_inputs import check_sample_ids
from .wsol_records import RecordStore

__all__ = [
    "EvalResult",
    "FaithfulnessMetric",
    "MapBatch",
    "Score",
    "check_choice",
    "check_positive_int",
    "checked_images",
    "class_scores",
    "map_batch",
    "model_logits",
    "one_shot",
    "scores_in_chunks",
]

Score = Literal["probability", "logit"]
MapsLike = Union[Tensor, CAMResult]
ClassesLike = Union[Tensor, np.ndarray, Sequence[int], Sequence[Sequence[int]], int, None]


class EvalResult(NamedTuple):
    """What a one-shot metric returns: ``records`` (``{"keys": [(sample id, class), ...],
    column: array (N, ...)}``, one row per map) and ``summary`` (name -> float)."""

    records: dict[str, Any]
    summary: dict[str, float]


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a :class:`CAMInputError` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise CAMInputError(f"{name} must be one of {tuple(choices)}, got {value!r}.")
    return value


def check_positive_int(value: object, name: str) -> int:
    """``value`` as an int ``>= 1`` (not a bool), else a :class:`CAMInputError`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise CAMInputError(f"{name} must be an int >= 1, got {value!r}.")
    return int(value)


# --------------------------------------------------------------------------- the model


def model_logits(model: nn.Module, x: Tensor) -> Tensor:
    """The model's logits ``(n, C)`` for the input ``x``: its output when that is a tensor,
    the first tensor of a tuple / list, or ``output.logits``.

    Raises:
        CAMInputError: the output is none of these, or not two-dimensional.
    """
    out = model(x)
    logits = first_tensor(out)
    if logits is None and isinstance(getattr(out, "logits", None), Tensor):
        logits = out.logits
    if logits is None or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if logits is not None else type(out).__name__
        raise CAMInputError(
            f"the model must return class scores (B, C) (a tensor, a tuple starting with one, "
            f"or an object with .logits); got {shape} for a batch of {x.shape[0]}."
        )
    return logits


def class_scores(logits: Tensor, classes: Tensor, score: str) -> Tensor:
    """The score of ``classes[i]`` in row ``i`` of ``logits``: the softmax probability
    (``"probability"``, computed in float32 or wider) or the logit (``"logit"``)."""
    values = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    if score == "probability":
        values = values.softmax(dim=1)
    return values.gather(1, classes.view(-1, 1).to(values.device)).view(-1)


def scores_in_chunks(
    model: nn.Module,
    n: int,
    build: Callable[[int, int], Tensor],
    classes: Tensor,
    score: str,
    max_batch: int,
) -> Tensor:
    """Class scores of ``n`` inputs built ``max_batch`` at a time.

    ``build(start, stop)`` returns the inputs ``start .. stop - 1`` as one batch; input ``i``
    is scored for ``classes[i]``. Call it inside :func:`cam_plugin.probing.untouched`.

    Returns:
        ``(n,)`` scores (float32 or wider) on the inputs' device.
    """
    parts = []
    for start in range(0, n, max_batch):
        stop = min(n, start + max_batch)
        logits = model_logits(model, build(start, stop))
        parts.append(class_scores(logits, classes[start:stop], score))
    if not parts:
        return torch.zeros(0, device=classes.device)
    return torch.cat(parts)


# --------------------------------------------------------------------------- inputs


def checked_images(images: Tensor, model: Optional[nn.Module]) -> Tensor:
    """``images`` if they are a float ``(B, C, H, W)`` batch without NaN / inf (on the
    model's device and dtype when ``model`` is given), else a clear error before any forward
    (:func:`cam_plugin.cam.check_images`)."""
    images = check_images(images, None, model=model)
    if images.dim() != 4:
        raise CAMInputError(f"images must be (B, C, H, W); got {tuple(images.shape)}.")
    return images


class MapBatch(NamedTuple):
    """One batch of maps, flattened to one row per (image, map).

    Attributes:
        images: ``(B, C, H, W)`` the images.
        maps: ``(N, H, W)`` float maps at image resolution on the images' device.
        image: ``(N,)`` int64: the image of each map.
        classes: ``(N,)`` int64: the class each map explains.
        keys: ``N`` record keys ``(sample id, class)``.
    """

    images: Tensor
    maps: Tensor
    image: Tensor
    classes: Tensor
    keys: list[Hashable]


def _class_grid(classes: ClassesLike, b: int, k: int, device: torch.device) -> Optional[Tensor]:
    """``classes`` as int64 ``(B, k)`` (``(B,)`` and a scalar broadcast), or ``None``."""
    if classes is None:
        return None
    try:
        grid = torch.as_tensor(np.asarray(classes) if not isinstance(classes, Tensor) else classes)
    except (TypeError, ValueError) as exc:
        raise CAMInputError("classes must be int class ids: (B,), (B, k) or one int.") from exc
    if grid.is_floating_point() or grid.dtype == torch.bool or grid.is_complex():
        raise CAMInputError(f"classes must hold integer class ids, got dtype {grid.dtype}.")
    grid = grid.to(device=device, dtype=torch.int64)
    if grid.dim() == 0:
        grid = grid.expand(b)
    if grid.dim() == 1 and grid.shape[0] == b:
        grid = grid.view(b, 1).expand(b, k)
    if tuple(grid.shape) != (b, k):
        raise CAMInputError(
            f"classes must be (B,) or (B, k) = ({b}, {k}), one class per map; got "
            f"{tuple(grid.shape)}."
        )
    return grid


def map_batch(
    images: Tensor,
    maps: MapsLike,
    classes: ClassesLike,
    keys_for: Callable[[int], list[Hashable]],
    *,
    logits: Optional[Tensor] = None,
    normalize: bool = False,
) -> MapBatch:
    """Check and flatten one batch (see the module notes).

    Args:
        images: ``(B, C, H, W)``, already checked by :func:`checked_images`.
        maps: ``(B, k, h, w)`` / ``(B, h, w)`` float tensor or a :class:`CAMResult`.
        classes: the class of each map, ``(B,)`` / ``(B, k)`` / one int; ``None``: the
            result's classes, else the top-1 class of ``logits``.
        keys_for: ``b -> b`` sample ids (the metric's own, or the caller's, checked).
        logits: the model's ``(B, C)`` logits for ``images`` (to default the class, and to
            check the class range).
        normalize: min-max normalize each map after resizing (``CAMResult.normalize``).
    """
    b, _, h, w = images.shape
    result_classes = None
    if isinstance(maps, CAMResult):
        result_classes = maps.classes
        maps = maps.maps
    if not isinstance(maps, Tensor) or not maps.is_floating_point():
        raise CAMInputError(
            "maps must be a float tensor (B, k, h, w) or (B, h, w), or a CAMResult."
        )
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    if maps.dim() != 4 or maps.shape[0] != b or 0 in maps.shape:
        raise CAMInputError(
            f"maps must be (B, k, h, w) or (B, h, w) with B = {b} (one row per image); got "
            f"{tuple(maps.shape)}."
        )
    k = maps.shape[1]
    maps = maps.detach().to(images.device)
    if not bool(torch.isfinite(maps).all()):
        raise CAMInputError("maps contain NaN or inf; fix them (or drop those images) first.")
    grid = _class_grid(classes, b, k, images.device)
    if grid is None and result_classes is not None:
        grid = result_classes.to(images.device, torch.int64)
    if grid is None:
        if logits is None or k != 1:
            raise CAMInputError("give the class of every map (classes=...): (B,) or (B, k).")
        grid = logits.argmax(dim=1).view(b, 1)
    valid = grid >= 0 if result_classes is not None else torch.ones_like(grid, dtype=torch.bool)
    if logits is not None and bool(
        (grid[valid] >= logits.shape[1]).any() | (grid[valid] < 0).any()
    ):
        raise CAMInputError(f"classes must be in 0..{logits.shape[1] - 1} (the model's classes).")
    if maps.shape[-2:] != (h, w):
        maps = F.interpolate(maps.float(), size=(h, w), mode="bilinear", align_corners=False)
    if normalize:
        maps = minmax_normalize(maps)
    rows = valid.view(-1).nonzero().view(-1)
    image = torch.arange(b, device=images.device).repeat_interleave(k)[rows]
    flat_classes = grid.reshape(-1)[rows]
    ids = keys_for(b)
    keys: list[Hashable] = [(ids[i], c) for i, c in zip(image.tolist(), flat_classes.tolist())]
    return MapBatch(images, maps.reshape(b * k, h, w)[rows], image, flat_classes, keys)


# --------------------------------------------------------------------------- records


def _rows_of(state: Mapping[str, Any], names: list[str]) -> Callable[[list[int]], dict[str, Any]]:
    """``rows -> {name: state[name][rows]}``: the values of a merged state's new rows."""
    return lambda rows: {n: np.asarray(state[n])[rows] for n in names}


class FaithfulnessMetric:
    """Per-map records keyed by ``(sample id, class)``, mergeable, with a summary.

    Subclasses define :attr:`format` (the state's tag), :meth:`config` (the settings that
    records depend on), :meth:`summarize` (columns -> name -> float) and an ``update`` that
    calls :meth:`_record`; optionally :meth:`derived` (columns computed from the stored ones
    for :meth:`records`). Column shapes may depend on the data (a curve's length); they are
    fixed by the first recorded batch and travel with :meth:`state`.
    """

    format: ClassVar[str] = "cam_plugin.FaithfulnessMetric/1"

    def __init__(self) -> None:
        self._uid = uuid.uuid4().hex
        self.reset()

    def reset(self) -> None:
        """Forget every record."""
        self._auto = 0
        self._store: Optional[RecordStore] = None

    def __len__(self) -> int:
        """Number of distinct (sample id, class) records."""
        return 0 if self._store is None else len(self._store)

    def config(self) -> dict[str, Any]:
        """The settings that records depend on (states merge only with equal configs)."""
        return {}

    def summarize(self, columns: Mapping[str, np.ndarray]) -> dict[str, float]:
        """The summary of the records' columns."""
        raise NotImplementedError

    def derived(self, columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-record columns computed from the stored ones (none by default)."""
        return {}

    def sample_keys(self, sample_ids: object) -> Callable[[int], list[Hashable]]:
        """``b -> `` the ``b`` sample ids of a batch: ``sample_ids`` checked, or fresh ids."""

        def ids(b: int) -> list[Hashable]:
            if sample_ids is not None:
                return check_sample_ids(sample_ids, b)
            fresh: list[Hashable] = [("auto", self._uid, self._auto + i) for i in range(b)]
            self._auto += b
            return fresh

        return ids

    def _record(
        self,
        keys: Sequence[Hashable],
        columns: Mapping[str, tuple[tuple[int, ...], Any]],
        compute: Callable[[list[int]], Mapping[str, np.ndarray]],
    ) -> int:
        """Record the rows of ``keys`` not recorded yet; ``compute(rows)`` runs only for
        those (see :meth:`RecordStore.record`). Returns how many were recorded."""
        spec = {name: (tuple(shape), np.dtype(dtype)) for name, (shape, dtype) in columns.items()}
        if self._store is None:
            self._store = RecordStore("keys", spec)
        elif {n: (s, np.dtype(d)) for n, (s, d) in self._store.columns.items()} != spec:
            raise CAMInputError(
                "this batch's records have other shapes than the recorded ones (e.g. a "
                "different image size changes a curve's length); use one metric per size."
            )
        return self._store.record(keys, compute)

    def records(self) -> dict[str, Any]:
        """``{"keys": [...], column: array (n, ...)}``: every record, in recording order,
        stored and derived columns."""
        if self._store is None:
            return {"keys": []}
        columns = {name: self._store.column(name) for name in self._store.columns}
        return {"keys": self._store.ids, **columns, **self.derived(columns)}

    def compute(self) -> dict[str, float]:
        """The summary over every record."""
        if self._store is None or not len(self._store):
            raise CAMInputError("nothing to compute: call update(...) with at least one batch.")
        columns = {name: self._store.column(name) for name in self._store.columns}
        return self.summarize(columns)

    def result(self) -> EvalResult:
        """``EvalResult(records(), compute())``."""
        return EvalResult(self.records(), self.compute())

    def state(self) -> dict[str, Any]:
        """A picklable snapshot: format, config, column shapes and every record."""
        spec = {} if self._store is None else dict(self._store.columns)
        body = {} if self._store is None else self._store.state()
        columns = {n: (list(s), np.dtype(d).str) for n, (s, d) in spec.items()}
        return {"format": self.format, "config": self.config(), "columns": columns, **body}

    def sample_states(self) -> list[tuple[Hashable, dict[str, Any]]]:
        """``[(sample id, state), ...]``: one :meth:`state` per recorded sample id, holding
        the records of that sample's maps (keys ``(sample id, class)``), in recording order.

        For collectors that expect one result per sample (mmengine's ``collect_results``
        drops a distributed sampler's padding by count); :meth:`merge` of all of them equals
        :meth:`merge` of the whole :meth:`state`."""
        if self._store is None:
            return []
        whole = self.state()
        groups: dict[Hashable, list[int]] = {}
        for row, key in enumerate(whole["keys"]):
            groups.setdefault(key[0], []).append(row)
        head = {k: whole[k] for k in ("format", "config", "columns")}
        out = []
        for sid, rows in groups.items():
            body = {n: np.asarray(whole[n])[rows] for n in whole["columns"]}
            out.append((sid, {**head, "keys": [whole["keys"][r] for r in rows], **body}))
        return out

    def merge(self, states: Union[Mapping[str, Any], Iterable[Mapping[str, Any]]]) -> None:
        """Add the records of other states (e.g. one per rank); known keys are skipped."""
        items = [states] if isinstance(states, Mapping) else list(states)
        for st in items:
            if not isinstance(st, Mapping) or st.get("format") != self.format:
                raise TypeError(f"merge expects states produced by {type(self).__name__}.state().")
            if st["config"] != self.config():
                diff = sorted(k for k in self.config() if st["config"].get(k) != self.config()[k])
                raise CAMInputError(f"cannot merge a state with a different config: {diff}.")
        for st in items:
            if not st["columns"]:
                continue
            spec = {n: (tuple(s), np.dtype(d)) for n, (s, d) in st["columns"].items()}
            self._record(list(st["keys"]), spec, _rows_of(st, list(spec)))


def one_shot(
    metric_type: type[FaithfulnessMetric],
    *args: Any,
    update_keywords: Sequence[str] = (),
    **options: Any,
) -> EvalResult:
    """What every one-shot function of :mod:`cam_plugin.evaluate` does: build
    ``metric_type`` with the ``options`` (its settings), call ``update(*args, **keywords)``
    once -- ``keywords`` are the ``options`` named in ``update_keywords`` (e.g. ``classes``),
    taken out of the settings -- and return :meth:`FaithfulnessMetric.result`."""
    keywords = {k: options.pop(k) for k in update_keywords if k in options}
    metric = metric_type(**options)
    update: Callable[..., None] = getattr(metric, "update")  # noqa: B009 (each metric's own)
    update(*args, **keywords)
    return metric.result()
