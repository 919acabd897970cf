"""Scripts of the pack (run from the repository root, e.g. ``python -m scripts.demo``)."""
