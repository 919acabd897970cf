"""Measured motion channels (``ddconfig.latent_motion = 'measured'``, reducio/vae/motion.py)."""
import json

import pytest
import torch

from reducio.data import SyntheticClips
from reducio.vae import ReducioVAE, normalize_latent
from reducio.vae.config import ConfigError
from reducio.vae.motion import (MAX_OBJECT_UNITS, MAX_UNITS, camera_cells, camera_similarity, embed_motion, frame_shifts,
                                measure_fine_objects, measure_latent_motion, measure_motion, measure_object_motion,
                                object_shifts, read_motion_flow, read_object_flow, steady_object_velocities,
                                zoom_roll_direction)


def measured_config(embed_dim=16, kind="measured"):
    from reducio.train.vae_trainer import VAE_PRESETS

    config = VAE_PRESETS["test"]()
    config["ddconfig"].update(ch_fuse=[0, 1, -1], fuse_type=["warp", "attn+warp", "attn"], latent_motion=kind,
                              z_channels=embed_dim)
    config["embed_dim"] = embed_dim
    return config


def sprite_free_pans(size, count=60):
    data = SyntheticClips(split="train", size=size, count=count)
    return data, [i for i in range(count) if data.spec(i).camera == "pan" and not data.spec(i).sprites]


def test_frame_shifts_are_the_pan_and_the_latent_channels_its_mean_per_latent_frame():
    data, pans = sprite_free_pans(64)
    for index in pans[:3]:
        spec = data.spec(index)
        video = data[index]["video"][None]
        expected = torch.tensor(spec.scene_shift)[:, None] * (7 - torch.arange(16.0))[None]   # [2, 16] px
        shifts = frame_shifts(video, 7)[0]
        # within 0.35 pixel: phase correlation with sub-pixel refinement, the clip edge reflects
        assert (shifts - expected).abs().max() < 0.35
        units = measure_latent_motion(video, 7, 4)[0]
        torch.testing.assert_close(units, (expected.reshape(2, 4, 4).mean(-1) * 16 / 64).clamp(-MAX_UNITS, MAX_UNITS),
                                   atol=0.35 * 16 / 64, rtol=0)


@pytest.mark.parametrize("scale", [0.05, 1.0, 30.0])
def test_embedded_motion_survives_the_latent_normalisation(scale):
    torch.manual_seed(0)
    z = torch.randn(3, 16, 4, 2, 2) * scale + 0.3
    motion = (torch.rand(3, 2, 4) * 2 - 1) * MAX_UNITS
    latent = embed_motion(z, motion)
    torch.testing.assert_close(latent[:, :2], motion[:, :, :, None, None].expand(-1, -1, -1, 2, 2))
    # the encoder and the DiT pipeline layer-normalise every latent: that must leave the motion as it is
    torch.testing.assert_close(normalize_latent(latent), latent, atol=1e-4, rtol=0)
    # and the learned channels keep their pattern (a positive affine map of the originals)
    rest, original = latent[:, 2:].reshape(3, -1), z[:, 2:].reshape(3, -1)
    assert all(torch.corrcoef(torch.stack([r, o]))[0, 1] > 0.9999 for r, o in zip(rest, original))


def test_the_flow_reads_frame_relative_units_and_a_tile_reads_the_whole_frame():
    z = torch.zeros(1, 16, 4, 4, 6)
    z[:, 0], z[:, 1] = 1.0, -2.0
    flow = read_motion_flow(z)                                       # latent pixels
    assert flow[:, 0].unique().tolist() == [6 / 16] and flow[:, 1].unique().tolist() == [-2 * 4 / 16]
    torch.testing.assert_close(read_motion_flow(z[..., :2, :2], frame_size=(4, 6)), flow[..., :2, :2])


def test_a_measured_motion_vae_encodes_the_motion_and_decodes_from_it(tmp_path):
    from reducio.files import atomic_write_safetensors
    from reducio.vae.checkpoint import CONFIG_METADATA_KEY

    torch.manual_seed(0)
    vae = ReducioVAE(**measured_config()).eval()
    data, pans = sprite_free_pans(16)
    video = data[pans[0]]["video"][None]
    with torch.no_grad():
        latent = vae.encode(video, tiling=False)
        torch.testing.assert_close(latent[:, :2, :, 0, 0], measure_latent_motion(video, 7, 4), atol=1e-4, rtol=0)
        # the decoder reads the flow before post_quant_conv: with that layer blind to channels 0-1, changing
        # them still changes the output (the content frame moves)
        vae.post_quant_conv.weight[:, :2] = 0
        moved = latent.clone()
        moved[:, 0] += 1.0
        a, b = (vae.decode(x, video[:, :, 7], tiling=False) for x in (latent, moved))
    assert (a - b).abs().max() > 1e-3
    path = tmp_path / "measured.safetensors"
    atomic_write_safetensors(vae.state_dict(), {CONFIG_METADATA_KEY: json.dumps(vae.config)}, path)
    assert ReducioVAE.from_pretrained(path).measured_motion


