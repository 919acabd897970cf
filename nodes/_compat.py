"""The one place that imports ComfyUI's node API.

``comfy_api.latest`` is what ComfyUI's own ``comfy_extras`` use; ``comfy_api.v0_0_2`` is the pinned
alias that exists from 0.3.64 on. Prefer ``latest`` and fall back to the pinned one if a future
ComfyUI moves it.
"""
try:
    from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401
except ImportError:  # pragma: no cover - depends on the ComfyUI version
    from comfy_api.v0_0_2 import ComfyExtension, io, ui  # noqa: F401
