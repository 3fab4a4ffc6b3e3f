"""The short version of ``benchmarks/wsol_digits.py`` (its ``QUICK`` config): the same
converted timm backbone trained from scratch for one pass over a few thousand digits (lighter
clutter than the full run), evaluated with Choe et al.'s metrics. Its CAM must localize
better than the centred-Gaussian prior (MaxBoxAccV2). The full run is ``make bench-wsol``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "wsol_digits.py"


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("wsol_digits", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["wsol_digits"] = module
    spec.loader.exec_module(module)
    return module


def test_short_benchmark_cam_beats_centred_prior(bench, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = bench.QUICK
    assert cfg.steps * cfg.batch <= cfg.train_size  # one pass over a few hundred images
    report = bench.run(cfg)
    rows = {r["key"]: r for r in report["rows"]}
    cam, prior = rows["gap_centred"], rows["gaussian"]
    assert cam["MaxBoxAccV2"] > prior["MaxBoxAccV2"], bench.table(report)
    for key in ("Top-1 Loc", "GT-known Loc", "MaxBoxAcc", "MaxBoxAccV2", "PxAP"):
        assert 0.0 <= cam[key] <= 100.0
    assert cam["accuracy"] > 10.0  # above chance: it learned from the image labels
    # the table, the docs block and the picture are written where asked
    md = tmp_path / "wsol.md"
    md.write_text("# t\n\n<!-- wsol-table:start -->\nSTALE\n<!-- wsol-table:end -->\ntail\n")
    bench.write_docs(report, md)
    text = md.read_text()
    assert "STALE" not in text and "| CAM, GAP (centred) |" in text
    assert text.startswith("# t\n") and text.endswith("tail\n")
    bench.picture(report, tmp_path / "grid.png", 3)
    assert (tmp_path / "grid.png").stat().st_size > 1000