def test_measured_motion_configs_are_validated():
    with pytest.raises(ConfigError, match="needs a decoder level with 'warp'"):
        config = measured_config()
        config["ddconfig"].update(ch_fuse=[-1, 1, -1], fuse_type="attn")
        ReducioVAE(**config)
    with pytest.raises(ConfigError, match="at least 16 latent channels"):
        ReducioVAE(**measured_config(embed_dim=8))
    with pytest.raises(ConfigError, match="latent_motion"):
        config = measured_config()
        config["ddconfig"]["latent_motion"] = "guessed"
        ReducioVAE(**config)


def test_the_motion_hint_is_refused_for_a_measured_motion_model(tmp_path, capsys):
    from reducio.train.cli import main

    path = tmp_path / "measured.json"
    path.write_text(json.dumps(measured_config()))
    common = ["--size", "16", "--clips", "4", "--steps", "1", "--batch-size", "2", "--quiet"]
    assert main(["vae", "--model-config", str(path), "--motion-hint-weight", "0.02", "--out", str(tmp_path / "a"),
                 *common]) == 2
    assert "this model measures it" in capsys.readouterr().err
    out = tmp_path / "b"
    assert main(["vae", "--model-config", str(path), "--out", str(out), *common]) == 0
    assert ReducioVAE.from_pretrained(next(out.glob("checkpoints/step_*/model.safetensors"))).measured_motion


