"""Windowed attention paths checked against straightforward per-window loops."""
import math

import torch
import torch.nn.functional as F

import pytest

from reducio.vae import ReducioVAE
from reducio.vae.blocks import (AddFusion, CrossAttention, FusionBlock, SelfAttention, plane_position_table,
                                sinusoid_table)
from reducio.vae.config import ConfigError


def reference_attention(q, k, v, heads):
    """Plain softmax(q k^T / sqrt(d)) v on [N, C] token matrices, heads split head-major."""
    d = q.shape[-1] // heads
    out = []
    for h in range(heads):
        qs, ks, vs = (t[:, h * d : (h + 1) * d] for t in (q, k, v))
        out.append(torch.softmax(qs @ ks.T / math.sqrt(d), dim=-1) @ vs)
    return torch.cat(out, dim=-1)


def test_windowed_2d_self_attention_matches_loop():
    torch.manual_seed(0)
    block = SelfAttention(64, dims=2, heads=8, window=(4, 4)).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 64, 6, 10)
    with torch.no_grad():
        out = block(x)
        h = F.pad(block.norm(x), (0, 2, 0, 2))  # zero-padded to 8x12 after the norm
        result = torch.zeros(1, 64, 8, 12)
        for top in range(0, 8, 4):
            for left in range(0, 12, 4):
                win = h[:, :, top : top + 4, left : left + 4]
                q, k, v = (conv(win)[0].flatten(1).T for conv in (block.q, block.k, block.v))
                att = reference_attention(q, k, v, 8)
                result[0, :, top : top + 4, left : left + 4] = att.T.reshape(64, 4, 4)
        expected = x + block.proj_out(result[:, :, :6, :10])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_windowed_cross_attention_matches_loop():
    torch.manual_seed(1)
    attn = CrossAttention(query_dim=64, context_dim=32, heads=1, window=(4, 4)).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 64, 3, 5, 7)       # video 5x7 per frame, 3 frames
    context = torch.randn(1, 32, 10, 14)  # content 10x14 > 4x4 -> windows
    # 5*7 = 35 >= 16 video positions and 140 > 16 content positions: windows are used
    assert attn.uses_windows((5, 7), (10, 14))
    assert not attn.uses_windows((3, 3), (10, 14))
    with torch.no_grad():
        out = attn(x, context)
        # the video-side window at this size is (ceil(4*5/10), ceil(4*7/14)) = (2, 2) latent cells
        xp = F.pad(x, (0, 1, 0, 1))                 # 6x8
        cp = F.pad(context, (0, 2, 0, 2))           # 12x16
        result = torch.zeros(1, 3, 6, 8, 64)
        for i in range(3):
            for j in range(4):
                xv = xp[0, :, :, i * 2 : i * 2 + 2, j * 2 : j * 2 + 2].flatten(1).T  # (t,h,w) tokens
                cv = cp[0, :, i * 4 : i * 4 + 4, j * 4 : j * 4 + 4].flatten(1).T
                att = reference_attention(attn.to_q(xv), attn.to_k(cv), attn.to_v(cv), 1)
                result[0, :, i * 2 : i * 2 + 2, j * 2 : j * 2 + 2] = att.reshape(3, 2, 2, 64)
        expected = attn.to_out[0](result[:, :, :5, :7].reshape(1, -1, 64))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_sinusoid_table_values():
    table = sinusoid_table(4, 8)
    assert table[0, 0] == 0 and table[0, 1] == 1
    torch.testing.assert_close(table[3, 2], torch.tensor(math.sin(3 / 10000 ** (2 / 8))))
    torch.testing.assert_close(table[3, 3], torch.tensor(math.cos(3 / 10000 ** (2 / 8))))


def test_plane_position_code_is_a_rotation_per_frequency_and_size_free():
    table = plane_position_table(6, 4, 16)              # 4 sin/cos pairs per axis
    assert table.shape == (24, 16)
    pairs = table.reshape(24, 8, 2)
    torch.testing.assert_close((pairs ** 2).sum(-1), torch.ones(24, 8))   # each pair is a point on a circle
    assert len({tuple(row.tolist()) for row in table}) == 24              # every place has its own code
    # the same place of the frame gets the same code at another map size (centre of 1x1 and of 3x3)
    torch.testing.assert_close(plane_position_table(1, 1, 16)[0], plane_position_table(3, 3, 16)[4])
    # y lives in the first half, x in the second: the rows of one column share their x half
    grid = table.reshape(6, 4, 16)
    torch.testing.assert_close(grid[:, 0, 8:], grid[:1, 0, 8:].expand(6, -1))
    assert plane_position_table(2, 2, 3).abs().sum() == 0                 # fewer than 4 channels: no code


