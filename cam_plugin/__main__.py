"""``python -m cam_plugin explain ...`` runs the ``cam-plugin`` command."""

from __future__ import annotations

from cam_plugin.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
