"""Boxes per map and faithfulness metrics: cam-plugin against raw OpenCV and the peers.

Two measurements, one run, one machine:

1. **Boxes per 224 x 224 map** on real CAM maps (the pretrained EfficientNet-Lite0's top
   classes on the bundled photos, upsampled and normalized; smooth random maps when the
   weights are not installed). cam-plugin's rules start from the float maps
   (``threshold_boxes``: the paper's rule; ``contour_boxes``: Choe et al.'s, largest and every
   contour); the raw OpenCV baselines start from the binary masks, computed beforehand:
   ``cv2.connectedComponentsWithStats`` + the largest area per mask, and ``cv2.findContours``
   + ``max(contours, key=cv2.contourArea)`` + ``cv2.boundingRect``, one call per mask. The
   torch labelling (``backend="torch"``, the CUDA path) is shown for reference.
2. **Faithfulness metrics per image** against the peers' implementations of the same metric,
   on the same model, images and maps: Average Drop / Increase (torchcam
   ``ClassificationMetric``), deletion / insertion (torchcam ``DeletionInsertionMetric``,
   same steps and zero substrates), grad-cam's ``CamMultImageConfidenceChange`` and
   ``ROADCombined`` (9 percentiles).

Timing: one thread for torch and OpenCV (``--threads``), every variant run in turn for
``--rounds`` rounds (``--box-rounds`` for the one-threshold box rows), the minimum kept (the
machine may be shared). The box rows are timed in CPU seconds of the calling thread when
``--threads 1`` (all their work runs on it, so other processes do not inflate it); the
metric rows, whose peers may call multi-threaded BLAS, in wall time. Writes the section between
the ``boxes-bench`` markers of ``docs/benchmarks-evaluate.md`` and a JSON report.

    python benchmarks/boxes.py                 # full run
    python benchmarks/boxes.py --quick         # a smoke run (fewer maps, photos, rounds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
START, END = "<!-- boxes-bench:start -->", "<!-- boxes-bench:end -->"
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "stereo_motorcycle")


# --------------------------------------------------------------------------- inputs


def load_photos(names: tuple[str, ...]) -> Tensor:
    """Resize 256, centre-crop 224, mean = std = 0.5 (EfficientNet-Lite0's preprocessing)."""
    from skimage import data as skdata

    batch = []
    for name in names:
        img = getattr(skdata, name)()
        if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
            img = img[0]
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        img = img[..., :3]
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None] / 255
        t = F.interpolate(t, scale_factor=256 / min(t.shape[-2:]), mode="bilinear", antialias=True)
        top, left = (t.shape[-2] - 224) // 2, (t.shape[-1] - 224) // 2
        batch.append((t[..., top : top + 224, left : left + 224] - 0.5) / 0.5)
    return torch.cat(batch)


def lite0() -> nn.Module | None:
    try:
        from cam_plugin.integrations.timm import efficientnet_lite0_pretrained

        return efficientnet_lite0_pretrained()
    except ImportError:
        return None


def box_maps(model: nn.Module | None, images: Tensor, per_image: int) -> tuple[Tensor, str]:
    """``(N, 224, 224)`` normalized maps to box, and where they come from."""
    import cam_plugin as cp

    if model is not None:
        with cp.CAM(model) as cam:
            res = cam(images, topk=per_image).upsample().normalize()
        return res.maps.flatten(0, 1).contiguous(), "EfficientNet-Lite0 CAM maps"
    g = torch.Generator().manual_seed(0)
    n = images.shape[0] * per_image
    x = F.interpolate(torch.rand(n, 1, 7, 7, generator=g), size=(224, 224), mode="bilinear")
    return cp.minmax_normalize(x[:, 0]), "smooth random maps (upsampled 7 x 7)"


# --------------------------------------------------------------------------- timing


#: the clock of the box rows: CPU seconds of the calling thread when all the work runs on it
#: (``--threads 1``: other processes on a shared machine do not inflate it), else wall time;
#: the metric rows (whose peers may call multi-threaded BLAS) always use wall time
BOX_CLOCK: Callable[[], float] = time.perf_counter


