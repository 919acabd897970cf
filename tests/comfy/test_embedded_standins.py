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
