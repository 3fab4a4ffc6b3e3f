"""One data set through every method and every metric: maps and time per image first, then
the scores, all in the same process with the same thread count.

Time: every method is called twice untimed on one image before any is timed (allocator,
oneDNN primitives, autograd warm-up: the first calls of a process are several times slower),
then on every batch of ``batch`` images; a batch's time is the fastest of up to 3 calls while
their total stays under 1 s (one call for a slower method): on a shared machine single calls
stall now and then, and the minimum filters that out, as ``timeit`` does. The process CPU
time (``time.process_time``, every thread) is recorded too: other jobs on the machine stretch
the wall time far more than the CPU time, so the ``× CAM`` ratio is taken on the CPU time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from . import captum_metrics, metrics
from .methods import Settings, build, for_randomization


@dataclass
class Dataset:
    """The model, images and classes of one table, with what its metrics need.

    Attributes:
        name: ``"photos"`` or ``"digits"``.
        images: ``(N, C, H, W)`` as the model takes them; ``classes`` ``(N,)``.
        batch: images per method call (the time per image is the batch's over ``batch``).
        random_n, random_layers: images and cascade of the randomisation check.
        boxes, masks, ids: ground truth (digits), else ``None``.
        captum_n: images scored with sensitivity_max (0: Captum's metrics are not run).
    """

    name: str
    model: nn.Module
    images: Tensor
    classes: Tensor
    settings: Settings
    batch: int
    random_n: int
    random_layers: Sequence[str]
    boxes: Optional[list[Any]] = None
    masks: Optional[Tensor] = None
    ids: Optional[list[int]] = None
    captum_n: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def timed(
    fn: Callable[[], Tensor], budget: float = 1.0, most: int = 3
) -> tuple[Tensor, float, float]:
    """``fn()``, its wall time and its process CPU time (all threads), each the smallest over
    the calls (see the module notes)."""
    best, cpu, spent, calls = float("inf"), float("inf"), 0.0, 0
    out: Optional[Tensor] = None
    while calls < most and (calls == 0 or spent + best < budget):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        best, cpu, spent, calls = min(best, dt), min(cpu, dc), spent + dt, calls + 1
    assert out is not None
    return out.detach().float(), best, cpu


def explain_all(
    ds: Dataset, names: Sequence[str]
) -> tuple[dict[str, Tensor], dict[str, float], dict[str, float]]:
    """Every method's ``(N, H, W)`` maps, its wall time and CPU time per image (ms)."""
    maps: dict[str, Tensor] = {}
    ms: dict[str, float] = {}
    cpu_ms: dict[str, float] = {}
    n = ds.images.shape[0]
    built = {name: build(ds.model, name, ds.settings) for name in names}
    for _ in range(2):  # warm-up, untimed: every method twice before any is timed
        for explain in built.values():
            explain(ds.images[:1], ds.classes[:1])
    for name, explain in built.items():
        parts, seconds, cpu = [], 0.0, 0.0
        for i in range(0, n, ds.batch):
            x, c = ds.images[i : i + ds.batch], ds.classes[i : i + ds.batch]
            part, dt, dc = timed(lambda: explain(x, c))  # noqa: B023  (called at once)
            parts.append(part)
            seconds, cpu = seconds + dt, cpu + dc
        maps[name], ms[name], cpu_ms[name] = torch.cat(parts), seconds / n * 1e3, cpu / n * 1e3
        print(f"[{ds.name}] {name}: {ms[name]:.1f} ms, {cpu_ms[name]:.1f} CPU ms", flush=True)
    return maps, ms, cpu_ms


def score(ds: Dataset, name: str, maps: Tensor, cfg: Any) -> dict[str, Any]:
    """Every metric of one method on the data set (NaN where a metric does not apply)."""
    row: dict[str, Any] = metrics.faithfulness(
        ds.model,
        ds.images,
        maps,
        ds.classes,
        di_steps=cfg.di_steps,
        road_percentiles=cfg.road_percentiles,
        seed=cfg.seed,
    )
    k = ds.random_n
    row.update(
        metrics.randomization(
            ds.model,
            ds.images[:k],
            ds.classes[:k],
            for_randomization(name, ds.settings),
            ds.random_layers,
            cfg.seed,
        )
    )
    row["completeness"] = (
        metrics.completeness(ds.model, ds.images, ds.classes) if name == "CAM" else float("nan")
    )
    if ds.boxes is not None and ds.masks is not None and ds.ids is not None:
        row.update(metrics.region(maps, ds.boxes, ds.masks, ds.ids, cfg.pointing_tolerance))
    if ds.captum_n:
        row.update(_captum_scores(ds, name, maps, cfg))
    return row


def _captum_scores(ds: Dataset, name: str, maps: Tensor, cfg: Any) -> dict[str, float]:
    row = captum_metrics.infidelity(
        ds.model,
        ds.images,
        maps,
        ds.classes,
        samples=cfg.infid_samples,
        noise_std=cfg.noise_std,
        square=cfg.square,
        seed=cfg.seed,
    )
    k = ds.captum_n
    row["sensitivity"] = captum_metrics.sensitivity(
        build(ds.model, name, ds.settings),
        ds.images[:k],
        ds.classes[:k],
        samples=cfg.sens_samples,
        radius=cfg.sens_radius,
        seed=cfg.seed,
    )
    return row


def run(ds: Dataset, names: Sequence[str], cfg: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The table rows ``{method: {metric: value}}`` (with ``ms`` and ``x_cam``) and the maps."""
    maps, ms, cpu_ms = explain_all(ds, names)
    rows: dict[str, Any] = {}
    for name in names:
        t0 = time.perf_counter()
        rows[name] = score(ds, name, maps[name], cfg)
        rows[name]["ms"] = ms[name]
        rows[name]["cpu_ms"] = cpu_ms[name]
        rows[name]["x_cam"] = cpu_ms[name] / cpu_ms["CAM"] if "CAM" in ms else float("nan")
        print(f"[{ds.name}] {name}: scored in {time.perf_counter() - t0:.0f} s", flush=True)
    return rows, maps
