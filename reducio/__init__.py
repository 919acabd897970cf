"""Reducio: image-conditioned video VAE and Reducio-DiT, in pure PyTorch (no ComfyUI import)."""
from .vae import ReducioVAE

__all__ = ["ReducioVAE"]
