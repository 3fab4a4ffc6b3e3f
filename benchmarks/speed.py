"""Speed and memory of cam-plugin's CAM against a plain forward pass, torchcam, pytorch-grad-cam
and Captum, plus the bulk fast path (channels_last, torch.compile, ONNX Runtime).

    python benchmarks/speed.py                  # `make bench`: ~13 min on 2 CPU threads
    python benchmarks/speed.py --device cuda    # the same on a GPU (CUDA events + sync)
    python benchmarks/speed.py --smoke --out-dir /tmp/bench   # batch 2, tiny model (tests)

How it measures (see docs/benchmarks.md):

* This parent process never imports torch. Every measurement runs in a fresh child
  interpreter: two *timing* children per (model, batch, allocator setting) (the autograd
  methods apart, see ``GROUPS``), one *tensor-memory* child per (model, batch), one *RSS*
  child per (model, method) at the largest batch, one *fast-path* child per (model,
  allocator). glibc reads ``MALLOC_MMAP_MAX_`` only at start-up, so the allocator setting is
  given to the child's environment, and peak RSS is not inherited from a parent that
  already holds torch.
* Same model, inputs, thread count and dtype for every method. Warm-up rounds, then rounds
  in which every method runs once, in rotating order (A B C … then B C … A), so that drift
  on a shared machine hits all methods alike. Reported: median and min–max of the wall time,
  and the median over rounds of the time divided by the same round's plain forward; the
  targets "A / B" are medians of per-round A / B within one child.
* Peak memory: the peak of live tensor bytes during one call (torch's profiler,
  deterministic), and the peak RSS in a child per method: after set-up (imports, model,
  inputs, extractor) the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``;
  ``ru_maxrss`` where that is not allowed) and the method runs twice; reported is the peak
  over those calls minus the RSS before them, the forward's in several children for the
  noise band. On CUDA: ``torch.cuda.max_memory_allocated``.
* Agreement, checked before any timing: cam-plugin's top-1 map at feature resolution against
  torchcam's ``CAM(normalized=False)`` and against Captum's ``LayerGradCam`` (× h·w, which is
  CAM for a GAP network) to 1e-4 × the map's max magnitude; pytorch-grad-cam's ``GradCAM``
  against cam-plugin's ReLU-ed, min-max-normalized, bilinearly upsampled map (Pearson
  correlation ≥ 0.999 per image). A method that disagrees is reported as such, not as a ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
METHODS = [
    "forward",
    "cam_feature",
    "cam_upsampled",
    "cam_top5",
    "cam_all",
    "torchcam",
    "gradcam",
    "captum",
    "captum_given",
]
LABELS = {
    "forward": "plain forward (`torch.inference_mode`), the floor",
    "cam_feature": "cam-plugin CAM, top-1, feature resolution",
    "cam_upsampled": "cam-plugin CAM, top-1, upsampled to the input + normalized",
    "cam_top5": "cam-plugin CAM, top-5, upsampled + normalized",
    "cam_all": "cam-plugin CAM, all classes, feature resolution",
    "torchcam": "torchcam `CAM` (`normalized=False`) + same upsampling/normalization",
    "gradcam": "pytorch-grad-cam `GradCAM` (same layer)",
    "captum": "Captum `LayerGradCam` + `interpolate` (bilinear) + normalization, top-1 "
    "class from its own forward first",
    "captum_given": "Captum, the same with the top-1 class given (computed before timing)",
}
FAST = ["forward", "cam_eager", "module_channels_last", "module_compile", "onnxruntime"]
FAST_LABELS = {
    "forward": "eager plain forward (NCHW, `inference_mode`), the reference",
    "cam_eager": "eager `CAM(model)` top-1 upsampled + normalized",
    "module_channels_last": "`CAMModule` eager, channels_last, `inference_mode`",
    "module_compile": "`torch.compile(CAMModule)`, channels_last, inductor freezing",
    "onnxruntime": "`export_onnx` -> onnxruntime (CAM as a graph output)",
}
ALLOCATORS = {
    "default": {},
    "mmap_max_0": {"MALLOC_MMAP_MAX_": "0"},
    # what cam_plugin.export.keep_freed_memory() sets at run time
    "keep_freed": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)},
}
MARK_START = "<!-- speed-table:start -->"
MARK_END = "<!-- speed-table:end -->"


# =============================================================================================
# children (these import torch)
# =============================================================================================
def _setup_torch(threads: int) -> Any:
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)
    return torch


def _tiny_model() -> Any:
    """A small real CNN (conv-BN-ReLU stages, GAP, Linear) for the smoke run."""
    from torch import nn

    class TinyNet(nn.Module):
        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1),
                nn.BatchNorm2d(32),
                nn.ReLU(),
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(32, num_classes)

        def forward(self, x: Any) -> Any:
            return self.fc(self.pool(self.features(x)).flatten(1))

    return TinyNet()


def build_model(name: str, seed: int = 0) -> tuple[Any, int]:
    """``(model in eval mode, input size)``."""
    import torch

    torch.manual_seed(seed)
    if name == "tiny":
        return _tiny_model().eval(), 32
    import timm

    if name == "lite0":
        from cam_plugin.integrations.timm import efficientnet_lite0_pretrained

        return efficientnet_lite0_pretrained().eval(), 224
    arch = name[5:] if name.startswith("timm:") else name
    model = timm.create_model(arch)
    return model.eval(), int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])


def make_images(batch: int, size: int, seed: int = 0) -> Any:
    """Real photos (scikit-image's bundled ones, centre-cropped, mean = std = 0.5, plus
    mirrored copies) when available and the size allows, else a seeded normal batch."""
    import torch
    import torch.nn.functional as F

    photos = []
    if size >= 64:
        try:
            from skimage import data

            for fn in ("chelsea", "coffee", "astronaut", "rocket", "cat", "camera"):
                img = torch.from_numpy(getattr(data, fn)().copy()).float() / 255.0
                img = img[..., None].expand(-1, -1, 3) if img.dim() == 2 else img[..., :3]
                photos.append(img.permute(2, 0, 1))
        except Exception:  # scikit-image missing: random images are as good for timing
            photos = []
    if not photos:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, size, size, generator=gen)
    out = []
    for i in range(batch):
        img = photos[i % len(photos)]
        if (i // len(photos)) % 2:
            img = img.flip(-1)
        h, w = img.shape[-2:]
        scale = size * 256 / 224 / min(h, w)
        img = F.interpolate(
            img[None],
            size=(round(h * scale), round(w * scale)),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0]
        top, left = (img.shape[-2] - size) // 2, (img.shape[-1] - size) // 2
        out.append((img[:, top : top + size, left : left + size] - 0.5) / 0.5)
    return torch.stack(out).contiguous()


def _module_name(model: Any, module: Any) -> Optional[str]:
    return next((n for n, m in model.named_modules() if m is module), None)


class Bench:
    """Model, inputs and the callables of every method, built once per child."""

    def __init__(self, model_name: str, batch: int, device: str, threads: int) -> None:
        torch = _setup_torch(threads)
        from torch import nn

        import cam_plugin as cp

        self.torch = torch
        self.device = device
        self.model, self.size = build_model(model_name)
        self.model.to(device)
        self.x = make_images(batch, self.size).to(device)
        self.cam = cp.CAM(self.model)
        adapter = self.cam.adapter
        self.layer = adapter.feature_module if adapter.capture == "output" else None
        self.layer_name = _module_name(self.model, self.layer) if self.layer is not None else None
        linears = [m for _, m in adapter.head_modules if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.fc_name = _module_name(self.model, linears[-1]) if len(linears) == 1 else None
        with torch.no_grad():
            self.top1 = self.model(self.x).argmax(dim=1)
        self.hw = (self.size, self.size)

    # -- methods ------------------------------------------------------------------------
    def methods(self, only: Optional[list[str]] = None) -> dict[str, Callable[[], Any]]:
        """The callables of every method (or of ``only`` those), comparators imported lazily."""
        torch = self.torch
        wanted = set(only or METHODS)
        import torch.nn.functional as F

        from cam_plugin import minmax_normalize

        model, x, cam, hw = self.model, self.x, self.cam, self.hw

        def forward() -> Any:
            with torch.inference_mode():
                return model(x)

        def cam_feature() -> Any:
            return cam(x).maps

        def cam_upsampled() -> Any:
            return cam(x).upsample().normalize().maps

        def cam_top5() -> Any:
            return cam(x, topk=5).upsample().normalize().maps

        def cam_all() -> Any:
            return cam(x, targets="all").maps

        out: dict[str, Callable[[], Any]] = {
            "forward": forward,
            "cam_feature": cam_feature,
            "cam_upsampled": cam_upsampled,
            "cam_top5": cam_top5,
            "cam_all": cam_all,
        }
        if self.layer_name is not None and self.fc_name is not None and "torchcam" in wanted:
            from torchcam import methods as torchcam_methods

            layer_name, fc_name = self.layer_name, self.fc_name

            def torchcam() -> Any:
                with torchcam_methods.CAM(model, target_layer=layer_name, fc_layer=fc_name) as ex:
                    with torch.inference_mode():
                        scores = model(x)
                    maps = ex(class_idx=scores.argmax(dim=1).tolist(), normalized=False)[0]
                up = F.interpolate(maps[:, None], size=hw, mode="bilinear", align_corners=False)
                return minmax_normalize(up)

            out["torchcam"] = torchcam
        layer, top1 = self.layer, self.top1
        if layer is not None and "gradcam" in wanted:
            from pytorch_grad_cam import GradCAM

            def gradcam() -> Any:
                with GradCAM(model=model, target_layers=[layer]) as gc:
                    maps = gc(input_tensor=x, targets=None)
                model.zero_grad(set_to_none=True)
                return maps

            out["gradcam"] = gradcam
        if layer is not None and ("captum" in wanted or "captum_given" in wanted):
            from captum.attr import LayerAttribution, LayerGradCam

            lgc = LayerGradCam(model, layer)

            def captum_given() -> Any:
                attr = lgc.attribute(x, target=top1)
                up = LayerAttribution.interpolate(attr, hw, interpolate_mode="bilinear")
                return minmax_normalize(up.detach())

            def captum() -> Any:
                # LayerGradCam needs the target before its pass: the top-1 class costs a
                # forward first (CAM, torchcam and grad-cam read it off their own pass)
                with torch.no_grad():  # an inference tensor could not index autograd's output
                    target = model(x).argmax(dim=1)
                attr = lgc.attribute(x, target=target)
                up = LayerAttribution.interpolate(attr, hw, interpolate_mode="bilinear")
                return minmax_normalize(up.detach())

            out["captum"] = captum
            out["captum_given"] = captum_given
        return {k: v for k, v in out.items() if k in wanted}

    # -- agreement ----------------------------------------------------------------------
    def agreement(self, methods: dict[str, Callable[[], Any]]) -> dict[str, dict[str, Any]]:
        """Maps of torchcam / grad-cam / Captum against cam-plugin's, before any timing."""
        torch = self.torch
        import torch.nn.functional as F

        from cam_plugin import minmax_normalize

        res = self.cam(self.x)
        ours = res.maps[:, 0].float()
        scale = float(ours.abs().max())
        out: dict[str, dict[str, Any]] = {}
        if "torchcam" in methods:
            from torchcam import methods as torchcam_methods

            with torchcam_methods.CAM(self.model, self.layer_name, self.fc_name) as ex:
                with torch.inference_mode():
                    scores = self.model(self.x)
                theirs = ex(class_idx=scores.argmax(dim=1).tolist(), normalized=False)[0]
            err = float((theirs.float() - ours).abs().max()) / scale
            out["torchcam"] = {
                "check": "top-1 map at feature resolution, torchcam normalized=False",
                "max_rel_err": err,
                "same_classes": bool(torch.equal(scores.argmax(1), res.classes[:, 0])),
                "agree": err <= 1e-4,
            }
        if "gradcam" in methods:
            from pytorch_grad_cam import GradCAM

            with GradCAM(model=self.model, target_layers=[self.layer]) as gc:
                theirs_np = gc(input_tensor=self.x, targets=None)
            self.model.zero_grad(set_to_none=True)
            theirs = torch.from_numpy(theirs_np).float().to(ours.device)
            mine = res.relu().normalize().upsample(self.hw).normalize().maps[:, 0].float()
            corr = _pearson(theirs, mine)
            out["gradcam"] = {
                "check": "relu -> min-max -> bilinear upsample (grad-cam resizes with OpenCV)",
                "min_corr": corr,
                "max_abs_err": float((theirs - mine).abs().max()),
                "agree": corr >= 0.999,
            }
        if "captum" in methods:
            from captum.attr import LayerAttribution, LayerGradCam

            attr = LayerGradCam(self.model, self.layer).attribute(self.x, target=self.top1)
            attr = attr.detach().float()
            h, w = ours.shape[-2:]
            err = float((attr[:, 0] * (h * w) - ours).abs().max()) / scale
            up_theirs = minmax_normalize(
                LayerAttribution.interpolate(attr, self.hw, interpolate_mode="bilinear")
            )
            up_mine = minmax_normalize(
                F.interpolate(ours[:, None], self.hw, mode="bilinear", align_corners=False)
            )
            out["captum"] = {
                "check": "LayerGradCam x h*w vs top-1 map (GAP: gradient = w/hw); then both "
                "bilinear + min-max",
                "max_rel_err": err,
                "max_abs_err_normalized": float((up_theirs - up_mine).abs().max()),
                "agree": err <= 1e-4,
            }
            out["captum_given"] = out["captum"]
        return out

    # -- timing -------------------------------------------------------------------------
    def timer(self) -> Callable[[Callable[[], Any]], float]:
        torch = self.torch
        if self.device.startswith("cuda"):

            def cuda_time(fn: Callable[[], Any]) -> float:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                return float(start.elapsed_time(end)) / 1000.0

            return cuda_time

        def cpu_time(fn: Callable[[], Any]) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        return cpu_time