def test_fusion_block_with_plane_position_adds_no_weights_and_changes_the_result():
    torch.manual_seed(0)
    plain, coded = FusionBlock(64, 32, 4), FusionBlock(64, 32, 4, plane_position=True)
    coded.load_state_dict(plain.state_dict(), strict=True)
    x, ctx = torch.randn(1, 64, 4, 3, 5), torch.randn(1, 32, 6, 10)
    assert not torch.allclose(plain(x, ctx), coded(x, ctx), atol=1e-3)


def test_content_position_is_validated_and_keeps_the_official_key_set():
    from reducio.train.vae_trainer import VAE_PRESETS

    config = VAE_PRESETS["test"]()
    base = set(ReducioVAE(**config).state_dict())
    config["ddconfig"]["content_position"] = "sincos2d"
    assert set(ReducioVAE(**config).state_dict()) == base
    config["ddconfig"]["content_position"] = "learned"
    with pytest.raises(ConfigError, match="ddconfig.content_position"):
        ReducioVAE(**config)


def test_add_fusion_passes_content_from_the_start_and_learns_unlike_the_official_zero_init():
    torch.manual_seed(0)
    block = AddFusion(32, 16, 4)
    x, ctx = torch.randn(2, 32, 4, 6, 6), torch.randn(2, 16, 6, 6)
    assert not torch.allclose(block(x, ctx), block(x, ctx * 0))  # the content changes the output at once
    block(x, ctx).pow(2).sum().backward()
    assert block.norm.weight.grad.abs().sum() > 0 and block.conv_context.weight.grad.abs().sum() > 0
    # the official zero_init (both convolutions and the norm zeroed) leaves only the norm bias learning
    official = AddFusion(32, 16, 4)
    for tensor in (official.conv.weight, official.conv.bias, official.conv_context.weight, official.conv_context.bias,
                   official.norm.weight, official.norm.bias):
        torch.nn.init.zeros_(tensor)
    assert torch.equal(official(x, ctx), x)
    official(x, ctx).pow(2).sum().backward()
    assert official.norm.weight.grad.abs().sum() == 0 and official.conv.weight.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="same resolution"):
        block(x, torch.randn(2, 16, 3, 3))


@pytest.mark.parametrize("kinds, keys, refused", [
    (["add", "add+attn", "attn"],
     {"decoder.up.0.fuse.0.temp_embed", "decoder.up.1.fuse.0.temp_embed", "decoder.up.1.fuse.1.pos_embed"},
     [([1, 1, -1], ["add", "attn", "attn"]), ([0, 1, -1], ["add", "concat", "attn"])]),
    (["warp", "attn+warp", "attn"],
     {"decoder.up.0.fuse.0.flow.weight", "decoder.up.1.fuse.0.pos_embed", "decoder.up.1.fuse.1.temp_embed",
      "decoder.up.1.fuse.1.flow.weight"},
     [([0, 0, -1], ["warp", "attn+warp", "attn"]), ([0, 1, -1], ["warp", "warp+attn", "attn"])]),
])
def test_same_level_fusion_configs_build_load_and_are_validated(tmp_path, kinds, keys, refused):
    import json

    from reducio.files import atomic_write_safetensors
    from reducio.train.vae_trainer import VAE_PRESETS
    from reducio.vae.checkpoint import CONFIG_METADATA_KEY

    config = VAE_PRESETS["test"]()
    config["ddconfig"].update(ch_fuse=[0, 1, -1], fuse_type=kinds)
    vae = ReducioVAE(**config)
    assert keys <= set(vae.state_dict())
    # a warp decoder reads its coarsest flow off the latent's first two channels (no weights of its own)
    assert hasattr(vae.decoder, "latent_flow") == ("warp" in kinds[0])
    if hasattr(vae.decoder, "latent_flow"):
        z = torch.randn(1, 8, 4, 4, 4)
        torch.testing.assert_close(vae.decoder.latent_flow(z), z[:, :2] / 8)
        assert not any(k.startswith("decoder.latent_flow") for k in vae.state_dict())
    video = torch.rand(1, 3, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        out = vae.decode(vae.encode(video, tiling=False), video[:, :, 7], tiling=False)
    assert out.shape == video.shape and torch.isfinite(out).all()
    path = tmp_path / "fusion.safetensors"
    atomic_write_safetensors(vae.state_dict(), {CONFIG_METADATA_KEY: json.dumps(vae.config)}, path)
    assert ReducioVAE.from_pretrained(path).config["ddconfig"]["fuse_type"] == kinds
    # a config that claims other frame counts than the file's per-frame tables is refused by field
    lying = json.loads(json.dumps(vae.config))
    lying["ddconfig"]["temp_res"] = 8
    atomic_write_safetensors(vae.state_dict(), {CONFIG_METADATA_KEY: json.dumps(lying)}, path, overwrite=True)
    with pytest.raises(Exception, match="temp_res"):
        ReducioVAE.from_pretrained(path)
    for fuse, bad in refused:       # another level's content, or a kind that does not exist
        config["ddconfig"].update(ch_fuse=fuse, fuse_type=bad)
        with pytest.raises(ConfigError, match="same resolution|fuse_type"):
            ReducioVAE(**config)


def test_warp_fusion_starts_near_the_add_fusion_of_its_weights_and_moves_the_content():
    from reducio.vae.blocks import WarpFusion, resize_flow, warp_frames

    torch.manual_seed(0)
    image = torch.randn(2, 5, 8, 8)
    flow = torch.zeros(2, 2, 3, 8, 8)
    assert torch.equal(warp_frames(image, flow), image[:, :, None].expand(2, 5, 3, 8, 8))
    flow[:, 0, 1], flow[:, 1, 2] = 1.0, -2.0        # frame 1: one pixel right; frame 2: two pixels up
    moved = warp_frames(image, flow)
    assert torch.allclose(moved[:, :, 1, :, :-1], image[:, :, :, 1:]) and torch.allclose(moved[:, :, 2, 2:], image[:, :, :-2])
    # a flow resized to twice the size doubles its pixel values
    assert torch.allclose(resize_flow(flow, (3, 16, 16))[:, 0, 1], torch.full((2, 16, 16), 2.0))

    block, add = WarpFusion(32, 16, 4), AddFusion(32, 16, 4)
    add.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("flow.")})
    x, ctx = torch.randn(2, 32, 4, 6, 6, requires_grad=True), torch.randn(2, 16, 6, 6)
    out, out_flow = block(x, ctx)
    # it starts near the add fusion of its weights: the content moves by a small fraction of a pixel ...
    assert 0 < out_flow.abs().max() < 0.5 and (out - add(x, ctx)).abs().max() < 0.2
    # ... and the flow layer passes a gradient back to the video features (a zero layer would not)
    block.flow.weight.grad = None
    assert torch.autograd.grad(out_flow.sum(), x, retain_graph=True)[0].abs().sum() > 0
    out.pow(2).sum().backward()
    assert block.flow.weight.grad.abs().sum() > 0
    with torch.no_grad():
        block.flow.weight.zero_()
        assert torch.allclose(block(x, ctx)[0], add(x, ctx), atol=1e-6)    # a zero flow is the add fusion
        # a prior (coarser) flow is carried up: resampled and added
        prior = torch.ones(2, 2, 4, 3, 3)
        assert torch.allclose(block(x, ctx, prior)[1], torch.full((2, 2, 4, 6, 6), 2.0))


