"""The clip picture of docs/video.md: a space-time CAM of a briefly trained r3d_18.

The data are made here: clips of ``FRAMES`` grey noise frames ``SIZE x SIZE`` holding two
bright squares: one stays put, the other moves ``STEP`` px per frame to the right (class 0)
or to the left (class 1), each at a random place. Only the direction of motion tells the
classes apart, so a correct prediction needs the frames together, not one frame, and the
square that stays put is no evidence for either class.

The model is torchvision's ``r3d_18`` (random initialisation: nothing is downloaded)
converted with :func:`cam_plugin.convert` at ``layer1`` (stage 0, stride 2): ``GlobalPool3d
→ Linear`` on its ``(64, T, H/2, W/2)`` map, CAM-exact. It is trained with Adam for
``STEPS`` steps of ``BATCH`` fresh clips (about 40 s of CPU time on two cores), then tested
on ``TEST`` new clips. On ``EVAL`` more clips the predicted class's map (upsampled to
``(T, H, W)``, one min-max over each clip) is averaged on the moving square (its box in each
frame), on the square that stays put and over everything; ``clip.json`` records these with
the accuracy and the identity residual. The picture is the predicted class's map on one clip
of each direction with its tube boxes (``0.2 ×`` the clip's maximum),
:func:`cam_plugin.viz_video.clip_picture`.

    python benchmarks/video_figure.py                     # writes docs/assets/video/clip.png
    python benchmarks/video_figure.py --out /tmp/video    # elsewhere
"""

from __future__ import annotations

import argparse
import json
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
from cam_plugin.viz_video import clip_picture  # noqa: E402

FRAMES, SIZE, SQUARE, STEP = 8, 32, 6, 3
STEPS, BATCH, TEST, EVAL, LR = 25, 12, 64, 16, 2e-3
NAMES = ("moving right", "moving left")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def make_clips(
    n: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(frames (n, T, H, W, 3) in [0, 1], labels (n,), boxes (n, T, 4), still (n, 4))``:
    noise, a square that stays put (``still``) and a square moving right (label 0) or left
    (label 1) (``boxes``, per frame); boxes inclusive ``(x0, y0, x1, y1)``."""
    frames = 0.35 + 0.1 * torch.rand(n, FRAMES, SIZE, SIZE, 1, generator=gen)
    frames = frames.repeat(1, 1, 1, 1, 3)
    labels = torch.randint(0, 2, (n,), generator=gen)
    boxes = torch.zeros(n, FRAMES, 4, dtype=torch.long)
    still = torch.zeros(n, 4, dtype=torch.long)
    travel = STEP * (FRAMES - 1)
    for i in range(n):
        sy, sx = (int(v) for v in torch.randint(0, SIZE - SQUARE + 1, (2,), generator=gen))
        frames[i, :, sy : sy + SQUARE, sx : sx + SQUARE] = 0.95  # a square that stays put
        still[i] = torch.tensor([sx, sy, sx + SQUARE - 1, sy + SQUARE - 1])
        y = int(torch.randint(0, SIZE - SQUARE + 1, (1,), generator=gen))
        x = int(torch.randint(0, SIZE - SQUARE - travel + 1, (1,), generator=gen))
        for t in range(FRAMES):
            xt = x + STEP * t if labels[i] == 0 else x + travel - STEP * t
            frames[i, t, y : y + SQUARE, xt : xt + SQUARE] = 0.95
            boxes[i, t] = torch.tensor([xt, y, xt + SQUARE - 1, y + SQUARE - 1])
    return frames, labels, boxes, still


def model_input(frames: torch.Tensor) -> torch.Tensor:
    """``(n, T, H, W, 3)`` frames -> the normalized ``(n, 3, T, H, W)`` the model takes."""
    return ((frames - torch.tensor(MEAN)) / torch.tensor(STD)).permute(0, 4, 1, 2, 3)


def train(seed: int) -> tuple[torch.nn.Module, dict[str, float]]:
    """The converted r3d_18 trained for ``STEPS`` steps; returns it in eval mode and stats."""
    from torchvision.models.video import r3d_18

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = cp.convert(r3d_18(), 2, stage=0, input_size=(3, FRAMES, SIZE, SIZE))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    start = time.perf_counter()
    model.train()
    loss = torch.zeros(())
    for _ in range(STEPS):
        frames, labels, _, _ = make_clips(BATCH, gen)
        loss = torch.nn.functional.cross_entropy(model(model_input(frames)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    frames, labels, _, _ = make_clips(TEST, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        acc = float((model(model_input(frames)).argmax(1) == labels).float().mean())
    return model, {
        "train_seconds": seconds,
        "last_loss": float(loss.detach()),
        "test_accuracy": acc,
    }


def square_means(maps: torch.Tensor, boxes: torch.Tensor, still: torch.Tensor) -> dict[str, float]:
    """Mean of the clip-normalized maps ``(n, T, H, W)`` on the moving square (its box in
    each frame), on the square that stays put, and over every pixel."""
    moving, fixed = [], []
    for i in range(maps.shape[0]):
        x0, y0, x1, y1 = still[i].tolist()
        fixed.append(maps[i, :, y0 : y1 + 1, x0 : x1 + 1].mean())
        for t in range(maps.shape[1]):
            x0, y0, x1, y1 = boxes[i, t].tolist()
            moving.append(maps[i, t, y0 : y1 + 1, x0 : x1 + 1].mean())
    return {
        "map_on_moving_square": float(torch.stack(moving).mean()),
        "map_on_still_square": float(torch.stack(fixed).mean()),
        "map_everywhere": float(maps.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "assets" / "video")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, stats = train(args.seed)
    frames, labels, boxes, still = make_clips(EVAL, torch.Generator().manual_seed(args.seed + 2))
    x = model_input(frames)
    res = cp.CAM(model)(x, topk=1)  # the predicted class's map
    stats["identity_residual"] = float(res.identity_residual().abs().max())
    stats["eval_accuracy"] = float((res.classes[:, 0] == labels).float().mean())
    stats.update(square_means(res.upsample().normalize().maps[:, 0], boxes, still))
    shown = [int(torch.nonzero(labels == c)[0]) for c in range(2)]  # one clip per direction
    rows = [
        clip_picture(res, x[i], i, mean=MEAN, std=STD, class_names=NAMES, min_side=96)
        for i in shown
    ]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows)).save(args.out / "clip.png", optimize=True)
    stats["shown_clips"] = shown  # type: ignore[assignment]
    (args.out / "clip.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