# ---------------------------------------------------------------------------------------------------
# object motion (latent_motion 'measured+objects')
# ---------------------------------------------------------------------------------------------------
def test_object_shifts_find_each_sprite_against_the_camera_and_nothing_without_one():
    """Per frame, in the cell where the sprite is, the shift is its motion against the camera's
    (backward: (velocity - scene shift) * (7 - t)). Measured on the first 120 training clips with a pan
    or a still view: 80 % of the checks within 2.5 pixels (299 of 376; the rest mostly when the sprite
    crosses a cell edge or moves nearly with the camera), and no shift at all in any sprite-free clip."""
    data = SyntheticClips(split="train", size=64, count=120)
    right = checks = 0
    for index in range(120):
        spec = data.spec(index)
        if spec.camera not in ("pan", "still") or len(spec.sprites) > 1:
            continue
        video = data[index]["video"][None]
        shifts = object_shifts(video, frame_shifts(video, 7), 7, (2, 2))[0] * 64      # pixels
        if not spec.sprites:
            assert shifts.abs().max() == 0, index
            continue
        sprite = spec.sprites[0]
        for t in range(16):
            expected = [(sprite.velocity[k] - spec.scene_shift[k]) * (7 - t) for k in (0, 1)]
            if not 2 <= max(map(abs, expected)) <= 9.5:      # too small to tell, or beyond the search's reach
                continue
            x, y = (sprite.start[k] + sprite.velocity[k] * t for k in (0, 1))
            row, col = min(1, max(0, int(y // 32))), min(1, max(0, int(x // 32)))
            checks += 1
            right += all(abs(float(shifts[k, t, row, col]) - expected[k]) <= 2.5 for k in (0, 1))
    assert checks > 300 and right / checks >= 0.75


def test_object_channels_are_the_group_mean_in_frame_units_and_survive_the_normalisation():
    data = SyntheticClips(split="train", size=64, count=40)
    index = next(i for i in range(40) if data.spec(i).camera == "still" and data.spec(i).sprites)
    video = data[index]["video"][None]
    shifts = object_shifts(video, frame_shifts(video, 7), 7, (2, 2))
    units = measure_object_motion(video, 7, 4, (2, 2))
    torch.testing.assert_close(units, (shifts.reshape(1, 2, 4, 4, 2, 2).mean(3) * 8).clamp(-1.4, 1.4))
    assert units.abs().max() > 0.3
    # the worst case: every motion channel at its largest everywhere
    torch.manual_seed(0)
    z = torch.randn(2, 16, 4, 2, 2)
    motion = torch.cat([torch.full((2, 2, 4, 2, 2), MAX_UNITS), torch.full((2, 2, 4, 2, 2), -MAX_OBJECT_UNITS)], 1)
    latent = embed_motion(z, motion)
    torch.testing.assert_close(latent[:, :4], motion)
    torch.testing.assert_close(normalize_latent(latent), latent, atol=1e-4, rtol=0)
    flow = read_object_flow(latent)                                   # latent pixels: units * side / 8
    torch.testing.assert_close(flow, torch.full_like(flow, -MAX_OBJECT_UNITS * 2 / 8))


def test_a_measured_objects_vae_encodes_them_and_its_decoder_reads_them_through_its_own_layers():
    torch.manual_seed(0)
    vae = ReducioVAE(**measured_config(kind="measured+objects")).eval()
    assert vae.latent_motion == "measured+objects" and vae.measured_motion
    data = SyntheticClips(split="train", size=16, count=40)
    index = next(i for i in range(40) if data.spec(i).sprites)
    video = data[index]["video"][None]
    with torch.no_grad():
        latent = vae.encode(video, tiling=False)
        torch.testing.assert_close(latent[:, 2:4], measure_object_motion(video, 7, 4, latent.shape[3:]),
                                   atol=1e-4, rtol=0)
        vae.post_quant_conv.weight[:, :4] = 0          # the decoder's other path to the motion channels
        moved = latent.clone()
        moved[:, 2] += 1.0
        # zero-initialised object layers: a model trained without them decodes as before
        a, b = (vae.decode(x, video[:, :, 7], tiling=False) for x in (latent, moved))
        torch.testing.assert_close(a, b)
        for module in vae.decoder.modules():
            if hasattr(module, "conv_objects"):
                module.conv_objects.weight.normal_(0, 0.1)
        a, b = (vae.decode(x, video[:, :, 7], tiling=False) for x in (latent, moved))
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="at least 16 latent channels"):
        ReducioVAE(**measured_config(embed_dim=8, kind="measured+objects"))


# ---------------------------------------------------------------------------------------------------
# motion_interpolation 'linear' and the camera per cell (latent_motion 'measured-similarity+objects')
# ---------------------------------------------------------------------------------------------------
def test_linear_flow_gives_a_steady_motion_and_a_linear_field_back_exactly():
    from reducio.vae.blocks import linear_flow, resize_flow

    # a steady motion through zero at the content frame (7), stored as the mean over each latent frame
    per_frame = torch.tensor([[0.8], [-1.5]]) * (torch.arange(16.0) - 7)                # [2, 16]
    latent = per_frame.reshape(2, 4, 4).mean(-1)[None, :, :, None, None].expand(3, 2, 4, 2, 2)
    frames = linear_flow(latent, (16, 2, 2), space=False)
    torch.testing.assert_close(frames, per_frame[None, :, :, None, None].expand(3, 2, 16, 2, 2))
    assert frames[:, :, 7].abs().max() < 1e-6                # the content frame stays where it is
    # held over the latent frame's frames instead ('held'): up to 1.5 frames' motion off
    held = resize_flow(latent, (16, 2, 2), mode="nearest")
    assert (held[0, 0, :, 0, 0] - per_frame[0]).abs().max() == pytest.approx(1.5 * 0.8)
    # a zoom: the flow grows linearly from the centre; per cell it is the cell's mean, and spread over
    # the pixels it comes back out to the frame's edges (F.interpolate holds the outer cells' values)
    xs = torch.arange(64.0) + 0.5 - 32
    field = torch.stack([0.05 * xs[None, :].expand(64, 64), 0.05 * xs[:, None].expand(64, 64)])    # pixels
    cells = field.reshape(2, 2, 32, 2, 32).mean((2, 4))[None, :, None] / 32                       # latent pixels
    torch.testing.assert_close(linear_flow(cells, (1, 64, 64))[0, :, 0], field, atol=1e-5, rtol=0)
    assert (resize_flow(cells, (1, 64, 64))[0, :, 0] - field).abs().max() > 0.7
    assert torch.equal(linear_flow(latent, (4, 2, 2)), latent)
    with pytest.raises(ValueError, match="keeps the flow's size"):
        linear_flow(latent, (16, 4, 4), space=False)


def test_the_camera_similarity_finds_pans_zooms_and_rolls_past_the_sprites():
    """Per latent cell and latent frame, the measured camera against the clip's exact motion (the mean
    of ``camera_flow`` over the cell). Measured on the first 96 held-out clips at 64 px (1536 checks):
    with sprites 5 % more than a pixel off and none beyond 3 pixels; the frame's one phase-correlation
    shift 38 % and 20 %. Here the first 32."""
    data = SyntheticClips(split="heldout", size=64, count=32, seed=123)
    errors, kinds = [], set()
    for index in range(32):
        spec = data.spec(index)
        video = data[index]["video"][None]
        truth = data.camera_flow(spec, 7).reshape(2, 16, 2, 32, 2, 32).mean((3, 5))
        cells = camera_cells(video, 7, (2, 2))[0]
        assert cells.shape == (2, 16, 2, 2) and cells[:, 7].abs().max() == 0
        errors += (cells.reshape(2, 4, 4, 2, 2).mean(2) - truth.reshape(2, 4, 4, 2, 2).mean(2)).norm(dim=0).flatten().tolist()
        kinds.add(spec.camera)
        if spec.camera == "zoom" and not spec.sprites:
            zoom = camera_similarity(video, 7)[0, :, 2]
            # the content frame zoomed by z per frame: frame t samples it at (1 / z)^(t - 7) times the offset.
            # Within 0.025 (measured: at most 0.022 off on two clips of 0.6 % and 1.5 % per frame: the
            # 16-pixel tiles' sub-pixel shifts lean towards whole pixels)
            expected = spec.scene_zoom ** (7 - torch.arange(16.0)) - 1
            torch.testing.assert_close(zoom, expected, atol=0.025, rtol=0)
    errors = torch.tensor(errors)
    assert kinds >= {"pan", "zoom", "roll", "still"} and len(errors) == 32 * 16
    assert (errors > 1).float().mean() < 0.1 and errors.max() < 4


def test_linear_interpolation_puts_each_sprite_closer_to_where_it_is():
    """The position the decoder reads for a held-out sprite (camera plus object flow in the sprite's
    cell, each frame) against the truth. Measured on the first 64 held-out clips at 64 px (1020 checks),
    more than 2 pixels off: 35 % 'measured+objects' held over each latent frame, 23 % with 'linear'
    interpolation, 17 % 'measured-similarity+objects' with 'linear'; medians 1.48, 0.70, 0.73 pixel.
    Here the first 24."""
    from reducio.vae.blocks import linear_flow

    data = SyntheticClips(split="heldout", size=64, count=24, seed=123)
    errors = {"held": [], "linear": [], "similarity": []}
    for index in range(24):
        spec = data.spec(index)
        if not spec.sprites:
            continue
        video = data[index]["video"][None]
        flows = {}
        for kind in ("measured+objects", "measured-similarity+objects"):
            units = measure_motion(video, 7, (4, 2, 2), kind)
            camera, objects = read_motion_flow(units), read_object_flow(units)         # latent pixels
            if kind == "measured+objects":
                flows["held"] = (camera + objects).repeat_interleave(4, 2).repeat_interleave(32, 3)
                flows["held"] = flows["held"].repeat_interleave(32, 4) * 32
                flows["linear"] = linear_flow(camera + objects, (16, 2, 2), space=False)
                flows["linear"] = flows["linear"].repeat_interleave(32, 3).repeat_interleave(32, 4) * 32
            else:
                objects = linear_flow(objects, (16, 2, 2), space=False).repeat_interleave(32, 3).repeat_interleave(32, 4)
                flows["similarity"] = linear_flow(camera, (16, 64, 64)) + objects * 32
        for sprite in spec.sprites:
            for t in range(16):
                x, y = (sprite.start[k] + sprite.velocity[k] * t for k in (0, 1))
                if t == 7 or not (0 <= x < 64 and 0 <= y < 64):
                    continue
                truth = torch.tensor([sprite.velocity[0], sprite.velocity[1]]) * (7 - t)
                for name, flow in flows.items():
                    errors[name].append(float((flow[0, :, t, int(y), int(x)] - truth).norm()))
    far = {name: (torch.tensor(e) > 2).float().mean() for name, e in errors.items()}
    assert len(errors["held"]) > 250
    assert far["similarity"] < far["held"] - 0.1 and far["linear"] < far["held"] - 0.05


def test_a_similarity_vae_encodes_the_camera_per_cell_and_checks_its_config():
    config = measured_config(kind="measured-similarity+objects")
    config["ddconfig"]["motion_interpolation"] = "linear"
    torch.manual_seed(0)
    vae = ReducioVAE(**config).eval()
    assert vae.decoder.linear_motion and any(hasattr(m, "conv_objects") for m in vae.decoder.modules())
    data = SyntheticClips(split="train", size=32, count=40)
    video = data[next(i for i in range(40) if data.spec(i).camera == "zoom")]["video"][None]
    with torch.no_grad():
        latent = vae.encode(video, tiling=False)
        torch.testing.assert_close(latent[:, :4], measure_motion(video, 7, latent.shape[2:], "measured-similarity+objects"),
                                   atol=1e-4, rtol=0)
        assert latent[:, :2].std((3, 4)).max() > 0.01          # a zoom: not the same in every cell
        assert vae.decode(latent, video[:, :, 7], tiling=False).shape == video.shape
    config["ddconfig"]["motion_interpolation"] = "smooth"
    with pytest.raises(ConfigError, match="motion_interpolation"):
        ReducioVAE(**config)
    config["ddconfig"].update(motion_interpolation="linear", latent_motion="learned")
    with pytest.raises(ConfigError, match="needs a measured"):
        ReducioVAE(**config)


def test_zoom_roll_direction_reads_the_captioned_zoom_or_roll_off_a_clip():
    """The first 80 held-out clips at 64 px, sprites included. Measured: every zoom and roll clip read as
    captioned (31 of 31); pans read 'still' 38 of 41 (3 as a roll), still views 8 of 8."""
    data = SyntheticClips(split="heldout", size=64, count=80, seed=123)
    readings = {"zoom": [], "roll": [], "pan": [], "still": []}
    for index in range(80):
        spec = data.spec(index)
        seen = zoom_roll_direction(data[index]["video"])
        readings[spec.camera].append(seen == spec.direction if spec.camera in ("zoom", "roll") else seen == "still")
    assert len(readings["zoom"]) + len(readings["roll"]) >= 25
    assert all(readings["zoom"]) and all(readings["roll"]) and all(readings["still"])
    assert sum(readings["pan"]) >= 0.85 * len(readings["pan"])


def test_the_camera_similarity_keeps_its_reach_at_larger_sizes_and_ignores_flat_tiles():
    """Review findings: 16-pixel tiles lost every shift above 8 pixels at 256 px (a pan of 15.2 pixels
    read as 1.4), and flat tiles, whose correlation reads a confident zero, pulled the fit into a roll.
    Measured now: 15.16 against the frame's 15.22 at 256 px; with half the frame flat, the pan kept
    (3.62 px against 3.72) and no roll."""
    data = SyntheticClips(split="heldout", size=256, count=40, seed=123)
    index = next(i for i in range(40) if data.spec(i).camera == "pan" and not data.spec(i).sprites)
    video = data[index]["video"][None]
    global_dx = float(frame_shifts(video, 7)[0, 0, 15])
    assert abs(global_dx) > 10 and abs(float(camera_similarity(video, 7)[0, 15, 0]) - global_dx) < 0.5
    data = SyntheticClips(split="heldout", size=64, count=40, seed=123)
    video = data[index]["video"][None].clone()
    video[..., :32, :] = 0.2                               # the top half without any texture
    params = camera_similarity(video, 7)[0, 15]
    assert abs(float(params[0]) - float(frame_shifts(data[index]["video"][None], 7)[0, 0, 15])) < 0.6
    assert abs(float(params[3])) < 0.005 and zoom_roll_direction(video[0]) == "still"


# ---------------------------------------------------------------------------------------------------
# composite output (ddconfig.composite_output): the content frame moved by the decoder's flows, mixed in
# ---------------------------------------------------------------------------------------------------
def composite_config():
    config = measured_config(kind="measured-similarity+objects")
    config["ddconfig"].update(motion_interpolation="linear", composite_output=True)
    return config


def force_mix(vae, picture: int) -> None:
    """Make the decoder's mix take entry ``picture`` (0 camera, 1 objects, -1 generated) everywhere."""
    with torch.no_grad():
        vae.decoder.mix.weight.zero_()
        vae.decoder.mix.bias.fill_(-50.0)
        vae.decoder.mix.bias[picture] = 50.0


def test_a_composite_decoder_gives_the_content_frame_moved_by_its_flows():
    from reducio.vae.blocks import WarpFusion

    torch.manual_seed(0)
    vae = ReducioVAE(**composite_config()).eval()
    data = SyntheticClips(split="train", size=32, count=40)
    clip = data[next(i for i in range(40) if data.spec(i).camera == "pan" and not data.spec(i).sprites)]["video"][None]
    content = clip[:, :, 7]
    feats = vae.encode_2d(content)
    assert torch.equal(feats[-1], content) and vae.decoder.used_content_levels()[-2:] == [-2, -1]
    # a still clip, no learned flow on top of the measured one: the camera picture is the content frame
    for module in vae.decoder.modules():
        if isinstance(module, WarpFusion):
            torch.nn.init.zeros_(module.flow.weight)
    still = content[:, :, None].expand(-1, -1, 16, -1, -1)
    force_mix(vae, 0)
    with torch.no_grad():
        latent = vae.encode(still, tiling=False)
        assert latent[:, :4].abs().max() < 1e-3                       # nothing moves
        torch.testing.assert_close(vae.decode(latent, content, tiling=False), still, atol=1e-5, rtol=0)
        # a pan: every frame is the content frame moved by the measured camera flow, sharp (no blur)
        latent = vae.encode(clip, tiling=False)
        flow = read_motion_flow(latent)
        from reducio.vae.blocks import linear_flow, warp_frames

        expected = warp_frames(content, linear_flow(flow, (16, 32, 32)))
        out = vae.decode(latent, content, tiling=False)
        # the flow reaches level 0 through the test preset's half-resolution warp level, which holds 8
        # frames: resampled there and back, it stays within 0.01 pixel value of the exact move (measured
        # 0.006) except in the end frames, whose motion the 8-frame level clamps
        torch.testing.assert_close(out[:, :, 1:15], expected[:, :, 1:15], atol=0.01, rtol=0)
        assert (out - expected).abs().mean() < 0.1 * (out - still).abs().mean()
        # the generated entry alone is conv_out's output: the same as the plain decoder's
        force_mix(vae, -1)
        plain_config = composite_config()
        plain_config["ddconfig"]["composite_output"] = False
        plain = ReducioVAE(**plain_config).eval()
        plain.load_state_dict({k: v for k, v in vae.state_dict().items() if not k.startswith("decoder.mix.")})
        torch.testing.assert_close(vae.decode(latent, content, tiling=False), plain.decode(latent, content, tiling=False),
                                   atol=1e-5, rtol=0)


def composite_inputs(decoder):
    """(content image, generated video, last features, the warp levels' flow, the latent's camera flow) for
    calling ``decoder._composite`` on a 16-pixel frame with 8 pixels per latent cell: the generated video
    and features are zero, the warp levels' flow 5 pixels (the object pictures must not use it), the
    camera still."""
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    video = torch.zeros(1, 3, 16, 16, 16)
    hidden = torch.zeros(1, decoder.norm_out.num_channels, 16, 16, 16)
    return image, video, hidden, torch.full((1, 2, 16, 16, 16), 5.0), torch.zeros(1, 2, 16, 16, 16)


def test_a_composite_decoder_moves_the_object_picture_by_the_cells_object_flow():
    torch.manual_seed(0)
    vae = ReducioVAE(**composite_config()).eval()
    decoder = vae.decoder
    image, video, hidden, refined, read = composite_inputs(decoder)
    read[:, 1] = 1.0                                    # the camera as the latent holds it: 1 pixel down
    objects = torch.zeros(1, 2, 16, 2, 2)
    objects[:, 0, :, 0, 0] = 3.0 / 8      # latent pixels: 3 output pixels at 8 output pixels per cell
    force_mix(vae, 1)
    with torch.no_grad():
        out = decoder._composite(video, hidden, image, refined, read, objects)
    # in the top-left cell the picture is the content 3 pixels further right and 1 down; elsewhere 1 down
    torch.testing.assert_close(out[0, :, 5, :7, :5], image[0, :, 1:8, 3:8], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, :, 5, 8:15, :], image[0, :, 9:, :], atol=1e-5, rtol=0)
    force_mix(vae, 0)
    with torch.no_grad():
        out = decoder._composite(video, hidden, image, refined, read, objects)
    torch.testing.assert_close(out[0, :, 5, :11, :11], image[0, :, 5:, 5:], atol=1e-5, rtol=0)


def test_a_composite_model_starts_from_a_plain_ones_weights_close_to_its_output():
    """The new mix starts at the generated output: a model fine-tuned into a composite one begins where it
    was, off by at most the pictures' share of the softmax times the distance to them."""
    plain_config = composite_config()
    plain_config["ddconfig"]["composite_output"] = False
    torch.manual_seed(0)
    plain = ReducioVAE(**plain_config).eval()
    vae = ReducioVAE(**composite_config()).eval()
    missing = vae.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["decoder.mix.bias", "decoder.mix.weight"]
    clip = SyntheticClips(split="train", size=32, count=4)[1]["video"][None]
    with torch.no_grad():
        latent = vae.encode(clip, tiling=False)
        generated = plain.decode(latent, clip[:, :, 7], tiling=False)
        out = vae.decode(latent, clip[:, :, 7], tiling=False)
    share = 2 / (2 + torch.exp(torch.tensor(vae.decoder.MIX_INIT)))
    assert (out - generated).abs().max() <= share * (1 + generated.abs().max()) + 1e-5
    assert (out - generated).abs().max() > 0


def test_composite_output_configs_are_validated():
    config = composite_config()
    config["ddconfig"]["composite_output"] = "yes"
    with pytest.raises(ConfigError, match="composite_output"):
        ReducioVAE(**config)
    config = composite_config()
    config["ddconfig"].update(latent_motion="learned", motion_interpolation="held")
    with pytest.raises(ConfigError, match="composite_output needs a measured"):
        ReducioVAE(**config)
    config = composite_config()
    config["ddconfig"]["tanh_out"] = True
    with pytest.raises(ConfigError, match="cannot both be true"):
        ReducioVAE(**config)


def test_freeze_latent_trains_the_decoder_and_keeps_the_latent(tmp_path, capsys):
    from safetensors.torch import load_file

    from reducio.train.cli import main

    path = tmp_path / "composite.json"
    path.write_text(json.dumps(composite_config()))
    common = ["--model-config", str(path), "--size", "32", "--clips", "4", "--batch-size", "2", "--quiet",
              "--posterior", "mean", "--lr", "1e-3"]
    assert main(["vae", "--steps", "1", "--out", str(tmp_path / "a"), *common]) == 0
    start = next((tmp_path / "a").glob("checkpoints/step_*/model.safetensors"))
    assert main(["vae", "--steps", "2", "--init", str(start), "--freeze-latent", "--out", str(tmp_path / "b"),
                 *common]) == 0
    before = load_file(str(start))
    after = load_file(str(next((tmp_path / "b").glob("checkpoints/step_*/model.safetensors"))))
    latent = [k for k in before if k.startswith(("encoder_3d.", "quant_conv."))]
    assert latent and all(torch.equal(before[k], after[k]) for k in latent)
    assert not torch.equal(before["decoder.mix.weight"], after["decoder.mix.weight"])
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])
    # resuming without the flag is refused: the settings differ from the checkpoint's
    capsys.readouterr()
    assert main(["vae", "--steps", "3", "--init", str(start), "--resume", "--out", str(tmp_path / "b"), *common]) == 2
    assert "freeze_latent: checkpoint true vs now false" in capsys.readouterr().err