def _pearson(a: Any, b: Any) -> float:
    """Smallest per-image Pearson correlation of two ``(B, H, W)`` batches."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    num = (a * b).sum(1)
    den = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)
    return float((num / den).min())


def run_rounds(
    methods: dict[str, Callable[[], Any]],
    timer: Callable[[Callable[[], Any]], float],
    warmup: int,
    repeats: int,
    budget_s: Optional[float] = None,
) -> dict[str, dict[str, Any]]:
    """Interleaved rounds; per method its times, page faults and per-round ratio to forward."""
    import gc
    import resource
    import statistics

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
    out: dict[str, dict[str, Any]] = {}
    for n in names:
        ts = times[n]
        out[n] = {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "max_s": max(ts),
            "times_s": ts,
            "minflt_median": statistics.median(faults[n]),
            "ratio_median": statistics.median(ratios[n]) if ratios[n] else None,
            "ratio_min": min(ratios[n]) if ratios[n] else None,
            "ratio_max": max(ratios[n]) if ratios[n] else None,
            "cpu_s": cpu[n],
            "cpu_ratio_median": statistics.median(cpu_ratios[n]) if cpu_ratios[n] else None,
            "rounds": len(ts),
        }
    return out


# grad-cam's and Captum's autograd passes grow glibc's heap (a batch-16 ResNet-50 backward keeps
# GBs live at once); the heap is then not trimmed, and every call after them in that process
# stops page-faulting. They are therefore timed in their own child, with the forward and the
# top-1 upsampled CAM as in-process references, so the other methods see the heap a plain
# inference process has.
GROUPS = {
    "inference": ["forward", "cam_feature", "cam_upsampled", "cam_top5", "cam_all", "torchcam"],
    "autograd": ["forward", "cam_upsampled", "gradcam", "captum", "captum_given"],
}


def worker_time(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args.model, args.batch, args.device, args.threads)
    methods = bench.methods(GROUPS[args.group])
    agreement = bench.agreement(methods)
    results = run_rounds(methods, bench.timer(), args.warmup, args.repeats, args.budget)
    return {"agreement": agreement, "results": results, "env": _env_info(bench.torch, args)}


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _hwm_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def worker_memory(args: argparse.Namespace) -> dict[str, Any]:
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
    base = _rss_kib()
    how = "VmHWM after /proc/self/clear_refs reset"
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        how = "ru_maxrss (peak-RSS reset not permitted; includes set-up)"
    for _ in range(2):
        fn()
    peak = (
        _hwm_kib()
        if how.startswith("VmHWM")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    return {
        "how": how,
        "base_mib": base / 1024,
        "peak_mib": peak / 1024,
        "delta_mib": (peak - base) / 1024,
    }


def _tensor_peak_bytes(fn: Callable[[], Any]) -> int:
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
            peak = _tensor_peak_bytes(fn)
        out[name] = {"peak_mib": peak / 2**20}
    how = "cuda max_memory_allocated" if cuda else "torch profiler, live tensor bytes"
    return {"how": how + ", peak during one call over what was live before", "methods": out}


def worker_fast(args: argparse.Namespace) -> dict[str, Any]:
    """Bulk fast path: CAMModule eager channels_last, torch.compile, onnxruntime."""
    import copy
    import tempfile

    bench = Bench(args.model, args.batch, args.device, args.threads)
    torch = bench.torch
    from cam_plugin.export import CAMModule, export_onnx

    model, x, cam = bench.model, bench.x, bench.cam
    ref = cam(x).upsample().normalize()
    opts = {"topk": 1, "upsample": True, "normalize": True}
    methods: dict[str, Callable[[], Any]] = {}
    info: dict[str, dict[str, Any]] = {}

    def forward() -> Any:
        with torch.inference_mode():
            return model(x)

    def cam_eager() -> Any:
        return cam(x).upsample().normalize().maps

    methods["forward"] = forward
    methods["cam_eager"] = cam_eager
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    module_cl = CAMModule(model_cl, **opts).eval()

    def module_channels_last() -> Any:
        with torch.inference_mode():
            return module_cl(x_cl)

    methods["module_channels_last"] = module_channels_last
    info["module_channels_last"] = {"trunk": module_cl.trunk}
    if not args.no_compile:
        try:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            compiled = torch.compile(module_cl)
            t0 = time.perf_counter()
            with torch.inference_mode():
                compiled(x_cl)
            info["module_compile"] = {"compile_s": time.perf_counter() - t0}

            def module_compile() -> Any:
                with torch.inference_mode():
                    return compiled(x_cl)

            methods["module_compile"] = module_compile
        except Exception as err:  # report, do not hide
            info["module_compile"] = {"error": f"{type(err).__name__}: {err}"[:300]}
    if not args.no_onnx:
        try:
            import onnxruntime as ort

            tmp = tempfile.mkdtemp()
            t0 = time.perf_counter()
            path = export_onnx(
                CAMModule(model, **opts), os.path.join(tmp, "cam.onnx"), example=x[:2]
            )
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.inter_op_num_threads = 1
            providers = ["CPUExecutionProvider"]
            if args.device.startswith("cuda") and "CUDAExecutionProvider" in (
                ort.get_available_providers()
            ):
                providers.insert(0, "CUDAExecutionProvider")
            sess = ort.InferenceSession(path, so, providers=providers)
            info["onnxruntime"] = {
                "export_and_load_s": time.perf_counter() - t0,
                "providers": sess.get_providers(),
            }
            x_np = x.cpu().numpy()

            def onnxruntime() -> Any:
                outs = sess.run(None, {"images": x_np})
                return [torch.from_numpy(o) for o in outs]

            if providers[0] == "CPUExecutionProvider" and args.device.startswith("cuda"):
                info["onnxruntime"]["note"] = "no CUDA provider: CPU onnxruntime"
            methods["onnxruntime"] = onnxruntime
        except Exception as err:
            info["onnxruntime"] = {"error": f"{type(err).__name__}: {err}"[:300]}
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
    return {"results": results, "info": info, "env": _env_info(torch, args)}


def worker_breakdown(args: argparse.Namespace) -> dict[str, Any]:
    """Cost of each step a CAM call adds after the forward, on a real forward's features."""
    import statistics

    import torch.nn.functional as F

    from cam_plugin import minmax_normalize, parse_targets
    from cam_plugin.cam import _all_finite
    from cam_plugin.hooks import FeatureCapture

    bench = Bench(args.model, args.batch, args.device, args.threads)
    torch, cam, x = bench.torch, bench.cam, bench.x
    adapter = cam.adapter
    with torch.no_grad(), FeatureCapture(adapter.feature_module, adapter.capture) as cap:
        logits = bench.model(x)
        captured = cap.value
    assert captured is not None
    feats = adapter.features(captured, bench.hw)
    head = adapter.fold(feats.shape[1])
    classes = parse_targets(None, logits, 1)
    top1 = head.maps(feats, classes)
    timer = bench.timer()

    def fwd() -> Any:
        with torch.inference_mode():
            return bench.model(x)

    steps: dict[str, Callable[[], Any]] = {
        "forward": fwd,
        "finite check, elementwise isfinite(images).all() (before)": lambda: bool(
            torch.isfinite(x).all()
        ),
        "finite check, isfinite(sum) first (now)": lambda: _all_finite(x),
        "head fold (per call)": lambda: adapter.fold(feats.shape[1]),
        "exactness check (verify=True)": lambda: cam._verify(adapter, head, feats, logits),
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
    return {"steps": out, "env": _env_info(torch, args)}


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _env_info(torch: Any, args: argparse.Namespace) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "dtype": "float32",
        "versions": {
            d: _version(d)
            for d in (
                "torch",
                "timm",
                "torchcam",
                "grad-cam",
                "captum",
                "onnxruntime",
                "numpy",
                "cam-plugin",
            )
        },
    }
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


