"""Tiny randomly initialised native ComfyUI DiTs for the DiTFastAttn tests and bench.

Configs from spec comfyui_integration.md section 18, version-aware (Flux's ``txt_ids_dims`` only
exists from 0.4-ish on). Weights are drawn from a seeded generator: comfy ops leave them
uninitialised. Conditioning is random tensors of the model's text width (no text encoder).
"""
from __future__ import annotations

import inspect
import sys

import torch


def _finish(cfg, seed: int, std: float = 0.02):
    import comfy.model_management as mm
    import comfy.model_patcher

    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "", device=mm.unet_offload_device())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def wan_config(dim=64, layers=2, heads=4):
    return dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=32, in_dim=16,
                dim=dim, ffn_dim=2 * dim, freq_dim=32, text_dim=32, out_dim=16, num_heads=heads,
                num_layers=layers, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)


def tiny_wan(seed=0, **kw):
    import comfy.supported_models

    return _finish(comfy.supported_models.WAN21_T2V(wan_config(**kw)), seed)


def flux_config(hidden=64, double=2, single=2, heads=4):
    import comfy.ldm.flux.model as flux_model

    cfg = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=8, context_in_dim=32,
               hidden_size=hidden, mlp_ratio=2, num_heads=heads, depth=double, depth_single_blocks=single,
               axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False)
    if "txt_ids_dims" in inspect.signature(flux_model.FluxParams).parameters:
        cfg["txt_ids_dims"] = []
    return cfg


def tiny_flux(seed=0, **kw):
    import comfy.supported_models

    return _finish(comfy.supported_models.FluxSchnell(flux_config(**kw)), seed)


def tiny_sd3(seed=0, depth=2):
    import comfy.supported_models

    cfg = dict(in_channels=16, patch_size=2, out_channels=16, depth=depth, input_size=None,
               adm_in_channels=8, context_embedder_config={"target": "torch.nn.Linear",
                                                           "params": {"in_features": 32, "out_features": 64 * depth}},
               num_patches=256, pos_embed_max_size=16, pos_embed_scaling_factor=None,
               x_block_self_attn_layers=[])
    patcher = _finish(comfy.supported_models.SD3(cfg), seed)
    # pos_embed is a buffer that comfy ops leave uninitialised (real checkpoints carry it)
    generator = torch.Generator().manual_seed(seed + 1)
    pos_embed = patcher.model.diffusion_model.pos_embed
    pos_embed.copy_(torch.randn(pos_embed.shape, generator=generator) * 0.02)
    return patcher


def tiny_hunyuan_video(seed=0):
    import comfy.ldm.hunyuan_video.model as hv
    import comfy.supported_models

    cfg = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=8, context_in_dim=32,
               hidden_size=64, mlp_ratio=2, num_heads=4, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6],
               theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=False)
    params = inspect.signature(hv.HunyuanVideoParams).parameters
    for key, value in dict(byt5=False, meanflow=False, use_cond_type_embedding=False, vision_in_dim=None,
                           meanflow_sum=False).items():
        if key in params:
            cfg[key] = value
    return _finish(comfy.supported_models.HunyuanVideo(cfg), seed)


def tiny_pixart(seed=0):
    import comfy.supported_models

    cfg = dict(image_model="pixart_sigma", num_heads=4, patch_size=2, hidden_size=64, in_channels=4, depth=2,
               model_max_length=16, input_size=8, pe_interpolation=1, micro_condition=False, caption_channels=32)
    return _finish(comfy.supported_models.PixArtSigma(cfg), seed)


def conditioning(length=7, width=32, seed=1, pooled=None):
    generator = torch.Generator().manual_seed(seed)
    extra = {}
    if pooled is not None:
        extra["pooled_output"] = torch.randn(1, pooled, generator=generator)
    return [[torch.randn(1, length, width, generator=generator), extra]]


def video_latent(batch=1, frames=3, size=8):
    return {"samples": torch.zeros(batch, 16, frames, size, size)}


def image_latent(batch=1, channels=16, size=8):
    return {"samples": torch.zeros(batch, channels, size, size)}


