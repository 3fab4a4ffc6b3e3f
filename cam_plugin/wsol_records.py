"""Per-sample WSOL records keyed by sample id: the bookkeeping of ``WSOLMetrics``.

A :class:`RecordStore` holds named columns of per-sample rows (numpy arrays, row ``i`` of
every column belongs to the ``i``-th recorded sample) and the ids of the recorded samples,
in recording order. One rule, for batches and for merged states alike: **a sample id that is
already recorded is skipped, and within one batch the first occurrence wins.** So the
repeats a ``DistributedSampler`` pads the last batch with, or a sample seen by two ranks,
count once.

The metric keeps two stores (box records, mask records) with the same rule; a store's
:meth:`~RecordStore.state` is part of the metric's picklable state, under the store's own
key names.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import CAMInputError

__all__ = ["RecordStore"]


class RecordStore:
    """Columns of per-sample records, deduplicated by sample id.

    Args:
        ids_key: the key of the sample ids in :meth:`state` (e.g. ``"box_ids"``).
        columns: ``name -> (row shape, dtype)`` of each column, e.g.
            ``{"hist_true": ((T + 2,), np.int64)}``; a column's rows are arrays of the row
            shape (``()`` for one number per sample).
    """

    def __init__(self, ids_key: str, columns: Mapping[str, tuple[tuple[int, ...], Any]]) -> None:
        self.ids_key = ids_key
        self.columns = {name: (tuple(shape), dtype) for name, (shape, dtype) in columns.items()}
        self.reset()

    def reset(self) -> None:
        """Forget every record."""
        self._ids: dict[Hashable, None] = {}  # insertion-ordered set
        self._chunks: dict[str, list[np.ndarray]] = {name: [] for name in self.columns}

    def __len__(self) -> int:
        """Number of distinct samples recorded."""
        return len(self._ids)

    @property
    def ids(self) -> list[Hashable]:
        """The recorded sample ids, in recording order (row order of every column)."""
        return list(self._ids)

    def new_rows(self, ids: Sequence[Hashable]) -> list[int]:
        """Indices into ``ids`` of the samples not recorded yet (first occurrence only)."""
        rows: list[int] = []
        batch_seen: set[Hashable] = set()
        for i, s in enumerate(ids):
            if s in self._ids or s in batch_seen:
                continue
            batch_seen.add(s)
            rows.append(i)
        return rows

    def record(
        self,
        ids: Sequence[Hashable],
        compute: Callable[[list[int]], Mapping[str, np.ndarray]],
    ) -> int:
        """Record the samples of ``ids`` that are new.

        ``compute(rows)`` is called only when some are new, with their indices into ``ids``,
        and returns every column's values for exactly those samples (``len(rows)`` rows
        each). Returns how many samples were recorded.
        """
        rows = self.new_rows(ids)
        if not rows:
            return 0
        values = compute(rows)
        if set(values) != set(self.columns):
            raise CAMInputError(
                f"record needs the columns {sorted(self.columns)}, got {sorted(values)}."
            )
        for name, value in values.items():
            if len(value) != len(rows):
                raise CAMInputError(
                    f"column {name!r} has {len(value)} rows for {len(rows)} new samples."
                )
            self._chunks[name].append(value)
        for i in rows:
            self._ids[ids[i]] = None
        return len(rows)

    def column(self, name: str) -> np.ndarray:
        """Every row of column ``name`` in recording order, ``(n, *row_shape)`` of its dtype
        (``(0, *row_shape)`` when nothing is recorded)."""
        shape, dtype = self.columns[name]
        chunks = self._chunks[name]
        if not chunks:
            return np.zeros((0, *shape), dtype=dtype)
        return np.concatenate(chunks).astype(dtype, copy=False)

    def state(self) -> dict[str, Any]:
        """``{ids_key: [ids...], column: array, ...}``: picklable, for :meth:`merge_state`."""
        return {self.ids_key: self.ids, **{name: self.column(name) for name in self.columns}}

    def merge_state(self, state: Mapping[str, Any]) -> int:
        """Record the samples of another store's :meth:`state` that are new here (the same
        rule as a batch: known ids are skipped). Returns how many were recorded."""
        missing = [k for k in (self.ids_key, *self.columns) if k not in state]
        if missing:
            raise CAMInputError(
                f"the state lacks {missing}; merge states produced by the same metric's state()."
            )
        ids = list(state[self.ids_key])
        return self.record(
            ids, lambda rows: {name: np.asarray(state[name])[rows] for name in self.columns}
        )
