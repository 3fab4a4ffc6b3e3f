"""cam-plugin's benchmarks (not part of the installed package).

Run from the repository root: ``python -m benchmarks.speed`` (``make bench``),
``python benchmarks/wsol_digits.py`` (``make bench-wsol``) and
``python -m benchmarks.compare`` (``make compare``).
"""