def whole_and_tiled(vae, clip):
    """``clip`` decoded from its latent whole and in 32-pixel tiles."""
    with torch.no_grad():
        latent = vae.encode(clip, tiling=False)
        return (vae.decode(latent, clip[:, :, 7], tiling=False),
                vae.decode(latent, clip[:, :, 7], tiling=True, tile_size=32))


def test_a_composite_decoder_decodes_tiles_with_each_tiles_own_piece_of_the_content_frame():
    torch.manual_seed(0)
    vae = ReducioVAE(**composite_config()).eval()
    data = SyntheticClips(split="train", size=64, count=40)
    clip = data[next(i for i in range(40) if data.spec(i).camera == "pan" and not data.spec(i).sprites)]["video"][None]
    force_mix(vae, 0)
    whole, tiled = whole_and_tiled(vae, clip)
    # the same picture up to the tiles' borders, where a tile's border repeats instead of reaching into its
    # neighbour (measured: mean 0.0024, against 0.023 from the clip itself)
    assert (whole - tiled).abs().mean() < 0.01 < (whole - clip).abs().mean()


def test_a_tiled_composite_decode_leaves_the_callers_content_frame_alone():
    """The content frame enters the feature list as a copy: tiled features are blended in place."""
    torch.manual_seed(0)
    vae = ReducioVAE(**composite_config()).eval()
    clip = SyntheticClips(split="train", size=64, count=2)[0]["video"][None]
    content = clip[:, :, 7].clone()
    shared = content.expand(2, -1, -1, -1)          # a view: in-place writes into it would fail
    with torch.no_grad():
        latent = vae.encode(clip.expand(2, -1, -1, -1, -1), tiling=False)
        vae.decode(latent, shared, tiling=True, tile_size=32)
    assert torch.equal(content, clip[:, :, 7])


