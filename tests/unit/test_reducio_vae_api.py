"""High-level API of the Reducio VAE: input checks, padding, long videos, dtypes, hooks, memory."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import reducio.vae.blocks as blocks
from reducio import ReducioVAE
from reducio.vae import ReducioInterrupted, choose_tile_size, estimate_memory, official_config
from reducio.vae.blocks import FloatGroupNorm

from testkit.golden import golden_path

GOLDEN = golden_path("reducio")
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def config():
    return json.loads((GOLDEN / "tiny_config.json").read_text())["constructor_kwargs"]


@pytest.fixture(scope="module")
def model(config):
    vae = ReducioVAE(**config).eval()
    vae.load_state_dict(load_file(GOLDEN / "tiny_weights.safetensors"), strict=True)
    return vae


@pytest.fixture(scope="module")
def io():
    return load_file(GOLDEN / "tiny_io.safetensors")


def smooth_video(frames, height, width, seed=0, batch=1):
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, frames, max(2, height // 8), max(2, width // 8), generator=gen)
    return (F.interpolate(coarse, size=(frames, height, width), mode="trilinear") * 1.6 - 0.8)


# ------------------------------------------------------------------------------ bad input
def test_video_must_be_5d(model, io):
    with pytest.raises(ValueError, match=r"5-D \[B, 3, T, H, W\].*video\[None\]"):
        model.encode(io["video"][0])


def test_channels_last_video_is_explained(model, io):
    with pytest.raises(ValueError, match="permute"):
        model.encode(io["video"].permute(0, 2, 1, 3, 4))


def test_0_255_range_is_rejected_with_fix(model, io):
    with pytest.raises(ValueError, match=r"0\.\.255.*127\.5"):
        model.encode((io["video"] + 1) * 127.5)


def test_uint8_and_nan_rejected(model, io):
    with pytest.raises(TypeError, match="floating-point"):
        model.encode(((io["video"] + 1) * 127.5).to(torch.uint8))
    bad = io["video"].clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.encode(bad)


def test_unit_range_input_warns(model, io):
    with pytest.warns(UserWarning, match=r"x \* 2 - 1"):
        model.encode((io["video"] + 1) / 2, tiling=False)


def test_decode_rejects_wrong_latent_shapes(model, io):
    content = io["content"]
    with pytest.raises(ValueError, match="multiple of 4"):
        model.decode(io["latent_det"][:, :, :3], content)
    with pytest.raises(ValueError, match="channels"):
        model.decode(torch.zeros(1, 16, 4, 8, 8), content)
    with pytest.raises(ValueError, match=r"latent must be"):
        model.decode(io["latent_det"][0], content)


def test_decode_rejects_mismatched_content(model, io):
    with pytest.raises(ValueError, match=r"content image is 32x32 px but the latent is 8x8.*64x64"):
        model.decode(io["latent_det"], io["content"][..., :32, :32])
    with pytest.raises(ValueError, match="batch mismatch"):
        model.decode(io["latent_det"], io["content"].repeat(2, 1, 1, 1))
    two_clips = torch.cat([io["latent_det"]] * 2, dim=2)
    with pytest.raises(ValueError, match=r"one content frame per clip.*\[B, 3, 2, H, W\]"):
        model.decode(two_clips, io["content"])
    with pytest.raises(ValueError, match="channels-last"):
        model.decode(io["latent_det"], io["content"].permute(0, 2, 3, 1))


def test_bad_tile_size(model, io):
    with pytest.raises(ValueError, match="multiple of 8"):
        model.encode(io["video"], tiling=True, tile_size=36)


# ------------------------------------------------------------------------------ sizes and clips
def test_odd_size_is_padded_and_cropped_back(model):
    video = smooth_video(16, 18, 27)
    latent = model.encode(video, tiling=False)
    assert latent.shape == (1, 8, 4, 3, 4)  # ceil(18/8), ceil(27/8)
    padded = F.pad(video, (0, 5, 0, 6, 0, 0), mode="replicate")
    torch.testing.assert_close(latent, model.encode(padded, tiling=False), **TOL)
    out = model.decode(latent, video[:, :, 7], tiling=False)
    assert out.shape == video.shape
    full = model.decode(latent, padded[:, :, 7], tiling=False)
    torch.testing.assert_close(out, full[..., :18, :27], **TOL)


def test_long_video_is_cut_into_clips_concatenated_on_time(model):
    video = smooth_video(40, 16, 16, seed=1)
    latent = model.encode(video, tiling=False)
    assert latent.shape == (1, 8, 12, 2, 2)  # 3 clips x 4 latent frames
    torch.testing.assert_close(latent[:, :, 4:8], model.encode(video[:, :, 16:32], tiling=False), **TOL)
    # the partial last clip (8 frames) is completed by repeating its last frame
    last = torch.cat([video[:, :, 32:], video[:, :, 39:40].expand(-1, -1, 8, -1, -1)], dim=2)
    torch.testing.assert_close(latent[:, :, 8:], model.encode(last, tiling=False), **TOL)
    # each clip is normalised on its own
    for k in range(3):
        clip = latent[:, :, 4 * k : 4 * k + 4]
        assert abs(clip.mean().item()) < 1e-4 and abs(clip.std(unbiased=False).item() - 1) < 1e-3

    content = model.content_frames(video)
    assert content.shape == (1, 3, 3, 16, 16)
    torch.testing.assert_close(content[:, :, 1], video[:, :, 23], atol=0, rtol=0)
    torch.testing.assert_close(content[:, :, 2], video[:, :, 39], atol=0, rtol=0)
    out = model.decode(latent, content, tiling=False, num_frames=40)
    assert out.shape == (1, 3, 40, 16, 16)
    first = model.decode(latent[:, :, :4], video[:, :, 7], tiling=False)
    torch.testing.assert_close(out[:, :, :16], first, **TOL)
    with pytest.raises(ValueError, match="num_frames"):
        model.decode(latent, content, tiling=False, num_frames=49)


def test_short_clip_and_single_frame(model):
    video = smooth_video(5, 16, 16, seed=2)
    assert model.encode(video, tiling=False).shape == (1, 8, 4, 2, 2)
    assert model.content_frames(video).shape == (1, 3, 1, 16, 16)


def test_batch_is_independent(model):
    video = smooth_video(16, 16, 16, seed=3, batch=2)
    both = model.encode(video, tiling=False)
    torch.testing.assert_close(both[1:], model.encode(video[1:], tiling=False), **TOL)


def test_sampling_is_seeded_per_clip(model):
    video = smooth_video(32, 16, 16, seed=4)
    a = model.encode(video, sample=True, generator=torch.Generator().manual_seed(5), tiling=False)
    b = model.encode(video, sample=True, generator=torch.Generator().manual_seed(5), tiling=False)
    c = model.encode(video, sample=True, generator=torch.Generator().manual_seed(6), tiling=False)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-3


def test_auto_tiling_follows_the_window(config, io):
    # with use_tiling True (the tiny config says False: never tile, see test_reducio_vae_config_choice)
    model = ReducioVAE(**{**config, "use_tiling": True}).eval()
    model.load_state_dict(load_file(GOLDEN / "tiny_weights.safetensors"), strict=True)
    # tiny tile 32 px -> window 40 px: 40x40 is one window (untiled), 64x64 is tiled
    small = smooth_video(16, 40, 40, seed=7)
    torch.testing.assert_close(model.encode(small), model.encode(small, tiling=False), atol=0, rtol=0)
    # a 64-px tile (80-px window) still tiles 64x96: 1 row x 2 columns instead of 2 x 3
    calls = []
    latent = model.encode(io["tiled_video"], tile_size=64, progress=lambda d, t: calls.append(t))
    assert latent.shape == (1, 8, 4, 8, 12) and calls == [2, 2]


# ------------------------------------------------------------------------------ hooks
def test_progress_and_interrupt_hooks(model, io):
    calls = []
    model.encode(io["tiled_video"], tiling=True, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 6) for i in range(1, 7)]

    calls.clear()
    video = smooth_video(32, 16, 16, seed=9)
    latent = model.encode(video, tiling=False, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 2), (2, 2)]
    calls.clear()
    model.decode(latent, model.content_frames(video), tiling=False, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 2), (2, 2)]

    checks = []

    def stop_at_third():
        checks.append(1)
        return len(checks) >= 3

    calls.clear()
    with pytest.raises(ReducioInterrupted):
        model.decode(io["tiled_latent_det"], io["tiled_content"], tiling=True, interrupt=stop_at_third,
                     progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 6), (2, 6)]

    class Cancelled(Exception):
        pass

    def raise_own():
        raise Cancelled()

    with pytest.raises(Cancelled):
        model.encode(video, tiling=False, interrupt=raise_own)


# ------------------------------------------------------------------------------ precision and attention
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_float32(config, model, dtype):
    # Small frames: half-precision 3-D convolutions have no fast CPU kernel.
    video = smooth_video(16, 8, 8, seed=8)
    reference_latent = model.encode(video, tiling=False)
    reference_video = model.decode(reference_latent, video[:, :, 7], tiling=False)
    vae = ReducioVAE(**config).eval()
    vae.load_state_dict(model.state_dict())
    vae.to(dtype)
    latent = vae.encode(video, tiling=False)
    assert latent.dtype == torch.float32
    assert (latent - reference_latent).abs().mean() < 0.05
    decoded = vae.decode(reference_latent, video[:, :, 7], tiling=False)
    assert decoded.dtype == torch.float32
    assert (decoded - reference_video).abs().mean() < 0.05


def test_norms_compute_in_float32():
    norm = FloatGroupNorm(64)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(1, 64, 2, 4, 4) * 50 + 300  # large offset: fp16 statistics would be inaccurate
    out = norm.to(torch.float16)(x.half())
    reference = F.group_norm(x.half().float(), 32, norm.weight.float(), norm.bias.float(), 1e-6)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=1e-2)


def test_attention_goes_through_sdpa_and_chunking_is_exact(model, io, monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(blocks.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    reference = model.decode_features(io["latent_det"], [io[f"content_feat_{i}"] for i in range(4)])
    assert len(calls) == 4  # mid fusion, mid self-attention, two level fusions
    calls.clear()
    monkeypatch.setattr(blocks, "MAX_ATTENTION_SCORE_ELEMENTS", 1 << 18)
    with torch.no_grad():
        chunked = model.decode_features(io["latent_det"], [io[f"content_feat_{i}"] for i in range(4)])
    assert len(calls) > 4
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ memory estimate
def test_memory_estimate_behaviour(model):
    ft4 = official_config("ft4")
    gib = 2 ** 30
    enc256 = estimate_memory(ft4, "encode", 16, 256, 256)
    dec256 = estimate_memory(ft4, "decode", 16, 256, 256)
    # calibrated on the official CPU fp32 figures: weights 1.63 GiB, encode +2.1 GiB, decode <= +4.2 GiB
    assert 3.5 * gib < enc256 < 4.5 * gib
    assert 5.5 * gib < dec256 < 7.5 * gib
    assert estimate_memory(ft4, "decode", 16, 256, 256, dtype=torch.float16) < dec256
    assert estimate_memory(ft4, "decode", 16, 256, 256, batch=2) > dec256
    untiled = estimate_memory(ft4, "decode", 16, 1024, 1024, tiling=False)
    tiled = estimate_memory(ft4, "decode", 16, 1024, 1024)
    assert tiled < untiled / 4
    assert estimate_memory(ft4, "decode", 16, 1024, 1024, tile_size=128) < tiled
    assert model.estimate_memory("encode", 16, 64, 64) == estimate_memory(model, "encode", 16, 64, 64)
    with pytest.raises(ValueError, match="op must be"):
        estimate_memory(ft4, "train")


def test_choose_tile_size():
    ft4 = official_config("ft4")
    gib = 2 ** 30
    assert choose_tile_size(ft4, "decode", 16, 256, 256, 16 * gib) is None
    tile = choose_tile_size(ft4, "decode", 16, 1024, 1024, 12 * gib)
    assert tile is not None and tile % 128 == 0
    assert estimate_memory(ft4, "decode", 16, 1024, 1024, tiling=True, tile_size=tile) <= 12 * gib
    with pytest.raises(ValueError, match="needs about"):
        choose_tile_size(ft4, "decode", 16, 1024, 1024, 1 * gib)
