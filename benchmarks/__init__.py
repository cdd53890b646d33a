"""Side-by-side benchmarks of PD-ASGD against the strategies users would use instead.

Run from the repository root: ``python -m benchmarks.run --suite quick --out DIR`` (see ``benchmarks/README.md``).
"""
