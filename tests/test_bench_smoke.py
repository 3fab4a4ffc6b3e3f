"""Keeps the speed benchmark (``python -m benchmarks.speed``, the package ``benchmarks/speed/``)
working: its smoke mode (tiny model, batch 2) runs end to end in fresh child processes and writes
the table and the JSON. Nothing is asserted about time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_smoke_writes_table_and_json(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--smoke", "--threads", "1"]
        + ["--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "speed.json").read_text())
    timing = report["timing"][0]
    assert set(timing["results"]) >= {
        "forward",
        "cam_upsampled",
        "torchcam",
        "gradcam",
        "captum",
        "captum_given",
    }
    agreement = timing["agreement"]
    assert set(agreement) == {"torchcam", "gradcam", "captum", "captum_given"}
    assert all(a["agree"] for a in agreement.values()), agreement
    assert {m["method"] for m in report["memory"]} == {"forward", "cam_upsampled"}
    assert all(m["delta_mib"] > -1 for m in report["memory"])
    # the tensor peaks come from torch's profiler: the forward allocates something
    peaks = report["tensors"][0]["methods"]
    assert set(peaks) == {"forward", "cam_upsampled"} and peaks["forward"]["peak_mib"] > 0
    fast = report["fast"][0]
    assert fast["info"]["module_channels_last"]["agree"]
    table = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- speed-table:start -->" in table and "<!-- speed-table:end -->" in table
    for column in ("× forward", "peak tensor MiB", "peak RSS Δ MiB", "agreement", "images/s"):
        assert column in table
    assert "torchcam" in table and "GradCAM" in table and "LayerGradCam" in table
