"""``cam-plugin run`` across processes: ``kill -9`` then resume, torchrun, Ray (issue 12).

Every run here is a real process (``python -m cam_plugin run`` or ``torch.distributed.run``)
on files from :mod:`test_run_data`; the outputs are compared with an uninterrupted
one-process run: manifest rows equal, maps equal bit for bit, ``boxes.json`` equal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_run_data import run_data

pq = pytest.importorskip("pyarrow.parquet")
zarr = pytest.importorskip("zarr")

COMMON = [
    "--model",
    "tinynets:tiny",
    "--input-size",
    "64",
    "--crop-pct",
    "1.0",
    "--workers",
    "0",
    "--batch-size",
    "4",
    "--shard-size",
    "8",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    (tmp_path_factory.getbasetemp() / "run-data").mkdir(exist_ok=True)
    base = run_data(tmp_path_factory)
    (base / "forty.txt").write_text("".join(f"images/{i:04d}.jpg\n" for i in range(40)))
    wsol40 = base / "wsol40"
    wsol40.mkdir(exist_ok=True)
    for name in ("image_ids.txt", "class_labels.txt", "localization.txt"):
        lines = (base / "wsol" / name).read_text().splitlines()[:40]
        (wsol40 / name).write_text("\n".join(lines) + "\n")
    return base


def _env() -> dict[str, str]:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    return env


def start(root: Path, *args: str, torchrun: int = 0) -> subprocess.Popen[str]:
    head = [sys.executable, "-m", "cam_plugin"]
    if torchrun:
        head = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={torchrun}",
            "-m",
            "cam_plugin",
        ]
    return subprocess.Popen(
        [*head, "run", *args],
        cwd=root,
        env=_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> int:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return proc.returncode


def same_outputs(a: Path, b: Path) -> None:
    """Manifest rows equal, every shard's maps equal bit for bit, boxes.json equal."""
    ra, rb = (pq.read_table(p / "manifest.parquet").to_pylist() for p in (a, b))
    assert ra == rb
    shards = sorted(p.name for p in (a / "shards").iterdir())
    assert shards == sorted(p.name for p in (b / "shards").iterdir())
    for s in shards:
        xa = zarr.open_array(str(a / "shards" / s / "maps.zarr"), mode="r")[:]
        xb = zarr.open_array(str(b / "shards" / s / "maps.zarr"), mode="r")[:]
        assert xa.dtype == xb.dtype and np.array_equal(xa.view(np.uint8), xb.view(np.uint8))
    assert (a / "boxes.json").read_bytes() == (b / "boxes.json").read_bytes()
    assert not any((b / ".tmp").iterdir()) if (b / ".tmp").exists() else True


@pytest.fixture(scope="module")
def reference(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted one-process run over forty.txt."""
    out = tmp_path_factory.mktemp("reference") / "out"
    finish(start(root, "--data", "forty.txt", "--out", str(out), *COMMON))
    return out


def test_kill_9_mid_run_then_rerun_equals_an_uninterrupted_run(
    root: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["--data", "forty.txt", "--out", str(out), *COMMON, "--model", "tinynets:slow"]
    proc = start(root, *args)
    deadline = time.monotonic() + 180
    while len(list(out.glob("shards/*/DONE.json"))) < 2:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done_before = len(list(out.glob("shards/*/DONE.json")))
    assert 2 <= done_before < 5 and not (out / "manifest.parquet").exists()
    proc = start(root, *args)
    out_text, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    assert f"computed {40 - 8 * done_before} now" in out_text
    # the reference ran tinynets:tiny, the same network without the sleep
    same_outputs(reference, out)


def test_torchrun_two_ranks_equal_one_process(root: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = start(root, "--data", "forty.txt", "--out", str(out), *COMMON, torchrun=2)
    finish(proc)
    same_outputs(reference, out)
    import json

    meta: dict[str, Any] = json.loads((out / "run.json").read_text())
    assert meta["engine"] == {"name": "torchrun", "world_size": 2}
    assert meta["counts"]["images"] == 40


def test_ray_engine_on_a_local_cluster_equals_one_process(
    root: Path, reference: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ray.data")
    out = tmp_path / "out"
    args = [
        "--data",
        "forty.txt",
        "--out",
        str(out),
        *COMMON,
        "--engine",
        "ray",
        "--concurrency",
        "2",
    ]
    finish(start(root, *args), timeout=400)
    same_outputs(reference, out)
    import json

    assert json.loads((out / "run.json").read_text())["engine"]["name"] == "ray"


def test_evaluate_under_torchrun_equals_one_process(root: Path, tmp_path: Path) -> None:
    import json

    out = tmp_path / "out"
    finish(start(root, "--data", "wsol40", "--data-root", str(root), "--out", str(out), *COMMON))
    env = _env()
    for world in (1, 2):
        head = [sys.executable, "-m", "cam_plugin"]
        if world == 2:
            head = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node=2",
                "-m",
                "cam_plugin",
            ]
        proc = subprocess.run(
            [*head, "evaluate", str(out), "--worst", "2"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        doc = json.loads((out / "evaluation" / "metrics.json").read_text())
        assert doc["world_size"] == world and doc["counts"]["samples"] == 40
        if world == 1:
            single = doc
    for key in ("metrics", "per_class", "counts", "worst"):
        assert doc[key] == single[key], key
