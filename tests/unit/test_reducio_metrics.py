"""reducio.metrics on clips whose answers are known by construction."""
import math

import pytest
import torch

from reducio import metrics


def _texture(h=48, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, h // 4, w // 4, generator=g)
    return torch.nn.functional.interpolate(base[None], size=(h, w), mode="bilinear", align_corners=False)[0] * 2 - 1


def _panning_clip(dy, dx, frames=8, seed=0):
    big = _texture(96, 128, seed)
    crops = [big[:, 24 + round(i * dy): 72 + round(i * dy), 32 + round(i * dx): 96 + round(i * dx)]
             for i in range(frames)]
    return torch.stack(crops, 1)   # content moves by (-dy, -dx) per frame


def test_psnr_known_values():
    a = torch.zeros(1, 3, 2, 8, 8)
    assert torch.isinf(metrics.psnr(a, a)).item() or metrics.psnr(a, a).item() > 100
    b = a + 0.2   # 0.1 on the [0, 1] scale -> MSE 0.01 -> 20 dB
    assert metrics.psnr(a, b).item() == pytest.approx(20.0, abs=1e-4)


def test_ssim_identity_and_degradation():
    clip = _panning_clip(1, 2)[None]
    assert metrics.ssim(clip, clip).item() == pytest.approx(1.0, abs=1e-6)
    noisy = clip + 0.3 * torch.randn(clip.shape, generator=torch.Generator().manual_seed(1))
    assert metrics.ssim(clip, noisy).item() < 0.8
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.ssim(clip, clip[:, :, :2])


@pytest.mark.parametrize("dy, dx", [(0, 3), (0, -2), (2, 0), (-3, 1), (1.0, 0.0)])
def test_phase_correlation_finds_integer_shifts(dy, dx):
    clip = _panning_clip(dy, dx, frames=2)
    sy, sx = metrics.phase_correlation(clip[:, 0], clip[:, 1])
    assert (sy, sx) == pytest.approx((-dy, -dx), abs=0.35)


@pytest.mark.parametrize("dy, dx, pan", [(0, 2, "right"), (0, -2, "left"), (2, 0, "down"), (-2, 0, "up")])
def test_pan_direction_is_the_camera_direction(dy, dx, pan):
    # the crop window (the camera) moves by (dy, dx): a camera panning right shows content moving left
    assert metrics.pan_direction(_panning_clip(dy, dx)) == pan


def test_still_clip_is_still():
    clip = torch.stack([_texture()] * 6, 1)
    assert metrics.pan_direction(clip) == "still"


def test_sprite_direction_by_colour():
    frames = []
    for i in range(8):
        f = torch.full((3, 32, 32), -1.0)
        f[:, 10:14, 4 + 2 * i: 8 + 2 * i] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]   # red, moving right
        f[:, 4 + 3 * i // 2: 8 + 3 * i // 2, 20:24] = torch.tensor([-1.0, -1.0, 1.0])[:, None, None]  # blue, down
        frames.append(f)
    clip = torch.stack(frames, 1)
    assert metrics.sprite_direction(clip, (1, 0, 0)) == "right"
    assert metrics.sprite_direction(clip, (0, 0, 1)) == "down"
    assert metrics.sprite_direction(clip, (0, 1, 0)) == "unseen"
    track = metrics.colour_track(clip, (1, 0, 0))
    assert track[0] == pytest.approx((11.5, 5.5)) and track[-1] == pytest.approx((11.5, 19.5))


def test_direction_of():
    assert metrics.direction_of(0.1, 0.1) == "still"
    assert metrics.direction_of(0, -3) == "left" and metrics.direction_of(4, 1) == "down"
    assert math.isclose(metrics.phase_correlation(torch.ones(8, 8), torch.ones(8, 8))[0], 0.0, abs_tol=1)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        metrics.psnr(torch.zeros(2, 2), torch.zeros(2, 2))
