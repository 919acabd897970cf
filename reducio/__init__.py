"""Reducio: image-conditioned video VAE and Reducio-DiT, in pure PyTorch (no ComfyUI import)."""
from .vae import ReducioVAE
from .dit import ReducioDiT, ReducioDiTConfig

__all__ = ["ReducioVAE", "ReducioDiT", "ReducioDiTConfig"]
