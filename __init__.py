"""reducio-fastattn: ComfyUI custom node pack.

ComfyUI imports this folder as a package and calls ``comfy_entrypoint`` (V3 node API). The pure
PyTorch packages ``reducio`` and ``fastattn`` never import ComfyUI and can be used on their own;
the nodes reach them through relative imports (``from ..reducio import ...``), because ComfyUI has
a top-level module of its own named ``nodes``.
"""
from .nodes import comfy_entrypoint  # noqa: F401

__all__ = ["comfy_entrypoint"]
