"""cam-plugin's benchmarks (not part of the installed package).

Run from the repository root: ``python -m benchmarks.speed`` (``make bench``),
``python benchmarks/wsol_digits.py`` (``make bench-wsol``) and
``python benchmarks/compare_captum.py`` (``make compare``).
"""
