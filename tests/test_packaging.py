"""The wheel installs outside the source tree; `import cam_plugin` stays framework-free."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("timm", "captum", "mmengine", "mmcv", "mmpretrain", "mmdet", "torchvision")


def _run(cmd: list[str], cwd: Path, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]


def test_import_is_framework_free(tmp_path: Path) -> None:
    code = (
        "import sys, cam_plugin; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    out = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_wheel_installs_into_a_clean_venv(tmp_path: Path) -> None:
    """Build the wheel, install it (not editable) into a new venv built the Makefile's way.

    The new venv reuses this environment's already-installed binary packages (torch,
    torchvision, timm) through a path entry (a plain path line: the editable install's
    finder `.pth` in that folder is *not* executed), gets the torchvision shim the way the
    Makefile installs it, and gets cam-plugin only from the wheel.
    """
    dist = tmp_path / "dist"
    build = _run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(ROOT),
        ],
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    wheels = list(dist.glob("cam_plugin-*.whl"))
    assert len(wheels) == 1
    import zipfile

    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "cam_plugin/integrations/timm.py" in names
    assert "cam_plugin/cam.py" in names and "cam_plugin/py.typed" in names
    assert not any(n.startswith(("integrations/", "tests/")) for n in names)

    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path).returncode == 0
    py = venv / "bin" / "python"
    site = Path(
        _run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=tmp_path,
        ).stdout.strip()
    )
    (site / "shared_binaries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    shim = _run([str(py), str(ROOT / "tools" / "install_torchvision_shim.py")], cwd=tmp_path)
    assert shim.returncode == 0, shim.stderr
    inst = _run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheels[0])],
        cwd=tmp_path,
    )
    assert inst.returncode == 0, inst.stderr

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check = (
        "import sys, cam_plugin; "
        f"heavy = {{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}); "
        "assert not heavy, heavy; "
        f"assert cam_plugin.__file__.startswith({str(site)!r}), cam_plugin.__file__; "
        "import cam_plugin.integrations.timm as t, timm, torch; "
        "m = timm.create_model('resnet18', num_classes=3).eval(); "
        "r = cam_plugin.CAM(m)(torch.randn(1, 3, 64, 64)); "
        "print('ok', tuple(r.maps.shape))"
    )
    out = _run([str(py), "-c", check], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok (1, 1, 2, 2)"
    cli = _run([str(venv / "bin" / "cam-plugin"), "explain", "--help"], cwd=tmp_path, env=env)
    assert cli.returncode == 0 and "--checkpoint" in cli.stdout
