"""What a Reducio workflow made, measured from its files: figures and a contact sheet a person can judge.

Used by ``scripts/demo.sh`` after each example workflow; works on any video or image files (PyAV and
Pillow read them), so the figures are those of the files a user gets, codec included.

* :func:`reconstruction_report` -- a VAE round trip or decode: the input clip beside the output, PSNR /
  SSIM against the input, and the same figures for the content frame repeated (what a latent that
  carries no motion gives), so a result is never read without its baseline.
* :func:`generation_report` -- image-to-video: the content image beside the generated clip, frame-7 PSNR
  against the content image and the camera direction measured on the clip (phase correlation), next to
  the direction the caption asks for when it names one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .contact_sheet import difference, save_contact_sheet
from .data.video_io import read_video
from .metrics import pan_direction, psnr, ssim

CONTENT_INDEX = 7
DIRECTIONS = ("left", "right", "up", "down")


def read_clip(path: str | Path) -> torch.Tensor:
    """A video file as ``[3, T, H, W]`` float in [-1, 1]."""
    frames, _ = read_video(path)
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1


def read_image(path: str | Path) -> torch.Tensor:
    """An image file (the first frame of an animated one) as ``[3, H, W]`` float in [-1, 1]."""
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1


def _common(reference: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both clips cut to their common frames; the sizes must agree (a codec may pad by one pixel)."""
    frames = min(reference.shape[1], output.shape[1])
    height, width = min(reference.shape[2], output.shape[2]), min(reference.shape[3], output.shape[3])
    if abs(reference.shape[2] - output.shape[2]) > 1 or abs(reference.shape[3] - output.shape[3]) > 1:
        raise ValueError(f"the output is {output.shape[3]}x{output.shape[2]} but the input "
                         f"{reference.shape[3]}x{reference.shape[2]}: not a reconstruction of it")
    return reference[:, :frames, :height, :width], output[:, :frames, :height, :width]


def _figures(reference: torch.Tensor, output: torch.Tensor) -> dict:
    return {"psnr_db": round(float(psnr(reference[None], output[None])), 2),
            "ssim": round(float(ssim(reference[None], output[None])), 4)}


def reconstruction_report(input_video: str | Path, output_video: str | Path, sheet: str | Path,
                          title: str = "") -> dict:
    """Figures of ``output_video`` against ``input_video`` (and of the content frame repeated); writes
    a contact sheet input | output | difference | content repeated to ``sheet``."""
    reference, output = _common(read_clip(input_video), read_clip(output_video))
    content = CONTENT_INDEX if reference.shape[1] > CONTENT_INDEX else reference.shape[1] // 2
    repeated = reference[:, content:content + 1].expand_as(reference)
    result = {"frames": reference.shape[1], **_figures(reference, output),
              "repeat_content": _figures(reference, repeated)}
    result["gain_over_repeat_db"] = round(result["psnr_db"] - result["repeat_content"]["psnr_db"], 2)
    save_contact_sheet(sheet, [("input", reference), ("output", output),
                               ("|difference| x4", difference(reference, output)),
                               ("content repeated", repeated)],
                       caption=f"{title}  PSNR {result['psnr_db']} dB, SSIM {result['ssim']} "
                               f"(content repeated: {result['repeat_content']['psnr_db']} dB)".strip())
    result["sheet"] = str(sheet)
    return result


def caption_direction(caption: str) -> str | None:
    """The pan direction a caption names ("... pans left ..."), or None."""
    words = caption.lower().replace(",", " ").replace(";", " ").split()
    for i, word in enumerate(words[:-1]):
        if word == "pans" and words[i + 1] in DIRECTIONS:
            return words[i + 1]
    return None


def generation_report(content_image: str | Path, output_video: str | Path, sheet: str | Path,
                      caption: str = "", title: str = "") -> dict:
    """Figures of a generated clip against its content image: frame-7 PSNR, the measured camera
    direction and, when the caption names one, whether they agree; writes a contact sheet."""
    output = read_clip(output_video)
    image = read_image(content_image)
    if image.shape[1:] != output.shape[2:]:
        image = torch.nn.functional.interpolate(image[None], size=output.shape[2:], mode="bilinear",
                                                antialias=True, align_corners=False)[0]
    content = CONTENT_INDEX if output.shape[1] > CONTENT_INDEX else output.shape[1] // 2
    still = image[:, None].expand_as(output)
    measured = pan_direction(output)
    wanted = caption_direction(caption)
    result = {"frames": output.shape[1],
              "frame7_psnr_db": round(float(psnr(output[None, :, content:content + 1],
                                                 image[None, :, None])), 2),
              "camera_direction": measured, "caption_direction": wanted,
              "follows_caption": None if wanted is None else measured == wanted}
    verdict = "" if wanted is None else f", caption says {wanted}: {'yes' if measured == wanted else 'no'}"
    save_contact_sheet(sheet, [("content image", still), ("generated", output),
                               ("|difference| x4", difference(output, still))],
                       caption=f"{title}  frame-7 PSNR {result['frame7_psnr_db']} dB, camera moves "
                               f"{measured}{verdict}".strip())
    result["sheet"] = str(sheet)
    return result
