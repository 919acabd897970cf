"""Tiny models and features for tests and benchmarks (random weights, seconds to build on a CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..dit import get_config
from ..files import atomic_write_safetensors
from ..vae import ReducioVAE
from ..vae.checkpoint import CONFIG_METADATA_KEY, VARIANT_METADATA_KEY


def write_test_vae(path, preset: str = "test", seed: int = 0) -> Path:
    """A randomly initialised VAE of a ``VAE_PRESETS`` entry, saved the way the trainer saves one."""
    from .vae_trainer import VAE_PRESETS

    torch.manual_seed(seed)
    vae = ReducioVAE(**VAE_PRESETS[preset]())
    meta = {CONFIG_METADATA_KEY: json.dumps(vae.config, sort_keys=True), VARIANT_METADATA_KEY: vae.variant}
    return atomic_write_safetensors(vae.state_dict(), meta, path, overwrite=True, create_folder=True)


def write_test_dit_config(path, vae_preset: str = "test") -> Path:
    """The ``tiny`` DiT config resized to a test VAE's latent (channels, spatial factor)."""
    from .vae_trainer import VAE_PRESETS

    config = VAE_PRESETS[vae_preset]()
    spatial = 2 ** (len(config["ddconfig"]["ch_mult"]) - 1)
    frames = config["ddconfig"]["temp_res"] // 2 ** config["ddconfig"]["f_t"]
    dit = get_config("tiny", in_channels=config["embed_dim"], vae_spatial_factor=spatial, latent_frames=frames)
    path = Path(path)
    path.write_text(dit.to_json())
    return path
