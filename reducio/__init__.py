"""Reducio: image-conditioned video VAE and Reducio-DiT, in pure PyTorch (no ComfyUI import)."""
from .dit import ReducioDiT, ReducioDiTConfig  # noqa: E402,F401  (Reducio-DiT, helper dit)
