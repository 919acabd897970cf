"""Benchmarks. The top-level ``bench_*.py`` files are scripts; ``bench.gpu`` is the GPU check and
benchmark suite, importable from the repository root (``python -m bench.gpu``)."""
