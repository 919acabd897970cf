"""Stand-in model files, in the real file formats, for running the Reducio-DiT workflows on CPU.

Built with ComfyUI's own model classes (imported in-process, tier-2 style) so the key layouts are
exactly what the stock loaders detect; weights are random. What each stands in for:

| workflow file name                     | stand-in                                                        |
|----------------------------------------|-----------------------------------------------------------------|
| t5xxl_fp16.safetensors (CLIPLoader)    | a T5-*base* encoder (768 wide). T5-XXL's config is fixed in     |
|                                        | ComfyUI (24 layers x 4096, 4.7 B params), so no tiny XXL file   |
|                                        | can exist; ComfyUI routes a base-size T5 file to its T5-base    |
|                                        | text model, and the tiny DiT takes 768-wide text.               |
| clip_vision_h.safetensors              | a random ViT-L/14 (the smallest CLIP ViT ComfyUI detects; H/14  |
|                                        | is 632 M params): 256 patch tokens x 1024.                      |
| vae-ft-ema-560000-ema-pruned.safetensors | a TAESD-format VAE (SD latent space, 4 channels, /8).         |
| v1-5-pruned-emaonly-fp16.safetensors   | an SD1.5 checkpoint with a 1-level UNet (model_channels 320, as |
|                                        | SD1.5 detection requires), the real CLIP-L text model, TAESD VAE|
| reducio_dit_xl.safetensors             | the `tiny` Reducio-DiT adapted to the stand-ins' widths         |
| reducio-ft4-fs32-attn23.safetensors    | the golden tiny Reducio VAE (8 latent channels, /8 spatially)   |
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DIT_NAME = "reducio_dit_xl.safetensors"
REDUCIO_VAE_NAME = "reducio-ft4-fs32-attn23.safetensors"
T5_NAME = "t5xxl_fp16.safetensors"
CLIP_VISION_NAME = "clip_vision_h.safetensors"
IMAGE_VAE_NAME = "vae-ft-ema-560000-ema-pruned.safetensors"
SD15_NAME = "v1-5-pruned-emaonly-fp16.safetensors"
CONTENT_IMAGE_NAME = "reducio_content_example.png"

# the tiny golden Reducio VAE: 8 latent channels, 8x spatial, 4x temporal
VAE_LATENT_CHANNELS, VAE_SPATIAL = 8, 8


def _random_like(shapes: dict[str, torch.Size], seed: int, dtype=torch.float16, std=0.02) -> dict[str, torch.Tensor]:
    """Random weights for a key -> shape map; norm weights 1, biases 0 so activations keep a scale."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        lower = key.lower()
        if "norm" in lower and key.endswith("weight"):
            out[key] = torch.ones(shape, dtype=dtype)
        elif key.endswith("bias") or len(shape) == 0:
            out[key] = torch.zeros(shape, dtype=dtype)
        else:
            out[key] = (torch.randn(shape, generator=g) * std).to(dtype)
    return out


def _shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def tiny_dit_config():
    from reducio.dit import get_config

    return get_config("tiny", in_channels=VAE_LATENT_CHANNELS, vae_spatial_factor=VAE_SPATIAL, caption_channels=768,
                      text_tokens=16, clip_channels=1024, clip_tokens=256)


def write_dit(folder: Path) -> Path:
    from reducio.dit import ReducioDiT, save_checkpoint

    torch.manual_seed(0)
    model = ReducioDiT(tiny_dit_config())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    save_checkpoint(model, folder / DIT_NAME)
    return folder / DIT_NAME


def write_reducio_vae(folder: Path, golden_dir: Path) -> Path:
    base = golden_dir / "reducio"
    config = json.loads((base / "tiny_config.json").read_text())["constructor_kwargs"]
    save_file(load_file(str(base / "tiny_weights.safetensors")), str(folder / REDUCIO_VAE_NAME),
              metadata={"reducio_config": json.dumps(config), "format": "pt"})
    return folder / REDUCIO_VAE_NAME