# =============================================================================================
# parent (no torch)
# =============================================================================================
def _child(argv: list[str], env_extra: dict[str, str], threads: int, timeout: float) -> Any:
    env = dict(os.environ)
    env.update(env_extra)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "PYTHONWARNINGS": "ignore",
            "TQDM_DISABLE": "1",
        }
    )
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@RESULT "):
            return json.loads(line[len("@@RESULT ") :])
    tail = (proc.stderr or proc.stdout)[-1500:]
    return {"error": f"child {' '.join(argv)} failed (rc {proc.returncode}): {tail}"}


def _loadavg() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run_parent(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    common = ["--device", args.device, "--threads", str(args.threads)]
    report: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "smoke": args.smoke,
        "config": {
            "models": args.models,
            "batches": args.batches,
            "threads": args.threads,
            "device": args.device,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "allocators": args.allocators,
            "fast_allocators": args.fast_allocators,
            "allocator_models": args.allocator_models,
            "rss_batches": args.rss_batches,
            "rss_forward_repeats": args.rss_forward_repeats,
        },
        "load_before": _loadavg(),
        "timing": [],
        "memory": [],
        "tensors": [],
        "fast": [],
        "breakdown": [],
    }
    allocators = args.allocators if args.device == "cpu" else ["default"]
    fast_allocators = args.fast_allocators if args.device == "cpu" else ["default"]

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    for model in args.models:
        # the allocator variants (a process each) for the models asked for, by default the
        # first one (the targets are stated for it)
        variants = args.allocator_models or args.models[:1]
        model_allocs = allocators if model in variants else allocators[:1]
        model_fast_allocs = fast_allocators if model in variants else fast_allocators[:1]
        for batch in args.batches:
            # small batches are quick and noisier: more rounds
            reps = args.repeats if batch >= 8 else 3 * args.repeats
            for alloc in model_allocs:
                merged: dict[str, Any] = {"results": {}, "agreement": {}, "references": {}}
                for group in GROUPS:
                    log(f"timing {model} batch {batch} allocator {alloc} ({group})")
                    out = _child(
                        [
                            "--worker",
                            "time",
                            "--group",
                            group,
                            "--model",
                            model,
                            "--batch",
                            str(batch),
                            "--warmup",
                            str(args.warmup),
                            "--repeats",
                            str(reps),
                            "--budget",
                            str(args.budget),
                            *common,
                        ],
                        ALLOCATORS[alloc],
                        args.threads,
                        args.timeout,
                    )
                    if "error" in out:
                        merged.setdefault("errors", []).append(out["error"])
                        continue
                    merged["env"] = out["env"]
                    merged["agreement"].update(out["agreement"])
                    for name, res in out["results"].items():
                        if group == "autograd" and name in GROUPS["inference"]:
                            merged["references"][name] = res  # the in-child references
                        else:
                            merged["results"][name] = res
                if merged.get("errors") and not merged["results"]:
                    merged = {"error": " | ".join(merged["errors"])}
                report["timing"].append(
                    {
                        "model": model,
                        "batch": batch,
                        "allocator": alloc,
                        "load": _loadavg(),
                        **merged,
                    }
                )
            if args.memory:
                log(f"tensor memory {model} batch {batch}")
                out = _child(
                    ["--worker", "tensors", "--model", model, "--batch", str(batch), *common]
                    + ["--memory-methods", *args.memory_methods],
                    {},
                    args.threads,
                    args.timeout,
                )
                report["tensors"].append({"model": model, "batch": batch, **out})
            rss_batches = args.rss_batches or [max(args.batches)]
            if args.memory and batch in rss_batches:
                runs = [
                    (m, i)
                    for m in args.memory_methods
                    for i in range(args.rss_forward_repeats if m == "forward" else 1)
                ]
                for method, repeat in runs:
                    log(f"memory (RSS) {model} batch {batch} {method}")
                    out = _child(
                        [
                            "--worker",
                            "memory",
                            "--model",
                            model,
                            "--batch",
                            str(batch),
                            "--method",
                            method,
                            *common,
                        ],
                        {},
                        args.threads,
                        args.timeout,
                    )
                    report["memory"].append(
                        {"model": model, "batch": batch, "method": method, "repeat": repeat, **out}
                    )
        if args.fast:
            for alloc in model_fast_allocs:
                log(f"fast path {model} batch {args.fast_batch} allocator {alloc}")
                extra = (["--no-compile"] if args.no_compile else []) + (
                    ["--no-onnx"] if args.no_onnx else []
                )
                out = _child(
                    [
                        "--worker",
                        "fast",
                        "--model",
                        model,
                        "--batch",
                        str(args.fast_batch),
                        "--warmup",
                        str(args.warmup),
                        "--repeats",
                        str(args.repeats),
                        "--budget",
                        str(args.budget),
                        *extra,
                        *common,
                    ],
                    ALLOCATORS[alloc],
                    args.threads,
                    args.timeout,
                )
                report["fast"].append(
                    {"model": model, "batch": args.fast_batch, "allocator": alloc, **out}
                )
    if args.breakdown and args.models:
        for batch in args.batches:
            log(f"breakdown {args.models[0]} batch {batch}")
            out = _child(
                ["--worker", "breakdown", "--model", args.models[0], "--batch", str(batch)]
                + common,
                {},
                args.threads,
                args.timeout,
            )
            report["breakdown"].append({"model": args.models[0], "batch": batch, **out})
    report["load_after"] = _loadavg()
    report["wall_s"] = time.perf_counter() - t_start
    env = next((t["env"] for t in report["timing"] if "env" in t), None)
    report["env"] = env
    return report


