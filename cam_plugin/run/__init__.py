"""Data-set runs: ``cam-plugin run`` and ``cam-plugin evaluate``.

The parts, one concept each: :mod:`.datasets` (what ``--data`` names), :mod:`.compute` (one
batch: logits, maps, boxes), :mod:`.shards` (index shards, atomic commits, the run's
identity), :mod:`.outputs` (the files, their merge and readers), :mod:`.engines` (one
process, torchrun, Ray), :mod:`.runner` (the loop), :mod:`.evaluate` (WSOL metrics from the
saved maps). Importing this package imports none of pyarrow, zarr or ray: they load when a
run writes or reads its files (``pip install 'cam-plugin[run]'``, ``'cam-plugin[ray]'``).

Reading a run back (see ``docs/runs.md``)::

    from cam_plugin.run import read_manifest, read_maps, maps_on_image, run_placement
    table = read_manifest("out")                 # pyarrow.Table, one row per image
    row = table.slice(0, 1).to_pylist()[0]
    maps = read_maps("out", row)                 # (k, h, w) float32, feature resolution
    on_image = maps_on_image(maps, row, run_placement("out"))   # (k, h0, w0)
"""

from __future__ import annotations

from .outputs import (
    image_placement,
    maps_on_image,
    pixel_box_to_original,
    read_manifest,
    read_maps,
    run_placement,
)

__all__ = [
    "image_placement",
    "maps_on_image",
    "pixel_box_to_original",
    "read_manifest",
    "read_maps",
    "run_placement",
]
