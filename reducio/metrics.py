"""Quality measures for reconstructions and generated clips (pure PyTorch).

Videos are ``[B, 3, T, H, W]`` (or ``[3, T, H, W]``) in [-1, 1], the layout of the VAE. PSNR and SSIM
are computed on [0, 1] values, per clip, as the evaluation scripts and the model card report them.
Motion is measured without any learned model: the global (camera) shift between two frames by phase
correlation, and a coloured sprite's path by the centroid of the pixels close to its colour.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIRECTIONS = ("left", "right", "up", "down")


def _as_batch(video: torch.Tensor) -> torch.Tensor:
    if video.ndim == 4:
        video = video[None]
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"expected a video [B, 3, T, H, W] or [3, T, H, W], got {list(video.shape)}")
    return video.float()


def _unit(video: torch.Tensor) -> torch.Tensor:
    return ((_as_batch(video) + 1) / 2).clamp(0, 1)


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each clip (peak 1 on [0, 1] values); ``[B]``."""
    ref, est = _unit(reference), _unit(estimate)
    if ref.shape != est.shape:
        raise ValueError(f"shapes differ: {list(ref.shape)} vs {list(est.shape)}")
    mse = (ref - est).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(reference: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Mean structural similarity of each clip (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
    K1 0.01, K2 0.03, on [0, 1] values, per channel and frame, valid region only); ``[B]``."""
    ref, est = _unit(reference), _unit(estimate)
    if ref.shape != est.shape:
        raise ValueError(f"shapes differ: {list(ref.shape)} vs {list(est.shape)}")
    b, c, t, h, w = ref.shape
    size = min(11, h, w)
    window = _gaussian_window(size)
    x = ref.permute(0, 2, 1, 3, 4).reshape(b * t * c, 1, h, w)
    y = est.permute(0, 2, 1, 3, 4).reshape(b * t * c, 1, h, w)
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    var_x = F.conv2d(x * x, window) - mu_x ** 2
    var_y = F.conv2d(y * y, window) - mu_y ** 2
    cov = F.conv2d(x * y, window) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return score.reshape(b, -1).mean(1)


def _gray(frame: torch.Tensor) -> torch.Tensor:
    return (0.299 * frame[0] + 0.587 * frame[1] + 0.114 * frame[2]).float()


def phase_correlation(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Shift ``(dy, dx)`` in pixels that moves frame ``a`` onto frame ``b`` (``[3, H, W]`` or ``[H, W]``):
    content at (y, x) in ``a`` is near (y + dy, x + dx) in ``b``. Hann-windowed, integer peak refined to
    sub-pixel by a parabola through the neighbours."""
    ga = _gray(a) if a.ndim == 3 else a.float()
    gb = _gray(b) if b.ndim == 3 else b.float()
    h, w = ga.shape
    window = torch.hann_window(h, periodic=False)[:, None] * torch.hann_window(w, periodic=False)[None, :]
    fa = torch.fft.fft2((ga - ga.mean()) * window)
    fb = torch.fft.fft2((gb - gb.mean()) * window)
    cross = fb * fa.conj()
    surface = torch.fft.ifft2(cross / cross.abs().clamp_min(1e-9)).real
    peak = int(torch.argmax(surface))
    py, px = divmod(peak, w)

    def refine(minus: float, centre: float, plus: float) -> float:
        denom = minus - 2 * centre + plus
        return 0.0 if abs(denom) < 1e-12 else 0.5 * (minus - plus) / denom

    dy = py + refine(float(surface[(py - 1) % h, px]), float(surface[py, px]), float(surface[(py + 1) % h, px]))
    dx = px + refine(float(surface[py, (px - 1) % w]), float(surface[py, px]), float(surface[py, (px + 1) % w]))
    dy = dy - h if dy > h / 2 else dy
    dx = dx - w if dx > w / 2 else dx
    return float(dy), float(dx)


def direction_of(dy: float, dx: float, min_shift: float = 0.5) -> str:
    """The dominant direction of a displacement (image coordinates: +y is down), or "still"."""
    if math.hypot(dy, dx) < min_shift:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def camera_motion(video: torch.Tensor) -> tuple[float, float]:
    """Mean per-frame content shift ``(dy, dx)`` of one clip ``[3, T, H, W]`` (phase correlation of
    consecutive frames). A camera panning left moves the content right, so the caption direction of a
    pan is the opposite of this shift (see :func:`pan_direction`)."""
    clip = _as_batch(video)[0]
    shifts = [phase_correlation(clip[:, i], clip[:, i + 1]) for i in range(clip.shape[1] - 1)]
    return (sum(s[0] for s in shifts) / len(shifts), sum(s[1] for s in shifts) / len(shifts))


_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "still": "still"}


def pan_direction(video: torch.Tensor, min_shift: float = 0.25) -> str:
    """The direction the camera pans in (the opposite of the content's shift)."""
    dy, dx = camera_motion(video)
    return _OPPOSITE[direction_of(dy, dx, min_shift)]


def colour_track(video: torch.Tensor, rgb: tuple[float, float, float], tolerance: float = 0.25,
                 min_pixels: int = 4) -> list[tuple[float, float] | None]:
    """Centroid ``(y, x)`` per frame of the pixels within ``tolerance`` (Euclidean, [0, 1] RGB) of the
    colour ``rgb``; None in frames where fewer than ``min_pixels`` match."""
    clip = _unit(video)[0]
    target = torch.tensor(rgb, dtype=torch.float32)[:, None, None]
    out: list[tuple[float, float] | None] = []
    for i in range(clip.shape[1]):
        close = (clip[:, i] - target).pow(2).sum(0).sqrt() < tolerance
        if int(close.sum()) < min_pixels:
            out.append(None)
            continue
        ys, xs = torch.nonzero(close, as_tuple=True)
        out.append((float(ys.float().mean()), float(xs.float().mean())))
    return out


def sprite_direction(video: torch.Tensor, rgb: tuple[float, float, float], tolerance: float = 0.25,
                     min_shift: float = 1.0) -> str:
    """The direction a sprite of colour ``rgb`` moves over the clip (first to last frame it is seen in),
    "still", or "unseen" when it is found in fewer than two frames."""
    seen = [p for p in colour_track(video, rgb, tolerance) if p is not None]
    if len(seen) < 2:
        return "unseen"
    (y0, x0), (y1, x1) = seen[0], seen[-1]
    return direction_of(y1 - y0, x1 - x0, min_shift)