# ---------------------------------------------------------------------------------------------------
# one steady object motion per quarter cell (latent_motion 'measured-similarity+fine-objects')
# ---------------------------------------------------------------------------------------------------
def fine_config():
    config = composite_config()
    config["ddconfig"]["latent_motion"] = "measured-similarity+fine-objects"
    return config


def test_fine_objects_hold_each_sprites_motion_in_the_quarter_cell_it_covers():
    """Each sprite's motion against the camera (backward: scene shift - velocity, per frame) is the steady
    motion of the 16-pixel cell its centre is in at the content frame. Measured on the pan / still clips
    among the first 160 training clips: within 0.35 pixel per frame for 37 of 53 sprites alone in their
    clip and 50 of 62 in two-sprite clips (within 0.15: 28 and 39; the rest mostly sprites whose centre
    cell they soon leave, or that move nearly with the camera)."""
    data = SyntheticClips(split="train", size=64, count=160)
    found = {1: [0, 0], 2: [0, 0]}
    for index in range(160):
        spec = data.spec(index)
        if spec.camera not in ("pan", "still") or not spec.sprites:
            continue
        video = data[index]["video"][None]
        velocities = steady_object_velocities(video, camera_cells(video, 7, (4, 4)), 7, (4, 4))[0] * 64
        for sprite in spec.sprites:
            truth = torch.tensor([spec.scene_shift[k] - sprite.velocity[k] for k in (0, 1)])
            x, y = (sprite.start[k] + sprite.velocity[k] * 7 for k in (0, 1))
            row, col = min(3, max(0, int(y // 16))), min(3, max(0, int(x // 16)))
            found[len(spec.sprites)][0] += int((velocities[:, row, col] - truth).abs().max() <= 0.35)
            found[len(spec.sprites)][1] += 1
    assert all(total > 40 and right / total >= 0.65 for right, total in found.values()), found
    still = data[0]["video"][:, 7][None, :, None].expand(-1, -1, 16, -1, -1)
    assert steady_object_velocities(still, torch.zeros(1, 2, 16, 4, 4), 7, (4, 4)).abs().max() == 0
    # one frame: nothing can move (and nothing to divide by)
    one = steady_object_velocities(still[:, :, :1], torch.zeros(1, 2, 1, 4, 4), 0, (4, 4))
    assert one.shape == (1, 2, 4, 4) and one.abs().max() == 0


def test_fine_object_channels_hold_each_latent_cells_quarters_and_read_back_as_a_finer_grid():
    data = SyntheticClips(split="train", size=64, count=40)
    index = next(i for i in range(40) if data.spec(i).camera == "still" and len(data.spec(i).sprites) == 2)
    video = data[index]["video"][None]
    params = camera_similarity(video, 7)
    velocities = steady_object_velocities(video, camera_cells(video, 7, (4, 4), params), 7, (4, 4))
    offsets = (torch.arange(16.0) - 7).reshape(4, 4).mean(1)                       # -5.5, -1.5, 2.5, 6.5
    fine = (velocities[:, :, None] * offsets.reshape(1, 1, 4, 1, 1) * 8).clamp(-1.4, 1.4)   # [1, 2, 4, 4, 4] units
    units = measure_fine_objects(video, 7, 4, (2, 2), params)                      # [1, 8, 4, 2, 2]
    for row in range(4):
        for col in range(4):               # latent cell (row // 2, col // 2), quarter (row % 2, col % 2)
            quarter = 2 * (row % 2) + col % 2
            torch.testing.assert_close(units[0, 2 * quarter:2 * quarter + 2, :, row // 2, col // 2],
                                       fine[0, :, :, row, col])
    assert (velocities[0].abs().sum(0) > 0).sum() >= 2         # both sprites found, in some cell each
    # read back: the finer grid's flow in its own pixels (4 a side), 1/8 of the frame per unit
    torch.testing.assert_close(read_object_flow(torch.cat([torch.zeros(1, 2, 4, 2, 2), units], 1), split=2),
                               fine * 4 / 8)
    # in a model's latent (the test preset: 4 pixels per latent cell): channels 0-1 the camera, 2-9 the quarters
    torch.manual_seed(0)
    vae = ReducioVAE(**fine_config()).eval()
    with torch.no_grad():
        latent = vae.encode(video, tiling=False)
    motion = measure_motion(video, 7, tuple(latent.shape[2:]), "measured-similarity+fine-objects")
    torch.testing.assert_close(latent[:, :10], motion, atol=1e-4, rtol=0)


def test_a_fine_objects_decoder_moves_the_object_picture_by_each_quarter_cells_own_flow():
    torch.manual_seed(0)
    vae = ReducioVAE(**fine_config()).eval()
    decoder = vae.decoder
    image, video, hidden, refined, read = composite_inputs(decoder)
    objects = torch.zeros(1, 2, 16, 4, 4)        # 4 output pixels per quarter cell
    objects[:, 0, :, 0, 1] = 2.0 / 4             # 2 pixels right in the second quarter of the top row
    force_mix(vae, 1)
    with torch.no_grad():
        out = decoder._composite(video, hidden, image, refined, read, objects)
    torch.testing.assert_close(out[0, :, 5, :4, 4:8], image[0, :, :4, 6:10], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, :, 5, :4, :4], image[0, :, :4, :4], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, :, 5, 4:, :], image[0, :, 4:, :], atol=1e-5, rtol=0)


def test_a_fine_objects_model_takes_a_composite_models_weights_whole_and_decodes_tiles():
    """The kind changes what channels 2-9 hold, not the decoder: a tiny-composite model's weights load
    tensor for tensor (the shipped tiny-fine VAE was fine-tuned so); a tiled decode reads each tile's
    quarters at the whole frame's scale (the same picture up to the tiles' borders, as for one shift
    per latent cell above)."""
    torch.manual_seed(0)
    composite = ReducioVAE(**composite_config())
    vae = ReducioVAE(**fine_config()).eval()
    assert vae.load_state_dict(composite.state_dict(), strict=True)
    data = SyntheticClips(split="train", size=64, count=40)
    clip = data[next(i for i in range(40) if data.spec(i).camera == "still" and data.spec(i).sprites)]["video"][None]
    force_mix(vae, 1)
    whole, tiled = whole_and_tiled(vae, clip)
    assert (whole - tiled).abs().mean() < 0.01 < (whole - clip).abs().mean()
    config = fine_config()
    config["embed_dim"] = config["ddconfig"]["z_channels"] = 8
    with pytest.raises(ConfigError, match="at least 16 latent channels"):
        ReducioVAE(**config)
    # a warp level at the latent's own resolution would take one quarter's flow for the whole cell
    config = fine_config()
    config["ddconfig_2d"]["ch_mult"] = [1, 1, 1]
    config["ddconfig"].update(ch_fuse=[0, 1, 2], fuse_type=["warp", "attn+warp", "warp"])
    with pytest.raises(ConfigError, match="runs at 1x the latent's resolution"):
        ReducioVAE(**config)


def test_a_fine_objects_model_decodes_each_quarters_motion_where_that_quarter_is():
    """Through the model's own decode path (the latent read at the finer grid): a motion in one quarter
    of one latent cell moves the object picture there and nowhere else."""
    torch.manual_seed(0)
    vae = ReducioVAE(**fine_config()).eval()
    force_mix(vae, 1)
    clip = SyntheticClips(split="train", size=32, count=2)[0]["video"][None]
    content = clip[:, :, 7]
    latent = torch.zeros(1, 16, 4, 8, 8)                  # the test preset: 4 pixels per latent cell
    latent[:, 2 + 2 * 3, :, 1, 2] = 8 * 2 / 32             # quarter 3 (bottom right) of cell (1, 2): 2 px right
    with torch.no_grad():
        out = vae.decode(latent, content, tiling=False)
    moved = (out - content[:, :, None]).abs().amax((0, 1, 2)) > 1e-4     # [H, W]
    assert moved[6:8, 10:12].all()                          # that quarter: rows 6-7, columns 10-11
    moved[6:8, 10:12] = False
    assert not moved.any()
