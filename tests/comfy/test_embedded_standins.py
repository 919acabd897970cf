"""Tier 2: the embedded tiny DiT's stand-in condition encoders are what the stock ComfyUI loaders build
and load: the shape manifest equals ComfyUI's own classes, and the generated files load through
``comfy.sd.load_clip`` (type pixart, the graph's CLIPLoader) and ``comfy.sd.VAE`` (VAELoader)."""
import json

import torch


def test_shape_manifest_is_comfyuis(comfy, comfy_install):
    import comfy.ops
    import comfy.taesd.taesd
    import comfy.text_encoders.t5

    from reducio import embedded

    manifest = json.loads(embedded.SHAPES_FILE.read_text())
    config = json.loads((comfy_install.root / "comfy" / "text_encoders" / "t5_config_base.json").read_text())
    t5 = comfy.text_encoders.t5.T5(config, torch.float16, "cpu", comfy.ops.manual_cast)
    assert manifest["t5base"] == {k: list(v.shape) for k, v in t5.state_dict().items()}
    taesd = comfy.taesd.taesd.TAESD()
    assert manifest["taesd"] == {k: list(v.shape) for k, v in taesd.state_dict().items()}


def test_generated_files_load_with_the_stock_loaders(comfy, tmp_path):
    import comfy.sd
    from safetensors.torch import load_file

    from reducio import embedded

    paths = embedded.write_standins(tmp_path)
    clip = comfy.sd.load_clip([str(paths["t5base"])], clip_type=comfy.sd.CLIPType.PIXART)
    left = clip.encode_from_tokens(clip.tokenize("the camera pans left over the coffee photo"), return_dict=True)
    right = clip.encode_from_tokens(clip.tokenize("the camera pans right over the coffee photo"), return_dict=True)
    assert left["cond"].shape[-1] == 768 and torch.isfinite(left["cond"]).all()
    assert not torch.allclose(left["cond"], right["cond"])          # the words reach the features
    vae = comfy.sd.VAE(sd=load_file(str(paths["taesd"])))
    latent = vae.encode(torch.rand(1, 64, 64, 3))
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()


def test_training_conditions_equal_what_the_graph_feeds_the_dit(comfy, tmp_path, monkeypatch):
    """scripts/comfy_condition_encoders.py (the embedded DiT's training features) against the stock
    CLIPTextEncode node and ReducioImageToVideo without a CLIP vision model, on the same stand-ins."""
    nodes = comfy   # the in-process ComfyUI fixture (the name comfy is rebound by the import below)
    import comfy.sd
    from safetensors.torch import load_file

    from reducio import embedded
    from reducio.dit import get_config
    from scripts.comfy_condition_encoders import ComfyConditionEncoders

    cfg = get_config("tiny", caption_channels=768, text_tokens=24, clip_condition="null")
    encoders = ComfyConditionEncoders(cfg, models_dir=tmp_path)
    caption = "the camera pans left over the coffee photo; a red disc moves down"
    video_frame = torch.rand(1, 3, 64, 64) * 2 - 1
    text, mask = encoders.encode_text([caption])
    content = encoders.encode_content(video_frame)

    paths = embedded.write_standins(tmp_path)
    clip = comfy.sd.load_clip([str(paths["t5base"])], clip_type=comfy.sd.CLIPType.PIXART)
    vae = comfy.sd.VAE(sd=load_file(str(paths["taesd"])))
    (positive,) = nodes.execute("CLIPTextEncode", text=caption, clip=clip)
    image = ((video_frame + 1) / 2).movedim(1, -1)
    out_pos, _, latent, _ = nodes.execute("ReducioImageToVideo", positive=positive, negative=positive, vae=vae,
                                          content_image=image, width=64, height=64, batch_size=1,
                                          latent_frames=4, uncond="null text", latent_downscale=32)
    graph_text = positive[0][0][:, :24]
    torch.testing.assert_close(text, graph_text.float(), atol=0, rtol=0)
    assert mask.shape == (1, 24) and bool((mask == 1).all())
    graph_content = out_pos[0][1]["reducio_content_latent"]
    torch.testing.assert_close(content, graph_content.float(), atol=1e-6, rtol=0)
    assert "reducio_clip_tokens" not in out_pos[0][1]
    assert latent["samples"].shape == (1, 16, 4, 2, 2)
    assert encoders.encode_clip(video_frame).shape == (1, cfg.clip_tokens, cfg.clip_channels)