# -- the markdown ------------------------------------------------------------------------------
def _ms(s: Optional[float]) -> str:
    return "–" if s is None else (f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}")


def _x(r: Optional[float]) -> str:
    return "–" if r is None else f"{r:.2f}x"


def _find(rows: list[dict[str, Any]], **kw: Any) -> Optional[dict[str, Any]]:
    return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)


def _ratio(
    report: dict[str, Any], model: str, batch: int, method: str, alloc: str = "default"
) -> Optional[float]:
    row = _find(report["timing"], model=model, batch=batch, allocator=alloc)
    if not row or "results" not in row or method not in row["results"]:
        return None
    return row["results"][method]["ratio_median"]


def _tensor_peak(report: dict[str, Any], model: str, batch: int, method: str) -> Optional[float]:
    row = _find(report.get("tensors", []), model=model, batch=batch)
    entry = (row or {}).get("methods", {}).get(method)
    return None if entry is None else float(entry["peak_mib"])


def _rss_band(
    report: dict[str, Any], model: str, batch: int
) -> Optional[tuple[float, float, float]]:
    """(min, max, median) of the plain forward's peak RSS Δ over its repeated children."""
    import statistics

    vals = [
        float(r["delta_mib"])
        for r in report["memory"]
        if r.get("model") == model
        and r.get("batch") == batch
        and r.get("method") == "forward"
        and "delta_mib" in r
    ]
    return (min(vals), max(vals), statistics.median(vals)) if vals else None


