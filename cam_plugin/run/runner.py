"""``cam-plugin run``: CAM maps, classes and boxes for every image of a data set.

One :class:`RunContext` per process holds the data (:func:`~.datasets.open_data`), the
model (:func:`cam_plugin.models.load_model`), its preprocessing
(:class:`~cam_plugin.preprocess.DataConfig`) and, from the first batch of real images, its
:class:`~.compute.MapComputer`. :meth:`RunContext.process` runs a list of shards: one
``DataLoader`` (``--workers`` decoding processes) over the shards' indices in order, batches
never straddling a shard, the forward under ``inference_mode``, and a writer thread that
encodes and commits a finished shard (zarr maps, Parquet rows, COCO boxes, overlays) while
the next one computes. :func:`run` ties the engines together (see :mod:`.engines`), merges
the small files on rank 0 and writes ``run.json``.

Exit status (the CLI's): ``0`` every image has its maps; ``3`` the run finished and some
inputs could not be read (rows with ``status == "failed"`` in the manifest); ``2`` a usage
mistake, one line on stderr; ``1`` an unexpected error; ``130`` interrupted. Interrupted or
failed runs keep every finished shard: the same command resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import CAMInputError
from .compute import MapComputer, Targets, parse_targets_option, placement_dict
from .datasets import RunData, RunSamples, open_data
from .outputs import ShardBuffer, merge_outputs, require
from .shards import (
    CONFIG_FILE,
    atomic_write_text,
    claim_config,
    clean_temporaries,
    commit_shard,
    completed_shards,
    shard_ranges,
)
from .units import RunUnits, check_unit_options, unit_identity, write_unit_patches

__all__ = ["FORMAT", "RunContext", "RunOptions", "run"]

FORMAT = "cam-plugin-run/1"


@dataclasses.dataclass
class RunOptions:
    """The options of ``cam-plugin run`` (see ``cam-plugin run --help``)."""

    data: str
    out: str
    data_format: str = "auto"
    data_root: Optional[str] = None
    model: str = "tf_efficientnet_lite0"
    checkpoint: Optional[str] = None
    num_classes: Optional[int] = None
    model_kwargs: Optional[str] = None
    device: str = "cpu"
    targets: str = "auto"
    topk: int = 1
    threshold: float = 0.2
    batch_size: int = 32
    workers: int = 2
    shard_size: int = 256
    float16: bool = False
    overlays: int = 0
    input_size: Optional[int] = None
    crop_pct: Optional[float] = None
    engine: str = "auto"
    ray_address: Optional[str] = None
    concurrency: int = 1
    num_gpus: float = 0.0
    threads: Optional[int] = None
    channels_last: bool = False
    compile: bool = False
    units: int = 0
    unit_patches: int = 8
    unit_classes: str = "auto"
    unit_span: float = 2.0
    command: list[str] = dataclasses.field(default_factory=list)

    def check(self) -> None:
        """Raise :class:`CAMInputError` for values out of range."""
        for name, ok, want in (
            ("topk", self.topk >= 1, ">= 1"),
            ("threshold", 0.0 <= self.threshold <= 1.0, "in [0, 1]"),
            ("batch-size", self.batch_size >= 1, ">= 1"),
            ("workers", self.workers >= 0, ">= 0"),
            ("shard-size", self.shard_size >= 1, ">= 1"),
            ("overlays", self.overlays >= -1, ">= 0, or -1 for every image"),
            ("concurrency", self.concurrency >= 1, ">= 1"),
        ):
            if not ok:
                value = getattr(self, name.replace("-", "_"))
                raise CAMInputError(f"--{name} must be {want}, got {value}")
        check_unit_options(self)

    @classmethod
    def from_namespace(cls, args: Any) -> RunOptions:
        """The fields of an ``argparse.Namespace`` with the same names."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class RunContext:
    """Data, model, preprocessing and (lazily) the map computer of one process."""

    def __init__(self, options: RunOptions, device_index: Optional[int] = None) -> None:
        from ..models import check_device, load_model, parse_model_kwargs
        from ..preprocess import DataConfig, Preprocess

        options.check()
        self.options = opts = options
        self.out = Path(opts.out)
        self.data: RunData = open_data(opts.data, opts.data_format, opts.data_root, [opts.out])
        self.targets: Targets = parse_targets_option(opts.targets, self.data.has_labels)
        device = check_device(opts.device)
        if device.type == "cuda" and device.index is None and device_index is not None:
            device = torch.device("cuda", device_index)
        self.device = device
        if opts.threads:
            torch.set_num_threads(opts.threads)
        self.loaded = load_model(
            opts.model,
            checkpoint=opts.checkpoint,
            num_classes=opts.num_classes,
            model_kwargs=parse_model_kwargs(opts.model_kwargs),
        )
        self.loaded.model.to(device)
        self.memory_format = torch.channels_last if opts.channels_last else torch.contiguous_format
        if opts.channels_last:
            self.loaded.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        base = DataConfig.for_model(self.loaded.model)
        self.config = base.with_overrides(opts.input_size, opts.crop_pct)
        self.transform = Preprocess(self.config)
        self.plan = shard_ranges(len(self.data.items), opts.shard_size)
        self.gt_width = max([len(i.labels) for i in self.data.items] + [1])
        self.computer: Optional[MapComputer] = None
        self.overlay_names: dict[int, str] = {}
        limit = len(self.data.items) if opts.overlays < 0 else opts.overlays
        if limit:
            from ..inputs import picture_names

            names = picture_names([i.name for i in self.data.items[:limit]])
            self.overlay_names = {i: f"overlays/{n}" for i, n in enumerate(names)}

    # -- identity --------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """The settings that decide the outputs (``run-config.json``)."""
        o = self.options
        return {
            "format": FORMAT,
            "model": o.model,
            "checkpoint_sha256": _sha256(o.checkpoint) if o.checkpoint else None,
            "num_classes": o.num_classes,
            "model_kwargs": json.loads(o.model_kwargs) if o.model_kwargs else None,
            "preprocessing": self.config.to_dict() | {"source": None},
            "targets": list(self.targets) if isinstance(self.targets, tuple) else self.targets,
            "topk": o.topk,
            "threshold": o.threshold,
            "float16": o.float16,
            "batch_size": o.batch_size,
            "shard_size": o.shard_size,
            "overlays": o.overlays,
            "channels_last": o.channels_last,
            "data_kind": self.data.kind,
            "data_items": len(self.data.items),
            "data_fingerprint": self.data.fingerprint(),
            **unit_identity(o),
        }

    @functools.cached_property
    def units(self) -> Optional[RunUnits]:
        """The per-shard unit collectors of ``--units`` (``None`` when off; :mod:`.units`)."""
        return RunUnits.from_options(self.options)

    def category_table(self, num_classes: int) -> list[dict[str, Any]]:
        """``[{"id", "name"}]`` per model class: the data's categories when it names as many
        classes as the model has, else the class index (ImageNet names for 1000 classes)."""
        from ..models import class_names

        cats = self.data.categories
        if len(cats) == num_classes:
            return [{"id": int(c["id"]), "name": str(c["name"])} for c in cats]
        names = class_names(num_classes, self.loaded.model)
        return [{"id": i, "name": n} for i, n in enumerate(names)]

    # -- the map computer ------------------------------------------------------------------
    def _example(self, shards: Sequence[int]) -> Optional[torch.Tensor]:
        """The first image of ``shards`` that decodes, preprocessed, as a batch of one."""
        samples = RunSamples(self.data, self.transform)
        for s in shards:
            for i in self.plan[s]:
                sample = samples[i]
                if "prepared" in sample:
                    example = sample["prepared"].tensor[None]
                    return example.to(self.device, memory_format=self.memory_format)
        return None

    def ensure_computer(self, shards: Sequence[int]) -> Optional[MapComputer]:
        """Build the :class:`MapComputer` from a real image of ``shards`` (once)."""
        if self.computer is None:
            example = self._example(shards)
            if example is None:
                return None
            o = self.options
            self.computer = MapComputer(
                self.loaded.model,
                example,
                targets=self.targets,
                topk=o.topk,
                threshold=o.threshold,
                gt_width=self.gt_width,
                compile=o.compile,
                unit_maps=self.units is not None,
            )
            if self.data.kind != "dataset":
                self.computer.check_labels([i.labels for i in self.data.items])
            if self.units is not None:
                self.units.attach(self.computer)
        return self.computer

    def maps_meta(self) -> dict[str, Any]:
        """Shape, dtype and placement of the stored maps (zarr attributes, run.json)."""
        c = self.computer
        k, (h, w) = (c.maps_per_image, c.map_size) if c is not None else (1, (1, 1))
        return {
            "maps_shape": [k, h, w],
            "dtype": "float16" if self.options.float16 else "float32",
            "input_size": list(self.config.input_size),
            "placement": placement_dict(c.placement) if c is not None else None,
            "stage": "feature resolution, before any normalization",
        }

    # -- processing --------------------------------------------------------------------------
    def _loader(self, shards: Sequence[int]) -> Any:
        from torch.utils.data import DataLoader

        bs = self.options.batch_size
        batches = [
            list(r[j : j + bs])
            for s in shards
            for r in [self.plan[s]]
            for j in range(0, len(r), bs)
        ]
        return DataLoader(
            RunSamples(self.data, self.transform, keep_original=len(self.overlay_names)),
            batch_sampler=batches,
            num_workers=self.options.workers,
            collate_fn=list,
            worker_init_fn=lower_priority,
        )

    def process(
        self, shards: Sequence[int], progress: Optional[Callable[[int], None]]
    ) -> list[dict[str, Any]]:
        """Compute and commit ``shards`` (in order); returns their completion markers."""
        shards = list(shards)
        if not shards:
            return []
        require("zarr")
        require("pyarrow")
        computer = self.ensure_computer(shards)
        size = self.options.shard_size
        cats = self.category_table(computer.num_classes) if computer else []
        ids = [int(c["id"]) for c in cats]
        markers: list[dict[str, Any]] = []
        pending: Optional[Future[dict[str, Any]]] = None
        buffer: Optional[ShardBuffer] = None
        trim = heap_trimmer()
        with ThreadPoolExecutor(1, thread_name_prefix="cam-plugin-writer") as writer:
            for samples in self._loader(shards):
                shard = samples[0]["index"] // size
                if buffer is None or buffer.shard != shard:
                    if buffer is not None:
                        if pending is not None:
                            markers.append(pending.result())
                        pending = writer.submit(self._commit, buffer)
                    buffer = ShardBuffer(shard, ids)
                self._add_batch(buffer, samples)
                trim()
                if progress is not None:
                    progress(len(samples))
            if pending is not None:
                markers.append(pending.result())
            if buffer is not None:
                markers.append(writer.submit(self._commit, buffer).result())
        return markers

    def _add_batch(self, buffer: ShardBuffer, samples: list[dict[str, Any]]) -> None:
        good = [s for s in samples if "prepared" in s]
        for s in samples:
            if "prepared" not in s:
                buffer.add_failure(s)
                path = s["item"].path or s["item"].name
                print(f"cam-plugin: skipped {path}: {s['reason']}", file=sys.stderr)
        if not good:
            return
        assert self.computer is not None
        images = torch.stack([s["prepared"].tensor for s in good])
        images = images.to(self.device, memory_format=self.memory_format)
        res = self.computer(images, [tuple(s["labels"]) for s in good])
        if self.units is not None:
            self.units.add(buffer.shard, [s["index"] for s in good], res.unit_maps)
        for i, s in enumerate(good):
            buffer.add_image(s, res, i, self.overlay_names.get(s["index"]))

    def _commit(self, buffer: ShardBuffer) -> dict[str, Any]:
        """Write one shard (temporary folder, then rename) and its overlays."""
        meta = self.maps_meta()
        marker: dict[str, Any] = {}
        try:
            if self.computer is not None:
                buffer.write_overlays(self.out, self.computer.placement)
            with commit_shard(self.out, buffer.shard, marker) as tmp:
                marker.update(buffer.write(tmp, self.options.float16, meta))
                if self.units is not None:
                    self.units.write(buffer.shard, tmp)
                marker.update(
                    maps=meta, num_classes=self.computer.num_classes if self.computer else None
                )
        except OSError as err:
            raise CAMInputError(
                f"writing shard {buffer.shard} to {self.out} failed "
                f"({err.strerror or type(err).__name__}); finished shards are kept: rerun the "
                "same command to resume"
            ) from err
        return marker


