"""``python -m benchmarks.compare [--quick] [--flags]``: run the scoreboard (see
:mod:`benchmarks.compare`)."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Optional

from .runner import main


def entry(argv: Optional[list[str]] = None) -> int:
    """Quiet the libraries' per-call notes, then run."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    # Captum notes, for every gradient method, that it set requires_grad on the inputs
    warnings.filterwarnings("ignore", message="Input Tensor .* did not already require grad")
    warnings.filterwarnings("ignore", message=".*Setting forward, backward hooks.*")
    return main(argv)


if __name__ == "__main__":
    sys.exit(entry())
