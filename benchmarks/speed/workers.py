"""What each child process measures (``--worker <name>``); each returns a JSON-able dict.

The parent prints nothing of these itself: :func:`benchmarks.speed.cli.main` runs the
worker named on the command line and prints its result as one ``@@RESULT`` line.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from .measure import env_info, hwm_kib, rss_kib, run_rounds, tensor_peak_bytes
from .methods import GROUPS, Bench, Method


def worker_time(args: argparse.Namespace) -> dict[str, Any]:
    """One timing child: the methods of ``args.group``, agreement first, then the rounds."""
    bench = Bench(args.model, args.batch, args.device, args.threads)
    methods = bench.methods(GROUPS[args.group])
    agreement = bench.agreement(methods)
    results = run_rounds(methods, bench.timer(), args.warmup, args.repeats, args.budget)
    return {"agreement": agreement, "results": results, "env": env_info(bench.torch, args)}


def worker_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS over two calls of ``args.method`` minus the RSS after set-up (on CUDA:
    ``max_memory_allocated`` over what was allocated before)."""
    import gc
    import resource

    bench = Bench(args.model, args.batch, args.device, args.threads)
    fn = bench.methods([args.method])[args.method]
    torch = bench.torch
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {
            "how": "cuda max_memory_allocated",
            "base_mib": base / 2**20,
            "peak_mib": peak / 2**20,
            "delta_mib": (peak - base) / 2**20,
        }
    base = rss_kib()
    how = "VmHWM after /proc/self/clear_refs reset"
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        how = "ru_maxrss (peak-RSS reset not permitted; includes set-up)"
    for _ in range(2):
        fn()
    peak = (
        hwm_kib() if how.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    return {
        "how": how,
        "base_mib": base / 1024,
        "peak_mib": peak / 1024,
        "delta_mib": (peak - base) / 1024,
    }


def worker_tensors(args: argparse.Namespace) -> dict[str, Any]:
    """Peak live tensor memory of every method, one after the other in one child."""
    import gc

    bench = Bench(args.model, args.batch, args.device, args.threads)
    methods = bench.methods(args.memory_methods)
    out: dict[str, Any] = {}
    torch = bench.torch
    cuda = args.device.startswith("cuda")
    for name, fn in methods.items():
        fn()  # lazy imports, first-call caches
        gc.collect()
        if cuda:  # the caching allocator's own statistics
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = tensor_peak_bytes(fn)
        out[name] = {"peak_mib": peak / 2**20}
    how = "cuda max_memory_allocated" if cuda else "torch profiler, live tensor bytes"
    return {"how": how + ", peak during one call over what was live before", "methods": out}


# -- the bulk fast path ------------------------------------------------------------------------
def _compiled(module_cl: Any, x_cl: Any, torch: Any) -> tuple[Method, dict[str, Any]]:
    """``torch.compile`` of the channels_last ``CAMModule`` (inductor freezing), compiled by
    one call here; the compile time goes into the info."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    compiled = torch.compile(module_cl)
    t0 = time.perf_counter()
    with torch.inference_mode():
        compiled(x_cl)
    info = {"compile_s": time.perf_counter() - t0}

    def module_compile() -> Any:
        with torch.inference_mode():
            return compiled(x_cl)

    return module_compile, info


def _onnx(bench: Bench, args: argparse.Namespace, opts: dict[str, Any]) -> tuple[Method, dict]:
    """``export_onnx`` of a ``CAMModule`` run by onnxruntime (the CUDA provider on a GPU when
    it has one)."""
    import tempfile

    import onnxruntime as ort

    from cam_plugin.export import CAMModule, export_onnx

    torch, model, x = bench.torch, bench.model, bench.x
    tmp = tempfile.mkdtemp()
    t0 = time.perf_counter()
    path = export_onnx(CAMModule(model, **opts), os.path.join(tmp, "cam.onnx"), example=x[:2])
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if args.device.startswith("cuda") and "CUDAExecutionProvider" in (
        ort.get_available_providers()
    ):
        providers.insert(0, "CUDAExecutionProvider")
    sess = ort.InferenceSession(path, so, providers=providers)
    info: dict[str, Any] = {
        "export_and_load_s": time.perf_counter() - t0,
        "providers": sess.get_providers(),
    }
    x_np = x.cpu().numpy()

    def onnxruntime() -> Any:
        outs = sess.run(None, {"images": x_np})
        return [torch.from_numpy(o) for o in outs]

    if providers[0] == "CPUExecutionProvider" and args.device.startswith("cuda"):
        info["note"] = "no CUDA provider: CPU onnxruntime"
    return onnxruntime, info


def _try(
    build: Callable[[], tuple[Method, dict[str, Any]]],
    name: str,
    methods: dict[str, Method],
    info: dict[str, dict[str, Any]],
) -> None:
    """Add ``name`` built by ``build``; a failure is reported in the info, not hidden."""
    try:
        fn, what = build()
    except Exception as err:
        info[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        return
    info[name] = what
    methods[name] = fn


def worker_fast(args: argparse.Namespace) -> dict[str, Any]:
    """Bulk fast path: CAMModule eager channels_last, torch.compile, onnxruntime."""
    import copy

    from cam_plugin.export import CAMModule

    bench = Bench(args.model, args.batch, args.device, args.threads)
    torch, model, x, cam = bench.torch, bench.model, bench.x, bench.cam
    ref = cam(x).upsample().normalize()
    opts: dict[str, Any] = {"topk": 1, "upsample": True, "normalize": True}
    base = bench.methods(["forward"])
    methods: dict[str, Method] = {"forward": base["forward"]}
    methods["cam_eager"] = lambda: cam(x).upsample().normalize().maps
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    module_cl = CAMModule(model_cl, **opts).eval()

    def module_channels_last() -> Any:
        with torch.inference_mode():
            return module_cl(x_cl)

    methods["module_channels_last"] = module_channels_last
    info: dict[str, dict[str, Any]] = {"module_channels_last": {"trunk": module_cl.trunk}}
    if not args.no_compile:
        _try(lambda: _compiled(module_cl, x_cl, torch), "module_compile", methods, info)
    if not args.no_onnx:
        _try(lambda: _onnx(bench, args, opts), "onnxruntime", methods, info)
    # maps equal to eager, within 1e-4 x the map's max magnitude
    scale = float(ref.maps.abs().max())
    for name in ("module_channels_last", "module_compile", "onnxruntime"):
        if name not in methods:
            continue
        outs = methods[name]()
        maps, classes = outs[1].to(ref.maps.device).float(), outs[2].to(ref.classes.device)
        err = float((maps - ref.maps.float()).abs().max()) / scale
        info.setdefault(name, {}).update(
            {
                "max_rel_err": err,
                "same_classes": bool(torch.equal(classes, ref.classes)),
                "agree": err <= 1e-4,
            }
        )
    results = run_rounds(methods, bench.timer(), args.warmup, args.repeats, args.budget)
    return {"results": results, "info": info, "env": env_info(torch, args)}


def worker_breakdown(args: argparse.Namespace) -> dict[str, Any]:
    """Cost of each step a CAM call adds after the forward, on a real forward's features.

    The steps are cam-plugin's public pieces: the input's finite check
    (``cam_plugin.cam.all_finite``), the head fold, the exactness check
    (``FoldedHead.check_reproduces``), the maps, the upsampling.
    """
    import statistics

    import torch.nn.functional as F

    from cam_plugin import FeatureCapture, minmax_normalize, parse_targets
    from cam_plugin.checks import all_finite

    bench = Bench(args.model, args.batch, args.device, args.threads)
    torch, x, adapter = bench.torch, bench.x, bench.adapter
    with torch.no_grad(), FeatureCapture(adapter.feature_module, adapter.capture) as cap:
        logits = bench.model(x)
        captured = cap.value
    assert captured is not None
    feats = adapter.features(captured, bench.hw)
    head = adapter.fold(feats.shape[1])
    top1 = head.maps(feats, parse_targets(None, logits, 1))
    timer = bench.timer()
    steps: dict[str, Method] = {
        "forward": bench.methods(["forward"])["forward"],
        "finite check, elementwise isfinite(images).all() (before)": lambda: bool(
            torch.isfinite(x).all()
        ),
        "finite check, isfinite(sum) first (now)": lambda: all_finite(x),
        "head fold (per call)": lambda: adapter.fold(feats.shape[1]),
        "exactness check (verify=True)": lambda: head.check_reproduces(
            feats, logits, name=adapter.name
        ),
        "top-1 class + map (batched matmul)": lambda: head.maps(
            feats, parse_targets(None, logits, 1)
        ),
        "bilinear upsample to the input + min-max": lambda: minmax_normalize(
            F.interpolate(top1, size=bench.hw, mode="bilinear", align_corners=False)
        ),
        "all classes' maps (one GEMM)": lambda: head.maps(feats, None),
    }
    out: dict[str, Any] = {}
    with torch.no_grad():
        for name, fn in steps.items():
            fn()
            reps = 5 if name == "forward" else 25
            out[name] = statistics.median(timer(fn) for _ in range(reps))
    return {"steps": out, "env": env_info(torch, args)}


WORKERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "time": worker_time,
    "memory": worker_memory,
    "tensors": worker_tensors,
    "fast": worker_fast,
    "breakdown": worker_breakdown,
}
