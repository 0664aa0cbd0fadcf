"""Benchmarks of rmserve next to the alternatives an RL user would run instead.

Not part of the installed package: run from the repository root with
``python -m benchmarks.run [--quick] [--bundle DIR] --out DIR`` (docs/performance.md).
"""

__all__: list[str] = []
