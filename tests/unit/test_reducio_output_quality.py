"""Tier 1: the demo's per-workflow figures, measured from real video and image files (PyAV, Pillow)."""
import numpy as np
import pytest

from reducio.data.video_io import write_video
from reducio.output_quality import caption_direction, generation_report, reconstruction_report


def panning_frames(step: int, frames: int = 16, size: int = 32) -> np.ndarray:
    """A smooth texture whose content moves ``step`` pixels right per frame (a camera panning left)."""
    ys, xs = np.mgrid[0:size, 0:size + frames * abs(step) + 1]
    texture = np.stack([128 + 100 * np.sin(xs / 3.0), 128 + 100 * np.cos(ys / 4.0), 128 + 60 * np.sin((xs + ys) / 5.0)],
                       axis=-1).astype(np.uint8)
    start = frames * abs(step)
    return np.stack([texture[:, start - t * step:start - t * step + size] if step > 0 else texture[:, t * -step:t * -step + size]
                     for t in range(frames)])


def test_a_reconstruction_is_measured_against_its_input_and_the_still_baseline(tmp_path):
    frames = panning_frames(1)
    source = write_video(tmp_path / "in.mkv", frames)             # lossless: the figures are exact
    same = reconstruction_report(source, write_video(tmp_path / "same.mkv", frames), tmp_path / "same.png")
    assert same["psnr_db"] >= 100 and same["ssim"] == pytest.approx(1.0)
    assert same["repeat_content"]["psnr_db"] < 30 and same["gain_over_repeat_db"] > 60
    noisy = np.clip(frames.astype(int) + np.random.default_rng(0).integers(-20, 21, frames.shape), 0, 255).astype(np.uint8)
    worse = reconstruction_report(source, write_video(tmp_path / "noisy.mkv", noisy), tmp_path / "noisy.png")
    assert 15 < worse["psnr_db"] < same["psnr_db"] and (tmp_path / "noisy.png").stat().st_size > 0
    with pytest.raises(ValueError, match="not a reconstruction"):
        reconstruction_report(source, write_video(tmp_path / "small.mkv", frames[:, :16, :16]), tmp_path / "x.png")


def test_a_generated_clip_is_checked_against_its_content_image_and_caption(tmp_path):
    from PIL import Image

    frames = panning_frames(1)           # content moves right: the camera pans left
    Image.fromarray(frames[7]).save(tmp_path / "content.png")
    clip = write_video(tmp_path / "gen.mkv", frames)
    left = generation_report(tmp_path / "content.png", clip, tmp_path / "sheet.png",
                             caption="the camera pans left over the coffee photo; a red disc moves down")
    assert left["camera_direction"] == "left" and left["follows_caption"] is True
    assert left["frame7_psnr_db"] >= 100
    right = generation_report(tmp_path / "content.png", clip, tmp_path / "sheet.png", caption="the camera pans right")
    assert right["follows_caption"] is False
    assert generation_report(tmp_path / "content.png", clip, tmp_path / "sheet.png")["follows_caption"] is None


def test_caption_direction_reads_the_camera_not_the_sprites():
    assert caption_direction("a still view of the rocket photo; a red disc moves left") is None
    assert caption_direction("the camera pans up over the coffee photo; a red disc moves left") == "up"