def _paired(
    report: dict[str, Any],
    model: str,
    batch: int,
    alloc: str,
    num: str,
    den: str,
) -> Optional[float]:
    """Median over rounds of time(num) / time(den), both from the same child: the methods of
    the autograd child against its in-child references, the others within the inference
    child. Paired per round, so drift between rounds cancels."""
    import statistics

    row = _find(report["timing"], model=model, batch=batch, allocator=alloc) or {}
    results, refs = row.get("results", {}), row.get("references", {})
    autograd = set(GROUPS["autograd"]) - set(GROUPS["inference"])
    if num in autograd:
        a, b = results.get(num), refs.get(den)
    else:
        a, b = results.get(num), results.get(den)
    if not a or not b or len(a["times_s"]) != len(b["times_s"]):
        return None
    return statistics.median(x / y for x, y in zip(a["times_s"], b["times_s"]))


def _agree_text(agreement: dict[str, Any], method: str) -> str:
    a = agreement.get(method)
    if a is None:
        return "reference" if method.startswith("cam_") or method == "forward" else "–"
    txt = f"corr {a['min_corr']:.5f}" if "min_corr" in a else f"rel. err {a['max_rel_err']:.1e}"
    return ("✅ " if a["agree"] else "❌ DIFFERS: ") + txt


