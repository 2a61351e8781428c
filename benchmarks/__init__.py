"""Benchmarks for riformer_kernels: block microbenchmarks and whole-model benchmarks.

Run `riformer-bench --help` (or `python -m riformer_kernels.benchmarks --help`; from a checkout
of the repository, where this folder is the top-level `benchmarks/`, `python -m benchmarks`).
Installed, it is the subpackage `riformer_kernels.benchmarks`. Every implementation is checked
against the float64 reference on the same inputs before it is timed; results go to a CSV, a
markdown table and PNG plots (when matplotlib is installed) under `--out` (default
`bench_results/`).
"""
