"""Reducio-DiT nodes: load the model, build its image conditions, re-normalise the sampled latent.

Graph (image -> video): CLIPLoader(type pixart) + CLIPTextEncode -> ReducioImageToVideo (content
image, CLIP vision model, SD image VAE) -> KSampler(ReducioDiTLoader) -> ReducioRenormalizeLatent ->
ReducioVAEDecode (motion latent + the same content image) -> CreateVideo -> SaveVideo.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._compat import io
from ._folders import REDUCIO_FOLDER, register_model_folder
from .reducio_vae._layout import ReducioInputError, check_image

MODEL_FOLDERS = (REDUCIO_FOLDER, "diffusion_models")
UNCOND_MODES = {
    # mode: (drop text, drop CLIP, drop content) for the negative branch (spec §5.4)
    "null text": (1.0, 0.0, 0.0),
    "null all": (1.0, 1.0, 1.0),
    "negative prompt": (0.0, 0.0, 0.0),
}
MAX_RESOLUTION = 16384


def register() -> None:
    register_model_folder(REDUCIO_FOLDER)


def _model_files() -> list[str]:
    import folder_paths

    names: list[str] = []
    for folder in MODEL_FOLDERS:
        try:
            names.extend(n for n in folder_paths.get_filename_list(folder) if n not in names)
        except KeyError:  # folder not registered in this ComfyUI
            continue
    return names


def _resolve(name: str) -> str:
    import folder_paths

    for folder in MODEL_FOLDERS:
        try:
            path = folder_paths.get_full_path(folder, name)
        except KeyError:
            path = None
        if path:
            return path
    raise FileNotFoundError(f"Reducio-DiT file {name!r} not found in models/{REDUCIO_FOLDER} or models/diffusion_models")


class ReducioDiTLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ReducioDiTLoader",
            display_name="Load Reducio-DiT",
            category="Reducio",
            description="Loads a Reducio-DiT checkpoint (safetensors with its config in the metadata) as a MODEL "
                        "for KSampler / SamplerCustomAdvanced.",
            inputs=[
                io.Combo.Input("dit_name", options=_model_files(),
                               tooltip="Reducio-DiT .safetensors file from models/reducio or models/diffusion_models. "
                                       "PixArt-alpha checkpoints must be converted first "
                                       "(python -m reducio.convert pixart IN OUT)."),
                io.Combo.Input("weight_dtype", options=["default", "bf16", "fp16", "fp32"], default="default",
                               tooltip="Precision of the weights in memory; 'default' lets ComfyUI choose for the device."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, dit_name, weight_dtype="default") -> io.NodeOutput:
        from .reducio_dit_native import load_reducio_dit

        return io.NodeOutput(load_reducio_dit(_resolve(dit_name), weight_dtype))


def _clip_patch_tokens(clip_vision, image: torch.Tensor) -> torch.Tensor:
    """OpenCLIP-style patch tokens: squash-resize to the model's size (no crop), after the final LayerNorm
    (``ln_post``), CLS excluded, no projection (spec §2.3). ComfyUI's ``last_hidden_state`` of a CLIP ViT is
    taken *before* that LayerNorm, which is why this node needs the CLIP vision model itself."""
    vision = getattr(getattr(clip_vision, "model", None), "vision_model", None)
    post_norm = getattr(vision, "post_layernorm", None)
    if post_norm is None or getattr(vision, "output_layernorm", False):
        raise ValueError("ReducioImageToVideo needs a CLIP ViT vision model (OpenCLIP ViT-H/14, "
                         "e.g. clip_vision_h.safetensors); this CLIP vision model has no separate final LayerNorm")
    output = clip_vision.encode_image(image, crop=False)
    hidden = output["last_hidden_state"]
    weight = post_norm.weight.detach().to(device=hidden.device, dtype=torch.float32)
    bias = post_norm.bias.detach().to(device=hidden.device, dtype=torch.float32)
    tokens = F.layer_norm(hidden.float(), hidden.shape[-1:], weight, bias, eps=post_norm.eps)
    return tokens[:, 1:]


class ReducioImageToVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ReducioImageToVideo",
            display_name="Reducio Image to Video",
            category="Reducio",
            description="Attaches the content image's conditions (CLIP patch tokens and SD-VAE latent) to both "
                        "conditionings and makes the empty motion latent for Reducio-DiT.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="Text conditioning (T5-XXL via CLIPLoader type 'pixart')."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning; with uncond 'null text' (default) "
                                                          "the learned null text replaces it."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="OpenCLIP ViT-H/14 vision model (clip_vision_h); its patch "
                                            "tokens after the final LayerNorm condition the DiT. Leave it "
                                            "unconnected only for a DiT with the reduced conditioning "
                                            "clip_condition 'null' (e.g. the embedded tiny model)."),
                io.Vae.Input("vae", tooltip="The SD image VAE (sd-vae-ft-ema / SD1.x family) that encodes the "
                                            "content image into the 4-channel content latent."),
                io.Image.Input("content_image", tooltip="The content image (the first of a batch): frame 8 of 16 of "
                                                        "the generated clip. Feed the 'content_image' output to the "
                                                        "Reducio VAE decode, so both use the same pixels."),
                io.Int.Input("width", default=256, min=32, max=MAX_RESOLUTION, step=32,
                             tooltip="Video width in pixels (multiple of 32)."),
                io.Int.Input("height", default=256, min=32, max=MAX_RESOLUTION, step=32,
                             tooltip="Video height in pixels (multiple of 32)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Videos generated at once."),
                io.Int.Input("latent_frames", default=4, min=1, max=64,
                             tooltip="Latent frames T': 4 for the ft4 Reducio VAE (16 frames / 4), 8 for ft2."),
                io.Combo.Input("uncond", options=list(UNCOND_MODES), default="null text",
                               tooltip="What the negative (uncond) branch uses: 'null text' = learned null text with the "
                                       "real image conditions (default), 'null all' = nulls for text, CLIP and content, "
                                       "'negative prompt' = the negative conditioning's text."),
                io.Int.Input("latent_downscale", default=32, min=1, max=64,
                             tooltip="Pixels per latent cell of the Reducio VAE (32 for the official VAEs)."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
                io.Latent.Output(display_name="latent"),
                io.Image.Output(display_name="content_image"),
            ],
        )

    @classmethod
    def execute(cls, positive, negative, vae, content_image, width, height, batch_size,
                latent_frames=4, uncond="null text", latent_downscale=32, clip_vision=None) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils
        import node_helpers

        if width % 32 or height % 32:
            raise ValueError(f"width and height must be multiples of 32 (the Reducio VAE works on 32 px cells), "
                             f"got {width}x{height}")
        if width % latent_downscale or height % latent_downscale:
            raise ValueError(f"width and height must be multiples of latent_downscale {latent_downscale}")
        if uncond not in UNCOND_MODES:
            raise ValueError(f"uncond must be one of {list(UNCOND_MODES)}, got {uncond!r}")
        if not isinstance(content_image, torch.Tensor) or content_image.ndim != 4 or content_image.shape[-1] < 3:
            shape = list(content_image.shape) if isinstance(content_image, torch.Tensor) else type(content_image).__name__
            raise ValueError(f"content_image must be an IMAGE [B, H, W, 3], got {shape}")
        try:   # NaN / 0..255 / -1..1 pixels are refused (same rule as the Reducio VAE nodes)
            image = check_image(content_image[:1, :, :, :3], "content_image")
        except ReducioInputError as error:
            raise ValueError(f"ReducioImageToVideo: {error}") from error
        image = comfy.utils.common_upscale(image.movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)

        content_latent = vae.encode(image)
        if content_latent.ndim != 4 or content_latent.shape[1] != 4 or content_latent.shape[-1] * 8 != width:
            raise ValueError("the image VAE must be the SD image VAE (4 latent channels, 8x downscale, e.g. "
                             f"sd-vae-ft-ema); it produced a latent of shape {list(content_latent.shape)}")
        base = {"reducio_content_latent": content_latent}
        if clip_vision is not None:
            base["reducio_clip_tokens"] = _clip_patch_tokens(clip_vision, image)
        positive = node_helpers.conditioning_set_values(positive, {**base, "reducio_drop": torch.zeros(1, 3)})
        negative = node_helpers.conditioning_set_values(
            negative, {**base, "reducio_drop": torch.tensor([UNCOND_MODES[uncond]])})

        latent = torch.zeros([batch_size, 16, latent_frames, height // latent_downscale, width // latent_downscale],
                             device=comfy.model_management.intermediate_device())
        return io.NodeOutput(positive, negative, {"samples": latent}, image)


class ReducioRenormalizeLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ReducioRenormalizeLatent",
            display_name="Reducio Renormalize Latent",
            category="Reducio",
            description="Per-sample layer norm of a sampled motion latent (over C, T', h, w; no affine): the "
                        "statistics the Reducio VAE decoder was trained on. Put it between the sampler and the decode.",
            inputs=[io.Latent.Input("samples", tooltip="Motion latent from the sampler.")],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, samples) -> io.NodeOutput:
        from ..reducio.dit.sampling import renormalize_latent

        out = dict(samples)
        out["samples"] = renormalize_latent(samples["samples"])
        return io.NodeOutput(out)


NODES = [ReducioDiTLoader, ReducioImageToVideo, ReducioRenormalizeLatent]
