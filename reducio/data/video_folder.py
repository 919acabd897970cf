"""A folder of videos (decoded with PyAV) and image-sequence folders, as random 16-frame clips.

* Video files: any of ``VIDEO_SUFFIXES`` anywhere under the root. A folder that directly holds image
  files (``IMAGE_SUFFIXES``, sorted by the numbers in their names) is one image-sequence video at
  ``sequence_fps``.
* Clips: 16 frames every ``round(source_fps / fps)`` frames from a random start (official rule),
  then a random-resized crop (training, ``random_crop=True``) or short-side resize + centre crop.
* Captions: ``<video stem>.txt`` beside a video, ``caption.txt`` inside a sequence folder, else "".
* A file that cannot give a clip (corrupt, too short, oversized) is skipped: the next file is used,
  the item's ``skipped`` field counts the files passed over, and ``bad_files`` (per process) lists
  them with the reason. Only when no file at all can be read does it raise, naming examples.

Items are keyed by ``(index, draw)``: the same key always gives the same clip; the training sampler
passes the epoch as ``draw`` so every epoch sees new clip starts and crops.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import CLIP_FRAMES, DatasetError, clip_indices, frame_step, frames_to_clip, parse_size
from .video_io import MAX_FRAME_SIDE, decode_frames

VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".gif"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def scan_folder(root: Path) -> list[Path]:
    """Video files and image-sequence folders under ``root``, sorted (deterministic order)."""
    items = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
            items.append(path)
        elif path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir() if p.is_file()):
            items.append(path)
    if root.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir() if p.is_file()):
        items.insert(0, root)
    return items


class VideoFolder(Dataset):
    def __init__(self, root, size=256, fps: float = 16.0, seed: int = 0, random_crop: bool = True,
                 sequence_fps: float | None = None, frames: int = CLIP_FRAMES):
        self.root = Path(root)
        if not self.root.exists():
            raise DatasetError(f"dataset folder {self.root} does not exist; pass the folder that holds your videos "
                               f"(or --data synthetic for the built-in clips)")
        if not self.root.is_dir():
            raise DatasetError(f"{self.root} is a file; pass the folder that holds the videos")
        self.items = scan_folder(self.root)
        if not self.items:
            raise DatasetError(
                f"dataset folder {self.root} holds no videos: put video files ({', '.join(sorted(VIDEO_SUFFIXES))}) "
                f"or folders of numbered frames ({', '.join(sorted(IMAGE_SUFFIXES))}) in it, or train on the "
                f"built-in clips with --data synthetic")
        self.size, self.fps, self.seed, self.random_crop = parse_size(size), float(fps), int(seed), random_crop
        self.sequence_fps = float(sequence_fps or fps)
        self.frames = frames
        self.bad_files: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.items)

    def describe(self) -> dict:
        return {"kind": "folder", "root": str(self.root), "items": len(self.items), "size": list(self.size),
                "fps": self.fps, "seed": self.seed, "random_crop": self.random_crop, "frames": self.frames}

    def caption(self, item: Path) -> str:
        sidecar = item / "caption.txt" if item.is_dir() else item.with_suffix(".txt")
        return sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else ""

    def _load(self, item: Path, rng: np.random.Generator) -> torch.Tensor:
        def pick(total: int, source_fps: float) -> list[int]:
            return clip_indices(total, frame_step(source_fps, self.fps), rng, self.frames)

        if item.is_dir():
            images = sorted((p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                            key=_natural_key)
            frames = np.stack([self._read_image(images[i]) for i in pick(len(images), self.sequence_fps)])
        else:
            frames = decode_frames(item, pick, default_fps=self.fps)
        if len({f.shape for f in frames}) != 1:
            raise DatasetError("frames of different sizes")
        return frames_to_clip(torch.from_numpy(frames), self.size, rng if self.random_crop else None)

    @staticmethod
    def _read_image(path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as image:
                if max(image.size) > MAX_FRAME_SIDE:
                    raise DatasetError(f"{path.name} is {image.size[0]}x{image.size[1]} px (limit {MAX_FRAME_SIDE})")
                return np.asarray(image.convert("RGB"))
        except DatasetError:
            raise
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path.name} cannot be read ({exc})") from None

    def __getitem__(self, key) -> dict:
        index, draw = (key, 0) if isinstance(key, (int, np.integer)) else (int(key[0]), int(key[1]))
        errors = []
        for attempt in range(len(self.items)):
            position = (index + attempt) % len(self.items)
            item = self.items[position]
            if str(item) in self.bad_files:
                errors.append(f"{item.name}: {self.bad_files[str(item)]}")
                continue
            rng = np.random.default_rng([self.seed, position, draw])
            try:
                video = self._load(item, rng)
            except DatasetError as exc:
                self.bad_files[str(item)] = str(exc)
                errors.append(f"{item.name}: {exc}")
                continue
            return {"video": video, "caption": self.caption(item), "index": position, "skipped": attempt}
        raise DatasetError(
            f"none of the {len(self.items)} videos in {self.root} gives a {self.frames}-frame clip at {self.fps:g} fps "
            f"(e.g. {'; '.join(errors[:3])}). Use longer or undamaged videos, or a lower --fps")