def _versions() -> dict[str, Optional[str]]:
    import importlib.metadata as md

    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in ("cam-plugin", "torch", "numpy", "timm", "torchvision", "zarr", "pyarrow"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _write_run_json(ctx: RunContext, status: str, extra: dict[str, Any]) -> None:
    c = ctx.computer
    doc = {
        "format": FORMAT,
        "status": status,
        "command": ctx.options.command,
        "versions": _versions(),
        "model": {
            **ctx.loaded.describe(),
            "adapter": c.adapter.name if c else None,
            "num_classes": c.num_classes if c else None,
        },
        "preprocessing": ctx.config.to_dict(),
        "speed": {"channels_last": ctx.options.channels_last, "compile": ctx.options.compile},
        "data": {
            "kind": ctx.data.kind,
            "spec": ctx.options.data,
            "root": ctx.data.root,
            "items": len(ctx.data.items),
        },
        "identity": json.loads((ctx.out / CONFIG_FILE).read_text()),
        "exit_codes": {
            "0": "every image has its maps",
            "3": "some inputs could not be read (manifest rows with status 'failed')",
            "2": "a usage mistake",
            "1": "an unexpected error",
            "130": "interrupted",
        },
        **extra,
    }
    atomic_write_text(ctx.out / "run.json", json.dumps(doc, indent=1))


class _Progress:
    """A tqdm bar on rank 0 over all images: finished shards, this rank's images, and (with
    several ranks) the shards other ranks finished since the start, read from their markers
    at most every two seconds."""

    def __init__(self, ctx: RunContext, group: Any, done: set[int], mine: set[int]) -> None:
        from tqdm import tqdm

        self.ctx, self.skip = ctx, done | mine
        self.initial = sum(len(ctx.plan[s]) for s in done)
        self.own, self.others, self.checked = 0, 0, 0.0
        self.world = group.world
        self.bar = tqdm(
            total=len(ctx.data.items),
            initial=self.initial,
            desc="cam-plugin run",
            unit="img",
            disable=None if group.is_main else True,
            smoothing=0.1,
        )

    def __call__(self, n: int) -> None:
        self.own += n
        if self.world > 1 and time.monotonic() - self.checked > 2.0:
            self.checked = time.monotonic()
            finished = completed_shards(self.ctx.out)
            self.others = sum(len(self.ctx.plan[s]) for s in finished if s not in self.skip)
        self.bar.update(self.initial + self.own + self.others - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def lower_priority(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: decoding workers yield the CPU to the forward.

    The forward's threads synchronise at every layer; when a decoding process takes one of
    their cores, the others wait at the barrier, and a model of many small layers
    (EfficientNet-Lite0) slows far more than the decoding costs. At ``nice`` +10 the workers
    decode in the gaps, and still keep ahead of the forward."""
    import contextlib
    import os

    with contextlib.suppress(OSError):  # not permitted on this system: keep the priority
        os.nice(10)


def heap_trimmer() -> Callable[[], None]:
    """A function that gives the freed heap memory of this process back to the system
    (glibc's ``malloc_trim(0)``; a no-op elsewhere).

    The runner calls it after every batch. Batches, activations and decoded crops are blocks
    of megabytes; glibc serves them from its heap once it has raised its mmap threshold, and
    the freed pages between live blocks stay resident: over thousands of batches the peak
    RSS creeps up by 10% or more. Trimming after each batch returns those pages (a few
    milliseconds per batch) and keeps memory flat with the number of images
    (``docs/benchmarks-run.md``). Fixing the mmap threshold instead also bounds memory but
    makes every large activation a fresh mapping and slowed the forward by about 15%."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None

    def release() -> None:
        trim(0)

    return release


def run(options: RunOptions) -> int:
    """Run ``cam-plugin run`` with ``options``; returns the exit status (module doc)."""
    from ..cli import EXIT_OK, prepare_out
    from .engines import open_group, run_on_ray

    options.check()
    group = open_group(options.engine, options.device)
    try:
        if group.is_main:
            prepare_out(options.out)
        group.barrier()
        ctx = RunContext(options, device_index=group.local_rank)
        # the model's classes are known from one real image: --targets and the labels are
        # checked before this run claims --out
        ctx.ensure_computer(range(len(ctx.plan)))
        error: Optional[str] = None
        done: dict[int, dict[str, Any]] = {}
        if group.is_main:
            try:
                claim_config(ctx.out, ctx.identity())
                clean_temporaries(ctx.out)
                done = completed_shards(ctx.out)
            except CAMInputError as err:
                error = str(err)
        error, done = group.broadcast((error, done))
        if error:
            raise CAMInputError(error)
        pending = [s for s in range(len(ctx.plan)) if s not in done]
        mine = pending[group.rank :: group.world]
        progress = _Progress(ctx, group, set(done), set(mine))
        start = time.perf_counter()
        try:
            if options.engine == "ray":
                run_on_ray(
                    options,
                    mine,
                    address=options.ray_address,
                    concurrency=options.concurrency,
                    num_gpus=options.num_gpus,
                    progress=progress,
                )
            else:
                ctx.process(mine, progress)
        finally:
            progress.close()
        seconds = time.perf_counter() - start
        computed = group.gather(progress.own if options.engine != "ray" else 0)
        group.barrier()
        code = EXIT_OK
        if group.is_main:
            engine = "ray" if options.engine == "ray" else group.engine
            code = _finish(
                ctx,
                pending,
                seconds,
                sum(computed) or progress.own,
                {"name": engine, "world_size": group.world},
            )
        return int(group.broadcast(code)) if group.distributed else code
    finally:
        group.close()


def _finish(
    ctx: RunContext, pending: list[int], seconds: float, computed: int, engine: dict[str, Any]
) -> int:
    """Rank 0: merge the shards, write run.json, print the summary; the exit status."""
    from ..cli import EXIT_INPUTS_FAILED, EXIT_OK

    done = completed_shards(ctx.out)
    missing = [s for s in range(len(ctx.plan)) if s not in done]
    if missing:
        raise CAMInputError(f"shards {missing[:5]} did not finish; rerun the same command")
    first = done[min(done)]
    maps_meta = first.get("maps") or ctx.maps_meta()
    num_classes = int(first.get("num_classes") or 0) or (
        ctx.computer.num_classes if ctx.computer else 0
    )
    cats = ctx.category_table(num_classes) if num_classes else []
    table = merge_outputs(ctx.out, sorted(done), cats)
    failed = int(sum(1 for s in table.column("status").to_pylist() if s != "ok"))
    total = table.num_rows
    rate = computed / seconds if seconds > 0 else 0.0
    units = write_unit_patches(ctx, sorted(done), table)
    counts = {
        "images": total,
        "ok": total - failed,
        "failed": failed,
        "shards": len(done),
        "shards_computed_now": len(pending),
        "images_computed_now": computed,
    }
    _write_run_json(
        ctx,
        "complete",
        {
            "maps": maps_meta,
            "categories": cats,
            "counts": counts,
            "engine": engine,
            "timing": {"seconds": round(seconds, 3), "images_per_s": round(rate, 2)},
            "files": {
                "manifest": "manifest.parquet",
                "boxes": "boxes.json",
                "coco": "boxes_coco.json",
                "maps": "shards/NNNNN/maps.zarr",
            },
            **({"units": units} if units is not None else {}),
        },
    )
    print(
        f"cam-plugin run: {total} images ({failed} failed) in {len(done)} shards; "
        f"computed {computed} now in {seconds:.1f} s ({rate:.1f} images/s); wrote "
        f"{ctx.out}/manifest.parquet, boxes.json, run.json"
    )
    if failed:
        print(
            f"cam-plugin: {failed} of {total} inputs could not be read (status 'failed' in "
            f"{ctx.out / 'manifest.parquet'}); exit status {EXIT_INPUTS_FAILED}",
            file=sys.stderr,
        )
        return EXIT_INPUTS_FAILED
    return EXIT_OK
