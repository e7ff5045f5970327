"""Benchmarks: ``python -m bench`` (or ``make bench``) prints one table; see BENCHMARKS.md."""
