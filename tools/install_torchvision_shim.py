"""Install the torchvision CPU shim into the running interpreter's site-packages.

Run with the venv's python: ``.venv/bin/python tools/install_torchvision_shim.py``.
See tools/torchvision_cpu_shim.py for what it does and why (development
environment only; never part of the cam-plugin package).
"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

here = Path(__file__).resolve().parent
site = Path(sysconfig.get_paths()["purelib"])
shutil.copyfile(here / "torchvision_cpu_shim.py", site / "_torchvision_cpu_shim.py")
(site / "torchvision_cpu_shim.pth").write_text("import _torchvision_cpu_shim\n")
print(f"torchvision shim installed in {site}")
