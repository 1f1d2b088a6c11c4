"""Benchmarks: ``python -m bench pipeline`` (see bench/README.md)."""