class PackModules:
    """The pack's DiTFastAttn modules as ComfyUI's loader imported them (package name is a path)."""

    def __init__(self, comfy):
        import sys

        base = comfy.pack_module.__name__ + ".nodes.fastattn_nodes"
        import importlib

        self.nodes_pkg = importlib.import_module(base)
        self.patcher = importlib.import_module(base + ".patcher")
        self.apply_node = importlib.import_module(base + ".apply_node")
        self.calibrate_node = importlib.import_module(base + ".calibrate_node")
        self.plan_io = importlib.import_module(base + ".plan_io_nodes")
        self.report_node = importlib.import_module(base + ".report_node")
        self.families = importlib.import_module(base + ".families")
        self.fastattn_plan = importlib.import_module(comfy.pack_module.__name__ + ".fastattn.plan")
        self.comfy = comfy
        self._sys = sys

    @property
    def Plan(self):
        return self.fastattn_plan.Plan

    @property
    def PlanMismatchError(self):
        return self.fastattn_plan.PlanMismatchError

    def sample(self, model, pos, neg, latent, *, steps=4, cfg=2.0, sampler="euler", scheduler="simple",
               seed=0, denoise=1.0):
        (out,) = self.comfy.nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, pos, neg, latent,
                                                  denoise=denoise)
        return out["samples"]

    def calibrate(self, model, pos, neg, latent, *, steps=4, cfg=2.0, sampler="euler", scheduler="simple",
                  seed=0, denoise=1.0, threshold=0.1, **kw):
        plan, out, session = self.calibrate_node.calibrate_plan(
            model, positive=pos, negative=neg, latent=latent, seed=seed, steps=steps, cfg=cfg,
            sampler_name=sampler, scheduler=scheduler, denoise=denoise, threshold=threshold, **kw)
        return plan, out["samples"], session

    def apply(self, model, plan, **kw):
        return self.apply_node.patch_model_with_plan(model, plan, **kw)

    def full_plan(self, model, steps, sampler="euler"):
        """An all-full_attn plan for ``model`` (no metadata checks beyond layers)."""
        family = self.families.detect_family(model)
        layers = family.layer_names(model.model.diffusion_model)
        return self.Plan([["full_attn"] * len(layers) for _ in range(steps)],
                         {"layer_names": layers, "architecture": family.name})


def cosmos_predict2_config(model_channels=256):
    """Cosmos-Predict2 as UNETLoader detects it from a state dict (model_channels, in_channels
    read from the weights; 10 blocks and 16 heads are the detector's defaults for unknown widths)."""
    return dict(image_model="cosmos_predict2", max_img_h=240, max_img_w=240, max_frames=128, in_channels=16,
                out_channels=16, patch_spatial=2, patch_temporal=1, model_channels=model_channels,
                concat_padding_mask=True, crossattn_emb_channels=1024, pos_emb_cls="rope3d",
                pos_emb_learnable=True, pos_emb_interpolation="crop", min_fps=1, max_fps=30,
                use_adaln_lora=True, adaln_lora_dim=256)


def tiny_cosmos_predict2(seed=0, model_channels=256):
    import comfy.model_detection

    return _finish(comfy.model_detection.model_config_from_unet_config(cosmos_predict2_config(model_channels)), seed)


def write_diffusion_model_file(model_patcher, path, dtype=torch.bfloat16):
    """Save the diffusion model's weights as a safetensors file that stock UNETLoader loads."""
    import safetensors.torch

    state = {k: v.detach().to(dtype).contiguous() for k, v in model_patcher.model.diffusion_model.state_dict().items()}
    safetensors.torch.save_file(state, str(path))
    return path


def lotus_conditioning():
    """The conditioning core's ``LotusConditioning`` node outputs (width 1024, no text encoder)."""
    import comfy_extras.nodes_lotus as lotus

    result = lotus.LotusConditioning.execute()
    return result.result[0] if hasattr(result, "result") else result[0]


def tiny_ltxv(seed=0, layers=2, heads=4, head_dim=16, text_width=32):
    """LTXV (``LTXVModel``) with 128 latent channels (its latent format) and a small width.

    Only constructor keywords present in both 0.3.64 and 0.8.0 are passed (0.8.0 added
    ``use_middle_indices_grid`` / ``timestep_scale_multiplier`` with defaults)."""
    import comfy.supported_models

    cfg = dict(image_model="ltxv", in_channels=128, cross_attention_dim=heads * head_dim,
               attention_head_dim=head_dim, num_attention_heads=heads, caption_channels=text_width,
               num_layers=layers)
    return _finish(comfy.supported_models.LTXV(cfg), seed)


def ltxv_conditioning(length=6, width=32, seed=1, frame_rate=25):
    """LTXV conditioning: the text tokens plus the ``attention_mask`` (integer 0/1, as the text
    encoder gives it; LTXV turns only a non-float mask into an additive bias) and ``frame_rate`` keys its
    ``extra_conds`` reads (the LTXV text encoder node would add them)."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, length, width, generator=generator),
             {"attention_mask": torch.ones(1, length, dtype=torch.long), "frame_rate": frame_rate}]]


# ------------------------------------------------------------------ shared by the tier-2 family tests
def spy_calls(fa, monkeypatch):
    """Record (layer, prefix tokens, suffix tokens, token grid) of every attention the patched run takes."""
    run_state = sys.modules[fa.patcher.RunState.__module__]
    seen = []
    original = run_state.RunState.attend

    def spy(self, **kw):
        seen.append((kw["layer"], kw["prefix_tokens"], kw["suffix_tokens"], kw["token_grid"]))
        return original(self, **kw)

    monkeypatch.setattr(run_state.RunState, "attend", spy)
    return seen


def mixed_plan(fa, model, steps=4):
    """A plan of full attention at step 0, then output sharing and residual window attention alternating."""
    layers = fa.families.detect_family(model).layer_names(model.model.diffusion_model)
    rows = [["full_attn"] * len(layers)]
    for t in range(1, steps):
        rows.append([("output_share" if (i + t) % 2 else "residual_window_attn") for i in range(len(layers))])
    return fa.Plan(rows, {"layer_names": layers})