def render_markdown(report: dict[str, Any]) -> str:
    env = report.get("env") or {}
    versions = env.get("versions", {})
    lines = [
        MARK_START,
        f"_Generated by `benchmarks/speed.py` on {report['date']}"
        f"{' (smoke run)' if report['smoke'] else ''}._",
        "",
        f"**Machine:** {env.get('cpu', '?')}, {env.get('logical_cpus', '?')} logical CPUs, "
        f"{env.get('threads', '?')} torch threads, device `{env.get('device', '?')}`"
        f"{(', GPU ' + env['gpu']) if env.get('gpu') else ''}, {env.get('dtype', 'float32')}; "
        f"load average before/after {report.get('load_before')} / {report.get('load_after')} "
        f"(the machine is shared). Python {env.get('python', '?')}, {env.get('platform', '?')}.",
        "",
        "**Versions:** " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".",
        "",
        f"Total wall time of the run: {report.get('wall_s', 0):.0f} s.",
        "",
    ]
    models = report["config"]["models"]
    batches = report["config"]["batches"]
    allocs = [
        a
        for a in report["config"]["allocators"]
        if _find(report["timing"], allocator=a) is not None
    ]
    for model in models:
        lines += [f"### {model}", ""]
        head = f"| batch | method | median ms (min–max), `{allocs[0] if allocs else '?'}` | "
        head += "× forward | × forward, CPU time | "
        head += " | ".join(f"× forward, `{a}` (median ms)" for a in allocs[1:])
        head += (" | " if len(allocs) > 1 else "") + (
            "peak tensor MiB (× forward's) | peak RSS Δ MiB (× forward's) | agreement |"
        )
        lines.append(head)
        lines.append("|" + "---|" * (head.count("|") - 1))
        for batch in batches:
            row0 = (
                _find(report["timing"], model=model, batch=batch, allocator=allocs[0])
                if (allocs)
                else None
            )
            if not row0 or "results" not in row0:
                err = (row0 or {}).get("error", "no result")
                lines.append(f"| {batch} | (failed: {str(err)[:200]}) |" + " |" * 5)
                continue
            agreement = row0.get("agreement", {})
            mem_fwd = _find(report["memory"], model=model, batch=batch, method="forward")
            for method in METHODS:
                if method not in row0["results"]:
                    continue
                r = row0["results"][method]
                a = agreement.get(method)
                differs = a is not None and not a["agree"]
                ratio = "differs (see agreement)" if differs else _x(r["ratio_median"])
                extra = []
                for alloc in allocs[1:]:
                    rr = _find(report["timing"], model=model, batch=batch, allocator=alloc)
                    res = (rr or {}).get("results", {}).get(method)
                    extra.append(
                        "differs"
                        if differs
                        else (
                            f"{_x(res['ratio_median'])} ({_ms(res['median_s'])} ms)" if res else "–"
                        )
                    )
                tens = _tensor_peak(report, model, batch, method)
                tens_fwd = _tensor_peak(report, model, batch, "forward")
                memtxt = "–"
                if tens is not None:
                    memtxt = f"{tens:.0f}"
                    if tens_fwd:
                        memtxt += f" ({tens / tens_fwd:.2f}x)"
                mem = _find(report["memory"], model=model, batch=batch, method=method)
                rsstxt = "–"
                if mem and "delta_mib" in mem:
                    rsstxt = f"{mem['delta_mib']:.0f}"
                    if method == "forward":
                        band = _rss_band(report, model, batch)
                        if band and band[0] != band[1]:
                            rsstxt = f"{band[2]:.0f} ({band[0]:.0f}–{band[1]:.0f}, noise)"
                    elif mem_fwd and mem_fwd.get("delta_mib"):
                        fwd_med = (_rss_band(report, model, batch) or (0, 0, 0))[2]
                        if fwd_med > 0:
                            rsstxt += f" ({mem['delta_mib'] / fwd_med:.2f}x)"
                cells = [
                    str(batch),
                    LABELS[method],
                    f"{_ms(r['median_s'])} ({_ms(r['min_s'])}–{_ms(r['max_s'])})",
                    ratio,
                    "differs" if differs else _x(r.get("cpu_ratio_median")),
                    *extra,
                    memtxt,
                    rsstxt,
                    _agree_text(agreement, method),
                ]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if report.get("tensors") or report["memory"]:
            m = _find(report["memory"], model=model)
            text = (
                "Peak tensor memory: the most bytes held by live tensors during one call, over "
                "what was live before it (torch's profiler with `profile_memory=True`, every "
                "allocation and free of torch's allocator; deterministic), all methods in one "
                "child after one untimed call each."
            )
            if m and m.get("how"):
                text += (
                    " Peak RSS Δ: what the process's resident memory rose to over its RSS after "
                    f"set-up, each method in its own child process ({m['how']}); it also counts "
                    "how glibc reuses and returns freed pages, so the same forward measured in "
                    f"{report['config'].get('rss_forward_repeats', 1)} separate child processes "
                    "gives the noise band shown in its row (median, min–max). Absolute peaks "
                    "of the forward: "
                    + ", ".join(
                        f"batch {b}: {f['peak_mib']:.0f} MiB"
                        for b in batches
                        if (f := _find(report["memory"], model=model, batch=b, method="forward"))
                        and "peak_mib" in f
                    )
                    + "."
                )
            lines += [text, ""]
        faults, refs = [], []
        for batch in batches:
            for alloc in allocs:
                rr = _find(report["timing"], model=model, batch=batch, allocator=alloc)
                if rr and "results" in rr and "forward" in rr["results"]:
                    fw = rr["results"]["forward"]
                    faults.append(
                        f"batch {batch} `{alloc}`: {_ms(fw['median_s'])} ms, "
                        f"{fw['minflt_median']:.0f} minor page faults"
                    )
                ref = (rr or {}).get("references", {})
                if "forward" in ref and "cam_upsampled" in ref:
                    refs.append(
                        f"batch {batch} `{alloc}`: forward {_ms(ref['forward']['median_s'])} ms "
                        f"({ref['forward']['minflt_median']:.0f} faults), top-1 upsampled CAM "
                        f"{_x(ref['cam_upsampled']['ratio_median'])}"
                    )
        if faults:
            lines += ["Plain forward per call (inference child): " + "; ".join(faults) + ".", ""]
        if refs:
            lines += [
                "grad-cam and Captum are timed in their own child process, interleaved with a "
                "plain forward and the top-1 upsampled CAM (their backward passes leave glibc's "
                "heap grown, which changes the page faults of everything run after them in a "
                "process); their × forward is relative to that child's forward: "
                + "; ".join(refs)
                + ".",
                "",
            ]
    lines += _targets_markdown(report)
    lines += _breakdown_markdown(report)
    lines += _fast_markdown(report)
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


