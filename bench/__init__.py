"""genq benchmarks: python -m bench.engine | bench.queue | bench.scaling (results in docs/BENCHMARKS.md)."""
