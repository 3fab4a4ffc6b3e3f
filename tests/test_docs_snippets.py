"""The runnable Python code blocks of the docs run as written: every block fenced as
```` ```python ```` on the pages below, in order, in one namespace per page, in a folder that
holds a real photo as ``photo.jpg``. Blocks that need the reader's own model or files are
fenced as ```` ```py ```` and are only shown."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytest.importorskip("timm")
skimage_data = pytest.importorskip("skimage.data")

DOCS = Path(__file__).resolve().parents[1] / "docs"


def run_blocks(page: str, folder: Path) -> dict:
    """Execute the page's ```` ```python ```` blocks in ``folder``; their namespace."""
    from PIL import Image

    Image.fromarray(skimage_data.coffee()).save(folder / "photo.jpg")
    doc = DOCS / page
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks, f"{page} has no runnable block"
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for block in blocks:
            exec(compile(block, str(doc), "exec"), namespace)  # noqa: S102 - our own docs
    finally:
        os.chdir(cwd)
    return namespace


def test_getting_started_python_blocks_run(tmp_path: Path) -> None:
    namespace = run_blocks("getting-started.md", tmp_path)
    assert (tmp_path / "overlay.png").is_file() and (tmp_path / "grid.png").is_file()
    assert namespace["boxes"].shape == (8, 5, 4)


def test_video_python_blocks_run(tmp_path: Path) -> None:
    namespace = run_blocks("video.md", tmp_path)
    assert namespace["tubes"].shape == (2, 1, 8, 4)  # one box per frame of each clip


def test_hf_python_blocks_run(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    namespace = run_blocks("hf-support.md", tmp_path)
    assert namespace["boxes"].shape == (2, 1, 4)
