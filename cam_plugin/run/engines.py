"""Where a run's shards are processed: one process, torchrun ranks, or Ray actors.

* ``local`` (default): this process does every pending shard.
* ``torchrun`` (chosen automatically when ``WORLD_SIZE > 1``, as ``torchrun
  --nproc-per-node N -m cam_plugin run ...`` sets it; multi-node runs need ``--out`` on a
  shared file system): the process group is created with ``gloo`` on the CPU or ``nccl``
  for ``--device cuda`` (rank ``r`` then uses ``cuda:LOCAL_RANK``). Rank 0 checks the
  run's identity and lists the pending shards; rank ``r`` takes ``pending[r::world]``;
  after a barrier rank 0 merges the small files. The shards are the same in every engine,
  and so are their files.
* ``ray`` (``--engine ray``, ``pip install 'cam-plugin[ray]'``): the pending shard ids
  become a Ray Data data set; ``map_batches`` with :class:`ShardActor` (one model per
  actor, ``--concurrency`` actors, ``--num-gpus`` each) processes one shard per call and
  writes it exactly as the other engines do. ``--ray-address`` joins a cluster (default:
  a local one).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from typing import Any, Optional

import torch

from ..errors import CAMInputError

__all__ = ["ENGINES", "Group", "ShardActor", "open_group", "run_on_ray"]

ENGINES = ("auto", "local", "torchrun", "ray")


class Group:
    """The processes of a run: ``rank``, ``world`` and the few collectives the runner
    needs (all no-ops for one process)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.distributed = False
        self.engine = "torchrun" if world > 1 else "local"

    @property
    def is_main(self) -> bool:
        """Rank 0."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.distributed:
            torch.distributed.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, by rank (on every rank)."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def close(self) -> None:
        """Leave the process group (if this object created it)."""
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.distributed = False


def open_group(engine: str, device: str) -> Group:
    """The :class:`Group` of ``engine`` (``auto``: torchrun when ``WORLD_SIZE > 1``)."""
    if engine not in ENGINES:
        raise CAMInputError(f"--engine must be one of {', '.join(ENGINES)}, got {engine}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if engine == "auto":
        engine = "torchrun" if world > 1 else "local"
    if engine != "torchrun":
        return Group()
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise CAMInputError(
            "--engine torchrun needs the environment torchrun sets (RANK, WORLD_SIZE, "
            "MASTER_ADDR): start it as torchrun --nproc-per-node N -m cam_plugin run ..."
        )
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    group = Group(rank, world, local)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(hours=24))
        group.distributed = True
    return group


class ShardActor:
    """A Ray Data actor: builds the run (data, model, its CAM) once, then processes the
    shard ids of each batch it is given and returns their completion markers."""

    def __init__(self, options: Any) -> None:
        from .runner import RunContext

        self.context = RunContext(options)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        shards = [int(s) for s in batch["shard"]]
        markers = self.context.process(shards, progress=None)
        return {
            "shard": [m["shard"] for m in markers],
            "images": [m["images"] for m in markers],
            "failed": [m["failed"] for m in markers],
        }


def run_on_ray(
    options: Any,
    shards: list[int],
    *,
    address: Optional[str],
    concurrency: int,
    num_gpus: float,
    progress: Optional[Callable[[int], None]] = None,
) -> int:
    """Process ``shards`` with Ray Data (module doc); returns how many images were done."""
    from .outputs import require

    ray = require("ray", extra="ray")
    require("ray.data", extra="ray")
    if not shards:
        return 0
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if address:
            kwargs["address"] = address
        ray.init(**kwargs)
        started = True
    try:
        ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
        ray.data.DataContext.get_current().enable_progress_bars = False
        done = ds.map_batches(
            ShardActor,
            fn_constructor_args=(options,),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=max(1, concurrency)),
            num_gpus=num_gpus or None,
            num_cpus=1,
        )
        total = 0
        for row in done.iter_rows():
            total += int(row["images"])
            if progress is not None:
                progress(int(row["images"]))
        return total
    finally:
        if started:
            ray.shutdown()
