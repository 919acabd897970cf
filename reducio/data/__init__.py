"""Training data for Reducio: 16-frame clips in [-1, 1], layout [3, T, H, W], content frame = index 7.

* :class:`VideoFolder` -- video files decoded with PyAV and folders of numbered frames;
* :class:`SyntheticClips` -- seeded clips made from scikit-image's bundled photographs, with captions;
* :func:`open_dataset` -- either of them from a command-line style spec (``synthetic`` or a folder).

Every dataset returns dicts ``{"video": [3, 16, H, W] float32, "caption": str, "index": int,
"skipped": int}`` and is random-access and deterministic: item ``i`` of a given dataset is always
the same clip, so data order can be resumed and split across processes by index alone.
"""
from .transforms import CLIP_FRAMES, CONTENT_INDEX, DatasetError, content_frame, to_uint8_frames
from .synthetic import SyntheticClips
from .video_folder import VideoFolder
from .video_io import read_video, write_video
from .spec import open_dataset

__all__ = ["CLIP_FRAMES", "CONTENT_INDEX", "DatasetError", "SyntheticClips", "VideoFolder", "content_frame",
           "open_dataset", "read_video", "to_uint8_frames", "write_video"]