def test_memory_estimate_counts_no_score_matrix_for_add_fusion():
    from reducio.train.vae_trainer import VAE_PRESETS
    from reducio.vae.memory import estimate_memory

    tiny = VAE_PRESETS["tiny"]()
    as_attention = json_copy(tiny)
    as_attention["ddconfig"]["fuse_type"] = "attn"
    add, attn = (estimate_memory(c, "decode", 16, 64, 64, include_weights=False) for c in (tiny, as_attention))
    # attention at full resolution would hold 16 x 4096 x 4096 scores (1 GiB in fp32, capped by the
    # chunking bound); the add fusion is a convolution and holds none (measured 45 MB against 578 MB)
    assert attn > 10 * add


def json_copy(value):
    import json
    return json.loads(json.dumps(value))


def test_norm_groups_sets_every_group_norm_and_keeps_the_key_set():
    from reducio.train.vae_trainer import VAE_PRESETS
    from reducio.vae.blocks import FloatGroupNorm

    config = VAE_PRESETS["test"]()
    official = ReducioVAE(**config)
    config["ddconfig"]["norm_groups"] = 8
    grouped = ReducioVAE(**config)
    assert {n.num_groups for n in grouped.modules() if isinstance(n, FloatGroupNorm)} == {8}
    assert {n.num_groups for n in official.modules() if isinstance(n, FloatGroupNorm)} == {32}
    assert set(grouped.state_dict()) == set(official.state_dict())
    # one channel per group (32 groups on 32 channels) normalises each channel over the clip: a colour
    # shift of the whole input leaves the features unchanged; 8 groups keep it
    x = torch.randn(1, 32, 4, 6, 6)
    shifted = x + torch.linspace(-1, 1, 32).reshape(1, 32, 1, 1, 1)
    per_channel, grouped_norm = FloatGroupNorm(32), FloatGroupNorm(32, groups=8)
    torch.testing.assert_close(per_channel(x), per_channel(shifted), atol=1e-4, rtol=0)
    assert not torch.allclose(grouped_norm(x), grouped_norm(shifted), atol=1e-2)
    config["ddconfig"]["norm_groups"] = 12
    with pytest.raises(ConfigError, match="ddconfig.norm_groups"):
        ReducioVAE(**config)
