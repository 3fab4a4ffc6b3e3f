"""The paper's Sec. 5 figure from the real EfficientNet-Lite0: a class, its top units, and
each unit's top patches over a small data set (scikit-image's bundled photos).

For each class that the model predicts on the main photos (chelsea, coffee, rocket,
astronaut, the motorcycle), the ``UNITS`` units with the largest class weight ``W'_ck``
(:func:`cam_plugin.units.class_units`) are drawn, one row per unit; each row holds the unit's
``PATCHES`` strongest patches over the data set (:class:`cam_plugin.unit_patches.
UnitPatchCollector`): the box of two feature cells around the cell where the unit's map
peaks, centred by the traced placement and cut from the original photo at full resolution.
The class's CAM on its photo is drawn on the left.

The data set is every colour photo bundled with scikit-image, each whole, mirrored, and as
five crops (the four corners and the centre, 60 % of the side): about 100 pictures.

    python benchmarks/units_figure.py                 # writes docs/assets/units/*.png
    python benchmarks/units_figure.py --out /tmp/u    # elsewhere
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cam_plugin as cp  # noqa: E402
from cam_plugin.image_inputs import prepare_pictures  # noqa: E402
from cam_plugin.models import class_names, load_model  # noqa: E402
from cam_plugin.preprocess import DataConfig  # noqa: E402
from cam_plugin.tracing import feature_placement  # noqa: E402
from cam_plugin.unit_patches import UnitPatchCollector, box_to_original, crop_picture  # noqa: E402
from cam_plugin.viz import overlay, unit_patches_picture  # noqa: E402

MAIN = ("chelsea", "coffee", "rocket", "astronaut", "motorcycle_left")
OTHERS = ("motorcycle_right", "hubble_deep_field", "retina", "ihc", "color", "logo", "grass")
UNITS, PATCHES, BATCH, PATCH_PX = 4, 6, 16, 80


def photos() -> dict[str, np.ndarray]:
    """scikit-image's bundled colour photos as ``(H, W, 3)`` uint8 (no download)."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    out = {}
    for name in MAIN + OTHERS:
        path = next((p for p in folder.glob(f"{name}.*")), None)
        if path is not None:
            out[name] = np.asarray(Image.open(path).convert("RGB"))
    return out


def views(pic: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The whole photo, its mirror, and five crops of 60 % of the side."""
    h, w = pic.shape[:2]
    ch, cw = int(0.6 * h), int(0.6 * w)
    corners = {"tl": (0, 0), "tr": (0, w - cw), "bl": (h - ch, 0), "br": (h - ch, w - cw)}
    corners["c"] = ((h - ch) // 2, (w - cw) // 2)
    out = [("whole", pic), ("mirror", np.ascontiguousarray(pic[:, ::-1]))]
    out += [(k, np.ascontiguousarray(pic[y : y + ch, x : x + cw])) for k, (y, x) in corners.items()]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "assets" / "units"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model("tf_efficientnet_lite0").model.eval()
    config = DataConfig.for_model(model)
    named = photos()
    samples = [(f"{n}/{v}", p) for n, pic in named.items() for v, p in views(pic)]
    pictures = [p for _, p in samples]
    cpu = torch.device("cpu")
    x, prepared = prepare_pictures(pictures, config, device=cpu, dtype=torch.float32)
    adapter = cp.resolve(model, example=x[:1])
    head = adapter.fold()
    weights = head.weight.detach()
    placement = feature_placement(model, tuple(x.shape[1:]), adapter=adapter)
    cam = cp.CAM(model)
    main_rows = [i for i, (n, _) in enumerate(samples) if n.endswith("/whole") and n[:-6] in MAIN]
    res = cam(x[main_rows], topk=1)
    classes = list(dict.fromkeys(int(c) for c in res.classes[:, 0]))
    collector = UnitPatchCollector.for_classes(
        head, classes, top=UNITS, per_unit=PATCHES, placement=placement
    )
    targets = [classes] * BATCH
    for s in range(0, len(x), BATCH):
        batch = x[s : s + BATCH]
        units = cam.units(batch, targets=targets[: len(batch)], top=UNITS, by="weight")
        collector.update(units, list(range(s, s + len(batch))))
    names = class_names(head.num_classes)
    up = res.upsample()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for c in classes:
        j = int((res.classes[:, 0] == c).nonzero()[0])
        side = overlay(prepared[main_rows[j]].picture, up.maps[j, 0])
        rows = []
        for u in collector.by_class[c]:
            crops = []
            for p in collector.records(u):
                g = prepared[p.sample]
                box = box_to_original(p.box, g.scale, g.left, g.top)
                crops.append(crop_picture(pictures[p.sample], box, out=PATCH_PX))
            rows.append((f"unit {u}\nw = {float(weights[c, u]):.3f}", crops))
        title = f"{names[c]} (class {c}): CAM, then its top {UNITS} units by W'ck"
        picture = unit_patches_picture(title, rows, patch=PATCH_PX, label_width=78, side=side)
        slug = "".join(ch if ch.isalnum() else "-" for ch in names[c].split(",")[0].lower())
        path = out / f"{slug}.png"
        # 256 colours: a third of the bytes, the patches still read as photos
        Image.fromarray(picture).quantize(256, dither=Image.Dither.FLOYDSTEINBERG).save(
            path, optimize=True
        )
        written.append(
            {
                "class": c,
                "name": names[c],
                "picture": path.name,
                "units": [
                    {
                        "unit": u,
                        "weight": round(float(weights[c, u]), 4),
                        "patches": [
                            {"sample": samples[p.sample][0], "activation": round(p.activation, 3)}
                            for p in collector.records(u)
                        ],
                    }
                    for u in collector.by_class[c]
                ],
            }
        )
    (out / "units.json").write_text(json.dumps(written, indent=1))
    seconds = time.perf_counter() - start
    print(
        f"{len(samples)} pictures, classes {classes}, placement {placement.stride} "
        f"{placement.offset} ({placement.source}); wrote {len(written)} figures to {out} "
        f"in {seconds:.1f} s on {os.cpu_count()} CPUs"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