def _targets_markdown(report: dict[str, Any]) -> list[str]:
    """The issue's targets, for the first model of the run (timm resnet50 in `make bench`)."""
    models, batches = report["config"]["models"], report["config"]["batches"]
    if not models or not report["timing"]:
        return []
    model = models[0]
    big = max(batches)
    checks: list[tuple[str, Optional[float], float, str]] = []

    def rat(b: int, m: str, alloc: str = "default") -> Optional[float]:
        return _ratio(report, model, b, m, alloc)

    for alloc in [
        a
        for a in report["config"]["allocators"]
        if _find(report["timing"], model=model, allocator=a) is not None
    ]:
        tag = f" (`{alloc}`)"
        for b in sorted(set(batches), reverse=True):
            # the targets: the large batch is the bulk case, batch 1 the latency case
            up_t, gc_t, ca_t = (1.03, 2.2, 1.45) if b == big else (1.05, 3.0, 2.0)
            checks += [
                (
                    f"CAM top-1 upsampled+normalized / forward, batch {b}{tag}",
                    rat(b, "cam_upsampled", alloc),
                    up_t,
                    "≤",
                ),
                (f"CAM all classes / forward, batch {b}{tag}", rat(b, "cam_all", alloc), 1.05, "≤"),
                (
                    f"grad-cam GradCAM time / CAM time, batch {b}{tag}",
                    _paired(report, model, b, alloc, "gradcam", "cam_upsampled"),
                    gc_t,
                    "≥",
                ),
                (
                    f"Captum LayerGradCam time / CAM time, top-1 found by each, batch {b}{tag}",
                    _paired(report, model, b, alloc, "captum", "cam_upsampled"),
                    ca_t,
                    "≥",
                ),
                (
                    f"Captum time / CAM time, Captum given the class, batch {b}{tag}",
                    _paired(report, model, b, alloc, "captum_given", "cam_upsampled"),
                    ca_t,
                    "info",
                ),
                (
                    f"CAM time / torchcam CAM time (same work), batch {b}{tag}",
                    _paired(report, model, b, alloc, "cam_upsampled", "torchcam"),
                    1.02,
                    "≤",
                ),
            ]
    for b in batches:
        fwd_t = _tensor_peak(report, model, b, "forward")
        cam_t = _tensor_peak(report, model, b, "cam_upsampled")
        if fwd_t and cam_t is not None:
            checks.append(
                (
                    f"peak tensor memory of CAM / of the forward, batch {b}",
                    cam_t / fwd_t,
                    1.10,
                    "≤",
                )
            )
        band = _rss_band(report, model, b)
        reps = report["config"].get("rss_forward_repeats", 1)
        cam = _find(report["memory"], model=model, batch=b, method="cam_upsampled")
        if band and band[2] > 0 and cam and "delta_mib" in cam:
            checks.append(
                (
                    f"peak RSS Δ of CAM / of the forward (median of {reps} children, spread "
                    f"{band[0]:.0f}–{band[1]:.0f} MiB), batch {b}",
                    cam["delta_mib"] / band[2],
                    1.10,
                    "≤",
                )
            )
    lines = [
        f"### Targets ({model}, {report['env']['threads'] if report.get('env') else '?'} threads)",
        "",
        "| check | measured | target | met |",
        "|---|---|---|---|",
    ]
    for label, value, target, op in checks:
        if value is None:
            lines.append(f"| {label} | – | {op} {target} | – |")
            continue
        if op == "info":
            lines.append(f"| {label} | {value:.3f} | (for reference) | – |")
            continue
        ok = value <= target if op == "≤" else value >= target
        lines.append(f"| {label} | {value:.3f} | {op} {target} | {'✅' if ok else '❌'} |")
    lines.append("")
    return lines


def _breakdown_markdown(report: dict[str, Any]) -> list[str]:
    rows = [r for r in report.get("breakdown", []) if "steps" in r]
    if not rows:
        return []
    names = list(rows[0]["steps"])
    head = "| step | " + " | ".join(f"batch {r['batch']}: ms (share of forward)" for r in rows)
    lines = [
        f"### What a CAM call adds after the forward ({rows[0]['model']})",
        "",
        head + " |",
        "|---|" + "---|" * len(rows),
    ]
    for name in names:
        cells = []
        for r in rows:
            t, fwd = r["steps"][name], r["steps"]["forward"]
            cells.append(f"{t * 1e3:.3f} ({100 * t / fwd:.2f} %)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Median of 25 calls each (forward: 5), same threads as above.", ""]
    return lines


