"""Benchmarks, autotuning runs and plots behind ``triton-bn bench | tune | plot``.

shapes: the shape sets and ``Case``; providers: the compared implementations and the float64
oracle; timing: do_bench / interpreter timer and copy bandwidth; results: the CSV schema;
runner: the sweep; summary: targets; plotting: PNGs from CSVs; tune: the autotuning runner.
"""

from .shapes import Case, build_cases  # noqa: F401
