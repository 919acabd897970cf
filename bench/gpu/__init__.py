"""GPU checks and benchmarks in one prepared run (see bench/gpu/README.md). ``python -m bench.gpu``."""
