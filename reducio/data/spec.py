"""Datasets from command-line style specs: ``synthetic`` / ``synthetic:heldout`` or a folder path."""
from __future__ import annotations

from .synthetic import SPLITS, SyntheticClips
from .transforms import DatasetError
from .video_folder import VideoFolder


def open_dataset(spec: str, size=64, seed: int = 0, count: int = 10000, fps: float = 16.0,
                 random_crop: bool = True):
    """``synthetic[:split]`` (split train / heldout / all; ``count`` clips) or a video folder."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        split = spec.partition(":")[2] or "train"
        if split not in SPLITS:
            raise DatasetError(f"unknown synthetic split {split!r} in {spec!r}; use one of {sorted(SPLITS)}")
        return SyntheticClips(split=split, size=size, count=count, seed=seed)
    return VideoFolder(spec, size=size, fps=fps, seed=seed, random_crop=random_crop)
