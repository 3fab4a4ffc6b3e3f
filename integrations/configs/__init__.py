"""Ready mmengine configs shipped with cam-plugin (plain config files, not modules to import).

``config_path("mmpretrain_resnet_digits")`` gives the file's path for
``mmengine.Config.fromfile`` or ``_base_``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["config_path"]


def config_path(name: str) -> str:
    """Absolute path of the shipped config ``name`` (with or without ``.py``)."""
    path = Path(__file__).with_name(name if name.endswith(".py") else f"{name}.py")
    if not path.is_file() or path.name == "__init__.py":
        available = sorted(
            p.stem for p in Path(__file__).parent.glob("*.py") if p.stem != "__init__"
        )
        raise FileNotFoundError(f"no shipped config {name!r}; available: {available}")
    return str(path)
