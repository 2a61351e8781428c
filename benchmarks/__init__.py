"""Benchmarks for riformer_kernels: block microbenchmarks and whole-model benchmarks.

Run `riformer-bench --help` (or `python -m benchmarks --help`). Every implementation is checked
against the float64 reference on the same inputs before it is timed; results go to a CSV, a
markdown table and PNG plots under `--out` (default `bench_results/`).
"""
