"""Reducio-DiT: the diffusion transformer that generates Reducio motion latents (pure PyTorch).

See ``docs/reducio_dit.md`` for usage and ``shared/spec/reducio_dit.md`` for the specification.
"""
from .checkpoint import (CheckpointError, ConfigError, check_state_dict, inspect_checkpoint, load_checkpoint,
                         read_checkpoint, save_checkpoint)
from .config import NAMED_CONFIGS, ReducioDiTConfig, get_config
from .model import ReducioDiT

__all__ = [
    "CheckpointError", "ConfigError", "NAMED_CONFIGS", "ReducioDiT", "ReducioDiTConfig", "check_state_dict", "get_config", "inspect_checkpoint",
    "load_checkpoint", "read_checkpoint", "save_checkpoint",
]