def _fast_markdown(report: dict[str, Any]) -> list[str]:
    if not report["fast"]:
        return []
    lines = [
        "### Fast path for bulk work",
        "",
        "| model | batch | allocator | method | images/s | × eager forward | "
        "× eager forward, `default` allocator | maps vs eager (rel. err) | set-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["fast"]:
        if "results" not in row:
            lines.append(
                f"| {row['model']} | {row['batch']} | {row['allocator']} | failed: "
                f"{str(row.get('error'))[:200]} | | | | | |"
            )
            continue
        res, info = row["results"], row.get("info", {})
        base = _find(report["fast"], model=row["model"], batch=row["batch"], allocator="default")
        base_fwd = (base or {}).get("results", {}).get("forward", {}).get("median_s")
        for name in FAST:
            i = info.get(name, {})
            if name not in res:
                if "error" in i:
                    lines.append(
                        f"| {row['model']} | {row['batch']} | {row['allocator']} | "
                        f"{FAST_LABELS[name]} | failed: {i['error'][:150]} | | | | |"
                    )
                continue
            r = res[name]
            ips = row["batch"] / r["median_s"]
            speed = None if not r["ratio_median"] else 1.0 / r["ratio_median"]
            cross = None if base_fwd is None else base_fwd / r["median_s"]
            if "max_rel_err" in i:
                err = ("✅ " if i["agree"] else "❌ ") + f"{i['max_rel_err']:.1e}"
                if not i.get("same_classes", True):
                    err += " (classes differ)"
            else:
                err = "reference" if name == "cam_eager" else "–"
            setup = ""
            if "compile_s" in i:
                setup = f"compile {i['compile_s']:.0f} s"
            elif "export_and_load_s" in i:
                setup = f"export+load {i['export_and_load_s']:.0f} s"
            lines.append(
                f"| {row['model']} | {row['batch']} | `{row['allocator']}` | {FAST_LABELS[name]} "
                f"| {ips:.1f} | {_x(speed)} | {_x(cross)} | {err} | {setup} |"
            )
    lines += [
        "",
        "× eager forward: images per second relative to the eager plain forward of the same "
        "child process, same rounds (per-round ratio, median). × eager forward, `default` "
        "allocator: relative to the eager forward's median in the `default`-allocator child "
        "(another process, so drift between the two is not cancelled).",
        "",
    ]
    return lines


def write_outputs(report: dict[str, Any], json_path: Path, md_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    table = render_markdown(report)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    if md_path.exists():
        text = md_path.read_text()
        if MARK_START in text and MARK_END in text:
            pre = text.split(MARK_START)[0]
            post = text.split(MARK_END, 1)[1]
            md_path.write_text(pre + table.rstrip("\n") + post)
            return
        md_path.write_text(text.rstrip("\n") + "\n\n" + table)
        return
    md_path.write_text("# Speed benchmark\n\n" + table)


# =============================================================================================
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--models",
        nargs="+",
        default=["resnet50", "lite0"],
        help="resnet50, lite0 (the real EfficientNet-Lite0), tiny, timm:<name>",
    )
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument(
        "--allocators", nargs="+", default=["default", "mmap_max_0"], choices=list(ALLOCATORS)
    )
    p.add_argument(
        "--fast-allocators", nargs="+", default=["default", "keep_freed"], choices=list(ALLOCATORS)
    )
    p.add_argument(
        "--allocator-models",
        nargs="+",
        default=None,
        help="models timed with every allocator setting (default: the first model; the "
        "others with the first setting only)",
    )
    p.add_argument(
        "--rss-batches",
        nargs="+",
        type=int,
        default=None,
        help="batch sizes whose peak RSS is measured, a child per method (default: largest)",
    )
    p.add_argument(
        "--rss-forward-repeats",
        type=int,
        default=3,
        help="children measuring the plain forward's RSS (their spread is the noise band)",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument(
        "--budget",
        type=float,
        default=150.0,
        help="stop a child's rounds after this many seconds (at least 3 rounds)",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="per child, seconds")
    p.add_argument(
        "--memory-methods",
        nargs="+",
        default=[m for m in METHODS if m != "captum_given"],
        choices=METHODS,
    )
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--no-fast", dest="fast", action="store_false")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    p.add_argument("--fast-batch", type=int, default=16)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, batch 2, two rounds, two memory children, no compile",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="write speed.json and benchmarks.md here instead of the repository",
    )
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "speed.json")
    p.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks.md")
    # child mode
    p.add_argument(
        "--worker",
        choices=["time", "memory", "tensors", "fast", "breakdown"],
        help=argparse.SUPPRESS,
    )
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--group", choices=list(GROUPS), default="inference", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke and args.worker is None:
        args.models, args.batches, args.fast_batch = ["tiny"], [2], 2
        args.warmup, args.repeats, args.budget = 1, 2, 20.0
        args.allocators = args.fast_allocators = ["default"]
        args.memory_methods = ["forward", "cam_upsampled"]
        args.rss_forward_repeats = 1
        args.no_compile = args.no_onnx = True
    if args.out_dir is not None:
        args.json = args.out_dir / "speed.json"
        args.md = args.out_dir / "benchmarks.md"
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        fn = {
            "time": worker_time,
            "memory": worker_memory,
            "tensors": worker_tensors,
            "fast": worker_fast,
            "breakdown": worker_breakdown,
        }[args.worker]
        out = fn(args)
        print("@@RESULT " + json.dumps(out, default=str), flush=True)
        return 0
    if "torch" in sys.modules:  # children must start from an interpreter without torch
        print("warning: torch is already imported in the parent", file=sys.stderr)
    report = run_parent(args)
    write_outputs(report, args.json, args.md)
    print(render_markdown(report))
    print(f"wrote {args.json} and {args.md}")
    failed = [r for r in report["timing"] + report["memory"] + report["fast"] if "error" in r]
    for r in failed:
        print("FAILED:", str(r["error"])[:500], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
