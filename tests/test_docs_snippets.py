"""The Python code blocks of the getting-started page run as written (in a folder that holds
a real photo as `photo.jpg`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytest.importorskip("timm")
skimage_data = pytest.importorskip("skimage.data")

DOC = Path(__file__).resolve().parents[1] / "docs" / "getting-started.md"


def test_getting_started_python_blocks_run(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(skimage_data.coffee()).save(tmp_path / "photo.jpg")
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - our own docs
    finally:
        os.chdir(cwd)
    assert (tmp_path / "overlay.png").is_file() and (tmp_path / "grid.png").is_file()
    assert namespace["boxes"].shape == (8, 5, 4)