def write_t5_base(folder: Path, comfy_root: Path) -> Path:
    import comfy.ops
    import comfy.text_encoders.t5

    config = json.loads((comfy_root / "comfy" / "text_encoders" / "t5_config_base.json").read_text())
    model = comfy.text_encoders.t5.T5(config, torch.float16, "cpu", comfy.ops.manual_cast)
    shapes = _shapes(model)
    tensors = _random_like(shapes, seed=1, std=0.05)
    save_file(tensors, str(folder / T5_NAME))
    return folder / T5_NAME


def write_clip_vision_l(folder: Path, comfy_root: Path) -> Path:
    import comfy.clip_vision

    model = comfy.clip_vision.ClipVisionModel(str(comfy_root / "comfy" / "clip_vision_config_vitl.json"))
    tensors = _random_like(_shapes(model.model), seed=2)
    del model
    save_file(tensors, str(folder / CLIP_VISION_NAME))
    return folder / CLIP_VISION_NAME


def taesd_state_dict(seed: int = 3) -> dict[str, torch.Tensor]:
    import comfy.taesd.taesd

    tensors = _random_like(_shapes(comfy.taesd.taesd.TAESD()), seed=seed, dtype=torch.float32, std=0.05)
    tensors["vae_scale"] = torch.tensor(1.0)
    tensors["vae_shift"] = torch.tensor(0.0)
    return tensors


def write_image_vae(folder: Path) -> Path:
    save_file(taesd_state_dict(), str(folder / IMAGE_VAE_NAME))
    return folder / IMAGE_VAE_NAME


def write_sd15_checkpoint(folder: Path) -> Path:
    import comfy.sd1_clip
    import comfy.supported_models

    unet = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[1], transformer_depth=[1],
                channel_mult=[1], transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
                num_heads=8, num_head_channels=-1, use_temporal_attention=False, use_temporal_resblock=False,
                transformer_depth_output=[1, 1])
    config = comfy.supported_models.SD15(unet)
    config.set_inference_dtype(torch.float16, None)
    unet_shapes = _shapes(config.get_model({}, "").diffusion_model)
    clip_shapes = _shapes(comfy.sd1_clip.SDClipModel(dtype=torch.float16).transformer)
    tensors = {f"model.diffusion_model.{k}": v for k, v in _random_like(unet_shapes, seed=4).items()}
    clip = _random_like(clip_shapes, seed=5)
    if "text_projection.weight" in clip:
        clip["text_projection.weight"] = torch.eye(*clip["text_projection.weight"].shape, dtype=torch.float16)
    tensors.update({f"cond_stage_model.transformer.{k}": v for k, v in clip.items()})
    tensors.update({f"first_stage_model.{k}": v.half() for k, v in taesd_state_dict(seed=6).items()})
    save_file(tensors, str(folder / SD15_NAME))
    return folder / SD15_NAME


def write_content_image(input_dir: Path) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(8)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 80), torch.linspace(0, 1, 96), indexing="ij")
    rgb = torch.stack([ys, xs, 0.5 + 0.5 * torch.sin(6 * xs * ys)], -1) * 0.8 + 0.2 * torch.rand(80, 96, 3, generator=g)
    Image.fromarray((rgb.clamp(0, 1) * 255).byte().numpy()).save(input_dir / CONTENT_IMAGE_NAME)
    return input_dir / CONTENT_IMAGE_NAME


def write_all(models_dir: Path, input_dir: Path, golden_dir: Path, comfy_root: Path) -> None:
    folders = {name: models_dir / name for name in ("reducio", "text_encoders", "clip_vision", "vae", "checkpoints")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    write_dit(folders["reducio"])
    write_reducio_vae(folders["reducio"], golden_dir)
    write_t5_base(folders["text_encoders"], comfy_root)
    write_clip_vision_l(folders["clip_vision"], comfy_root)
    write_image_vae(folders["vae"])
    write_sd15_checkpoint(folders["checkpoints"])
    write_content_image(input_dir)


def adapt_prompt_to_standins(prompt: dict, steps: int | None = None) -> dict:
    """The shipped API workflow with only what the stand-ins need changed: the video size (64 px, so the
    tiny /8 Reducio VAE decodes fast), the Reducio VAE's cell size (8 px) and, optionally, the step count."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "ReducioImageToVideo":
            inputs.update(width=64, height=64, latent_downscale=VAE_SPATIAL)
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        if steps is not None and node["class_type"] == "KSampler":
            inputs["steps"] = steps
    return prompt
