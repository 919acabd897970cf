"""Reducio-DiT as a native ComfyUI architecture (spec comfyui_integration.md §16).

Four pieces, so the stock KSampler / SamplerCustomAdvanced sample it like any built-in model:

* ``ReducioLatentFormat``: 16 channels (the model's ``in_channels``), 3 latent dims, no scale/shift:
  the DiT works in the VAE's per-sample layer-normed space already;
* ``ComfyReducioDiT``: the pure ``reducio.dit.ReducioDiT`` with ComfyUI's plumbing: ``comfy.ops``
  layers, a ``DIFFUSION_MODEL`` wrapper executor around the forward, every attention call through
  ``optimized_attention(..., transformer_options=...)`` with ``block_index`` / ``block_type`` /
  ``total_blocks`` / ``attn_kind`` set, and ``patches_replace["dit"][("double_block", i)]`` honoured;
* ``ReducioDiTModel`` (a ``BaseModel``): ``extra_conds`` pads the T5 tokens to a fixed length with a
  mask (so cond and uncond always batch together) and routes the image conditions;
* ``ReducioDiTModelConfig`` (a ``supported_models_base.BASE``): EPS on the linear-beta schedule,
  which ComfyUI calls ``"sqrt_linear"`` (its ``"linear"`` is SD's scaled-linear, wrong here).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.supported_models_base
import comfy.utils
from comfy.ldm.modules.attention import optimized_attention

from ..reducio.dit import ReducioDiT, ReducioDiTConfig
from ..reducio.dit.checkpoint import check_state_dict, inspect_checkpoint

# Conditioning keys set by ReducioImageToVideo (custom keys travel untouched through CONDITIONING).
COND_CLIP = "reducio_clip_tokens"
COND_CONTENT = "reducio_content_latent"
COND_DROP = "reducio_drop"          # [1, 3] floats: 1 = use the learned null for (text, clip, content)

# Activation memory per latent token, in ComfyUI's memory_required units; PixArt-alpha uses 0.5 per
# latent cell with 2x2 patches, i.e. 2.0 per token, and the blocks are the same width.
MEMORY_FACTOR_PER_TOKEN = 2.0


class ReducioLatentFormat(comfy.latent_formats.LatentFormat):
    latent_channels = 16
    latent_dimensions = 3
    scale_factor = 1.0

    def __init__(self, channels: int = 16):
        self.latent_channels = channels


class ComfyReducioDiT(ReducioDiT):
    """ReducioDiT constructed by ComfyUI: ``unet_model(**unet_config, device=..., operations=...)``."""

    # Tells the DiTFastAttn nodes that this model publishes block_index / attn_kind itself and calls
    # optimized_attention with transformer_options (their generic, block-index-tagged family).
    dfa_generic_attention = True

    def __init__(self, reducio_config: dict, image_model: str | None = None, device=None, dtype=None,
                 operations=None, **kwargs):
        super().__init__(ReducioDiTConfig.from_dict(reducio_config), operations=operations, device=device, dtype=dtype)
        self.dtype = dtype  # BaseModel.get_dtype() reads it
        self.patch_size = self.config.patch_size  # (pt, ph, pw): latent cells per token, for grid-aware tools

    def forward(self, x, timesteps, context, text_mask=None, clip_tokens=None, content_latent=None,
                reducio_drop=None, transformer_options={}, **kwargs):
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._forward, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                     transformer_options),
        ).execute(x, timesteps, context, text_mask, clip_tokens, content_latent, reducio_drop, transformer_options,
                  **kwargs)

    def _forward(self, x, timesteps, context, text_mask=None, clip_tokens=None, content_latent=None,
                 reducio_drop=None, transformer_options={}, **kwargs):
        drop = {"drop_text": None, "drop_clip": None, "drop_content": None}
        if reducio_drop is not None:
            flags = reducio_drop.reshape(x.shape[0], 3) > 0.5
            drop = {"drop_text": flags[:, 0], "drop_clip": flags[:, 1], "drop_content": flags[:, 2]}
        out = ReducioDiT.forward(self, x, timesteps, context, text_mask, clip_tokens, content_latent, **drop,
                                 options=transformer_options)
        return out[:, : self.config.in_channels]   # eps only; the learned-sigma channels are for training

    def attention(self, q, k, v, mask, *, layer, kind, attention_fn, options):
        options["block_index"] = layer
        options["block_type"] = "block"   # one kind of block (the DiTFastAttn nodes name layers "block.{i}")
        options["total_blocks"] = self.config.depth
        options["attn_kind"] = kind
        return optimized_attention(q, k, v, self.config.num_heads, mask=mask, transformer_options=options)

    def run_block(self, index, x, t0, context, attend, options):
        replace = options.get("patches_replace", {}).get("dit", {}).get(("double_block", index))
        if replace is None:
            return super().run_block(index, x, t0, context, attend, options)
        block = self.blocks[index]

        def original_block(args):
            opts = args["transformer_options"]

            def attend_with(q, k, v, mask, kind):
                return self.attention(q, k, v, mask, layer=index, kind=kind, attention_fn=None, options=opts)
            return {"img": block(args["img"], args["vec"], args["txt"], context.mask, attend_with)}

        args = {"img": x, "txt": context.for_block(index), "vec": t0, "transformer_options": options}
        return replace(args, {"original_block": original_block})["img"]


def fit_text(cross_attn: torch.Tensor, attention_mask: torch.Tensor | None, tokens: int):
    """Pad with zeros (mask 0) or truncate T5 tokens ``[B, L, C]`` to ``tokens``; returns (text, mask)."""
    batch, length = cross_attn.shape[:2]
    if attention_mask is None:
        mask = torch.ones(batch, length, dtype=torch.float32)
    else:
        mask = attention_mask.reshape(attention_mask.shape[0], -1)[:, :length].to(torch.float32)
        mask = mask.expand(batch, -1) if mask.shape[0] == 1 else mask
    if length >= tokens:
        return cross_attn[:, :tokens], mask[:, :tokens]
    return F.pad(cross_attn, (0, 0, 0, tokens - length)), F.pad(mask, (0, tokens - length))


class ReducioDiTModel(comfy.model_base.BaseModel):
    def __init__(self, model_config, model_type=comfy.model_base.ModelType.EPS, device=None):
        super().__init__(model_config, model_type, device=device, unet_model=ComfyReducioDiT)

    @property
    def reducio_config(self) -> ReducioDiTConfig:
        return self.diffusion_model.config

    def extra_conds(self, **kwargs):
        out = {}
        cfg = self.reducio_config
        cross_attn = kwargs.get("cross_attn", None)
        if cross_attn is None:
            raise ValueError("Reducio-DiT needs text conditioning (T5 tokens from CLIPLoader type 'pixart' + "
                             "CLIPTextEncode)")
        if cross_attn.shape[-1] != cfg.caption_channels:
            raise ValueError(f"Reducio-DiT expects T5 text tokens of width {cfg.caption_channels} (CLIPLoader type "
                             f"'pixart' with a t5xxl file), got width {cross_attn.shape[-1]}")
        text, mask = fit_text(cross_attn, kwargs.get("attention_mask", None), cfg.text_tokens)
        out["c_crossattn"] = comfy.conds.CONDRegular(text)
        out["text_mask"] = comfy.conds.CONDRegular(mask)
        clip = kwargs.get(COND_CLIP, None)
        if clip is None and cfg.clip_condition == "tokens":
            raise ValueError("this Reducio-DiT is conditioned on CLIP image tokens: connect a CLIP vision model "
                             "(OpenCLIP ViT-H/14, clip_vision_h) to ReducioImageToVideo's clip_vision input")
        if clip is not None:
            out["clip_tokens"] = comfy.conds.CONDRegular(clip)
        content = kwargs.get(COND_CONTENT, None)
        if content is not None:
            out["content_latent"] = comfy.conds.CONDRegular(content)
        drop = kwargs.get(COND_DROP, None)
        if drop is None:
            drop = torch.zeros(1, 3)
        out["reducio_drop"] = comfy.conds.CONDRegular(drop.reshape(-1, 3).to(torch.float32))
        return out


class ReducioDiTModelConfig(comfy.supported_models_base.BASE):
    unet_config = {"image_model": "reducio_dit"}
    unet_extra_config = {}
    sampling_settings = {"beta_schedule": "sqrt_linear", "linear_start": 1e-4, "linear_end": 0.02, "timesteps": 1000}
    latent_format = ReducioLatentFormat
    memory_usage_factor = MEMORY_FACTOR_PER_TOKEN
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    vae_key_prefix = []
    text_encoder_key_prefix = []

    def __init__(self, config: ReducioDiTConfig):
        super().__init__({"image_model": "reducio_dit", "reducio_config": config.to_dict()})
        self.latent_format.latent_channels = config.in_channels
        self.sampling_settings = {"beta_schedule": "sqrt_linear", "linear_start": config.beta_start,
                                  "linear_end": config.beta_end, "timesteps": config.num_train_timesteps}
        # memory_required counts latent cells; a (1,2,2) patch puts 4 cells in one token
        self.memory_usage_factor = MEMORY_FACTOR_PER_TOKEN / math.prod(config.patch_size)

    def get_model(self, state_dict, prefix="", device=None):
        return ReducioDiTModel(self, device=device)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_reducio_dit(path: str, weight_dtype: str = "default") -> comfy.model_patcher.ModelPatcher:
    """Read a Reducio-DiT safetensors file (config in its metadata), check it strictly, return a MODEL.
    The config and every key and shape are checked from the header before any tensor is read or any
    module built (a tiny file claiming depth 20000 is refused at once)."""
    config, _ = inspect_checkpoint(path)
    state_dict, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    check_state_dict(state_dict, config, metadata, source=path)
    model_config = ReducioDiTModelConfig(config)
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    if weight_dtype in DTYPES:
        dtype = DTYPES[weight_dtype]
    elif weight_dtype == "default":
        dtype = comfy.model_management.unet_dtype(model_params=comfy.utils.calculate_parameters(state_dict),
                                                  supported_dtypes=model_config.supported_inference_dtypes)
    else:
        raise ValueError(f"weight_dtype must be 'default' or one of {sorted(DTYPES)}, got {weight_dtype!r}")
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    model = model_config.get_model(state_dict, "", device=offload_device)
    missing, unexpected = model.diffusion_model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:  # check_state_dict makes this unreachable; keep the guarantee explicit
        raise RuntimeError(f"{path}: missing {missing}, unexpected {unexpected}")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
