"""Reducio-DiT architecture: shapes per config and resolution bucket, parameter counts, embeddings,
attention seam, conditioning nulls and content groups (spec shared/spec/reducio_dit.md §3-§4)."""
import math

import pytest
import torch

from reducio.dit import ReducioDiT, ReducioDiTConfig, get_config
from reducio.dit.conditioning import Context
from reducio.dit.embeddings import grid_positions, sincos_1d, sincos_2d, sincos_3d, timestep_frequencies


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = ReducioDiT(get_config("tiny", **overrides)).eval()
    with torch.no_grad():  # the from-scratch init zeroes the output layers; give every weight a value
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def tiny_inputs(batch=2, size=256, frames=4, text_len=5, seed=1, cfg=None):
    cfg = cfg or get_config("tiny")
    g = torch.Generator().manual_seed(seed)
    h = size // cfg.vae_spatial_factor
    return dict(
        x=torch.randn(batch, cfg.in_channels, frames, h, h, generator=g),
        t=torch.tensor([10.0, 700.0][:batch]),
        text=torch.randn(batch, text_len, cfg.caption_channels, generator=g),
        text_mask=torch.ones(batch, text_len),
        clip=torch.randn(batch, cfg.clip_tokens, cfg.clip_channels, generator=g),
        content=torch.randn(batch, 4, size // 8, size // 8, generator=g),
    )


def close(a, b, rel=1e-4):
    """Equal up to float32 reassociation noise, relative to the tensor's scale."""
    return bool((a - b).abs().max() <= rel * b.abs().max() + 1e-6)


def run(model, inputs, **kw):
    with torch.no_grad():
        return model(inputs["x"], inputs["t"], inputs["text"], inputs["text_mask"], inputs["clip"],
                     inputs["content"], **kw)


# --------------------------------------------------------------------------- shapes
BUCKETS = [(256, 256), (512, 512), (1024, 1024), (768, 1344)]


@pytest.mark.parametrize("name", ["XL", "small"])
@pytest.mark.parametrize("height,width", BUCKETS)
@pytest.mark.parametrize("patch", [(1, 1, 1), (1, 2, 2)])
@pytest.mark.parametrize("latent_frames", [4, 8])
def test_output_shape_on_meta(name, height, width, patch, latent_frames):
    if patch == (1, 2, 2) and (width // 32) % 2:
        pytest.skip("odd latent width cannot be tiled by patch (1, 2, 2)")
    cfg = get_config(name, patch_size=patch, latent_frames=latent_frames)
    model = ReducioDiT(cfg, device="meta")
    b = 2
    x = torch.empty(b, 16, latent_frames, height // 32, width // 32, device="meta")
    out = model(x, torch.empty(b, device="meta"), torch.empty(b, 120, 4096, device="meta"),
                torch.empty(b, 120, device="meta"), torch.empty(b, 256, 1280, device="meta"),
                torch.empty(b, 4, height // 8, width // 8, device="meta"))
    assert out.shape == (b, 32, latent_frames, height // 32, width // 32)


@pytest.mark.parametrize("height,width", BUCKETS)
def test_tiny_output_shape_and_context_length(height, width):
    model = tiny_model()
    cfg = model.config
    seen = []

    def attention(q, k, v, mask, *, layer, kind, attention_fn, options):
        seen.append((layer, kind, q.shape[1], k.shape[1]))
        return ReducioDiT.attention(model, q, k, v, mask, layer=layer, kind=kind, attention_fn=attention_fn,
                                    options=options)

    model.attention = attention
    x = torch.randn(1, 16, 4, height // 32, width // 32)
    out = model(x, torch.tensor([3.0]), torch.randn(1, 8, 32), None, torch.randn(1, 4, 32),
                torch.randn(1, 4, height // 8, width // 8))
    assert out.shape == (1, 32, 4, height // 32, width // 32)
    n_video = 4 * (height // 32) * (width // 32)
    content = (height // 16) * (width // 16)
    groups = 4 if height * width >= 524288 else 1
    expected_context = cfg.text_tokens + cfg.clip_tokens + content // groups
    assert [s for s in seen if s[1] == "self"] == [(i, "self", n_video, n_video) for i in range(4)]
    assert [s for s in seen if s[1] == "cross"] == [(i, "cross", n_video, expected_context) for i in range(4)]


def test_parameter_counts_match_spec():
    xl = ReducioDiT(get_config("XL"), device="meta")
    assert sum(p.numel() for p in xl.parameters()) == 615_827_108
    per_block = sum(p.numel() for p in xl.blocks[0].parameters())
    assert per_block == 21_255_552
    xl122 = ReducioDiT(get_config("XL", patch_size=(1, 2, 2)), device="meta")
    assert sum(p.numel() for p in xl122.parameters()) == 615_993_092
    # 26 top-level tensors + 15 per block (7 Linear layers with weight and bias + scale_shift_table)
    assert len(xl.state_dict()) == 26 + 15 * 28
    shapes = {k: tuple(v.shape) for k, v in xl.state_dict().items()}
    assert shapes["x_embedder.proj.weight"] == (1152, 16, 1, 1, 1)
    assert shapes["t_block.1.weight"] == (6912, 1152)
    assert shapes["y_embedder.y_embedding"] == (120, 4096)
    assert shapes["clip_embedder.null_embedding"] == (256, 1280)
    assert shapes["content_embedder.proj.weight"] == (1152, 4, 2, 2)
    assert shapes["content_embedder.null_latent"] == (4,)
    assert shapes["blocks.27.cross_attn.kv_linear.weight"] == (2304, 1152)
    assert shapes["blocks.27.mlp.fc1.weight"] == (4608, 1152)
    assert shapes["final_layer.linear.weight"] == (32, 1152)
    assert tuple(xl122.state_dict()["final_layer.linear.weight"].shape) == (128, 1152)


def test_config_json_round_trip_and_validation():
    cfg = get_config("tiny", patch_size=(1, 2, 2), content_groups=4)
    again = ReducioDiTConfig.from_json(cfg.to_json())
    assert again == cfg
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        get_config("tiny", num_heads=3)
    with pytest.raises(ValueError, match="unknown Reducio-DiT config fields"):
        ReducioDiTConfig.from_dict({"depth": 2, "hiden_size": 64})
    with pytest.raises(ValueError, match="unknown Reducio-DiT config"):
        get_config("huge")
    with pytest.raises(ValueError, match="content_groups"):
        get_config("tiny", content_groups=2)


# --------------------------------------------------------------------------- embeddings
def test_sincos_1d_layout_sin_half_then_cos_half():
    emb = sincos_1d(torch.tensor([0.0, 3.0]), 8)
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    expected = torch.cat([torch.sin(3 * omega), torch.cos(3 * omega)]).float()
    assert torch.allclose(emb[1], expected)
    assert torch.equal(emb[0], torch.tensor([0, 0, 0, 0, 1, 1, 1, 1.0]))
    assert emb.dtype == torch.float32


def test_sincos_2d_width_first_and_per_axis_normalisation():
    gh, gw, d = 4, 8, 16
    emb = sincos_2d(gh, gw, d, base_size=32, interpolation=1.0).reshape(gh, gw, d)
    pos_h = grid_positions(gh, 32, 1.0)
    pos_w = grid_positions(gw, 32, 1.0)
    assert torch.allclose(pos_h, torch.arange(4, dtype=torch.float64) * 8)   # step 32/4
    assert torch.allclose(pos_w, torch.arange(8, dtype=torch.float64) * 4)   # step 32/8
    i, j = 2, 5
    assert torch.allclose(emb[i, j, : d // 2], sincos_1d(pos_w[j:j + 1], d // 2)[0])  # first half: column
    assert torch.allclose(emb[i, j, d // 2:], sincos_1d(pos_h[i:i + 1], d // 2)[0])   # second half: row
    # the 1024 px grid (32x32, patch 1) has positions 0..31 step 1; 256 px step 4 (spec §4.3)
    assert torch.allclose(grid_positions(32, 32, 1.0), torch.arange(32, dtype=torch.float64))
    assert torch.allclose(grid_positions(8, 32, 1.0), torch.arange(8, dtype=torch.float64) * 4)


def test_sincos_3d_is_spatial_plus_temporal_in_raster_order():
    t, h, w, d = 3, 2, 4, 16
    emb = sincos_3d(t, h, w, d, 32, 1.0).reshape(t, h, w, d)
    spatial = sincos_2d(h, w, d, 32, 1.0).reshape(h, w, d)
    temporal = sincos_1d(torch.arange(t, dtype=torch.float64), d)
    assert torch.allclose(emb[2, 1, 3], spatial[1, 3] + temporal[2], atol=1e-6)
    no_t = sincos_3d(t, h, w, d, 32, 1.0, temporal=False).reshape(t, h, w, d)
    assert torch.allclose(no_t[0], no_t[2])


def test_timestep_frequencies_cos_first():
    emb = timestep_frequencies(torch.tensor([5.0]), 256)
    f = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    assert torch.allclose(emb[0, :128], torch.cos(5 * f))
    assert torch.allclose(emb[0, 128:], torch.sin(5 * f))


# --------------------------------------------------------------------------- attention seam
def test_attention_fn_hook_sees_every_self_attention_with_options():
    model, inputs = tiny_model(), tiny_inputs()
    reference = run(model, inputs)
    calls = []

    def hook(q, k, v, heads, *, layer, options):
        calls.append((layer, heads, tuple(q.shape), options["token_grid"], options["step"], options["cond_or_uncond"]))
        b, n, c = q.shape
        qh, kh, vh = (x.reshape(b, n, heads, c // heads).transpose(1, 2) for x in (q, k, v))
        return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(c // heads), -1).matmul(vh).transpose(1, 2).reshape(b, n, c)

    out = run(model, inputs, attention_fn=hook, options={"step": 3, "cond_or_uncond": [0]})
    assert [c[0] for c in calls] == [0, 1, 2, 3]
    assert all(c[1] == 4 and c[2] == (2, 256, 64) and c[3] == (4, 8, 8) for c in calls)
    assert all(c[4] == 3 and c[5] == [0] for c in calls)
    assert close(out, reference)
    # a hook that changes self-attention changes the output (it is really used)
    changed = run(model, inputs, attention_fn=lambda q, k, v, heads, *, layer, options: torch.zeros_like(q))
    assert not torch.allclose(changed, reference)


def test_timestep_scalar_broadcast_and_dtype():
    model, inputs = tiny_model(), tiny_inputs(batch=2)
    inputs["t"] = torch.tensor([250.0, 250.0])
    a = run(model, inputs)
    inputs["t"] = torch.tensor(250.0)
    b = run(model, inputs)
    assert torch.allclose(a, b)
    bf = tiny_model().to(torch.bfloat16)
    inputs_bf = {k: v.to(torch.bfloat16) if k != "t" else v for k, v in tiny_inputs().items()}
    assert run(bf, inputs_bf).dtype == torch.bfloat16


def test_bad_latent_shapes_are_rejected_with_clear_errors():
    model, inputs = tiny_model(), tiny_inputs()
    with pytest.raises(ValueError, match=r"motion latent \[B, 16"):
        model(torch.randn(1, 8, 4, 8, 8), inputs["t"][:1], inputs["text"][:1])
    model122 = tiny_model(patch_size=(1, 2, 2))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model122(torch.randn(1, 16, 4, 8, 7), inputs["t"][:1], inputs["text"][:1])
    with pytest.raises(ValueError, match="CLIP tokens must be"):
        model(inputs["x"], inputs["t"], inputs["text"], None, torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="content latent must be"):
        model(inputs["x"], inputs["t"], inputs["text"], None, None, torch.randn(2, 3, 32, 32))


# --------------------------------------------------------------------------- conditioning
def test_text_padding_truncation_and_mask_make_padded_values_irrelevant():
    model, inputs = tiny_model(), tiny_inputs(text_len=5)
    base = run(model, inputs)
    padded = dict(inputs)
    padded["text"] = torch.cat([inputs["text"], 100 * torch.randn(2, 3, 32)], dim=1)
    padded["text_mask"] = torch.cat([inputs["text_mask"], torch.zeros(2, 3)], dim=1)
    assert close(run(model, padded), base)
    # longer than text_tokens (8): truncated, so tokens beyond 8 do not matter
    long = dict(inputs)
    long["text"] = torch.randn(2, 12, 32)
    long["text_mask"] = None
    out1 = run(model, long)
    long["text"] = torch.cat([long["text"][:, :8], torch.randn(2, 4, 32)], dim=1)
    assert close(run(model, long), out1)


def test_null_text_uses_learned_embedding_with_all_ones_mask():
    model, inputs = tiny_model(), tiny_inputs(text_len=3)
    drop = torch.tensor([True, False])
    out = run(model, inputs, drop_text=drop)
    explicit = dict(inputs)
    explicit["text"] = torch.stack([model.y_embedder.y_embedding.detach(), torch.nn.functional.pad(inputs["text"][1], (0, 0, 0, 5))])
    explicit["text_mask"] = torch.stack([torch.ones(8), torch.tensor([1, 1, 1, 0, 0, 0, 0, 0.0])])
    assert close(out, run(model, explicit))
    assert not torch.allclose(out[0], run(model, inputs)[0])   # really replaced
    assert close(out[1], run(model, inputs)[1])  # other row untouched


def test_null_clip_and_none_clip_use_null_embedding():
    model, inputs = tiny_model(), tiny_inputs()
    out = run(model, inputs, drop_clip=torch.tensor([True, True]))
    explicit = dict(inputs, clip=model.clip_embedder.null_embedding.detach().expand(2, -1, -1).clone())
    assert close(out, run(model, explicit))
    assert close(out, run(model, dict(inputs, clip=None)))


def test_reduced_clip_condition_ignores_the_tokens():
    """clip_condition "null" (the reduced conditioning of models trained without a CLIP image encoder):
    any CLIP tokens, of any shape, give the output of the learned null embedding."""
    model = tiny_model(clip_condition="null")
    inputs = tiny_inputs(cfg=model.config)
    reference = run(model, dict(inputs, clip=None))
    assert close(run(model, inputs), reference)
    assert close(run(model, dict(inputs, clip=torch.randn(2, 7, 11))), reference)   # e.g. a ViT-L's tokens
    with pytest.raises(ValueError, match="clip_condition"):
        get_config("tiny", clip_condition="ignore")


def test_null_content_broadcasts_null_latent_before_scaling():
    model, inputs = tiny_model(), tiny_inputs()
    out = run(model, inputs, drop_content=torch.tensor([True, False]))
    scale = model.config.content_latent_scale
    null_raw = (model.content_embedder.null_latent.detach() / scale).reshape(1, 4, 1, 1).expand(1, 4, 32, 32)
    explicit = dict(inputs, content=torch.cat([null_raw, inputs["content"][1:]]))
    assert close(out, run(model, explicit))
    none = run(model, dict(inputs, content=None))
    all_null = run(model, inputs, drop_content=torch.tensor([True, True]))
    assert close(none, all_null)


def test_content_latent_is_scaled_inside_the_model():
    model = tiny_model()
    emb = model.content_embedder
    latent = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        tokens = emb(latent, None, 1)[0]
        conv = torch.nn.functional.conv2d(latent * 0.18215, emb.proj.weight, emb.proj.bias, stride=2)
        pos = sincos_2d(4, 4, 64, 32, 1.0)
        expected = emb.fc(torch.nn.functional.gelu(conv.flatten(2).transpose(1, 2) + pos, approximate="tanh"))
    assert torch.allclose(tokens, expected, atol=1e-5)


def test_content_groups_are_strided_after_positions_and_cycle_over_blocks():
    model = tiny_model()
    emb = model.content_embedder
    latent = torch.randn(1, 4, 16, 16)  # content grid 8x8
    with torch.no_grad():
        full = emb(latent, None, 1)[0].reshape(1, 8, 8, 64)
        groups = emb(latent, None, 4)
    assert len(groups) == 4
    for g, (dy, dx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert torch.allclose(groups[g], full[:, dy::2, dx::2].reshape(1, 16, 64))
    context = Context(tokens=["g0", "g1", "g2", "g3"], mask=None)
    assert [context.for_block(i) for i in range(6)] == ["g0", "g1", "g2", "g3", "g0", "g1"]
    # "auto" splits from 512*1024 px on; 1 and 4 force the choice
    cfg = get_config("tiny")
    assert cfg.groups_for_image(1024, 1024) == 4 and cfg.groups_for_image(768, 1344) == 4
    assert cfg.groups_for_image(512, 512) == 1 and cfg.groups_for_image(512, 1024) == 4
    assert get_config("tiny", content_groups=1).groups_for_image(1024, 1024) == 1
    assert get_config("tiny", content_groups=4).groups_for_image(256, 256) == 4


def test_each_block_cross_attends_to_its_group():
    model = tiny_model(content_groups=4)
    inputs = tiny_inputs(batch=1)
    seen = {}
    original = model.run_block

    def spy(index, x, t0, context, attend, options):
        seen[index] = context.for_block(index)[:, -16:]
        return original(index, x, t0, context, attend, options)

    model.run_block = spy
    run(model, inputs)
    with torch.no_grad():
        groups = model.content_embedder(inputs["content"], None, 4)
    for block in range(4):
        assert torch.allclose(seen[block], groups[block % 4][:, -16:])


def test_from_scratch_init_follows_spec():
    torch.manual_seed(0)
    model = ReducioDiT(get_config("tiny"))
    zero = ["final_layer.linear", "clip_embedder.proj.fc2", "content_embedder.fc", "blocks.0.cross_attn.proj"]
    sd = model.state_dict()
    for name in zero:
        assert sd[name + ".weight"].abs().max() == 0 and sd[name + ".bias"].abs().max() == 0
    assert sd["content_embedder.null_latent"].abs().max() == 0
    assert 0.005 < sd["clip_embedder.proj.fc1.weight"].std() < 0.04
    inputs = tiny_inputs()
    assert run(model, inputs).abs().max() == 0   # zero final layer -> eps = 0, v = 0
