"""Benchmarks: ``python -m bench.runtime`` (see bench/README.md). Never a CI gate."""
