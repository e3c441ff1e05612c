"""Lethe's benchmarks: quality (methods × settings × stages × seeds, with PNG plots), workload
measurement, POST → served latency, the demo's reliability over anchor draws and round coalescing.

One CLI: ``python -m bench <command> …`` (``lethe bench`` delegates to it; :mod:`bench.cli`).
This package may import ``worker`` and ``service``; the ML core (``worker/unlearning``) never
imports it. docs/benchmarks.md has the commands and the committed numbers.
"""
