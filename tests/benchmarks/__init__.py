"""Benchmarks: run with `python -m tests.benchmarks.run` (see docs/benchmarks.md)."""
