"""Reducio VAE in ComfyUI: the REDUCIO_VAE socket type and its loader, encode and decode nodes.

User documentation: docs/reducio_vae_nodes.md. The model itself is the pure ``reducio`` package;
this sub-package only adapts it to ComfyUI (sockets, tensor layouts, model management, progress).
"""
from __future__ import annotations

from .._folders import REDUCIO_FOLDER, register_model_folder
from ._handle import ReducioVAEHandle
from ._nodes import NODES, ReducioVAE, ReducioVAEDecode, ReducioVAEEncode, ReducioVAELoader

__all__ = ["NODES", "register", "ReducioVAE", "ReducioVAEHandle", "ReducioVAELoader", "ReducioVAEEncode",
           "ReducioVAEDecode"]


def register() -> None:
    """Register the models/reducio folder (shared with Reducio-DiT; idempotent)."""
    register_model_folder(REDUCIO_FOLDER)