def best_of(
    fns: dict[str, Callable[[], Any]], rounds: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Seconds per call: every function once per round, in turn; the minimum per function."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {k: min(v) for k, v in times.items()}


def bench_boxes(maps: Tensor, rounds: int, box_rounds: int) -> dict[str, float]:
    """Milliseconds per map for each rule and its OpenCV baseline."""
    import cv2

    from cam_plugin.localize import contour_boxes, masks, quantize_maps, threshold_boxes
    from cam_plugin.wsol_contours import contour_sweeps

    n = maps.shape[0]
    keep = masks(maps, 0.2).numpy().view(np.uint8)
    q = quantize_maps(maps.double().numpy())
    binary = [(q[i] > int(0.2 * int(q[i].max()))).view(np.uint8) for i in range(n)]

    def raw_components() -> None:
        for m in keep:
            count, _, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
            if count > 1:
                stats[1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))]

    def raw_contours() -> None:
        for b in binary:
            contours = cv2.findContours(b, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
            if contours:
                cv2.boundingRect(max(contours, key=cv2.contourArea))

    def raw_all_contours() -> None:
        for b in binary:
            for c in cv2.findContours(b, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]:
                cv2.boundingRect(c)

    sweep_maps = q[:12]
    thresholds = np.arange(0, 1, 0.01)

    def raw_sweep() -> None:
        for image in sweep_maps:
            peak = int(image.max())
            for t in thresholds:
                _, b = cv2.threshold(image, int(float(t) * peak), 255, cv2.THRESH_BINARY)
                contours = cv2.findContours(b, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
                boxes = [cv2.boundingRect(c) for c in contours]
                if contours:
                    boxes[int(np.argmax([cv2.contourArea(c) for c in contours]))]

    float_sweep = maps[:12].numpy()
    torch_rounds = max(1, rounds // 3)
    fns = {
        "paper rule (threshold_boxes)": lambda: threshold_boxes(maps, 0.2),
        "OpenCV connectedComponentsWithStats": raw_components,
        "contour rule, largest (contour_boxes)": lambda: contour_boxes(maps, 0.2),
        "OpenCV findContours + largest": raw_contours,
        "contour rule, every contour": lambda: contour_boxes(maps, 0.2, multi_contour=True),
        "OpenCV findContours + every box": raw_all_contours,
    }
    out = {k: v / n * 1e3 for k, v in best_of(fns, box_rounds, BOX_CLOCK).items()}
    sweeps = {
        "contour sweep, 100 thresholds (contour_sweeps)": lambda: contour_sweeps(
            float_sweep, thresholds
        ),
        "OpenCV threshold + findContours + boxes, 100 thresholds": raw_sweep,
    }
    per_map = len(sweep_maps)
    out.update({k: v / per_map * 1e3 for k, v in best_of(sweeps, rounds, BOX_CLOCK).items()})
    slow = {"paper rule, torch labelling": lambda: threshold_boxes(maps, 0.2, backend="torch")}
    out.update({k: v / n * 1e3 for k, v in best_of(slow, torch_rounds, BOX_CLOCK).items()})
    return out


def bench_metrics(
    model: nn.Module, images: Tensor, road_images: int, rounds: int, steps: int, di_images: int
) -> list[dict[str, Any]]:
    """Seconds per image of each metric, ours and the peer's, with the largest difference
    between the two numbers."""
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    from torchcam import methods as torchcam_methods
    from torchcam.metrics import ClassificationMetric, DeletionInsertionMetric

    from cam_plugin.evaluate import ROAD, ConfidenceChange, DeletionInsertion

    b = images.shape[0]
    extractor = torchcam_methods.CAM(model, "bn2", "classifier", input_shape=(3, 224, 224))
    with torch.no_grad():
        scores = torch.softmax(model(images), dim=-1)
    classes = scores.argmax(1).tolist()
    cams = extractor.fuse_cams(extractor(classes, scores))
    up = F.interpolate(cams.unsqueeze(1), size=(224, 224), mode="bilinear", align_corners=False)
    softmax = partial(torch.softmax, dim=-1)
    targets = [ClassifierOutputSoftmaxTarget(c) for c in classes]
    rows = []
    results: dict[str, Any] = {}

    def run(name: str, fn: Callable[[], Any]) -> Callable[[], None]:
        def call() -> None:
            results[name] = fn()

        return call

    def torchcam_cls() -> dict[str, float]:
        m = ClassificationMetric(extractor, softmax)
        m.update(images, class_idx=classes)
        return m.summary()

    def ours_cls() -> dict[str, float]:
        m = ConfidenceChange(normalize=False, eps=1e-7)
        m.update(model, images, cams.unsqueeze(1), classes)
        return m.compute()

    n = 224 * 224

    di = slice(0, di_images)

    def torchcam_di() -> dict[str, float]:
        m = DeletionInsertionMetric(extractor, softmax, steps=steps, batch_size=32)
        m.update(images[di], class_idx=classes[di])
        return m.summary()

    def ours_di() -> dict[str, float]:
        m = DeletionInsertion(
            step=-(-n // steps),
            deletion_substrate="zeros",
            insertion_substrate="zeros",
            max_batch=32,
        )
        m.update(model, images[di], cams[di].unsqueeze(1), classes[di])
        return m.compute()

    def grad_cam_change() -> np.ndarray:
        return CamMultImageConfidenceChange()(images, up[:, 0].numpy(), targets, model)

    def ours_change() -> np.ndarray:
        m = ConfidenceChange(normalize=False)
        m.update(model, images, up, classes)
        return m.records()["change"]

    r_img, r_up, r_targets = images[:road_images], up[:road_images], targets[:road_images]

    def grad_cam_road() -> np.ndarray:
        return ROADCombined()(r_img, r_up[:, 0].numpy(), r_targets, model)

    def ours_road() -> np.ndarray:
        m = ROAD(convention="grad-cam")
        m.update(model, r_img, r_up, classes[:road_images])
        rec = m.records()
        return ((rec["lerf_change"] - rec["morf_change"]) / 2).mean(axis=1)

    pairs = [
        ("Average Drop / Increase", "torchcam ClassificationMetric", torchcam_cls, ours_cls, b),
        (
            f"deletion + insertion ({steps} steps)",
            "torchcam DeletionInsertionMetric",
            torchcam_di,
            ours_di,
            b,
        ),
        (
            "confidence change",
            "grad-cam CamMultImageConfidenceChange",
            grad_cam_change,
            ours_change,
            b,
        ),
        (
            "ROAD combined (9 percentiles)",
            "grad-cam ROADCombined",
            grad_cam_road,
            ours_road,
            road_images,
        ),
    ]
    try:
        for metric, peer, theirs, ours, count in pairs:
            reps = rounds if "ROAD" not in metric else 1
            t = best_of({"peer": run("peer", theirs), "ours": run("ours", ours)}, reps)
            rows.append(
                {
                    "metric": metric,
                    "peer": peer,
                    "peer_s_per_image": t["peer"] / count,
                    "ours_s_per_image": t["ours"] / count,
                    "agreement": _agreement(results["peer"], results["ours"]),
                }
            )
    finally:
        extractor.remove_hooks()
    return rows


def _agreement(peer: Any, ours: Any) -> float:
    """Largest absolute difference between the two results (summaries or per-image arrays)."""
    if isinstance(peer, dict):
        pairs = {
            "avg_drop": "average_drop",
            "conf_increase": "increase_in_confidence",
            "deletion_auc": "deletion_auc",
            "insertion_auc": "insertion_auc",
        }
        return max(abs(float(peer[k]) - float(ours[v])) for k, v in pairs.items() if k in peer)
    return float(np.abs(np.asarray(peer, dtype=np.float64) - np.asarray(ours)).max())


# --------------------------------------------------------------------------- report


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def versions() -> str:
    import cv2

    parts = [f"torch {torch.__version__}", f"OpenCV {cv2.__version__}"]
    for dist in ("torchcam", "grad-cam", "timm"):
        try:
            from importlib.metadata import version

            parts.append(f"{dist} {version(dist)}")
        except Exception:  # noqa: BLE001 - a missing peer is reported as such
            parts.append(f"{dist} (not installed)")
    return ", ".join(parts)


def render(report: dict[str, Any]) -> str:
    lines = [
        f"Measured {report['date']} on {report['machine']}, {report['threads']} thread(s); "
        f"{report['versions']}.",
        f"Command: `{report['command']}`.",
        "",
        f"Clock of the box rows: {report['clock']} (minimum over rounds; with one thread all "
        "the work runs on the calling thread, so its CPU time is not inflated by other "
        "processes on a shared machine, though cache and memory contention still are); the "
        "metric rows use wall time.",
        "",
        f"**Boxes per 224 x 224 map** ({report['box_source']}, {report['maps']} maps, threshold "
        "0.2; minimum over rounds). cam-plugin starts from the float maps (checks them, "
        "binarizes, boxes); the raw OpenCV rows start from the binary masks computed "
        "beforehand, except the sweep row, which runs Choe et al.'s steps from the uint8 map "
        "(`cv2.threshold` per threshold) as the WSOL metrics do, on 12 of the maps:",
        "",
        "| rule | cam-plugin (ms / map) | raw OpenCV (ms / map) | ratio |",
        "|---|---:|---:|---:|",
    ]
    b = report["boxes"]
    for ours, raw in (
        ("paper rule (threshold_boxes)", "OpenCV connectedComponentsWithStats"),
        ("contour rule, largest (contour_boxes)", "OpenCV findContours + largest"),
        ("contour rule, every contour", "OpenCV findContours + every box"),
        (
            "contour sweep, 100 thresholds (contour_sweeps)",
            "OpenCV threshold + findContours + boxes, 100 thresholds",
        ),
    ):
        lines.append(f"| {ours} | {b[ours]:.3f} | {b[raw]:.3f} | {b[ours] / b[raw]:.2f}x |")
    lines += [
        f'| paper rule, torch labelling (`backend="torch"`, the CUDA path) | '
        f"{b['paper rule, torch labelling']:.3f} | {b['OpenCV connectedComponentsWithStats']:.3f}"
        f" | {b['paper rule, torch labelling'] / b['OpenCV connectedComponentsWithStats']:.1f}x |",
        "",
        f"**Faithfulness metrics per image** (EfficientNet-Lite0, {report['photos']} photos at "
        f"224 x 224; deletion / insertion on {report['di_images']}, ROAD on "
        f"{report['road_images']}; the same maps and batch sizes (32) for both sides; "
        "`agreement` is the largest difference between the two results, ROAD with the "
        "default noise 0.01 on both sides):",
        "",
        "| metric | peer | peer (s / image) | cam-plugin (s / image) | speed-up | agreement |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in report["metrics"]:
        lines.append(
            f"| {r['metric']} | {r['peer']} | {r['peer_s_per_image']:.3f} | "
            f"{r['ours_s_per_image']:.3f} | "
            f"{r['peer_s_per_image'] / r['ours_s_per_image']:.2f}x | {r['agreement']:.1e} |"
        )
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else "# Evaluation benchmarks\n\n"
    section = f"{START}\n{body}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--box-rounds", type=int, default=40, help="rounds of the one-threshold box rows"
    )
    parser.add_argument("--metric-rounds", type=int, default=3, help="rounds of each metric")
    parser.add_argument("--steps", type=int, default=20, help="deletion / insertion steps")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks-evaluate.md"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "boxes.json"))
    args = parser.parse_args(argv)
    import cv2

    global BOX_CLOCK
    BOX_CLOCK = time.thread_time if args.threads == 1 else time.perf_counter
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    photos = PHOTOS[:2] if args.quick else PHOTOS
    rounds = 2 if args.quick else args.rounds
    model = lite0()
    images = load_photos(photos)
    maps, source = box_maps(model, images, per_image=2 if args.quick else 10)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "threads": args.threads,
        "versions": versions(),
        "command": "python benchmarks/boxes.py" + (" --quick" if args.quick else ""),
        "box_source": source,
        "maps": int(maps.shape[0]),
        "clock": "thread CPU time" if args.threads == 1 else "wall time",
        "boxes": bench_boxes(maps, rounds, 2 if args.quick else args.box_rounds),
        "photos": len(photos),
        "road_images": 1 if args.quick else 2,
        "di_images": 1 if args.quick else 3,
        "metrics": [],
    }
    if model is not None:
        report["metrics"] = bench_metrics(
            model,
            images,
            report["road_images"],
            rounds=args.metric_rounds,
            steps=args.steps,
            di_images=report["di_images"],
        )
    body = render(report) if report["metrics"] else json.dumps(report["boxes"], indent=1)
    print(body)
    if args.doc != "none":
        write_section(Path(args.doc), body)
    if args.json != "none":
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
