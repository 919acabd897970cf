"""Contact sheets: a few frames of clips side by side in one PNG, so a person can judge a result.

Rows are frames, columns are the clips given (e.g. input | reconstruction | difference), each column
with its title; a line of figures (PSNR, SSIM, ...) can go under the titles. Videos are
``[3, T, H, W]`` or ``[1, 3, T, H, W]`` in [-1, 1]; the difference column shows |a - b| amplified.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _frames(video: torch.Tensor) -> torch.Tensor:
    if video.ndim == 5:
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3, T, H, W] (or [1, 3, T, H, W]), got {list(video.shape)}")
    return ((video.detach().float().cpu() + 1) / 2).clamp(0, 1)


def difference(a: torch.Tensor, b: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """|a - b| * gain as a video in [-1, 1] (black = equal), for a difference column."""
    return ((a.float() - b.float()).abs() / 2 * gain).clamp(0, 1) * 2 - 1


def pick_frames(num_frames: int, count: int = 4) -> list[int]:
    """``count`` frame indices spread over the clip, first and last included."""
    if count >= num_frames:
        return list(range(num_frames))
    return sorted({round(i * (num_frames - 1) / (count - 1)) for i in range(count)})


def contact_sheet(columns: list[tuple[str, torch.Tensor]], frames: list[int] | None = None,
                  caption: str | None = None, scale: int | None = None) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]``: one column per (title, video), one row per frame index."""
    from PIL import Image, ImageDraw, ImageFont

    videos = [(title, _frames(v)) for title, v in columns]
    t, h, w = videos[0][1].shape[1:]
    if any(v.shape[1:] != (t, h, w) for _, v in videos):
        raise ValueError("all videos of a contact sheet must have the same frames and size: "
                         + ", ".join(f"{title} {list(v.shape)}" for title, v in videos))
    frames = frames if frames is not None else pick_frames(t)
    scale = scale or max(1, 160 // max(h, w))
    cell_h, cell_w, gap = h * scale, w * scale, 6
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:
        font = ImageFont.load_default()
    label_w, top = 64, 28 + (22 if caption else 0)
    width = label_w + len(videos) * (cell_w + gap)
    height = top + len(frames) * (cell_h + gap)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if caption:
        width = max(width, int(measure.textlength(caption, font=font)) + 16)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if caption:
        draw.text((8, 4), caption, fill=(20, 20, 20), font=font)
    for c, (title, video) in enumerate(videos):
        x = label_w + c * (cell_w + gap)
        draw.text((x, top - 22), title, fill=(20, 20, 20), font=font)
        for r, index in enumerate(frames):
            pixels = (video[:, index].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(pixels).resize((cell_w, cell_h), Image.NEAREST)
            sheet.paste(tile, (x, top + r * (cell_h + gap)))
    for r, index in enumerate(frames):
        draw.text((6, top + r * (cell_h + gap) + cell_h // 2 - 7), f"frame {index}", fill=(20, 20, 20), font=font)
    return np.asarray(sheet)


def save_contact_sheet(path: str | Path, columns: list[tuple[str, torch.Tensor]], **kwargs) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(contact_sheet(columns, **kwargs)).save(path)
    return path
