"""Benchmarks: one timer, one result schema, JSON saved with the GPU, versions and git commit."""
