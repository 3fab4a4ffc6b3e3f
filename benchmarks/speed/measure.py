"""How a child measures: interleaved timing rounds, peak memory readers, the environment.

Nothing here imports torch at import time.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from typing import Any, Optional

from .methods import Method


def run_rounds(
    methods: dict[str, Method],
    timer: Callable[[Method], float],
    warmup: int,
    repeats: int,
    budget_s: Optional[float] = None,
) -> dict[str, dict[str, Any]]:
    """Interleaved rounds; per method its times, page faults and per-round ratio to forward.

    Round ``r`` runs every method once, starting at method ``r mod n`` (A B C …, B C … A,
    …). Each call is preceded by ``gc.collect()`` and runs with ``gc`` disabled; the set-up's
    objects are frozen out of the collector's reach first. ``ratio_median`` is the median
    over rounds of (time / the same round's ``forward`` time), ``cpu_ratio_median`` the same
    for process CPU time. Rounds stop early, after at least 3, once ``budget_s`` is spent.
    """
    import gc
    import resource

    names = list(methods)
    for _ in range(warmup):
        for n in names:
            methods[n]()
    # every call is preceded by a full collection; with torch, timm and the comparators
    # loaded that alone takes ~0.2 s, so the set-up's objects are moved out of the
    # collector's reach first (gc.freeze) and each collection sees only new garbage
    gc.collect()
    gc.freeze()
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[int]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    cpu_ratios: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        this: dict[str, float] = {}
        this_cpu: dict[str, float] = {}
        for n in order:
            gc.collect()
            gc.disable()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0 = time.process_time()
            try:
                this[n] = timer(methods[n])
            finally:
                this_cpu[n] = time.process_time() - c0
                gc.enable()
            faults[n].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            times[n].append(this[n])
            cpu[n].append(this_cpu[n])
        if "forward" in this:
            for n in names:
                ratios[n].append(this[n] / this["forward"])
                cpu_ratios[n].append(this_cpu[n] / max(this_cpu["forward"], 1e-9))
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {n: _summary(times[n], cpu[n], faults[n], ratios[n], cpu_ratios[n]) for n in names}


def _summary(
    ts: list[float],
    cpu: list[float],
    faults: list[int],
    ratios: list[float],
    cpu_ratios: list[float],
) -> dict[str, Any]:
    import statistics

    return {
        "median_s": statistics.median(ts),
        "min_s": min(ts),
        "max_s": max(ts),
        "times_s": ts,
        "minflt_median": statistics.median(faults),
        "ratio_median": statistics.median(ratios) if ratios else None,
        "ratio_min": min(ratios) if ratios else None,
        "ratio_max": max(ratios) if ratios else None,
        "cpu_s": cpu,
        "cpu_ratio_median": statistics.median(cpu_ratios) if cpu_ratios else None,
        "rounds": len(ts),
    }


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_kib() -> int:
    """The process's resident set size now (``VmRSS``), KiB."""
    return _proc_status_kib("VmRSS")


def hwm_kib() -> int:
    """The process's peak resident set size (``VmHWM``), KiB."""
    return _proc_status_kib("VmHWM")


def tensor_peak_bytes(fn: Method) -> int:
    """Peak of the bytes held by live tensors during one call of ``fn``, over what was live
    before it: torch's profiler records every allocation and free of the CPU
    allocator with its size and time, so the running sum of those events peaks at it. Unlike
    RSS it does not depend on how glibc reuses or returns freed pages, and it is the same
    from run to run."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def env_info(torch: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Python, platform, CPU model, threads, device and the versions of what is compared."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dists = ("torch", "timm", "torchcam", "grad-cam", "captum", "onnxruntime", "numpy")
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "dtype": "float32",
        "versions": {d: _version(d) for d in (*dists, "cam-plugin")},
    }
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info
