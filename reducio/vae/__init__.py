"""The Reducio video VAE in pure PyTorch (inference only). See docs/reducio_vae.md."""
from .config import OFFICIAL_PARAM_COUNTS, official_config
from .checkpoint import CheckpointError, ConfigError
from .hooks import ReducioInterrupted, StepHooks
from .memory import choose_tile_size, estimate_memory
from .model import ReducioVAE
from .posterior import DiagonalGaussian, normalize_latent
from .tiling import TileLayout

__all__ = ["ReducioVAE", "DiagonalGaussian", "normalize_latent", "official_config", "OFFICIAL_PARAM_COUNTS",
           "ReducioInterrupted", "StepHooks", "TileLayout", "CheckpointError", "ConfigError", "estimate_memory",
           "choose_tile_size"]
