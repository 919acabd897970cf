"""reducio-fastattn: ComfyUI custom node pack.

ComfyUI imports this folder as a package and calls ``comfy_entrypoint`` (V3 node API). The pure
PyTorch packages ``reducio`` and ``fastattn`` never import ComfyUI and can be used on their own;
the nodes reach them through relative imports (``from ..reducio import ...``), because ComfyUI has
a top-level module of its own named ``nodes``.
"""
import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401
else:
    # Imported outside ComfyUI (e.g. by pytest while collecting the pure tests): there is no node
    # API to register with, and the pure packages are importable on their own.
    comfy_entrypoint = None

__all__ = ["comfy_entrypoint"]
