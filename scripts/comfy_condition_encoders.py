"""DiT training conditions computed by ComfyUI itself, exactly as the stock graph computes them.

For ``python -m reducio.train encode --encoders scripts.comfy_condition_encoders:factory`` run with a
ComfyUI's Python from the repository root (``COMFYUI_PATH`` or ``~/comfy/ComfyUI``). The embedded tiny
DiT is trained on these, so at inference the graph's own nodes feed it the same features:

* text: ``CLIPLoader`` (type pixart) on the embedded T5-base stand-in + ``CLIPTextEncode``'s call
  (``encode_from_tokens_scheduled``), padded / truncated to the DiT's ``text_tokens`` the way the native
  model's ``extra_conds`` does;
* content latent: the embedded TAESD-format stand-in through ``comfy.sd.VAE.encode`` after the same
  resize ``ReducioImageToVideo`` applies;
* CLIP tokens: zeros -- the embedded DiT uses the reduced conditioning ``clip_condition: "null"``.

tests/comfy/test_embedded_standins.py checks these against the nodes' own outputs.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from reducio import embedded


def _import_comfy():
    root = Path(os.environ.get("COMFYUI_PATH", Path.home() / "comfy" / "ComfyUI")).expanduser()
    if not (root / "comfy").is_dir():
        raise RuntimeError(f"no ComfyUI at {root}: set COMFYUI_PATH (scripts/setup_comfyui.sh installs one)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True   # imported outside main.py: parse nothing, stay on the CPU
    import comfy.model_management  # noqa: F401


def pad_text(cond: torch.Tensor, mask: torch.Tensor | None, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeros with mask 0 past the prompt, or truncation (the native model's ``fit_text``)."""
    batch, length = cond.shape[:2]
    mask = torch.ones(batch, length) if mask is None else mask.reshape(batch, -1)[:, :length].float()
    if length >= tokens:
        return cond[:, :tokens], mask[:, :tokens]
    return F.pad(cond, (0, 0, 0, tokens - length)), F.pad(mask, (0, tokens - length))


class ComfyConditionEncoders:
    name = "comfyui-embedded-standins"
    version = 1

    def __init__(self, dit_config, models_dir: str | Path | None = None):
        _import_comfy()
        import comfy.sd
        from safetensors.torch import load_file

        if dit_config.clip_condition != "null":
            raise ValueError("these encoders provide no CLIP image tokens: use a DiT config with "
                             "clip_condition 'null' (the embedded tiny DiT's reduced conditioning)")
        self.cfg = dit_config
        paths = embedded.write_standins(models_dir or embedded.MODELS_DIR / "generated")
        self.clip = comfy.sd.load_clip([str(paths["t5base"])], clip_type=comfy.sd.CLIPType.PIXART)
        self.vae = comfy.sd.VAE(sd=load_file(str(paths["taesd"])))
        # Synthetic captions repeat (about 1 in 4 of 2000), and T5 on a CPU takes about a second each.
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "text_encoder": embedded.TEXT_ENCODER.sha256,
                "image_vae": embedded.IMAGE_VAE.sha256, "text_tokens": self.cfg.text_tokens,
                "caption_channels": self.cfg.caption_channels, "clip_condition": "null"}

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows, masks = [], []
        for caption in captions:
            if caption not in self._text_cache:
                # what CLIPTextEncode does
                conditioning = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(caption))
                cond, extra = conditioning[0][0], conditioning[0][1]
                self._text_cache[caption] = pad_text(cond.float(), extra.get("attention_mask"), self.cfg.text_tokens)
            text, mask = self._text_cache[caption]
            rows.append(text)
            masks.append(mask)
        return torch.cat(rows), torch.cat(masks)

    def encode_clip(self, images: torch.Tensor) -> torch.Tensor:
        return torch.zeros(images.shape[0], self.cfg.clip_tokens, self.cfg.clip_channels)

    @torch.no_grad()
    def encode_content(self, images: torch.Tensor) -> torch.Tensor:
        import comfy.utils

        pixels = ((images.float() + 1) / 2).clamp(0, 1)                    # [B, 3, H, W] -> ComfyUI IMAGE
        height, width = pixels.shape[-2:]
        pixels = comfy.utils.common_upscale(pixels, width, height, "bilinear", "center").movedim(1, -1)
        return torch.cat([self.vae.encode(pixels[i:i + 1]).float() for i in range(pixels.shape[0])])


def factory(dit_config) -> ComfyConditionEncoders:
    return ComfyConditionEncoders(dit_config)
