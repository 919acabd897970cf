"""Reading and writing video files with PyAV (imported lazily: only the data and training code need it)."""
from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from .transforms import DatasetError

# Refuse frames larger than this on either side before decoding them (a file may claim any size).
MAX_FRAME_SIDE = 8192
# Files whose frame count cannot be read from the container are decoded in full, up to this many frames.
MAX_DECODED_FRAMES = 4096


def _av():
    try:
        import av
    except ImportError:
        raise DatasetError("reading and writing videos needs PyAV: pip install 'reducio-fastattn[train]' "
                           "(or pip install av)") from None
    return av


def _stream_fps(stream, default: float) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else default


def decode_frames(path: str | os.PathLike, pick, default_fps: float = 16.0) -> np.ndarray:
    """Decode the frames ``pick(total_frames, source_fps)`` selects (a sorted list of indices) -> uint8
    ``[T, H, W, 3]``. Raises ``DatasetError`` for unreadable, oversized or too short files."""
    av = _av()
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                raise DatasetError("no video stream")
            stream = container.streams.video[0]
            if max(stream.codec_context.width or 0, stream.codec_context.height or 0) > MAX_FRAME_SIDE:
                raise DatasetError(f"frames of {stream.codec_context.width}x{stream.codec_context.height} exceed "
                                   f"{MAX_FRAME_SIDE} px")
            fps = _stream_fps(stream, default_fps)
            total = int(stream.frames or 0)
            if total <= 0 and stream.duration and stream.time_base:
                total = int(float(stream.duration * stream.time_base) * fps)
            if total <= 0:      # unknown length: decode everything (bounded), then pick
                frames = []
                for frame in container.decode(stream):
                    frames.append(frame.to_ndarray(format="rgb24"))
                    if len(frames) > MAX_DECODED_FRAMES:
                        raise DatasetError(f"length unknown and longer than {MAX_DECODED_FRAMES} frames")
                wanted = pick(len(frames), fps)
                return np.stack([frames[i] for i in wanted])
            wanted = pick(total, fps)
            want = set(wanted)
            start_time = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            first_time = wanted[0] / fps
            if wanted[0] > 0:
                container.seek(int((start_time + first_time) / stream.time_base), stream=stream, backward=True)
            found: dict[int, np.ndarray] = {}
            counter = None if wanted[0] > 0 else -1
            for frame in container.decode(stream):
                if frame.time is not None:
                    index = int(round((frame.time - start_time) * fps))
                elif counter is not None:
                    counter += 1
                    index = counter
                else:
                    raise DatasetError("frames carry no timestamps and the file cannot be seeked")
                if index in want and index not in found:
                    found[index] = frame.to_ndarray(format="rgb24")
                if index >= wanted[-1]:
                    break
            if len(found) < len(wanted):
                raise DatasetError(f"only {len(found)} of the {len(wanted)} frames needed could be decoded "
                                   f"(the file is shorter than its header says, or damaged)")
            return np.stack([found[i] for i in wanted])
    except DatasetError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError, RuntimeError) as exc:
        raise DatasetError(f"cannot be decoded ({type(exc).__name__}: {exc})") from None


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """All frames of a (short) video file: (uint8 [T, H, W, 3], fps)."""
    fps_seen = []

    def everything(total, fps):
        fps_seen.append(fps)
        return list(range(total))

    frames = decode_frames(path, everything)
    return frames, fps_seen[0]


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 16.0, codec: str | None = None,
                crf: int = 18) -> Path:
    """Write uint8 ``[T, H, W, 3]`` frames atomically (temporary file + rename). The codec follows the
    suffix: .mp4 -> H.264 (yuv420p; odd sizes are padded by one row/column), .mkv -> lossless FFV1."""
    av = _av()
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    lossless = path.suffix.lower() == ".mkv"
    codec = codec or ("ffv1" if lossless else "libx264")
    if not lossless and (frames.shape[1] % 2 or frames.shape[2] % 2):
        frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        with av.open(tmp, mode="w") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": str(crf)}
            for image in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
