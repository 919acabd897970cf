"""Reducio-DiT: the diffusion transformer that generates Reducio motion latents (pure PyTorch).

See ``docs/reducio_dit.md`` for usage and ``shared/spec/reducio_dit.md`` for the specification.
"""
from .checkpoint import CheckpointError, check_state_dict, load_checkpoint, read_checkpoint, save_checkpoint
from .config import NAMED_CONFIGS, ReducioDiTConfig, get_config
from .model import ReducioDiT

__all__ = [
    "CheckpointError", "NAMED_CONFIGS", "ReducioDiT", "ReducioDiTConfig", "check_state_dict", "get_config",
    "load_checkpoint", "read_checkpoint", "save_checkpoint",
]
